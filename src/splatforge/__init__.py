"""splatforge: captures in, 3D Gaussian Splatting models and their dataset products out.

Importing this package has no side effects: no device is touched, no kernel is compiled and
gsplat is not imported (its CUDA build starts only for CUDA tensors).
"""

from splatforge.errors import (
    BackendUnavailableError,
    ConfigError,
    DataFormatError,
    SplatforgeError,
    UnsupportedCameraModel,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "DataFormatError",
    "SplatforgeError",
    "UnsupportedCameraModel",
    "__version__",
]
