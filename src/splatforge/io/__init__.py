"""File formats: pure functions with readers as well as writers (numpy in and out)."""

from splatforge.io.cameras import cameras_json, read_cameras_json, write_cameras_json, write_colmap_model
from splatforge.io.ply import SPLAT_KEYS, read_ply, write_ply
from splatforge.io.sog import write_sog
from splatforge.io.splat import read_splat, write_splat
from splatforge.io.spz import read_spz, write_spz

__all__ = [
    "SPLAT_KEYS",
    "cameras_json",
    "read_cameras_json",
    "read_ply",
    "read_splat",
    "read_spz",
    "write_cameras_json",
    "write_colmap_model",
    "write_ply",
    "write_sog",
    "write_splat",
    "write_spz",
]
