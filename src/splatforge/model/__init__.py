"""Gaussian parameters (gsplat's trainer layout), initialisation and the hard cap."""

from splatforge.model.gaussians import activated, cap_gaussians, init_from_points, init_random

__all__ = ["activated", "cap_gaussians", "init_from_points", "init_random"]
