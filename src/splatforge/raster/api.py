"""``rasterize``: the one entry point every part of splatforge renders through."""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

import torch
from torch import Tensor

from splatforge.errors import BackendUnavailableError, ConfigError
from splatforge.geometry.sh import num_sh_bases
from splatforge.raster.constants import DEFAULT_NEAR_PLANE

__all__ = [
    "BACKENDS",
    "DEPTH_MODES",
    "RENDER_MODES",
    "available_backends",
    "inverse_depths",
    "rasterize",
    "resolve_backend",
]

BACKENDS = ("auto", "cpu", "gsplat", "reference")
RENDER_MODES = ("RGB", "D", "ED", "ID", "MD", "RGB+D", "RGB+ED", "RGB+ID", "RGB+MD")
#: Render modes whose last channel is a depth (``D``/``ED``/``MD``: camera z; ``ID``: inverse depth).
DEPTH_MODES = {
    "D": "D",
    "ED": "ED",
    "ID": "ID",
    "MD": "MD",
    "RGB+D": "D",
    "RGB+ED": "ED",
    "RGB+ID": "ID",
    "RGB+MD": "MD",
}
RASTERIZE_MODES = ("classic", "antialiased")
GSPLAT_VERSION = "1.5.3"


def _gsplat_installed() -> bool:
    # find_spec only looks for the package: nothing of gsplat is imported or compiled here.
    return importlib.util.find_spec("gsplat") is not None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can render tensors on ``device``, without importing or building gsplat."""
    device = torch.device(device)
    if device.type == "cpu":
        return ["cpu", "reference"]
    out = ["reference"]
    if device.type == "cuda" and _gsplat_installed():
        out.insert(0, "gsplat")
    return out


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device``.

    ``auto`` is ``gsplat`` for CUDA tensors when gsplat is installed, ``cpu`` for CPU tensors.

    Raises:
        ConfigError: unknown backend name.
        BackendUnavailableError: the backend cannot run on ``device`` (says what is missing).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda" and _gsplat_installed():
            return "gsplat"
        raise BackendUnavailableError(
            f"no compiled backend for tensors on {device}: the cpu backend needs CPU tensors and the "
            f"gsplat backend needs CUDA tensors and gsplat=={GSPLAT_VERSION} "
            "(a splatforge dependency: reinstall splatforge)"
        )
    if backend == "cpu" and device.type != "cpu":
        raise BackendUnavailableError(
            f"the cpu backend needs CPU tensors, got tensors on {device}; move them with .cpu()"
        )
    if backend == "gsplat":
        if device.type != "cuda":
            raise BackendUnavailableError(
                f"the gsplat backend needs CUDA tensors, got tensors on {device}; use backend='cpu' here"
            )
        if not _gsplat_installed():
            raise BackendUnavailableError(
                f"the gsplat backend needs gsplat=={GSPLAT_VERSION} (a splatforge dependency): reinstall splatforge"
            )
    return backend


def _check(name: str, t: Any, shape: tuple, device: torch.device) -> None:
    """Shape/dtype/device check; ``shape`` holds ints or None (any size)."""
    if not isinstance(t, Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ConfigError(f"{name} must have shape {want}, got {list(t.shape)}")
    if not t.is_floating_point():
        raise ConfigError(f"{name} must be a floating point tensor, got {t.dtype}")
    if t.device != device:
        raise ConfigError(f"{name} is on {t.device} but means is on {device}; put all inputs on one device")


def inverse_depths(depths: Tensor, radii: Tensor) -> Tensor:
    """``1 / depths`` ``[C, N]`` where a Gaussian is drawn (``radii > 0``, so ``z >= near``), 0
    where it is culled; culled entries get no gradient (never ``0 * inf``)."""
    drawn = (radii > 0).all(dim=-1) & (depths > 0)
    safe = torch.where(drawn, depths, torch.ones_like(depths))
    return torch.where(drawn, 1.0 / safe, torch.zeros_like(depths))


def _check_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height) -> tuple[torch.device, int, int]:
    """Shapes, devices and image size shared by every entry point; returns ``(device, N, C)``."""
    device = means.device if isinstance(means, Tensor) else torch.device("cpu")
    _check("means", means, (None, 3), device)
    N = means.shape[0]
    _check("quats", quats, (N, 4), device)
    _check("scales", scales, (N, 3), device)
    _check("opacities", opacities, (N,), device)
    _check("viewmats", viewmats, (None, 4, 4), device)
    C = viewmats.shape[0]
    _check("Ks", Ks, (C, 3, 3), device)
    if C == 0:
        raise ConfigError("viewmats must hold at least one camera, got 0")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise ConfigError(f"width and height must be positive ints, got {width!r} x {height!r}")
    return device, N, C


def _check_options(rasterize_mode: str, near_plane: float, far_plane: float, eps2d: float) -> None:
    """The options every entry point shares."""
    if rasterize_mode not in RASTERIZE_MODES:
        raise ConfigError(f"rasterize_mode must be one of {RASTERIZE_MODES}, got {rasterize_mode!r}")
    if not near_plane < far_plane:
        raise ConfigError(f"near_plane ({near_plane}) must be smaller than far_plane ({far_plane})")
    if not eps2d >= 0:
        raise ConfigError(f"eps2d must be >= 0 (pixels^2), got {eps2d}")


def _check_dtypes(backend: str, *tensors: Tensor) -> None:
    """The cpu backend's kernels are compiled for float32."""
    if backend == "cpu" and any(t.dtype != torch.float32 for t in tensors):
        raise ConfigError("the cpu backend needs float32 tensors; call .float() on the inputs")


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int | None = None,
    near_plane: float = DEFAULT_NEAR_PLANE,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    backgrounds: Tensor | None = None,
    render_mode: Literal["RGB", "D", "ED", "ID", "MD", "RGB+D", "RGB+ED", "RGB+ID", "RGB+MD"] = "RGB",
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
    absgrad: bool = False,
    backend: Literal["auto", "cpu", "gsplat", "reference"] = "auto",
    distributed: bool = False,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Render N 3D Gaussians into C pinhole cameras, differentiably.

    Same meaning as ``gsplat.rasterization`` (gsplat 1.5.3, ``packed=False``): EWA splatting
    (Zwicker et al. 2002) as in 3D Gaussian Splatting (Kerbl et al. 2023), with gsplat's constants
    (eps2d blur, opacity-aware 3.33-sigma radius, 16 px tiles, alpha <= 0.999, skip alpha < 1/255,
    stop before T <= 1e-4).

    Args:
        means: ``[N, 3]`` centres, world units.
        quats: ``[N, 4]`` rotations, **wxyz**, any non-zero length (normalised inside).
        scales: ``[N, 3]`` standard deviations, **activated** (world units, not log space).
        opacities: ``[N]`` **activated** opacities in [0, 1] (not logits).
        colors: ``[N, D]`` or ``[C, N, D]`` features when ``sh_degree`` is None, else SH
            coefficients ``[N, K, 3]`` with ``K >= (sh_degree + 1) ** 2`` (rendered as
            ``max(SH(dir) + 0.5, 0)`` with ``dir`` from the camera centre to the Gaussian), or
            those coefficients as the pair ``(sh0 [N, 1, 3], shN [N, K - 1, 3])``, the
            parameters as trainers hold them: the cpu backend reads them in place (no
            concatenated copy, and each gets its own gradient), the others concatenate them.
        viewmats: ``[C, 4, 4]`` world-to-camera matrices, OpenCV axes (+x right, +y down, +z
            forward).
        Ks: ``[C, 3, 3]`` intrinsics in pixels; pixel centres are at integer + 0.5.
        width, height: image size in pixels.
        sh_degree: SH degree 0..3 to evaluate, or None for plain colours.
        near_plane, far_plane: camera-z culling range, world units.
        eps2d: screen-space dilation added to the 2D covariance diagonal, pixels^2.
        backgrounds: ``[C, D]`` colour behind the Gaussians, or None for black/zero.
        render_mode: ``RGB``; ``D`` accumulated depth ``sum_i w_i z_i``; ``ED`` expected depth
            ``D / alpha``; ``ID`` accumulated inverse depth ``sum_i w_i / z_i`` (1 / world
            units: what Inria's 2024 depth regularisation renders and compares with an aligned
            monocular prior; not divided by alpha); ``MD`` median depth, the camera z of the
            Gaussian at which the transmittance first drops to 0.5 or below (2DGS's, Huang et al.
            2024; 0 where alpha stays below 0.5), **no gradient**, composited by the cpu kernel on
            CPU tensors and by the pure-torch reference on other devices (gsplat has no median
            mode); the depth is that of the point on the pixel's ray where that Gaussian's 3D
            density peaks (``t = d^T A mu / d^T A d`` for the ray ``t d``, ``d = K^-1 (x, y, 1)``,
            ``A`` the inverse covariance, ``mu`` the centre, camera frame: the ray-Gaussian
            intersection of RaDe-GS/Gaussian Opacity Fields), not the centre's z, so flat
            Gaussians seen at an angle give the depth of their plane; ``RGB+D`` / ``RGB+ED`` /
            ``RGB+ID`` / ``RGB+MD`` append it as the last channel.
            Depth is camera z, world units; its background is 0. gsplat has no ``ID`` mode: its
            backend renders ``1/z`` as a feature channel, the same sum.
        rasterize_mode: ``classic``, or ``antialiased`` (Mip-Splatting, Yu et al. 2024: opacities
            times ``sqrt(det(cov2d) / det(cov2d + eps2d I))``).
        absgrad: also provide ``info["means2d"].absgrad`` after backward (AbsGS): the sum over
            pixels of the absolute per-pixel gradients.
        backend: ``auto`` (gsplat on CUDA, cpu on CPU), ``cpu`` (ours, compiled, float32 CPU
            tensors), ``gsplat`` (CUDA), or ``reference`` (slow pure torch, any device/dtype).
        distributed: gsplat's distributed mode (torch.distributed initialised; every rank calls
            this): the Gaussians are this rank's shard, the C cameras this rank's views (the same
            C, width and height on every rank). Every rank projects its shard into the cameras of
            all ranks; the projected Gaussians go to the rank that renders each camera through
            one autograd-aware all-to-all (:func:`splatforge.raster.collectives.all_to_all`), so
            each rank gets the images of its own cameras from every Gaussian, and the gradients
            come back to the shards that own them. ``info``'s per-Gaussian entries are then
            ``[C_world, N, ...]`` (every rank's cameras in rank order, this rank's Gaussians:
            what densification reads), ``n_cameras`` is ``C_world`` (gsplat puts the local C
            there; splatforge's trainer takes the mean loss over the world's views, so the
            strategy's statistics need the world's count), and ``gaussian_counts`` lists every
            rank's N. Not with ``absgrad``.

    Returns:
        ``render [C, H, W, D']`` (D' = D, or 3/4 with depth, 1 for depth only),
        ``alpha [C, H, W, 1]``, and ``info`` with gsplat's keys: ``means2d [C, N, 2]`` (pixels,
        non-leaf: ``.grad`` after backward once ``retain_grad()`` was called), ``radii [C, N, 2]``
        int32 pixels, ``depths [C, N]``, ``conics [C, N, 3]``, ``opacities [C, N]``, ``width``,
        ``height``, ``n_cameras``, ``gaussian_ids`` (None: unpacked layout), ``backend``.

    Raises:
        ConfigError: bad shapes, dtypes, devices or option values; in distributed mode, ranks
            whose camera counts or image sizes differ.
        BackendUnavailableError: the requested backend cannot run here.
    """
    device, N, C = _check_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height)
    if render_mode not in RENDER_MODES:
        raise ConfigError(f"render_mode must be one of {RENDER_MODES}, got {render_mode!r}")
    _check_options(rasterize_mode, near_plane, far_plane, eps2d)
    if sh_degree is None:
        _check(
            "colors", colors, (N, None) if isinstance(colors, Tensor) and colors.dim() == 2 else (C, N, None), device
        )
    elif isinstance(colors, (tuple, list)):
        if len(colors) != 2:
            raise ConfigError(
                f"colors as SH coefficients in parts must be the pair (sh0, shN), got {len(colors)} tensors"
            )
        _check("colors[0] (sh0)", colors[0], (N, 1, 3), device)
        _check("colors[1] (shN)", colors[1], (N, None, 3), device)
        n_coeffs = 1 + colors[1].shape[1]
    else:
        _check("colors", colors, (N, None, 3), device)
        n_coeffs = colors.shape[1]
    if sh_degree is not None and n_coeffs < num_sh_bases(sh_degree):
        raise ConfigError(
            f"sh_degree={sh_degree} needs {num_sh_bases(sh_degree)} SH coefficients per channel, colors has {n_coeffs}"
        )
    D_in = 3 if sh_degree is not None else colors.shape[-1]
    if backgrounds is not None:
        _check("backgrounds", backgrounds, (C, D_in if "RGB" in render_mode else None), device)

    name = resolve_backend(backend, device)
    parts = list(colors) if isinstance(colors, (tuple, list)) else [colors]
    _check_dtypes(name, means, quats, scales, opacities, *parts, viewmats, Ks)
    if len(parts) == 2 and name != "cpu":  # only the cpu kernels read the parts in place
        colors = torch.cat(parts, dim=1)
    if DEPTH_MODES.get(render_mode) == "MD":
        if distributed:
            raise ConfigError("median depth (MD) is not available in distributed rendering")
        render, alpha, info = rasterize(
            means,
            quats,
            scales,
            opacities,
            colors,
            viewmats,
            Ks,
            width,
            height,
            sh_degree=sh_degree,
            near_plane=near_plane,
            far_plane=far_plane,
            eps2d=eps2d,
            backgrounds=backgrounds,
            render_mode="RGB" if render_mode == "RGB+MD" else "D",
            rasterize_mode=rasterize_mode,
            absgrad=absgrad,
            backend=name,
        )
        with torch.no_grad():
            median = _median_depth(
                name,
                means,
                quats,
                scales,
                opacities,
                viewmats,
                Ks,
                width,
                height,
                near_plane=near_plane,
                far_plane=far_plane,
                eps2d=eps2d,
                rasterize_mode=rasterize_mode,
            )
        return (
            (torch.cat([render, median.to(render.dtype)], -1) if render_mode == "RGB+MD" else median.to(render.dtype)),
            alpha,
            info,
        )
    world = _world(distributed, absgrad, device, N, C, width, height)
    if world is not None and sh_degree is None and colors.dim() == 3:
        raise ConfigError(
            "distributed rendering takes colours [N, D] or SH coefficients, not per-camera colours [C, N, D]"
        )
    if name == "gsplat":
        from splatforge.raster import gsplat_backend

        if world is not None and render_mode in ("ID", "RGB+ID"):
            raise ConfigError(
                "the gsplat backend has no inverse-depth mode in distributed rendering; use RGB+ED or the cpu backend"
            )
        render, alpha, info = gsplat_backend.rasterize(
            means,
            quats,
            scales,
            opacities,
            colors,
            viewmats,
            Ks,
            width,
            height,
            sh_degree=sh_degree,
            near_plane=near_plane,
            far_plane=far_plane,
            eps2d=eps2d,
            backgrounds=backgrounds,
            render_mode=render_mode,
            rasterize_mode=rasterize_mode,
            absgrad=absgrad,
            distributed=world is not None,
        )
        if world is not None:
            info["n_cameras"], info["gaussian_counts"] = C * world[0], world[1]
        return render, alpha, info
    if name == "cpu":
        from splatforge.raster import cpu as impl
    else:
        from splatforge.raster import reference as impl  # type: ignore[no-redef]

    antialiased = rasterize_mode == "antialiased"
    C_local = C
    if world is not None:  # project into every rank's cameras
        from splatforge.raster.collectives import all_gather_same

        viewmats = all_gather_same(viewmats.detach()).flatten(0, 1)
        Ks = all_gather_same(Ks.detach()).flatten(0, 1)
        C = viewmats.shape[0]
    proj = impl.project(
        means,
        quats,
        scales,
        opacities,
        viewmats,
        Ks,
        width,
        height,
        eps2d=eps2d,
        near_plane=near_plane,
        far_plane=far_plane,
        antialiased=antialiased,
    )
    opac = opacities[None, :].expand(C, N)
    if proj.compensations is not None:
        opac = opac * proj.compensations

    if sh_degree is None:
        feats = colors if colors.dim() == 3 else colors[None].expand(C, N, colors.shape[-1])
    else:
        feats = torch.clamp_min(impl.sh_colors(means, colors, viewmats, sh_degree, proj.radii) + 0.5, 0.0)

    bgs = backgrounds
    depth_kind = DEPTH_MODES.get(render_mode)
    if depth_kind is not None:
        z = inverse_depths(proj.depths, proj.radii) if depth_kind == "ID" else proj.depths
    if render_mode == depth_kind:  # depth only
        feats = z[..., None]
        bgs = None
    elif depth_kind is not None:
        feats = torch.cat([feats, z[..., None]], dim=-1)
        if bgs is not None:
            bgs = torch.cat([bgs, torch.zeros_like(bgs[:, :1])], dim=-1)

    means2d, conics, depths, radii, info_opac = proj.means2d, proj.conics, proj.depths, proj.radii, opac
    if world is not None:
        means2d, conics, feats, opac, depths, radii = _send_to_renderers(
            C_local, world[1], means2d, conics, feats, opac, depths, radii
        )
    render, alpha = impl.rasterize_to_pixels(
        means2d,
        conics,
        feats,
        opac,
        depths,
        radii,
        width,
        height,
        backgrounds=bgs,
        absgrad=absgrad,
    )
    if depth_kind == "ED":
        render = torch.cat([render[..., :-1], render[..., -1:] / alpha.clamp(min=1e-10)], dim=-1)

    info: dict[str, Any] = {
        "means2d": proj.means2d,
        "radii": proj.radii,
        "depths": proj.depths,
        "conics": proj.conics,
        "opacities": info_opac,
        "width": width,
        "height": height,
        "n_cameras": C,
        "gaussian_ids": None,
        "camera_ids": None,
        "tile_size": 16,
        "backend": name,
    }
    if world is not None:
        info["gaussian_counts"] = world[1]
    return render, alpha, info


def _world(
    distributed: bool, absgrad: bool, device: torch.device, N: int, C: int, width: int, height: int
) -> tuple[int, list[int]] | None:
    """For distributed rendering: ``(world size, every rank's N)`` after checking that every
    rank renders C cameras of one size; None when not distributed (or a world of one)."""
    if not distributed:
        return None
    from splatforge.raster.collectives import World, all_gather_same

    world = World.current()
    if not world.distributed:
        return None
    if absgrad:
        raise ConfigError("absgrad is not available in distributed rendering (as in gsplat)")
    dev = device if device.type == "cuda" else torch.device("cpu")
    dims = all_gather_same(torch.tensor([N, C, width, height], dtype=torch.int64, device=dev)).cpu()
    if (dims[:, 1:] != dims[0, 1:]).any():
        raise ConfigError(
            f"distributed rendering needs the same camera count and image size on every rank, got "
            f"(C, width, height) = {[tuple(r) for r in dims[:, 1:].tolist()]}"
        )
    return world.size, [int(n) for n in dims[:, 0]]


def _send_to_renderers(
    C: int,
    counts: list[int],
    means2d: Tensor,
    conics: Tensor,
    feats: Tensor,
    opac: Tensor,
    depths: Tensor,
    radii: Tensor,
) -> tuple[Tensor, ...]:
    """The all-to-all of distributed rendering: the inputs are this rank's Gaussians projected
    into every rank's C cameras (``[W C, N_r, ...]``); returns, for this rank's C cameras, every
    rank's Gaussians (``[C, sum N, ...]``, ranks in order), with gradients flowing back."""
    from splatforge.raster.collectives import World, all_to_all

    world = World.current()
    D = feats.shape[-1]
    packed = torch.cat([means2d, conics, feats, opac[..., None], depths[..., None], radii.to(means2d.dtype)], dim=-1)
    F = packed.shape[-1]
    send = [chunk.reshape(-1, F) for chunk in packed.split(C, dim=0)]
    recv = all_to_all(send, [C * n for n in counts], group=world.group)
    got = torch.cat([r.reshape(C, n, F) for r, n in zip(recv, counts)], dim=1)
    parts = got.split([2, 3, D, 1, 1, 2], dim=-1)
    return (
        parts[0],
        parts[1].contiguous(),
        parts[2].contiguous(),
        parts[3][..., 0].contiguous(),
        parts[4][..., 0].contiguous(),
        parts[5].round().to(radii.dtype),
    )


def transmittance_stats(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    near_plane: float = DEFAULT_NEAR_PLANE,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
    backend: Literal["auto", "cpu", "gsplat", "reference"] = "auto",
) -> tuple[Tensor, Tensor]:
    """Per-Gaussian visibility accumulators of a render (no gradients): for each camera and
    Gaussian, ``sum_T`` = the sum over the pixels where it contributes (alpha >= 1/255, before
    the pixel's early stop) of the transmittance in front of it, and ``count`` = the number of
    those pixels. ``sum_T / count`` is the Gaussian's mean transmittance in that view, the
    quantity the visibility masks of :mod:`splatforge.products.visibility` are built from.

    Arguments as :func:`rasterize`. Backends: ``cpu`` (compiled) on CPU tensors; on any other
    device (``gsplat``/``reference``) the pure-torch reference computes them on that device, with
    the same projection and compositing rules as gsplat.

    Returns:
        ``sum_T [C, N]`` float64 and ``count [C, N]`` int64, on the inputs' device.

    Raises:
        ConfigError, BackendUnavailableError: as :func:`rasterize`.
    """
    device, _N, _C = _check_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height)
    _check_options(rasterize_mode, near_plane, far_plane, eps2d)
    name = resolve_backend(backend, device)
    _check_dtypes(name, means, quats, scales, opacities, viewmats, Ks)
    impl, proj, opac = _project_for_stats(
        name,
        means,
        quats,
        scales,
        opacities,
        viewmats,
        Ks,
        width,
        height,
        near_plane=near_plane,
        far_plane=far_plane,
        eps2d=eps2d,
        rasterize_mode=rasterize_mode,
    )
    return impl.transmittance_stats(proj.means2d, proj.conics, opac, proj.depths, proj.radii, width, height)


@torch.no_grad()
def _project_for_stats(
    name: str,
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    **options: Any,
) -> tuple[Any, Any, Tensor]:
    """For the no-gradient per-pixel products (transmittance statistics, median depth): the
    implementation that computes them (the compiled cpu kernels for ``cpu``, the pure-torch
    reference on the inputs' device otherwise: gsplat has neither), the projection, and the
    opacities ``[C, N]`` times any antialiasing compensation."""
    if name == "cpu":
        from splatforge.raster import cpu as impl
    else:
        from splatforge.raster import reference as impl  # type: ignore[no-redef]
    proj = impl.project(
        means,
        quats,
        scales,
        opacities,
        viewmats,
        Ks,
        width,
        height,
        eps2d=options["eps2d"],
        near_plane=options["near_plane"],
        far_plane=options["far_plane"],
        antialiased=options["rasterize_mode"] == "antialiased",
    )
    opac = opacities[None, :].expand(viewmats.shape[0], means.shape[0])
    if proj.compensations is not None:
        opac = opac * proj.compensations
    return impl, proj, opac.contiguous()


def _median_depth(
    name: str,
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    **options: Any,
) -> Tensor:
    """``[C, H, W, 1]`` median depth (see :func:`rasterize`'s ``MD``), on the inputs' device."""
    means, quats, scales, viewmats, Ks = (t.detach() for t in (means, quats, scales, viewmats, Ks))
    impl, proj, opac = _project_for_stats(
        name, means, quats, scales, opacities.detach(), viewmats, Ks, width, height, **options
    )
    rays = median_rays(means, quats, scales, viewmats, Ks)
    return impl.median_depth(proj.means2d, proj.conics, opac, proj.depths, proj.radii, width, height, rays)[0]


def median_rays(
    means: Tensor, quats: Tensor, scales: Tensor, viewmats: Tensor, Ks: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """What the median depth needs to place a Gaussian's depth on each pixel's ray: the
    intrinsics ``[C, 4]`` (fx, fy, cx, cy), the centres in camera coordinates ``[C, N, 3]`` and
    the inverse 3D covariances in camera coordinates ``[C, N, 6]`` (upper triangle xx, xy, xz, yy,
    yz, zz; ``R diag(1 / s^2) R^T`` with ``s`` clamped at 1e-8 world units), all float32."""
    from splatforge.geometry.quats import quat_to_rotmat

    R = viewmats[:, None, :3, :3] @ quat_to_rotmat(quats)[None]  # [C, N, 3, 3]: Gaussian axes in the camera frame
    inv = (R / scales.clamp_min(1e-8)[None, :, None, :] ** 2) @ R.transpose(-1, -2)
    centres = torch.einsum("cij,nj->cni", viewmats[:, :3, :3], means) + viewmats[:, None, :3, 3]
    tri = inv[..., [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]]
    intr = torch.stack([Ks[:, 0, 0], Ks[:, 1, 1], Ks[:, 0, 2], Ks[:, 1, 2]], -1)
    return intr.float().contiguous(), centres.float().contiguous(), tri.float().contiguous()
