"""Differentiable Gaussian rasterization: one :func:`rasterize`, three backends.

- ``cpu``: ours, compiled with numba and parallel over tiles, hand-written backward.
- ``gsplat``: gsplat's CUDA kernels, for CUDA tensors (imported only then).
- ``reference``: slow, readable pure torch; the oracle the tests compare against.

Importing this package compiles nothing and never imports gsplat.
"""

from splatforge.errors import BackendUnavailableError
from splatforge.raster.api import (
    BACKENDS,
    RENDER_MODES,
    available_backends,
    rasterize,
    resolve_backend,
    transmittance_stats,
)

__all__ = [
    "BACKENDS",
    "RENDER_MODES",
    "BackendUnavailableError",
    "available_backends",
    "rasterize",
    "resolve_backend",
    "transmittance_stats",
]
