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
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from splatforge.data import SceneData, load_scene
from splatforge.data.images import load_image
from splatforge.errors import DataFormatError
from splatforge.model import Splats
from splatforge.train.checkpoint import latest_checkpoint, load_checkpoint
from splatforge.train.config import TrainConfig, load_config

log = logging.getLogger(__name__)

__all__ = ["Run", "read_run_config", "latest_ply"]


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


def latest_ply(run: Path) -> Optional[Path]:
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

    def __init__(self, path: Path, cfg: TrainConfig, splats: Splats, step: int, *, train_seconds: float = 0.0,
                 scene: Optional[SceneData] = None, device: Union[str, torch.device] = "cpu",
                 images: Optional[dict[int, Tensor]] = None, source: Optional[Path] = None):  # fmt: skip
        self.path = Path(path)
        self.cfg = cfg
        self.device = torch.device(device)
        self.splats = splats.torch(self.device)
        self.step = int(step)
        self.train_seconds = float(train_seconds)
        self.source = source
        self._scene = scene
        self._images = images if images is not None else {}
        self._cams: Optional[tuple[Tensor, Tensor]] = None
        #: ``[V, 3, 4]`` the views' trained exposure affines (``cfg.exposure``), or None.
        self.exposure: Optional[Tensor] = None

    @classmethod
    def open(cls, path: Path, *, device: Optional[str] = None, backend: Optional[str] = None) -> "Run":
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
            run = cls(path, cfg, splats, int(ckpt["step"]), train_seconds=float(ckpt.get("train_seconds", 0.0)),
                      device=device, source=ckpt_path)  # fmt: skip
            if "exposure" in ckpt:
                run.exposure = ckpt["exposure"]["E"].to(run.device)
            return run
        ply = latest_ply(path)
        if ply is None:
            raise DataFormatError(f"{path}: no checkpoint in {path / 'checkpoints'} and no point_cloud/iteration_N/point_cloud.ply")
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
            self._scene = load_scene(cfg.data, data_factor=cfg.data_factor, test_every=cfg.test_every,
                                     split_ratio=cfg.split_ratio, partition=cfg.partition, cache_dir=cache)  # fmt: skip
        return self._scene

    @property
    def num_gaussians(self) -> int:
        return len(self.splats)

    def cameras(self) -> tuple[Tensor, Tensor]:
        """``(viewmats [N, 4, 4], Ks [N, 3, 3])`` of the scene's views: float32 on ``device``."""
        if self._cams is None:
            s = self.scene
            self._cams = (torch.from_numpy(s.viewmats).float().to(self.device), torch.from_numpy(s.Ks).float().to(self.device))
        return self._cams

    def image_size(self, index: int) -> tuple[int, int]:
        """``(width, height)`` of view ``index``, pixels."""
        return int(self.scene.widths[index]), int(self.scene.heights[index])

    def image(self, index: int) -> Tensor:
        """Ground truth ``[H, W, 3]`` float32 in [0, 1] of view ``index``, on ``device``."""
        if index not in self._images:
            arr = load_image(self.scene.image_paths[index], self.scene.background)
            self._images[index] = torch.from_numpy(arr).to(self.device)
        return self._images[index]

    # ------------------------------------------------------------------ rendering
    @torch.no_grad()
    def render(self, index: Optional[int] = None, *, viewmats: Optional[Any] = None, Ks: Optional[Any] = None,
               width: Optional[int] = None, height: Optional[int] = None, sh_degree: Optional[int] = None,
               **kwargs: Any):  # fmt: skip
        """Render view ``index`` of the scene, or the cameras ``viewmats [C, 4, 4]``
        (world-to-camera, OpenCV axes) with ``Ks [C, 3, 3]`` (pixels) at ``width`` x ``height``.
        Other keyword arguments go to :func:`splatforge.raster.rasterize` (``render_mode``,
        ``backgrounds``, ...). Returns ``(render [C, H, W, D], alpha [C, H, W, 1], info)``.

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
        t = lambda a: torch.as_tensor(np.asarray(a) if not isinstance(a, Tensor) else a, dtype=torch.float32, device=self.device)  # noqa: E731
        viewmats, Ks = t(viewmats), t(Ks)
        if viewmats.dim() == 2:
            viewmats, Ks = viewmats[None], Ks[None]
        kwargs.setdefault("backend", self.cfg.backend)
        kwargs.setdefault("rasterize_mode", self.cfg.rasterize_mode)
        return self.splats.rasterize(viewmats, Ks, int(width), int(height), sh_degree=sh_degree, **kwargs)
