"""Typed errors for splatforge: every error the library raises on purpose derives from
:class:`SplatforgeError`, so callers (the CLI, the job server) can tell a user's bad input from a
bug. Messages name the file, argument or value at fault."""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "DataFormatError",
    "SplatforgeError",
    "TrainingError",
    "TrainingProcessError",
    "UnsupportedCameraModel",
]


class SplatforgeError(Exception):
    """Base class of every error splatforge raises deliberately."""


class BackendUnavailableError(SplatforgeError):
    """A requested rasterization backend cannot run here (missing package, no CUDA device,
    tensors on the wrong device). The message says what is missing and how to get it."""


class ConfigError(SplatforgeError, ValueError):
    """An argument or configuration value is invalid (wrong shape, dtype, range or choice)."""


class DataFormatError(SplatforgeError, ValueError):
    """An input file or folder is missing, truncated or not in the expected format."""


class UnsupportedCameraModel(DataFormatError):
    """A camera model splatforge cannot use directly and cannot undistort."""


class TrainingProcessError(SplatforgeError):
    """A process of a sharded training run failed or lost the others; the run can continue
    from its last checkpoint with ``--resume``."""


class TrainingError(SplatforgeError):
    """Training cannot go on from the current Gaussians (e.g. every one has become transparent,
    so MCMC has none to relocate onto); the message says at which step and what to check."""
