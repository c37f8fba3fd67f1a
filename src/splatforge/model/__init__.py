"""The splat container (:class:`Splats`), initialisation and the hard cap."""

from splatforge.model.gaussians import cap_gaussians, init_from_points, init_random
from splatforge.model.splats import SPLAT_KEYS, Activated, Splats

__all__ = ["SPLAT_KEYS", "Activated", "Splats", "cap_gaussians", "init_from_points", "init_random"]
