"""Training configuration: one dataclass, written resolved to every run folder as ``cfg.yml``.

The fields are the ``splatforge train`` command's options (parsed by tyro): ``--steps``,
``--lr.means``, ``--densify.refine-stop-iter``, ``--mcmc.cap-max`` and so on. Schedules that
depend on the run's length default to ``None`` and are resolved for it: the default strategy's
refine start/stop/every and opacity reset and the SH degree interval are gsplat's and Inria's
values for a 30,000-step run scaled by ``steps / 30,000`` (gsplat's ``steps_scaler``;
``refine_every`` at least ``MIN_REFINE_EVERY``); MCMC's refine stop scales too, while its start
(500) and period (100) are paces per step, shortened only when the run is too short for them
(see :class:`MCMCConfig`). A number given explicitly is used as it is. :meth:`TrainConfig.resolve`
fills them in, and ``cfg.yml`` records the numbers used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from splatforge._fs import atomic_path
from splatforge.errors import ConfigError

__all__ = [
    "REFERENCE_STEPS",
    "DensifyConfig",
    "LearningRates",
    "MCMCConfig",
    "TrainConfig",
    "TrainFeatures",
    "default_output",
    "load_config",
    "resolve_device",
    "save_config",
    "scaled_iter",
    "to_plain",
]

#: The run length gsplat's and Inria's schedule defaults are written for.
REFERENCE_STEPS = 30_000
#: Scaled ``refine_every`` never goes below this: the default strategy's gradient statistics
#: need several views between refinements, and MCMC's 5 % growth per refinement would otherwise
#: reach any cap within a few dozen steps of a short run.
MIN_REFINE_EVERY = 10


def scaled_iter(value: int, steps: int, minimum: int = 1) -> int:
    """``value`` (an iteration count of a ``REFERENCE_STEPS``-step schedule) scaled to a run of
    ``steps`` steps, rounded, at least ``minimum``."""
    return max(minimum, int(round(value * steps / REFERENCE_STEPS)))  # noqa: RUF046 (numpy values too)


def resolve_device(device: str) -> str:
    """``"auto"``: ``"cuda"`` when torch sees a CUDA device, else ``"cpu"``; other names as given.

    Raises:
        ConfigError: a CUDA device asked for where there is none.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: torch sees no CUDA device here; use --device cpu")
    return device


def default_output(
    data: Path, root: Path = Path("runs"), reuse: bool = False, same_run: Callable[[Path], bool] | None = None
) -> Path:
    """``root/<name of the scene folder>``; when that folder already holds a run (``cfg.yml``)
    and not ``reuse``, the first of ``<name>-2``, ``<name>-3``, ... that does not, or whose run
    ``same_run(folder)`` says is this one (the same command started again)."""
    name = Path(data).resolve().name or "scene"
    out = Path(root) / name
    if reuse:
        return out
    k = 2
    while (out / "cfg.yml").exists() and not (same_run is not None and same_run(out)):
        out = Path(root) / f"{name}-{k}"
        k += 1
    return out


@dataclass
class LearningRates:
    """Adam learning rates, those of 3DGS / gsplat's ``simple_trainer``."""

    means: float = 1.6e-4
    """Means, times the scene scale; decays exponentially to 1 % at the last step."""
    scales: float = 5e-3
    quats: float = 1e-3
    opacities: float = 5e-2
    sh0: float = 2.5e-3
    shN: float = 2.5e-3 / 20


@dataclass
class DensifyConfig:
    """Adaptive density control of 3DGS: gsplat's ``DefaultStrategy``, same field names and
    meanings (its documentation applies). ``None``: the 30,000-step default scaled to the run."""

    refine_start_iter: int | None = None
    """First step that grows or prunes (500 at 30k steps)."""
    refine_stop_iter: int | None = None
    """No growing, pruning or opacity reset from this step on (15,000 at 30k steps)."""
    refine_every: int | None = None
    """Grow and prune every this many steps (100 at 30k steps)."""
    reset_every: int | None = None
    """Opacity reset period (3,000 at 30k steps); gsplat 1.5.3 never resets by itself, the
    strategy here does."""
    grow_grad2d: float | None = None
    """Mean screen-space gradient (NDC units) above which a Gaussian is cloned or split: 2e-4,
    or 8e-4 with ``absgrad`` (gsplat's trainer: absolute gradients are larger)."""
    grow_scale3d: float = 0.01
    """Gaussians smaller than this (times the scene scale) are cloned, larger ones split."""
    grow_scale2d: float = 0.05
    prune_opa: float = 5e-3
    """Gaussians less opaque than this are pruned (activated opacity)."""
    prune_scale3d: float = 0.1
    prune_scale2d: float = 0.15
    refine_scale2d_stop_iter: int = 0
    pause_refine_after_reset: int = 0
    absgrad: bool = False
    """Use AbsGS absolute gradients (Ye et al. 2024); grow_grad2d then defaults to 8e-4."""
    revised_opacity: bool = False
    """Rota Bulo et al. 2024's opacity for split copies."""


@dataclass
class MCMCConfig:
    """3DGS as Markov chain Monte Carlo (Kheradmand et al. 2024): gsplat's ``MCMCStrategy``,
    same field names, plus its trainer's two regularisers. ``None``: the 30,000-step default
    scaled to the run."""

    cap_max: int = 1_000_000
    """Most Gaussians (``max_gaussians`` caps it further when smaller)."""
    refine_start_iter: int | None = None
    """First relocation/growth step: 500 (opacities first need that many steps to tell dead
    Gaussians), at most a fifth of the refine window in short runs."""
    refine_stop_iter: int | None = None
    """No relocation or growth from this step on (25,000 at 30k steps, scaled)."""
    refine_every: int | None = None
    """Relocate dead Gaussians and grow by 5 % every this many steps: 100 (a pace per step, not
    per run: scaled with the run, the count reaches the cap early and overfits; on skull at 3k
    steps 23.9 dB and 300k Gaussians instead of 25.5 dB and 55k), fewer in runs too short for
    20 refinements (at least 10)."""
    min_opacity: float = 0.005
    """Gaussians less opaque than this are dead: relocated onto live ones."""
    noise_lr: float = 5e5
    """Scale of the position noise (times the means' learning rate)."""
    opacity_reg: float = 0.01
    """Loss weight of the mean activated opacity."""
    scale_reg: float = 0.01
    """Loss weight of the mean activated scale."""


_SCHEDULE_DEFAULTS = {
    "densify": {"refine_start_iter": 500, "refine_stop_iter": 15_000, "refine_every": 100, "reset_every": 3_000},
}


@dataclass(kw_only=True)
class TrainFeatures:
    """The trainer's optional features as the commands that train for you (``run``,
    ``generate``, ``splatter``) offer them, with ``train``'s names and defaults
    (``--densify.absgrad``, ``--exposure``, ``--pose-opt``, ``--rasterize-mode``): see
    :class:`TrainConfig` for what each does. :meth:`apply` puts them into a config."""

    rasterize_mode: Literal["classic", "antialiased"] = "classic"
    """classic (3DGS) or antialiased (Mip-Splatting's 2D filter); every product uses it."""
    exposure: bool = False
    """Per-image exposure compensation (Inria's 3x4 colour affine per view)."""
    pose_opt: bool = False
    """Refine the training views' poses (gsplat's pose_opt); the test views are aligned at evaluation."""
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    """The default strategy's options (``--densify.absgrad``: AbsGS gradients, with their own threshold)."""

    def train_fields(self) -> dict:
        """These features as ``TrainConfig`` keyword values (for
        :func:`~splatforge.train.presets.preset_train_config`)."""
        return {
            "rasterize_mode": self.rasterize_mode,
            "exposure": self.exposure,
            "pose_opt": self.pose_opt,
            "densify": dataclasses.replace(self.densify),
        }

    def changed(self) -> dict:
        """The features that differ from the defaults, as plain ``TrainConfig`` keyword values
        (``densify`` as a dict of its changed fields): for job specs, whose hash they join."""
        default = TrainFeatures()
        out = {
            k: getattr(self, k)
            for k in ("rasterize_mode", "exposure", "pose_opt")
            if getattr(self, k) != getattr(default, k)
        }
        dens = {
            f.name: getattr(self.densify, f.name)
            for f in dataclasses.fields(DensifyConfig)
            if getattr(self.densify, f.name) != getattr(default.densify, f.name)
        }
        if dens:
            out["densify"] = dens
        return out


@dataclass
class TrainConfig:
    """Everything a training run depends on."""

    data: Path
    """Scene folder (COLMAP sparse/0 + images, or transforms.json)."""
    output: Path | None = None
    """Run folder: outputs, checkpoints and this config go here (default: runs/<scene folder
    name>, or runs/<name>-2, -3, ... when that holds another run)."""
    data_factor: int = 1
    """Read images_<k> (k > 1) instead of images/ (made by downscaling into the cache when
    missing)."""
    max_image_size: int = 0
    """Train on images at most this many pixels on the longer side: the data factor is raised
    until they fit (0: no limit). Presets set it for the device."""
    steps: int = 30_000
    """Optimisation steps (batch_size training views each)."""
    batch_size: int = 1
    """Training views rendered together per step (gsplat's batch_size; one image size per batch):
    learning rates times sqrt(B), Adam's eps / sqrt(B), betas (1 - 0.1 B, 1 - 0.001 B);
    densification statistics over every view of the step."""
    test_every: int = 8
    """Every k-th image (sorted by name) is a test view; 0 for none."""
    split_ratio: float | None = None
    """Fraction of views used for training, evenly spread (overrides test_every)."""
    partition: Path | None = None
    """A partition.json or splits/ folder (overrides both)."""
    backend: Literal["auto", "cpu", "gsplat", "reference"] = "auto"
    """Rasterizer: auto = gsplat on CUDA, our compiled kernels on CPU."""
    device: str = "auto"
    """torch device: auto (cuda when present, else cpu), cpu or cuda[:i]."""
    seed: int = 0
    """Seeds initialisation, view order and the strategy's draws (runs are repeatable)."""
    max_gaussians: int = 0
    """Hard cap on the count for any strategy; the least opaque are dropped (0 = no cap)."""
    sh_degree: int = 3
    """Final SH degree (0..3)."""
    sh_degree_interval: int | None = None
    """Raise the SH degree by one every this many steps (1,000 at 30k steps)."""
    ssim_lambda: float = 0.2
    """Loss = (1 - lambda) L1 + lambda (1 - SSIM)."""
    init_opacity: float | None = None
    """Initial opacity (activated); default 0.5 for MCMC from SfM points (gsplat's MCMC preset),
    0.1 otherwise (a random start at 0.5 is a fog short runs cannot clear)."""
    init_scale: float | None = None
    """Factor on the kNN initial scales; default 0.1 for MCMC from SfM points, 1.0 otherwise."""
    init_random_count: int = 100_000
    """Gaussians for random initialisation (scenes without sparse points)."""
    init_extent: float = 3.0
    """Half-size of the random initialisation cube, in scene scales."""
    world_unit: float | None = None
    """The length (world units) that MCMC's position noise and scale regulariser, the pose
    corrections' translations and the near plane are measured in, as gsplat's trainer has them in
    its normalised world (``normalize_world_space``), so that they do not depend on the arbitrary
    scale of an SfM reconstruction. None (default): the scene's :meth:`~splatforge.data.scene.SceneData.world_unit`
    (the cameras' median distance from their focus point), written resolved to ``cfg.yml``. Runs
    whose ``cfg.yml`` predates the field read 1.0: the scene's own units, as they were trained."""
    random_background: bool | None = None
    """Render on a random background colour each step (gsplat's random_bkgd), images with alpha
    composited on the same colour: Gaussians of the background's colour cannot stand in for
    empty space. None (default): on for scenes whose images have alpha (RGBA, e.g. Blender
    scenes; their renders are drawn on the colour the images are composited on, white unless
    the scene says), off otherwise (opaque images carry their background)."""
    checkpoint_every: int = 1000
    """Also checkpoint every this many steps (0: only at the end)."""
    cache_dir: Path | None = None
    """Undistorted/downscaled image copies (default: <output>/cache; never inside data)."""
    torch_threads: int = 0
    """Threads of torch's own ops while training on the CPU (0: one, leaving the cores to the
    compiled kernels; see ``Trainer.compute_threads``)."""
    depth_prior: str | None = None
    """Supervise the rendered inverse depth: a folder of depth maps (Inria's layout, with or without
    depth_params.json), depth-anything (run into <output>/depth_prior), or sfm (the sparse COLMAP
    depths); None: off. See splatforge.train.depth."""
    depth_weight_init: float = 1.0
    """Weight of the depth term at the first step (Inria's depth_l1_weight_init)."""
    depth_weight_final: float = 0.01
    """Weight at the last step, reached log-linearly (Inria's depth_l1_weight_final)."""
    depth_filter_px: float = 0.0
    """Multi-view check of a dense prior (CityGS-X's filter, e.g. 1): a pixel supervises only when
    its aligned depth, sent to up to 8 neighbouring training views (view directions within 30
    degrees) and back, lands within this many pixels in more than one. 0 (default): off; it needs
    two such neighbours per view, which sparse captures lack (skull: most views have one)."""
    depth_model: str = "depth-anything/Depth-Anything-V2-Small-hf"
    """Depth Anything model for --depth-prior depth-anything (a Hugging Face id or a local folder)."""
    masks: bool = True
    """Use SCENE/masks/<image stem>.png (white = keep) when the scene has them: masked pixels take
    no part in the loss (so neither in the densification statistics); metrics.json adds masked
    PSNR/SSIM."""
    invert_masks: bool = False
    """The masks mark what to ignore (white = ignore)."""
    alpha_mask: bool = False
    """Use the images' alpha channel as the mask (alpha > 0.5 kept) instead of compositing it onto a
    background (RGBA captures with the subject cut out)."""
    exposure: bool = False
    """Per-image exposure compensation (Inria's 2024 exposure: a 3x4 colour affine per view,
    identity at first, with its own Adam); test views are then evaluated by Inria's
    --train_test_exp protocol (an affine fitted on the left half, metrics on the right half)."""
    exposure_lr_init: float = 0.01
    """Learning rate of the exposure affines at the first step (Inria's exposure_lr_init)."""
    exposure_lr_final: float = 0.001
    """... at the last step, reached log-linearly (Inria's exposure_lr_final)."""
    pose_opt: bool = False
    """Refine the training views' poses (gsplat's pose_opt: a 6D-rotation + translation correction
    per view, in the camera's frame, with its own Adam); cameras.json then holds the refined
    poses."""
    pose_opt_lr: float = 1e-5
    """Learning rate of the pose corrections (gsplat's pose_opt_lr)."""
    pose_opt_reg: float = 1e-6
    """Their Adam weight decay (gsplat's pose_opt_reg)."""
    pose_align_steps: int = 200
    """With pose_opt, evaluation first aligns each test view's pose to the trained Gaussians
    (the refined training poses are in a slightly moved frame): this many Adam steps per view
    (0: score the given test poses); metrics.json says so in test_poses."""
    pose_align_lr: float = 2e-3
    """Learning rate of that alignment, decaying log-linearly to 1 % of it."""
    rasterize_mode: Literal["classic", "antialiased"] = "classic"
    """classic (3DGS), or antialiased (Mip-Splatting's 2D filter: opacities times the
    compensation factor, Yu et al. 2024): saved in cfg.yml, so render, eval, export and every
    product of the run use the mode it was trained with."""
    block_plan: Path | None = None
    """A blocks.json (``splatforge blocks plan``): train only block ``block_id``: its images (of
    the training split) and the SfM points inside its enlarged box."""
    block_id: str | None = None
    """The block of ``block_plan`` to train, e.g. ``0_1``."""
    strategy: Literal["default", "mcmc", "none"] = "mcmc"
    """Densification: mcmc (relocation, regularised: few floaters, the count never above the
    cap), default (3DGS adaptive density control) or none (the initial Gaussians, fixed in
    number)."""
    lr: LearningRates = field(default_factory=LearningRates)
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    mcmc: MCMCConfig = field(default_factory=MCMCConfig)

    def strategy_config(self) -> DensifyConfig | MCMCConfig:
        """The hyper-parameters of the chosen strategy."""
        return self.mcmc if self.strategy == "mcmc" else self.densify

    def resolve(self) -> TrainConfig:
        """Fill in, in place, what depends on other fields (strategy-dependent initialisation,
        schedules scaled to ``steps``, ``device="auto"``) and check the values; returns self.

        Raises:
            ConfigError: a value that cannot work, naming the field.
        """
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if not 1 <= self.batch_size <= 9:
            raise ConfigError(
                f"batch_size must be 1..9 (Adam's beta1 = 1 - 0.1 B stays positive), got {self.batch_size}"
            )
        if self.sh_degree not in (0, 1, 2, 3):
            raise ConfigError(f"sh_degree must be 0..3, got {self.sh_degree}")
        if self.data_factor < 1:
            raise ConfigError(f"data_factor must be >= 1, got {self.data_factor}")
        if self.max_image_size < 0:
            raise ConfigError(f"max_image_size must be >= 0, got {self.max_image_size}")
        if not 0.0 <= self.ssim_lambda <= 1.0:
            raise ConfigError(f"ssim_lambda must be in [0, 1], got {self.ssim_lambda}")
        if self.strategy not in ("default", "mcmc", "none"):
            raise ConfigError(f"strategy must be 'default', 'mcmc' or 'none', got {self.strategy!r}")
        if self.max_gaussians < 0:
            raise ConfigError(f"max_gaussians must be >= 0, got {self.max_gaussians}")
        self.device = resolve_device(self.device)
        from splatforge.train.depth import check_depth_prior

        check_depth_prior(self.depth_prior)
        if self.depth_filter_px < 0:
            raise ConfigError(f"depth_filter_px must be >= 0 (pixels; 0 is off), got {self.depth_filter_px}")
        if self.depth_weight_init < 0 or self.depth_weight_final < 0:
            raise ConfigError(f"depth weights must be >= 0, got {self.depth_weight_init} and {self.depth_weight_final}")
        if self.init_opacity is not None and not 0.0 < self.init_opacity < 1.0:
            raise ConfigError(f"init_opacity must be in (0, 1), got {self.init_opacity}")
        if self.init_scale is not None and not self.init_scale > 0.0:
            raise ConfigError(f"init_scale must be positive, got {self.init_scale}")
        if self.world_unit is not None and not 0.0 < self.world_unit < float("inf"):
            raise ConfigError(f"world_unit must be a positive length, got {self.world_unit}")
        if self.sh_degree_interval is None:
            self.sh_degree_interval = scaled_iter(1000, self.steps)
        m = self.mcmc
        if m.refine_stop_iter is None:
            m.refine_stop_iter = scaled_iter(25_000, self.steps)
        if m.refine_start_iter is None:
            m.refine_start_iter = min(500, m.refine_stop_iter // 5)
        if m.refine_every is None:
            m.refine_every = min(100, max(MIN_REFINE_EVERY, (m.refine_stop_iter - m.refine_start_iter) // 20))
        if self.densify.grow_grad2d is None:
            self.densify.grow_grad2d = 8e-4 if self.densify.absgrad else 2e-4
        for group, defaults in _SCHEDULE_DEFAULTS.items():
            sub = getattr(self, group)
            for name, value in defaults.items():
                if getattr(sub, name) is None:
                    floor = {"refine_start_iter": 0, "refine_every": MIN_REFINE_EVERY}.get(name, 1)
                    setattr(sub, name, scaled_iter(value, self.steps, minimum=floor))
                elif getattr(sub, name) < 0 or (name != "refine_start_iter" and getattr(sub, name) == 0):
                    raise ConfigError(f"{group}.{name} must be positive, got {getattr(sub, name)}")
        if self.pose_align_steps < 0 or not self.pose_align_lr > 0:
            raise ConfigError(
                "pose_align_steps must be >= 0 and pose_align_lr > 0, "
                f"got {self.pose_align_steps} and {self.pose_align_lr}"
            )
        if self.exposure and not (self.exposure_lr_init > 0 and self.exposure_lr_final > 0):
            raise ConfigError(
                f"exposure learning rates must be positive, got {self.exposure_lr_init} and {self.exposure_lr_final}"
            )
        if self.rasterize_mode not in ("classic", "antialiased"):
            raise ConfigError(f"rasterize_mode must be 'classic' or 'antialiased', got {self.rasterize_mode!r}")
        if (self.block_plan is None) != (self.block_id is None):
            raise ConfigError("block_plan and block_id go together: give both (or neither)")
        if self.output is not None and Path(self.output).resolve() == Path(self.data).resolve():
            raise ConfigError(f"the output folder must not be the input scene folder ({self.data})")
        return self

    def resolve_init(self, from_points: bool) -> TrainConfig:
        """Fill in ``init_opacity`` and ``init_scale`` for a start from SfM points or a random one
        (see the fields), in place; returns self. Measured on the demo scene (random start,
        300 steps): MCMC at 0.1/1.0 reaches 27.2 dB, at gsplat's 0.5/0.1 17.6 dB."""
        mcmc_points = self.strategy == "mcmc" and from_points
        if self.init_opacity is None:
            self.init_opacity = 0.5 if mcmc_points else 0.1
        if self.init_scale is None:
            self.init_scale = 0.1 if mcmc_points else 1.0
        return self

    @property
    def cap(self) -> int:
        """The count the Gaussians never exceed: ``max_gaussians`` (0: none) and, for MCMC, its
        ``cap_max``."""
        caps = [c for c in (self.max_gaussians, self.mcmc.cap_max if self.strategy == "mcmc" else 0) if c > 0]
        return min(caps) if caps else 0


def to_plain(value: Any) -> Any:
    """Paths as strings, recursively (for YAML and checkpoints)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_plain(dataclasses.asdict(cfg)), sort_keys=False))


#: Field names of configs written before the schedules took gsplat's names.
_RENAMED = {"refine_start": "refine_start_iter", "refine_stop": "refine_stop_iter"}


def load_config(path: Path) -> TrainConfig:
    """Read a ``cfg.yml`` back into a :class:`TrainConfig` (also one written by earlier
    versions, whose schedule fields were ``refine_start``/``refine_stop`` and which had no
    ``world_unit``: 1.0, the units they were trained in).

    Raises:
        ConfigError: unreadable file or unknown keys.
    """
    try:
        raw = yaml.safe_load(Path(path).read_text())
        if not isinstance(raw, dict):
            raise TypeError("the file does not hold a mapping")
        subs = {}
        for key, cls in (("lr", LearningRates), ("densify", DensifyConfig), ("mcmc", MCMCConfig)):
            sub = raw.pop(key, None) or {}
            subs[key] = cls(**{_RENAMED.get(k, k): v for k, v in sub.items()})
        for key in ("data", "output", "partition", "cache_dir", "block_plan"):
            if raw.get(key) is not None:
                raw[key] = Path(raw[key])
        raw.setdefault("world_unit", 1.0)  # written before the field: trained in the scene's own units
        return TrainConfig(**raw, **subs)
    except (OSError, yaml.YAMLError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a readable splatforge config: {exc}") from exc
