"""``Run``: a trained run folder opened for rendering, without a trainer.

``Run.open(path)`` reads what ``splatforge train`` wrote: ``cfg.yml`` (the resolved config), the
Gaussians of the newest checkpoint (``checkpoints/ckpt_N.pt``, only its parameters; or, without
checkpoints, the newest ``point_cloud/iteration_N/point_cloud.ply``), and, when first needed, the
scene the config names (cameras, split, ground-truth images). No optimizer, strategy or
initialisation is built. It renders any of the scene's views or any camera. Every product
(render sets, metrics, depth, visibility, previews, exports, the viewer) takes a ``Run`` or a
:class:`~splatforge.model.Splats`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from splatforge.data import SceneData, load_scene
from splatforge.data.scene import NEAR_PLANE
from splatforge.errors import DataFormatError
from splatforge.model import Splats
from splatforge.train.checkpoint import latest_checkpoint, load_checkpoint
from splatforge.train.config import TrainConfig, load_config
from splatforge.train.views import ViewImages, view_mask

log = logging.getLogger(__name__)

__all__ = ["Run", "latest_ply", "read_run_config", "view_mask"]


def read_run_config(run: Path) -> TrainConfig:
    """``RUN/cfg.yml`` with ``output`` set to ``run`` (the folder may have moved).

    Raises:
        DataFormatError: not a run folder (no ``cfg.yml``).
        ConfigError: an unreadable ``cfg.yml``.
    """
    run = Path(run)
    if not (run / "cfg.yml").is_file():
        raise DataFormatError(f"{run}: not a splatforge run folder (no cfg.yml)")
    cfg = load_config(run / "cfg.yml")
    cfg.output = run
    return cfg


def latest_ply(run: Path) -> Path | None:
    """``RUN/point_cloud/iteration_<N>/point_cloud.ply`` with the largest ``N``, or None."""
    found = []
    for p in (Path(run) / "point_cloud").glob("iteration_*/point_cloud.ply"):
        m = re.fullmatch(r"iteration_(\d+)", p.parent.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


class Run:
    """A trained run: ``path``, its resolved ``cfg`` (:class:`TrainConfig`), its ``splats``
    (:class:`Splats` of float32 tensors on ``device``, parameter space), the ``step`` they are
    from, and the ``scene`` (loaded on first use).

    Build one with :meth:`open`, or from a trainer with ``Trainer.as_run()``.
    """

    def __init__(
        self,
        path: Path,
        cfg: TrainConfig,
        splats: Splats,
        step: int,
        *,
        train_seconds: float = 0.0,
        scene: SceneData | None = None,
        device: str | torch.device = "cpu",
        views: ViewImages | None = None,
        source: Path | None = None,
    ):
        self.path = Path(path)
        self.cfg = cfg
        self.device = torch.device(device)
        self.splats = splats.torch(self.device)
        self.step = int(step)
        self.train_seconds = float(train_seconds)
        self.source = source
        self._scene = scene
        self._views = views
        self._cams: tuple[Tensor, Tensor] | None = None
        self._c2w: np.ndarray | None = None
        self._moved: set[int] = set()  # views drawn from other poses than the scene's
        #: After :meth:`align_test_views`: per test view, how far its pose moved (``rotation_deg``,
        #: ``translation`` in world units); None before.
        self.test_alignment: dict[int, dict[str, float]] | None = None
        #: ``[V, 3, 4]`` the views' trained exposure affines (``cfg.exposure``), or None.
        self.exposure: Tensor | None = None
        #: ``[V, 9]`` the views' trained pose corrections (``cfg.pose_opt``; see
        #: :mod:`splatforge.train.poses`), applied to the training views; or None.
        self.pose_deltas: Tensor | None = None

    @classmethod
    def open(cls, path: Path, *, device: str | None = None, backend: str | None = None) -> Run:
        """Open the run folder ``path``: config, then the Gaussians of the newest checkpoint
        (read with ``weights_only=True``, memory-mapped), or of the newest PLY without one.

        Args:
            device: where to put the Gaussians (default: the run's own ``cfg.device`` when it
                exists here, else the CPU).
            backend: rasterizer backend for :meth:`render` (default: the run's ``cfg.backend``).

        Raises:
            DataFormatError: not a run folder, or neither a checkpoint nor a PLY in it.
            ConfigError: an unreadable ``cfg.yml``.
        """
        from splatforge.train.config import resolve_device

        path = Path(path)
        cfg = read_run_config(path)
        if backend is not None:
            cfg.backend = backend
        if device is None:
            device = cfg.device if cfg.device == "cpu" or torch.cuda.is_available() else "cpu"
        device = resolve_device(device)
        if cfg.backend == "gsplat" and not device.startswith("cuda"):
            cfg.backend = "auto"  # a run trained on a GPU, rendered here on the CPU
        ckpt_path = latest_checkpoint(path / "checkpoints")
        if ckpt_path is not None:
            ckpt = load_checkpoint(ckpt_path)
            splats = Splats.from_mapping(ckpt["params"], str(ckpt_path))
            run = cls(
                path,
                cfg,
                splats,
                int(ckpt["step"]),
                train_seconds=float(ckpt.get("train_seconds", 0.0)),
                device=device,
                source=ckpt_path,
            )
            if "exposure" in ckpt:
                run.exposure = ckpt["exposure"]["E"].to(run.device)
            if "poses" in ckpt:
                run.pose_deltas = ckpt["poses"]["deltas"].to(run.device)
            return run
        ply = latest_ply(path)
        if ply is None:
            raise DataFormatError(
                f"{path}: no checkpoint in {path / 'checkpoints'} and no point_cloud/iteration_N/point_cloud.ply"
            )
        from splatforge.io import read_ply

        step = int(ply.parent.name.split("_")[1])
        return cls(path, cfg, read_ply(ply), step, device=device, source=ply)

    # ------------------------------------------------------------------ the scene
    @property
    def scene(self) -> SceneData:
        """The scene of ``cfg.data`` at the run's data factor and split (loaded once).

        Raises:
            DataFormatError: the scene folder cannot be read (moved or deleted).
        """
        if self._scene is None:
            cfg = self.cfg
            cache = cfg.cache_dir if cfg.cache_dir is not None else self.path / "cache"
            self._scene = load_scene(
                cfg.data,
                data_factor=cfg.data_factor,
                test_every=cfg.test_every,
                split_ratio=cfg.split_ratio,
                partition=cfg.partition,
                cache_dir=cache,
            )
        return self._scene

    @property
    def num_gaussians(self) -> int:
        return len(self.splats)

    @property
    def world_unit(self) -> float:
        """The length the run's pose corrections and near plane are measured in
        (``cfg.world_unit``; the scene's own when the config left it unresolved)."""
        return self.cfg.world_unit if self.cfg.world_unit is not None else self.scene.world_unit()

    @property
    def near_plane(self) -> float:
        """Camera z (world units) below which Gaussians are culled, as in training:
        :data:`~splatforge.data.scene.NEAR_PLANE` ``world_unit`` lengths (gsplat's near plane in
        its normalised world; 0.01 world units for runs trained before, whose unit reads 1.0)."""
        return NEAR_PLANE * self.world_unit

    def camtoworlds(self) -> np.ndarray:
        """``[N, 4, 4]`` float64 camera-to-world (OpenCV axes) of the scene's views as the run
        draws them: the scene's, with the trained pose corrections applied to the training
        views (``pose_opt``) and any poses set by :meth:`set_camtoworlds` (test-time alignment)."""
        if self._c2w is None:
            from splatforge.train.poses import corrected_camtoworlds

            self._c2w = np.array(self.scene.camtoworlds, dtype=np.float64)
            if self.pose_deltas is not None:
                ids = list(self.scene.split["train"])
                self._c2w = corrected_camtoworlds(self._c2w, self.pose_deltas, ids, unit=self.world_unit)
                self._moved.update(ids)
        return self._c2w

    def set_camtoworlds(self, views: list[int], camtoworlds: Any) -> None:
        """Draw ``views`` from ``camtoworlds [len(views), 4, 4]`` from now on (this object only:
        nothing is written)."""
        c2w = self.camtoworlds().copy()
        c2w[list(views)] = np.asarray(torch.as_tensor(camtoworlds).detach().double().cpu())
        self._c2w, self._cams = c2w, None
        self._moved.update(views)

    def viewmats(self) -> np.ndarray:
        """``[N, 4, 4]`` float64 world-to-camera (OpenCV axes) of the views as :meth:`camtoworlds`
        gives them: the scene's own ``viewmats`` for views whose pose is unchanged, the inverse
        of the moved ones' camera-to-world."""
        c2w = self.camtoworlds()
        viewmats = np.array(self.scene.viewmats, dtype=np.float64)
        moved = sorted(self._moved)
        if moved:
            viewmats[moved] = np.linalg.inv(c2w[moved])
        return viewmats

    def cameras(self) -> tuple[Tensor, Tensor]:
        """``(viewmats [N, 4, 4], Ks [N, 3, 3])`` of :meth:`viewmats`: float32 on ``device``."""
        if self._cams is None:
            self._cams = (
                torch.from_numpy(self.viewmats()).float().to(self.device),
                torch.from_numpy(self.scene.Ks).float().to(self.device),
            )
        return self._cams

    def image_size(self, index: int) -> tuple[int, int]:
        """``(width, height)`` of view ``index``, pixels."""
        return int(self.scene.widths[index]), int(self.scene.heights[index])

    @property
    def views(self) -> ViewImages:
        """The ground truth of the scene's views (:class:`~splatforge.train.views.ViewImages`, the
        trainer's own when the run came from one)."""
        if self._views is None:
            self._views = ViewImages(self.scene, self.cfg, self.device)
        return self._views

    def image(self, index: int) -> Tensor:
        """Ground truth ``[H, W, 3]`` float32 in [0, 1] of view ``index``, on ``device``."""
        return self.views.image(index)

    def backgrounds(self, count: int, *, scene_needed: bool = True) -> Tensor | None:
        """``[count, 3]`` colour renders are drawn on: the scene's ``alpha_background`` when its
        images have alpha (so renders compare with their ground truth), else None (black). With
        ``scene_needed=False`` a scene that cannot be read gives None instead of an error."""
        try:
            bg = self.scene.alpha_background
        except DataFormatError:
            if scene_needed:
                raise
            return None
        return None if bg is None else torch.tensor([bg] * count, dtype=torch.float32, device=self.device)

    def mask(self, index: int) -> Tensor | None:
        """``[H, W, 1]`` float32 mask of view ``index`` (1 = keep; loaded once), or None when the
        run uses no masks (``cfg.masks``/``alpha_mask``)."""
        return self.views.mask(index)

    def align_views(
        self,
        views: list[int],
        camtoworlds: Any | None = None,
        *,
        steps: int | None = None,
        lr: float | None = None,
    ) -> Tensor:
        """Test-time pose alignment (:func:`splatforge.train.poses.align_poses`) of ``views``
        against this run's fixed Gaussians, from ``camtoworlds [len(views), 4, 4]`` (default:
        :meth:`camtoworlds`), ``steps`` per view and learning rate ``lr`` (default:
        ``cfg.pose_align_steps``/``pose_align_lr``). Returns the aligned ``[len(views), 4, 4]``
        float32; call :meth:`set_camtoworlds` to draw the views from them."""
        from splatforge.train.poses import align_poses

        views = list(views)
        start = (
            torch.as_tensor(self.camtoworlds()[views] if camtoworlds is None else camtoworlds).float().to(self.device)
        )
        splats = self.splats.detach()
        Ks = self.cameras()[1]

        def render(viewmats: Tensor, b: int) -> Tensor:
            i = views[b]
            w, h = self.image_size(i)
            out, _, _ = splats.rasterize(
                viewmats,
                Ks[i : i + 1],
                w,
                h,
                backgrounds=self.backgrounds(1),
                backend=self.cfg.backend,
                rasterize_mode=self.cfg.rasterize_mode,
                near_plane=self.near_plane,
            )
            return out

        with torch.enable_grad():
            return align_poses(
                render,
                start,
                [self.image(i) for i in views],
                masks=[self.mask(i) for i in views],
                steps=self.cfg.pose_align_steps if steps is None else steps,
                lr=self.cfg.pose_align_lr if lr is None else lr,
                ssim_lambda=self.cfg.ssim_lambda,
                unit=self.world_unit,
            )

    def align_test_views(self) -> dict[int, dict[str, float]] | None:
        """With ``cfg.pose_opt`` (and ``cfg.pose_align_steps > 0``): align the test views' poses
        (:meth:`align_views`) once and draw them from the aligned poses from then on; returns
        :attr:`test_alignment`, or None when the run does not refine poses."""
        if not (self.cfg.pose_opt and self.cfg.pose_align_steps > 0):
            return None
        if self.test_alignment is None:
            from splatforge.train.poses import pose_change

            views = list(self.scene.split["test"])
            before = torch.from_numpy(self.camtoworlds()[views])
            after = self.align_views(views)
            self.set_camtoworlds(views, after)
            self.test_alignment = {i: pose_change(before[k], after[k]) for k, i in enumerate(views)}
            log.info("aligned %d test poses (%d steps each)", len(views), self.cfg.pose_align_steps)
        return self.test_alignment

    # ------------------------------------------------------------------ rendering
    @torch.no_grad()
    def render(
        self,
        index: int | None = None,
        *,
        viewmats: Any | None = None,
        Ks: Any | None = None,
        width: int | None = None,
        height: int | None = None,
        sh_degree: int | None = None,
        **kwargs: Any,
    ):
        """Render view ``index`` of the scene, or the cameras ``viewmats [C, 4, 4]``
        (world-to-camera, OpenCV axes) with ``Ks [C, 3, 3]`` (pixels) at ``width`` x ``height``.
        Other keyword arguments go to :func:`splatforge.raster.rasterize` (``render_mode``,
        ``backgrounds``, ...; ``near_plane`` defaults to :attr:`near_plane`). Returns
        ``(render [C, H, W, D], alpha [C, H, W, 1], info)``.

        Raises:
            ConfigError: neither a view index nor a full camera given.
        """
        from splatforge.errors import ConfigError

        if index is not None:
            vm, k = self.cameras()
            viewmats, Ks = vm[index : index + 1], k[index : index + 1]
            width, height = self.image_size(index)
        elif viewmats is None or Ks is None or width is None or height is None:
            raise ConfigError("Run.render needs a view index, or viewmats, Ks, width and height")
        t = lambda a: torch.as_tensor(
            np.asarray(a) if not isinstance(a, Tensor) else a, dtype=torch.float32, device=self.device
        )
        viewmats, Ks = t(viewmats), t(Ks)
        if viewmats.dim() == 2:
            viewmats, Ks = viewmats[None], Ks[None]
        kwargs.setdefault("backend", self.cfg.backend)
        kwargs.setdefault("rasterize_mode", self.cfg.rasterize_mode)
        kwargs.setdefault("near_plane", self.near_plane)
        if "backgrounds" not in kwargs and "RGB" in kwargs.get("render_mode", "RGB"):
            kwargs["backgrounds"] = self.backgrounds(len(viewmats), scene_needed=index is not None)
        return self.splats.rasterize(viewmats, Ks, int(width), int(height), sh_degree=sh_degree, **kwargs)
