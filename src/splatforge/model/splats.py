"""``Splats``: the one container of a Gaussian splat scene, in gsplat's trainer layout.

Fields (parameter space, the values training optimises and every file format stores):

=============== =============== ==========================================================
``means``       ``[N, 3]``      centres, world units
``quats``       ``[N, 4]``      rotations, **wxyz**, any non-zero length (not normalised)
``scales``      ``[N, 3]``      **log** of the standard deviations along the local axes
``opacities``   ``[N]``         **logit** of the opacity
``sh0``         ``[N, 1, 3]``   SH DC coefficient per colour channel
``shN``         ``[N, K-1, 3]`` higher SH bands, K = (degree + 1)^2 (``[N, 0, 3]`` for degree 0)
=============== =============== ==========================================================

The arrays are numpy arrays or torch tensors (all of one kind). The conversions live here and
nowhere else: :meth:`Splats.numpy` / :meth:`Splats.torch`, :meth:`Splats.activated` (``exp`` of the
scales, ``sigmoid`` of the opacities, the SH coefficients concatenated) and
:meth:`Splats.rasterize` (the arguments of :func:`splatforge.raster.rasterize`). A ``Splats`` also
reads like gsplat's ``splats`` dict (``splats["means"]``, ``keys()``, ``dict(splats)``), so code
written for gsplat's ``ParameterDict`` works on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from scipy.special import expit
from torch import Tensor

from splatforge.errors import DataFormatError
from splatforge.geometry.sh import num_sh_bases

__all__ = ["SPLAT_KEYS", "Activated", "Splats"]

#: The six fields, in the order of gsplat's trainer.
SPLAT_KEYS = ("means", "quats", "scales", "opacities", "sh0", "shN")

Array = Union[np.ndarray, Tensor]  # noqa: UP007


@dataclass(eq=False)
class Activated:
    """The activated values :func:`splatforge.raster.rasterize` takes: ``means [N, 3]`` (world),
    ``quats [N, 4]`` (wxyz, as stored), ``scales [N, 3]`` (``exp``: world units), ``opacities
    [N]`` (``sigmoid``: in [0, 1]), ``colors [N, K, 3]`` (SH coefficients, the first
    ``(sh_degree + 1)^2``; or the pair ``(sh0, shN)``, see :meth:`Splats.activated`) and
    ``sh_degree``."""

    means: Array
    quats: Array
    scales: Array
    opacities: Array
    colors: Array | tuple[Tensor, Tensor]
    sh_degree: int

    def __getitem__(self, key: str) -> Array:
        """``a["means"]`` as ``a.means`` (the dict habit of gsplat-style code)."""
        return getattr(self, key)


@dataclass(eq=False)
class Splats:
    """N Gaussians in parameter space (see the module docstring for shapes and spaces).

    Raises (from :meth:`validate`, called by the constructors that read outside data):
        DataFormatError: inconsistent shapes.
    """

    means: Array
    quats: Array
    scales: Array
    opacities: Array
    sh0: Array
    shN: Array

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | Splats, source: str = "splats") -> Splats:
        """From any mapping with the six keys (a dict, gsplat's ``ParameterDict``, a Splats). The
        arrays are taken as they are (no copy); shapes are checked.

        Raises:
            DataFormatError: a missing key or inconsistent shapes (``source`` names the origin).
        """
        if isinstance(m, Splats):
            return m
        missing = [k for k in SPLAT_KEYS if k not in m]
        if missing:
            raise DataFormatError(f"{source}: missing splat field(s) {missing}")
        return cls(*(m[k] for k in SPLAT_KEYS)).validate(source)

    @classmethod
    def empty(cls, sh_degree: int = 0) -> Splats:
        """Zero Gaussians (numpy float32) with room for ``sh_degree``."""
        z = lambda *s: np.zeros(s, np.float32)
        return cls(z(0, 3), z(0, 4), z(0, 3), z(0), z(0, 1, 3), z(0, num_sh_bases(sh_degree) - 1, 3))

    def validate(self, source: str = "splats") -> Splats:
        """Check the shapes against ``means [N, 3]``; returns self.

        Raises:
            DataFormatError: a field of the wrong shape, or ``shN`` not ``[N, (d+1)^2 - 1, 3]``.
        """
        n = self.means.shape[0] if self.means.ndim == 2 else -1
        want = {"means": (n, 3), "quats": (n, 4), "scales": (n, 3), "opacities": (n,), "sh0": (n, 1, 3)}
        for key, shape in want.items():
            got = tuple(getattr(self, key).shape)
            if got != shape:
                raise DataFormatError(f"{source}: {key} has shape {list(got)}, expected {list(shape)}")
        shN = tuple(self.shN.shape)
        k = shN[1] + 1 if len(shN) == 3 else -1
        if len(shN) != 3 or shN[0] != n or shN[2] != 3 or math.isqrt(k) ** 2 != k:
            raise DataFormatError(f"{source}: shN has shape {list(shN)}, expected [{n}, (degree + 1)^2 - 1, 3]")
        return self

    # ------------------------------------------------------------------ mapping protocol
    def __getitem__(self, key: str) -> Array:
        if key not in SPLAT_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in SPLAT_KEYS

    def keys(self) -> tuple[str, ...]:
        return SPLAT_KEYS

    def items(self) -> Iterator[tuple[str, Array]]:
        return ((k, getattr(self, k)) for k in SPLAT_KEYS)

    def as_dict(self) -> dict[str, Array]:
        return dict(self.items())

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return int(self.means.shape[0])

    @property
    def num_gaussians(self) -> int:
        return len(self)

    @property
    def sh_degree(self) -> int:
        """The SH degree the coefficients hold: ``sqrt(1 + shN.shape[1]) - 1``."""
        return math.isqrt(1 + int(self.shN.shape[1])) - 1

    @property
    def is_torch(self) -> bool:
        return isinstance(self.means, Tensor)

    # ------------------------------------------------------------------ conversions
    def numpy(self) -> Splats:
        """float32 numpy arrays on the host (detached copies of tensors; arrays as they are if
        already float32)."""
        conv = lambda a: a.detach().cpu().float().numpy() if isinstance(a, Tensor) else np.asarray(a, np.float32)
        return Splats(*(conv(getattr(self, k)) for k in SPLAT_KEYS))

    def torch(self, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> Splats:
        """Tensors of ``dtype`` on ``device`` (default: where they are, or the CPU for numpy)."""

        def conv(a):
            t = a if isinstance(a, Tensor) else torch.from_numpy(np.ascontiguousarray(a))
            return t.to(device=device if device is not None else t.device, dtype=dtype)

        return Splats(*(conv(getattr(self, k)) for k in SPLAT_KEYS))

    def detach(self) -> Splats:
        """Tensors cut from the autograd graph (numpy arrays unchanged); no copy."""
        return Splats(*(a.detach() if isinstance(a, Tensor) else a for a in (getattr(self, k) for k in SPLAT_KEYS)))

    def select(self, keep: Array) -> Splats:
        """The Gaussians picked by ``keep`` (``[N]`` bool mask or integer indices)."""
        if self.is_torch and not isinstance(keep, Tensor):
            keep = torch.as_tensor(np.asarray(keep), device=self.means.device)
        elif not self.is_torch and isinstance(keep, Tensor):
            keep = keep.cpu().numpy()
        return Splats(*(getattr(self, k)[keep] for k in SPLAT_KEYS))

    def alphas(self) -> Array:
        """``[N]`` activated opacities, ``sigmoid(opacities)``, in [0, 1]."""
        return torch.sigmoid(self.opacities) if self.is_torch else expit(np.asarray(self.opacities, np.float64))

    def activated(self, sh_degree: int | None = None, sh_parts: bool = False) -> Activated:
        """Activated values (see :class:`Activated`); ``sh_degree`` keeps the first
        ``(sh_degree + 1)^2`` coefficients (default: all). Differentiable for tensors.
        ``sh_parts`` (tensors only): ``colors`` is the pair ``(sh0 [N, 1, 3], shN [N, K - 1, 3])``
        instead of their concatenation, which :func:`splatforge.raster.rasterize` also takes
        (the cpu kernels read the parts in place: no copy, no split of the gradient)."""
        deg = self.sh_degree if sh_degree is None else min(int(sh_degree), self.sh_degree)
        k = num_sh_bases(deg)
        if self.is_torch:
            parts = (self.sh0, self.shN[:, : k - 1])
            colors = parts if sh_parts else torch.cat(parts, dim=1)
            return Activated(self.means, self.quats, torch.exp(self.scales), torch.sigmoid(self.opacities), colors, deg)
        colors = np.concatenate([np.asarray(self.sh0), np.asarray(self.shN)[:, : k - 1]], axis=1)
        return Activated(
            np.asarray(self.means),
            np.asarray(self.quats),
            np.exp(np.asarray(self.scales, np.float64)),
            expit(np.asarray(self.opacities, np.float64)),
            colors,
            deg,
        )

    def rasterize(
        self, viewmats: Tensor, Ks: Tensor, width: int, height: int, *, sh_degree: int | None = None, **kwargs: Any
    ):
        """Render with :func:`splatforge.raster.rasterize`: ``viewmats [C, 4, 4]`` world-to-camera
        (OpenCV axes), ``Ks [C, 3, 3]`` pixels, ``width`` x ``height`` pixels; ``sh_degree``
        (default: all the coefficients hold) and the other keyword arguments as ``rasterize``.
        Numpy splats are converted to float32 tensors on the cameras' device first.

        Returns ``(render [C, H, W, D], alpha [C, H, W, 1], info)``.
        """
        from splatforge.raster import rasterize

        s = self if self.is_torch else self.torch(viewmats.device)
        a = s.activated(sh_degree, sh_parts=True)
        return rasterize(
            a.means,
            a.quats,
            a.scales,
            a.opacities,
            a.colors,
            viewmats,
            Ks,
            width,
            height,
            sh_degree=a.sh_degree,
            **kwargs,
        )
