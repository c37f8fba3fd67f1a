"""The training loop: 3DGS optimisation with gsplat's densification, on any backend.

Follows Kerbl et al. 2023 and gsplat's ``examples/simple_trainer.py``: one random training view
per step, loss ``(1 - l) L1 + l (1 - SSIM)``, one Adam per parameter, the means' learning rate
times the scene scale with exponential decay to 1 %, SH degree raised every
``sh_degree_interval`` steps, adaptive density control by ``gsplat.strategy.DefaultStrategy``
after each optimiser step, then the hard cap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from splatforge.data import SceneData, load_scene
from splatforge.data.images import load_image
from splatforge.io import cameras_json, write_cameras_json, write_ply
from splatforge.model import activated, cap_gaussians, init_from_points, init_random
from splatforge.raster import rasterize
from splatforge.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from splatforge.train.config import TrainConfig, save_config, to_plain
from splatforge.train.losses import psnr as psnr_fn
from splatforge.train.losses import ssim

log = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainResult"]

PARAM_KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")


@dataclasses.dataclass
class TrainResult:
    step: int
    num_gaussians: int
    train_seconds: float
    ply_path: Path
    last_loss: float
    last_psnr: float


class Trainer:
    """Trains one scene into ``cfg.output``.

    Args:
        cfg: the run's configuration (validated here).
        scene: an already loaded scene (default: ``load_scene(cfg.data, ...)``).

    Raises:
        ConfigError, DataFormatError: bad configuration or input (nothing is written then).
    """

    def __init__(self, cfg: TrainConfig, scene: Optional[SceneData] = None):
        self.cfg = cfg.validate()
        self.output = Path(cfg.output)
        self.device = torch.device(cfg.device)
        cache = cfg.cache_dir if cfg.cache_dir is not None else self.output / "cache"
        self.scene = scene or load_scene(
            cfg.data, data_factor=cfg.data_factor, test_every=cfg.test_every, split_ratio=cfg.split_ratio,
            partition=cfg.partition, cache_dir=cache,
        )  # fmt: skip
        self.scene_scale = self.scene.scene_scale()
        self.train_ids = list(self.scene.split["train"])
        self._images: dict[int, torch.Tensor] = {}
        self.viewmats = torch.from_numpy(self.scene.viewmats).float().to(self.device)
        self.Ks = torch.from_numpy(self.scene.Ks).float().to(self.device)
        self.step = 0
        self.train_seconds = 0.0
        self.generator = torch.Generator().manual_seed(cfg.seed)
        # gsplat's strategies draw from torch's global RNG (splits, relocation, noise); they run
        # under fork_rng with this private state, so the process's RNG is left alone and a
        # resumed run draws the same numbers.
        self._strategy_rng = torch.Generator().manual_seed(cfg.seed + 1).get_state()
        self.params = self._init_params().to(self.device)
        self._build_optimizers()
        self.strategy, self.strategy_state = self._build_strategy()

    @classmethod
    def from_run(cls, run: Path) -> "Trainer":
        """Reopen a run folder (``cfg.yml`` + latest checkpoint) for rendering or evaluation.

        Raises:
            DataFormatError: no config or no checkpoint in ``run``.
        """
        from splatforge.errors import DataFormatError
        from splatforge.train.config import load_config

        run = Path(run)
        if not (run / "cfg.yml").is_file():
            raise DataFormatError(f"{run}: not a splatforge run folder (no cfg.yml)")
        cfg = load_config(run / "cfg.yml")
        cfg.output = run
        trainer = cls(cfg)
        if not trainer.resume():
            raise DataFormatError(f"{run}: no checkpoint in {run / 'checkpoints'}")
        return trainer

    # ---------------------------------------------------------------- set-up
    def _init_params(self) -> torch.nn.ParameterDict:
        cfg, scene = self.cfg, self.scene
        if len(scene.points):
            return init_from_points(scene.points, scene.points_rgb, sh_degree=cfg.sh_degree,
                                    init_opacity=cfg.init_opacity, init_scale=cfg.init_scale)  # fmt: skip
        center = scene.camtoworlds[:, :3, 3].mean(0)
        return init_random(cfg.init_random_count, center, cfg.init_extent * self.scene_scale, sh_degree=cfg.sh_degree,
                           init_opacity=cfg.init_opacity, generator=torch.Generator().manual_seed(cfg.seed))  # fmt: skip

    def _build_optimizers(self) -> None:
        lrs = dataclasses.asdict(self.cfg.lr)
        lrs["means"] *= self.scene_scale
        self.optimizers = {k: torch.optim.Adam([self.params[k]], lr=lrs[k], eps=1e-15) for k in PARAM_KEYS}
        gamma = 0.01 ** (1.0 / self.cfg.steps)
        self.schedulers = [torch.optim.lr_scheduler.ExponentialLR(self.optimizers["means"], gamma=gamma)]

    def _build_strategy(self):
        from gsplat.strategy import DefaultStrategy

        if self.cfg.strategy == "mcmc":
            from splatforge.train.mcmc import MCMCStrategyAnyDevice

            m = self.cfg.mcmc
            cap = min(m.cap_max, self.cfg.max_gaussians) if self.cfg.max_gaussians else m.cap_max
            strategy = MCMCStrategyAnyDevice(
                cap_max=cap, refine_start_iter=m.refine_start, refine_stop_iter=m.refine_stop,
                refine_every=m.refine_every, min_opacity=m.min_opacity, noise_lr=m.noise_lr,
            )  # fmt: skip
            strategy.check_sanity(self.params, self.optimizers)
            return strategy, strategy.initialize_state()
        d = self.cfg.densify
        strategy = DefaultStrategy(
            refine_start_iter=d.refine_start, refine_stop_iter=d.refine_stop, refine_every=d.refine_every,
            reset_every=d.reset_every, grow_grad2d=d.grow_grad2d, prune_opa=d.prune_opa, absgrad=d.absgrad,
        )  # fmt: skip
        strategy.check_sanity(self.params, self.optimizers)
        return strategy, strategy.initialize_state(scene_scale=self.scene_scale)

    def image(self, index: int) -> torch.Tensor:
        """Ground truth ``[H, W, 3]`` float32 of view ``index`` (loaded once, kept in memory)."""
        if index not in self._images:
            arr = load_image(self.scene.image_paths[index], self.scene.background)
            self._images[index] = torch.from_numpy(arr).to(self.device)
        return self._images[index]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {k: v.detach().cpu().clone() for k, v in self.params.items()},
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "schedulers": [s.state_dict() for s in self.schedulers],
            "strategy_state": self.strategy_state,
            "generator": self.generator.get_state(),
            "strategy_rng": self._strategy_rng,
            "train_seconds": self.train_seconds,
            "config": to_plain(dataclasses.asdict(self.cfg)),
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.params = torch.nn.ParameterDict({k: torch.nn.Parameter(v.to(self.device)) for k, v in ckpt["params"].items()})
        self._build_optimizers()
        for k, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][k])
        for s, sd in zip(self.schedulers, ckpt["schedulers"]):
            s.load_state_dict(sd)
        self.strategy_state = ckpt["strategy_state"]
        self.generator.set_state(ckpt["generator"])
        self._strategy_rng = ckpt["strategy_rng"]
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        self.step = int(ckpt["step"])

    def resume(self) -> bool:
        """Continue from the latest checkpoint in ``output/checkpoints``; False if there is none."""
        path = latest_checkpoint(self.output / "checkpoints")
        if path is None:
            return False
        self.load_state_dict(load_checkpoint(path))
        log.info("resumed from %s at step %d with %d Gaussians", path, self.step, len(self.params["means"]))
        return True

    def save(self) -> Path:
        return save_checkpoint(self.output / "checkpoints", self.step, self.state_dict())

    # ---------------------------------------------------------------- steps
    def sh_degree_at(self, step: int) -> int:
        return min(step // max(1, self.cfg.sh_degree_interval), self.cfg.sh_degree)

    def render(self, index: int, sh_degree: Optional[int] = None, backgrounds: Optional[torch.Tensor] = None,
               render_mode: str = "RGB"):  # fmt: skip
        """Render view ``index`` with the current Gaussians: ``(render [1,H,W,D], alpha, info)``."""
        deg = self.cfg.sh_degree if sh_degree is None else sh_degree
        g = activated(self.params, deg)
        return rasterize(
            g["means"], g["quats"], g["scales"], g["opacities"], g["colors"], self.viewmats[index : index + 1],
            self.Ks[index : index + 1], int(self.scene.widths[index]), int(self.scene.heights[index]),
            sh_degree=deg, backgrounds=backgrounds, render_mode=render_mode, backend=self.cfg.backend,
            absgrad=self.cfg.densify.absgrad,
        )  # fmt: skip

    def train_step(self) -> tuple[float, float]:
        """One optimisation step; returns (loss, PSNR of the rendered view)."""
        cfg, step = self.cfg, self.step
        index = self.train_ids[int(torch.randint(len(self.train_ids), (1,), generator=self.generator))]
        gt = self.image(index)[None]
        bg = torch.rand(1, 3, generator=self.generator).to(self.device) if cfg.random_background else None
        render, _, info = self.render(index, self.sh_degree_at(step), backgrounds=bg)
        self.strategy.step_pre_backward(self.params, self.optimizers, self.strategy_state, step, info)
        l1 = torch.abs(render - gt).mean()
        loss = (1.0 - cfg.ssim_lambda) * l1 + cfg.ssim_lambda * (1.0 - ssim(render, gt))
        if cfg.strategy == "mcmc":
            loss = loss + cfg.mcmc.opacity_reg * torch.sigmoid(self.params["opacities"]).mean()
            loss = loss + cfg.mcmc.scale_reg * torch.exp(self.params["scales"]).mean()
        loss.backward()
        for opt in self.optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        means_lr = self.schedulers[0].get_last_lr()[0]
        for sched in self.schedulers:
            sched.step()
        with self._private_rng():
            if cfg.strategy == "mcmc":
                self.strategy.step_post_backward(self.params, self.optimizers, self.strategy_state, step, info, lr=means_lr)
            else:
                self.strategy.step_post_backward(self.params, self.optimizers, self.strategy_state, step, info, packed=False)
                self._reset_opacities(step)
        if cfg.max_gaussians:
            cap_gaussians(self.params, self.optimizers, self.strategy_state, cfg.max_gaussians)
        self.step += 1
        return float(loss.detach()), psnr_fn(render, gt)

    @contextlib.contextmanager
    def _private_rng(self) -> Iterator[None]:
        """Run the block with the trainer's own CPU RNG state in place of the global one. On CUDA
        the device RNG is forked too and seeded from (seed, step), so a resumed run matches."""
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(self._strategy_rng)
            if cuda:
                torch.cuda.manual_seed(self.cfg.seed * 1_000_003 + self.step)
            yield
            self._strategy_rng = torch.get_rng_state()

    @torch.no_grad()
    def _reset_opacities(self, step: int) -> None:
        """Opacity reset (3DGS sec. 5.2). gsplat 1.5.3's ``DefaultStrategy`` tests
        ``step % reset_every == 0 & step > 0``, which Python reads as a chained comparison with
        ``0 > 0`` and is never true; do it here, as gsplat intends."""
        from gsplat.strategy.ops import reset_opa

        d = self.cfg.densify
        if step > 0 and step % d.reset_every == 0 and step < d.refine_stop:
            reset_opa(params=self.params, optimizers=self.optimizers, state=self.strategy_state, value=d.prune_opa * 2.0)

    def train(self, progress: Optional[Callable[[int, float, float, int, float], None]] = None) -> TrainResult:
        """Run from ``self.step`` to ``cfg.steps``, checkpointing on the way and at the end, then
        write the PLY and ``cameras.json``. ``progress(step, loss, psnr, n_gaussians, it_per_s)``
        is called after every step."""
        self.output.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.output / "cfg.yml")
        loss = psnr = float("nan")
        while self.step < self.cfg.steps:
            t0 = time.perf_counter()
            loss, psnr = self.train_step()
            dt = time.perf_counter() - t0
            self.train_seconds += dt
            if progress is not None:
                progress(self.step, loss, psnr, len(self.params["means"]), 1.0 / max(dt, 1e-9))
            if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 and self.step < self.cfg.steps:
                self.save()
        self.save()
        ply = self.export_ply()
        write_cameras_json(self.output / "cameras.json", cameras_json(
            self.scene.image_names, self.scene.camtoworlds, self.scene.Ks, self.scene.widths, self.scene.heights))  # fmt: skip
        return TrainResult(self.step, len(self.params["means"]), self.train_seconds, ply, loss, psnr)

    def export_ply(self) -> Path:
        path = self.output / "point_cloud" / f"iteration_{self.step}" / "point_cloud.ply"
        write_ply(path, {k: v.detach().cpu().numpy() for k, v in self.params.items()})
        return path

