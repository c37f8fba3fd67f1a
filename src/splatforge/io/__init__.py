"""File formats: pure functions with readers as well as writers."""

from splatforge.io.cameras import cameras_json, write_cameras_json
from splatforge.io.ply import SPLAT_KEYS, read_ply, write_ply

__all__ = ["SPLAT_KEYS", "cameras_json", "read_ply", "write_cameras_json", "write_ply"]
