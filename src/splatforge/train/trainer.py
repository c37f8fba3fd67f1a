"""The training loop: 3DGS optimisation with a densification strategy, on any backend.

Follows Kerbl et al. 2023 and gsplat's ``examples/simple_trainer.py``: one random training view
per step (``batch_size`` views rendered together, learning rates scaled as gsplat does), loss
``(1 - l) L1 + l (1 - SSIM)`` plus the strategy's regulariser, one Adam per parameter (fused
kernels where torch has them), the means' learning rate times the scene scale with exponential
decay to 1 % at the last step, SH degree raised every ``sh_degree_interval`` steps, the strategy
after each optimiser step, then the hard cap; with ``depth_prior`` the rendered inverse depth is
supervised too (:mod:`splatforge.train.depth`). The trainer never asks which strategy it runs
(see :mod:`splatforge.train.strategies`).

Launched by torchrun (``WORLD_SIZE`` > 1, the process group joined by
:func:`splatforge.train.distributed.init_from_env`), each rank trains a shard of the Gaussians:
the step's ``batch_size x world_size`` views are drawn alike on every rank, each renders its
``batch_size`` of them with every shard's Gaussians (``rasterize(distributed=True)``), the loss
is the mean over the world's views, so the gradients a shard gets are those of a single process
rendering the whole batch, and Adam and the strategy run per shard (MCMC's cap and the hard cap
split evenly). :class:`~splatforge.train.shards.ShardSet` keeps the shards: evened out when they
drift apart by more than 10 %, gathered for checkpoints, the PLY and ``cameras.json``, which hold
the whole run in one global order (written by rank 0) and resume on any number of ranks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splatforge.data import SceneData, load_scene
from splatforge.data.load import fit_data_factor
from splatforge.data.scene import NEAR_PLANE
from splatforge.io import cameras_json, write_cameras_json, write_colmap_model, write_ply
from splatforge.model import Splats, cap_gaussians, init_from_points, init_random
from splatforge.raster.collectives import World
from splatforge.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from splatforge.train.config import TrainConfig, save_config, to_plain
from splatforge.train.losses import masked_loss, psnr_from_mse, ssim
from splatforge.train.poses import corrected_camtoworlds
from splatforge.train.shards import PARAM_KEYS, ShardSet
from splatforge.train.step_times import StepClock, StepTimes
from splatforge.train.views import ViewImages

log = logging.getLogger(__name__)

__all__ = ["StepTimes", "TrainResult", "Trainer"]


@dataclasses.dataclass
class TrainResult:
    step: int
    num_gaussians: int
    train_seconds: float
    ply_path: Path
    last_loss: float
    last_psnr: float


@functools.cache
def _fused_adam_supported() -> bool:
    try:
        p = torch.nn.Parameter(torch.zeros(1))
        torch.optim.Adam([p], fused=True)
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


class Trainer:
    """Trains one scene into ``cfg.output``.

    Args:
        cfg: the run's configuration; the trainer resolves a copy of it (schedules scaled to
            ``cfg.steps``, the device, data factor and world unit chosen), read back as
            :attr:`cfg`, and leaves the caller's as it was.
        scene: an already loaded scene (default: ``load_scene(cfg.data, ...)``).
        world: the training processes (default: torch.distributed's, a world of one when it is
            not initialised); in sharded training this rank trains a shard (:attr:`shards`).

    Raises:
        ConfigError, DataFormatError: bad configuration or input (nothing is written then).
    """

    def __init__(self, cfg: TrainConfig, scene: SceneData | None = None, world: World | None = None):
        from splatforge.train.strategies import build_strategy, state_to

        self.cfg = copy.deepcopy(cfg).resolve()  # the trainer's own: the caller's config stays as it was
        cfg = self.cfg
        if cfg.output is None:
            from splatforge.errors import ConfigError

            raise ConfigError("TrainConfig.output is not set (the command line picks runs/<scene> by default)")
        self.output = Path(cfg.output)
        self.device = torch.device(cfg.device)
        self.shards = ShardSet(world if world is not None else World.current(), self.device)
        cache = cfg.cache_dir if cfg.cache_dir is not None else self.output / "cache"
        with self.shards.rank0_first():  # rank 0 fills the image cache, the others read it
            if scene is None:
                cfg.data_factor = fit_data_factor(cfg.data, cfg.data_factor, cfg.max_image_size)
            self.scene = scene or load_scene(
                cfg.data,
                data_factor=cfg.data_factor,
                test_every=cfg.test_every,
                split_ratio=cfg.split_ratio,
                partition=cfg.partition,
                cache_dir=cache,
            )
        self.scene_scale = self.scene.scene_scale()
        if cfg.world_unit is None:
            cfg.world_unit = self.scene.world_unit()
        self.near_plane = NEAR_PLANE * cfg.world_unit  # camera z (world units) culled below: gsplat's, in world_unit
        self.train_ids = list(self.scene.split["train"])
        self.block = self._open_block()
        self._size_groups: dict[tuple[int, int], list[int]] | None = None
        self.views = ViewImages(self.scene, cfg, self.device)  # the same loader as the run's products
        self.viewmats = torch.from_numpy(self.scene.viewmats).float().to(self.device)
        self.Ks = torch.from_numpy(self.scene.Ks).float().to(self.device)
        self.step = 0
        self.train_seconds = 0.0
        self.generator = torch.Generator().manual_seed(cfg.seed)
        # gsplat's strategies draw from torch's global RNG (splits, relocation, noise); they run
        # under fork_rng with this private state, so the process's RNG is left alone and a
        # resumed run draws the same numbers.
        self._strategy_rng = self._strategy_seed(0)
        self._state_to = state_to
        splats = self.shards.take(self._init_splats())  # contiguous shards: the global order stays the initial one
        self.params = torch.nn.ParameterDict(splats.torch(self.device).as_dict())
        self._build_optimizers()
        self.shard_cap = -(-cfg.cap // self.world.size) if cfg.cap else 0
        self.strategy = build_strategy(cfg, cap=self.shard_cap)
        self.strategy.check_sanity(self.params, self.optimizers)
        self.strategy_state = state_to(self.strategy.initialize_state(scene_scale=self.scene_scale), self.device)
        self.poses = None
        if cfg.pose_opt:
            from splatforge.train.poses import PoseRefinement

            bs = cfg.batch_size * self.world.size
            self.camtoworlds = torch.from_numpy(self.scene.camtoworlds).float().to(self.device)
            lr = cfg.pose_opt_lr * math.sqrt(bs)
            self.poses = PoseRefinement(len(self.scene), lr, cfg.pose_opt_reg, self.device, unit=cfg.world_unit)
        self.exposure = None
        if cfg.exposure:
            from splatforge.train.exposure import ExposureModel

            self.exposure = ExposureModel(
                len(self.scene), cfg.steps, cfg.exposure_lr_init, cfg.exposure_lr_final, self.device
            )
        self.depth = None
        if cfg.depth_prior is not None:
            from splatforge.train.depth import DepthSupervision

            self.depth = DepthSupervision(
                cfg.depth_prior,
                self.scene,
                self.output,
                steps=cfg.steps,
                weight_init=cfg.depth_weight_init,
                weight_final=cfg.depth_weight_final,
                model=cfg.depth_model,
                device=self.device,
                filter_px=cfg.depth_filter_px,
            )

    @property
    def world(self) -> World:
        """The training processes (this rank of their count; a world of one in a single process)."""
        return self.shards.world

    @classmethod
    def from_run(cls, run: Path) -> Trainer:
        """Reopen a run folder (``cfg.yml`` + latest checkpoint) to continue training it. To
        render or evaluate a finished run use :meth:`splatforge.train.Run.open`, which builds no
        optimizer or strategy.

        Raises:
            DataFormatError: no config or no checkpoint in ``run``.
        """
        from splatforge.errors import DataFormatError
        from splatforge.train.run import read_run_config

        cfg = read_run_config(run)
        trainer = cls(cfg)
        if not trainer.resume():
            raise DataFormatError(f"{run}: no checkpoint in {Path(run) / 'checkpoints'}")
        return trainer

    # ---------------------------------------------------------------- set-up
    def _strategy_seed(self, step: int) -> torch.Tensor:
        """The strategy's RNG state for a fresh start at ``step`` (its own stream on each rank)."""
        return torch.Generator().manual_seed(self.cfg.seed + 1 + 7919 * self.world.rank + 104_729 * step).get_state()

    def _open_block(self) -> tuple[dict, dict] | None:
        """With ``cfg.block_plan``: ``(plan, block)``, the training views cut to the block's (its
        Gaussians start from :func:`splatforge.data.blocks.block_points`)."""
        if self.cfg.block_plan is None:
            return None
        from splatforge.data.blocks import find_block, load_plan
        from splatforge.errors import ConfigError

        plan = load_plan(self.cfg.block_plan)
        block = find_block(plan, str(self.cfg.block_id), self.cfg.block_plan)
        names = set(block["images"])
        self.train_ids = [i for i in self.train_ids if self.scene.image_names[i] in names]
        if not self.train_ids:
            raise ConfigError(f"{self.cfg.block_plan}: block {block['id']} has none of the scene's training views")
        return plan, block

    def _init_splats(self) -> Splats:
        cfg, scene = self.cfg.resolve_init(from_points=len(self.scene.points) > 0), self.scene
        points, rgb = scene.points, scene.points_rgb
        if self.block is not None and len(points):
            from splatforge.data.blocks import block_points

            keep = block_points(scene, self.block[0], self.block[1], self.train_ids)
            points, rgb = points[keep], rgb[keep]
        if len(points):
            return init_from_points(
                points, rgb, sh_degree=cfg.sh_degree, init_opacity=cfg.init_opacity, init_scale=cfg.init_scale
            )
        center = scene.camtoworlds[:, :3, 3].mean(0)
        return init_random(
            cfg.init_random_count,
            center,
            cfg.init_extent * self.scene_scale,
            sh_degree=cfg.sh_degree,
            init_opacity=cfg.init_opacity,
            init_scale=cfg.init_scale,
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def _build_optimizers(self) -> None:
        lrs = dataclasses.asdict(self.cfg.lr)
        lrs["means"] *= self.scene_scale
        opts: dict[str, Any] = {"fused": True} if _fused_adam_supported() else {}
        bs = self.cfg.batch_size * self.world.size
        # gsplat's simple_trainer for a batch of BS views: lr * sqrt(BS), eps / sqrt(BS),
        # betas (1 - BS (1 - 0.9), 1 - BS (1 - 0.999)); torch's defaults at BS = 1
        if bs > 1:
            opts["betas"] = (1.0 - bs * (1.0 - 0.9), 1.0 - bs * (1.0 - 0.999))
        self.optimizers = {
            k: torch.optim.Adam([self.params[k]], lr=lrs[k] * math.sqrt(bs), eps=1e-15 / math.sqrt(bs), **opts)
            for k in PARAM_KEYS
        }
        gamma = 0.01 ** (1.0 / self.cfg.steps)
        self.schedulers = [torch.optim.lr_scheduler.ExponentialLR(self.optimizers["means"], gamma=gamma)]

    def image(self, index: int) -> torch.Tensor:
        """Ground truth ``[H, W, 3]`` of view ``index`` (:meth:`ViewImages.image`)."""
        return self.views.image(index)

    def ground_truth(self, views: list[int], backgrounds: torch.Tensor | None) -> torch.Tensor:
        """``[B, H, W, 3]`` ground truth of ``views`` on ``backgrounds`` (:meth:`ViewImages.ground_truth`)."""
        return self.views.ground_truth(views, backgrounds)

    @property
    def random_background(self) -> bool:
        """Whether training draws a random background per step (``cfg.random_background``; by
        default on for scenes whose images have alpha)."""
        rb = self.cfg.random_background
        return rb if rb is not None else self.scene.alpha_background is not None

    def mask(self, index: int) -> torch.Tensor | None:
        """``[H, W, 1]`` mask of view ``index`` or None (:meth:`ViewImages.mask`)."""
        return self.views.mask(index)

    @property
    def splats(self) -> Splats:
        """The current Gaussians (the optimised parameters themselves, not a copy); in sharded
        training this rank's shard (:meth:`full_splats` gathers them all)."""
        return Splats.from_mapping(self.params)

    @property
    def num_gaussians(self) -> int:
        """The run's Gaussian count (every shard's, as of the last step, in sharded training)."""
        return self.shards.num_gaussians(len(self.params["means"]))

    def full_splats(self) -> Splats:
        """All the run's Gaussians, detached, in the global order; in sharded training every
        rank must call it (the shards are gathered to every rank)."""
        return self.shards.full_splats(self.params)

    def memory_report(self) -> dict[str, Any]:
        """This process's memory (see :meth:`ShardSet.memory_report`): ``param_bytes`` (its
        Gaussians' parameters and Adam moments: 1/N of the run's on each of N ranks),
        ``peak_rss_bytes`` and, on CUDA, ``cuda_peak_bytes``."""
        return self.shards.memory_report(self.params, self.optimizers)

    def as_run(self):
        """The run as it stands, for products (renders, metrics, previews): a
        :class:`~splatforge.train.Run` sharing this trainer's scene, images and a detached view of
        the parameters (gathered from every rank in sharded training: every rank must call it)."""
        from splatforge.train.run import Run

        run = Run(
            self.output,
            self.cfg,
            self.full_splats(),
            self.step,
            train_seconds=self.train_seconds,
            scene=self.scene,
            device=self.device,
            views=self.views,
        )
        run.exposure = self.exposure.E.detach().clone() if self.exposure is not None else None
        run.pose_deltas = self.poses.deltas.detach().clone() if self.poses is not None else None
        return run

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any] | None:
        """Everything an exact resume needs (CPU tensors); :meth:`load_state_dict` takes it back.
        In sharded training every rank must call it: the shards are gathered into rank 0's
        dict (one run in the global order, with ``shard_sizes`` and every rank's strategy RNG,
        ``strategy_rngs``), the other ranks get None."""
        shard = self.shards.checkpoint_state(self.params, self.optimizers, self.strategy_state, self._strategy_rng)
        if shard is None:
            return None
        return {
            "step": self.step,
            "params": shard["params"],
            "optimizers": shard["optimizers"],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "strategy_state": shard["strategy_state"],
            "generator": self.generator.get_state(),
            "strategy_rng": self._strategy_rng,
            **{k: shard[k] for k in ("strategy_rngs", "shard_sizes") if k in shard},
            "train_seconds": self.train_seconds,
            "config": to_plain(dataclasses.asdict(self.cfg)),
            **({"exposure": self.exposure.state_dict()} if self.exposure is not None else {}),
            **({"poses": self.poses.state_dict()} if self.poses is not None else {}),
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Take back a :meth:`state_dict` (in sharded training: the whole run's, of any world
        size; this rank keeps its shard, :meth:`ShardSet.local_part`)."""
        ckpt = self.shards.local_part(ckpt, self._strategy_seed)
        self.params = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(v.to(self.device)) for k, v in ckpt["params"].items()}
        )
        self._build_optimizers()
        for k, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][k])
        for s, sd in zip(self.schedulers, ckpt["schedulers"]):
            s.load_state_dict(sd)
        self.strategy_state = self._state_to(ckpt["strategy_state"], self.device)
        self.generator.set_state(ckpt["generator"])
        self._strategy_rng = ckpt["strategy_rng"]
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        self.step = int(ckpt["step"])
        if self.exposure is not None and "exposure" in ckpt:
            self.exposure.load_state_dict(ckpt["exposure"])
        if self.poses is not None and "poses" in ckpt:
            self.poses.load_state_dict(ckpt["poses"])

    def resume(self) -> bool:
        """Continue from the latest checkpoint in ``output/checkpoints``; False if there is none."""
        path = latest_checkpoint(self.output / "checkpoints")
        if path is None:
            return False
        self.load_state_dict(load_checkpoint(path))
        log.info("resumed from %s at step %d with %d Gaussians", path, self.step, len(self.params["means"]))
        return True

    def save(self) -> Path:
        """Checkpoint the run (in sharded training a collective: rank 0 writes it)."""
        state = self.state_dict()
        folder = self.output / "checkpoints"
        if state is None:
            return folder / f"ckpt_{self.step:06d}.pt"
        return save_checkpoint(folder, self.step, state)

    # ---------------------------------------------------------------- steps
    def sh_degree_at(self, step: int) -> int:
        return min(step // max(1, self.cfg.sh_degree_interval), self.cfg.sh_degree)

    def render(
        self,
        index: int | list[int],
        sh_degree: int | None = None,
        backgrounds: torch.Tensor | None = None,
        render_mode: str = "RGB",
    ):
        """Render view ``index`` (or the views of a list, all of one image size) with the current
        Gaussians: ``(render [C, H, W, D], alpha [C, H, W, 1], info)``, C = 1 for one view;
        colours on ``backgrounds [C, 3]`` (None: the scene's ``alpha_background`` when its
        images have alpha, else black)."""
        views = [index] if isinstance(index, int) else list(index)
        if backgrounds is None and "RGB" in render_mode and self.scene.alpha_background is not None:
            backgrounds = torch.tensor([self.scene.alpha_background] * len(views), device=self.device)
        viewmats = self.viewmats[views]
        if self.poses is not None:  # the refined poses, differentiably
            viewmats = torch.linalg.inv(self.poses.refine(self.camtoworlds[views], views))
        return self.splats.rasterize(
            viewmats,
            self.Ks[views],
            int(self.scene.widths[views[0]]),
            int(self.scene.heights[views[0]]),
            sh_degree=self.cfg.sh_degree if sh_degree is None else sh_degree,
            backgrounds=backgrounds,
            render_mode=render_mode,
            backend=self.cfg.backend,
            absgrad=self.strategy.absgrad,
            distributed=self.world.distributed,
            rasterize_mode=self.cfg.rasterize_mode,
            near_plane=self.near_plane,
        )

    def draw_views(self) -> list[int]:
        """The training views of the next step: one uniformly at random, and with
        ``batch_size`` B > 1, B - 1 more among the training views of its image size (one render
        takes one size), drawn with replacement from the trainer's generator. In sharded training
        every rank draws the world's ``B x world_size`` views alike and keeps its B."""
        first = self.train_ids[int(torch.randint(len(self.train_ids), (1,), generator=self.generator))]
        count = self.cfg.batch_size * self.world.size
        if count == 1:
            return [first]
        if self._size_groups is None:  # training views by image size, built on the first batch
            self._size_groups = {}
            for i in self.train_ids:
                self._size_groups.setdefault((int(self.scene.widths[i]), int(self.scene.heights[i])), []).append(i)
        same = self._size_groups[(int(self.scene.widths[first]), int(self.scene.heights[first]))]
        rest = torch.randint(len(same), (count - 1,), generator=self.generator)
        views = [first] + [same[int(k)] for k in rest]
        B = self.cfg.batch_size
        return views[self.world.rank * B : (self.world.rank + 1) * B]

    def batch_loss(
        self, views: list[int], step: int, backgrounds: torch.Tensor | None = None, clock: StepClock | None = None
    ):
        """The training loss of ``views`` (one size) rendered together: the mean over their
        pixels of ``(1 - l) L1 + l (1 - SSIM)``, the strategy's regulariser and the mean of the
        views' depth terms. Returns ``(loss, render [B, H, W, 3], gt [B, H, W, 3], info)``.
        In sharded training the image and depth terms are divided by the world size and the
        regulariser (a mean over the shard) weighted by the shard's share of the Gaussians, so
        the ranks' losses sum to the single-process loss of the world's batch."""
        cfg = self.cfg
        clock = clock or StepClock(None, self.device)
        gt = self.ground_truth(views, backgrounds)
        render, _, info = self.render(
            views,
            self.sh_degree_at(step),
            backgrounds=backgrounds,
            render_mode="RGB" if self.depth is None else "RGB+ID",
        )
        inv_depth = None
        if self.depth is not None:
            render, inv_depth = render[..., :3], render[..., 3]
        if self.exposure is not None:
            render = self.exposure(render, views)
        clock.lap("forward")
        self.strategy.step_pre_backward(self.params, self.optimizers, self.strategy_state, step, info)
        masks = [self.mask(i) for i in views]
        if masks[0] is None:
            s = ssim(render, gt)
            clock.lap("ssim")
            loss = (1.0 - cfg.ssim_lambda) * (render - gt).abs().mean() + cfg.ssim_lambda * (1.0 - s)
        else:
            loss = masked_loss(render, gt, torch.stack(masks), cfg.ssim_lambda)
            clock.lap("ssim")
        if inv_depth is not None:
            terms = [self.depth.loss(i, inv_depth[k], step) for k, i in enumerate(views)]
            terms = [t for t in terms if t is not None]
            if terms:
                loss = loss + torch.stack(terms).sum() / len(views)
        reg = self.strategy.regularization(self.params)
        if self.world.distributed:
            loss = loss / self.world.size
            if reg is not None:
                reg = reg * (len(self.params["means"]) / max(1, sum(info["gaussian_counts"])))
        if reg is not None:
            loss = loss + reg
        return loss, render, gt, info

    def train_step(self, times: StepTimes | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step. Returns the loss and the view's mean squared error, detached
        tensors (read them with ``float()`` only when needed: on a GPU that waits for the step).
        With ``times``, each part of the step is timed into it (this synchronises the device)."""
        step = self.step
        clock = StepClock(times, self.device)
        views = self.draw_views()
        bg = torch.rand(len(views), 3, generator=self.generator).to(self.device) if self.random_background else None
        loss, render, gt, info = self.batch_loss(views, step, bg, clock)
        clock.lap("loss")
        loss.backward()
        clock.lap("backward")
        for opt in self.optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        means_lr = self.schedulers[0].get_last_lr()[0]
        for sched in self.schedulers:
            sched.step()
        if self.poses is not None:
            self.shards.all_reduce(self.poses.deltas.grad)
            self.poses.step()
        if self.exposure is not None:
            # each view's affine gets its gradient from the rank that rendered it; all ranks step the world's views
            self.shards.all_reduce(self.exposure.E.grad)
            self.exposure.step(step, self.shards.world_views(views))
        clock.lap("adam")
        with self._private_rng():
            self.strategy.step_post_backward(self.params, self.optimizers, self.strategy_state, step, info, lr=means_lr)
        if self.shard_cap:
            cap_gaussians(self.params, self.optimizers, self.strategy_state, self.shard_cap)
        if self.world.distributed:
            self._rebalance()
        clock.lap("strategy")
        clock.done()
        self.step += 1
        with torch.no_grad():
            mse = torch.mean((render.detach().clamp(0.0, 1.0) - gt) ** 2)
        return loss.detach(), mse

    def _rebalance(self) -> None:
        """Even the shards out when they drift apart by more than 10 % (:meth:`ShardSet.rebalance`)."""
        self.shards.rebalance(self.params, self.optimizers, self.strategy_state)

    @contextlib.contextmanager
    def compute_threads(self) -> Iterator[None]:
        """On the CPU, run torch's own (small) ops on one thread for the block, and restore the
        count after: the compiled kernels use every core through numba, and torch's pool spinning
        between them took the cores from it (measured on 2 cores: 58 instead of 73 ms per step at
        30k Gaussians). ``cfg.torch_threads`` > 0 sets the count instead; GPUs are left alone."""
        if self.device.type != "cpu":
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.cfg.torch_threads or 1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

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

    def train(
        self, progress: Callable[[int, float, float, int, float], None] | None = None, report_every: int = 10
    ) -> TrainResult:
        """Run from ``self.step`` to ``cfg.steps``, checkpointing on the way and at the end, then
        write the PLY and ``cameras.json``. ``progress(step, loss, psnr, n_gaussians, it_per_s)``
        is called every ``report_every`` steps and after the last (the values of that step).
        In sharded training every rank runs it; rank 0 writes the files."""
        lead = self.world.rank == 0
        if lead:
            self.output.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.output / "cfg.yml")
        loss = mse = torch.tensor(float("nan"))
        with self.compute_threads():
            while self.step < self.cfg.steps:
                t0 = time.perf_counter()
                loss, mse = self.train_step()
                dt = time.perf_counter() - t0
                self.train_seconds += dt
                if progress is not None and (self.step % report_every == 0 or self.step == self.cfg.steps):
                    progress(self.step, float(loss), psnr_from_mse(float(mse)), self.num_gaussians, 1.0 / max(dt, 1e-9))
                if (
                    self.cfg.checkpoint_every
                    and self.step % self.cfg.checkpoint_every == 0
                    and self.step < self.cfg.steps
                ):
                    self.save()
        self.save()
        full = self.full_splats()
        ply = self.export_ply(full)
        if lead:
            s, c2w = self.scene, self.refined_camtoworlds()
            write_cameras_json(
                self.output / "cameras.json", cameras_json(s.image_names, c2w, s.Ks, s.widths, s.heights)
            )
            if self.poses is not None:  # the refined poses as a COLMAP model too
                write_colmap_model(
                    self.output / "sparse" / "0", s.image_names, c2w, s.Ks, s.widths, s.heights, s.points, s.points_rgb
                )
        return TrainResult(self.step, len(full), self.train_seconds, ply, float(loss), psnr_from_mse(float(mse)))

    def refined_camtoworlds(self) -> np.ndarray:
        """``[V, 4, 4]`` float64 camera-to-world of every view: the scene's, with the trained
        corrections applied to the training views under ``pose_opt``."""
        if self.poses is None:
            return np.array(self.scene.camtoworlds, dtype=np.float64)
        return corrected_camtoworlds(
            self.scene.camtoworlds, self.poses.deltas, self.train_ids, unit=self.cfg.world_unit
        )

    def export_ply(self, splats: Splats | None = None) -> Path:
        """Write ``point_cloud/iteration_<step>/point_cloud.ply`` (rank 0 only in sharded
        training; ``splats``: the whole run, default :meth:`full_splats`, a collective there)."""
        path = self.output / "point_cloud" / f"iteration_{self.step}" / "point_cloud.ply"
        splats = self.full_splats() if splats is None else splats
        if self.world.rank == 0:
            write_ply(path, splats, rasterize_mode=self.cfg.rasterize_mode)
        return path
