"""Training configuration: one dataclass, written resolved to every run folder as ``cfg.yml``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from splatforge._fs import atomic_path
from splatforge.errors import ConfigError

__all__ = ["TrainConfig", "LearningRates", "DensifyConfig", "MCMCConfig", "save_config", "load_config", "to_plain"]


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
    """gsplat ``DefaultStrategy`` (adaptive density control of 3DGS) hyper-parameters."""

    refine_start: int = 500
    """First step that grows or prunes."""
    refine_stop: int = 15_000
    """No growing, pruning or opacity reset from this step on."""
    refine_every: int = 100
    reset_every: int = 3_000
    """Opacity reset period (gsplat 1.5.3 never resets by itself; the trainer does)."""
    grow_grad2d: float = 2e-4
    """Mean screen-space gradient (NDC units) above which a Gaussian is cloned or split."""
    prune_opa: float = 5e-3
    absgrad: bool = False
    """Use AbsGS absolute gradients (then grow_grad2d is usually raised to ~8e-4)."""


@dataclass
class MCMCConfig:
    """gsplat ``MCMCStrategy`` (Kheradmand et al. 2024) hyper-parameters, used with
    ``strategy="mcmc"``; the count never exceeds ``cap_max`` (or ``max_gaussians`` if smaller)."""

    cap_max: int = 1_000_000
    refine_start: int = 500
    refine_stop: int = 25_000
    refine_every: int = 100
    min_opacity: float = 0.005
    noise_lr: float = 5e5
    opacity_reg: float = 0.01
    """Loss weight of the mean opacity."""
    scale_reg: float = 0.01
    """Loss weight of the mean scale."""


@dataclass
class TrainConfig:
    """Everything a training run depends on."""

    data: Path
    """Scene folder (COLMAP sparse/0 + images, or transforms.json)."""
    output: Path
    """Run folder: outputs, checkpoints and this config go here."""
    data_factor: int = 1
    """Read images_<k> (k > 1) instead of images/."""
    steps: int = 30_000
    test_every: int = 8
    """Every k-th image (sorted by name) is a test view; 0 for none."""
    split_ratio: Optional[float] = None
    """Fraction of views used for training, evenly spread (overrides test_every)."""
    partition: Optional[Path] = None
    """A partition.json or splits/ folder (overrides both)."""
    backend: Literal["auto", "cpu", "gsplat", "reference"] = "auto"
    device: str = "cpu"
    """torch device: cpu or cuda[:i]."""
    seed: int = 0
    max_gaussians: int = 0
    """Hard cap on the count; the least opaque are dropped (0 = no cap)."""
    sh_degree: int = 3
    sh_degree_interval: int = 1000
    """Raise the SH degree by one every this many steps."""
    ssim_lambda: float = 0.2
    """Loss = (1 - lambda) L1 + lambda (1 - SSIM)."""
    init_opacity: Optional[float] = None
    """Initial opacity (activated); default 0.1, or 0.5 with strategy="mcmc" (gsplat's presets)."""
    init_scale: Optional[float] = None
    """Factor on the kNN initial scales; default 1.0, or 0.1 with strategy="mcmc"."""
    init_random_count: int = 100_000
    """Gaussians for random initialisation (scenes without sparse points)."""
    init_extent: float = 3.0
    """Half-size of the random initialisation cube, in scene scales."""
    random_background: bool = False
    checkpoint_every: int = 1000
    """Also checkpoint every this many steps (0: only at the end)."""
    cache_dir: Optional[Path] = None
    """Undistorted/downscaled image copies (default: <output>/cache; never inside data)."""
    strategy: Literal["default", "mcmc"] = "default"
    """Densification: 3DGS adaptive density control, or MCMC relocation (CPU path included)."""
    lr: LearningRates = field(default_factory=LearningRates)
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    mcmc: MCMCConfig = field(default_factory=MCMCConfig)

    def validate(self) -> "TrainConfig":
        """Resolve strategy-dependent defaults in place; raise ConfigError for values that cannot
        work."""
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.sh_degree not in (0, 1, 2, 3):
            raise ConfigError(f"sh_degree must be 0..3, got {self.sh_degree}")
        if self.data_factor < 1:
            raise ConfigError(f"data_factor must be >= 1, got {self.data_factor}")
        if not 0.0 <= self.ssim_lambda <= 1.0:
            raise ConfigError(f"ssim_lambda must be in [0, 1], got {self.ssim_lambda}")
        if self.strategy not in ("default", "mcmc"):
            raise ConfigError(f"strategy must be 'default' or 'mcmc', got {self.strategy!r}")
        mcmc = self.strategy == "mcmc"
        if self.init_opacity is None:
            self.init_opacity = 0.5 if mcmc else 0.1
        if self.init_scale is None:
            self.init_scale = 0.1 if mcmc else 1.0
        if not 0.0 < self.init_opacity < 1.0:
            raise ConfigError(f"init_opacity must be in (0, 1), got {self.init_opacity}")
        if Path(self.output).resolve() == Path(self.data).resolve():
            raise ConfigError(f"the output folder must not be the input scene folder ({self.data})")
        return self


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


def load_config(path: Path) -> TrainConfig:
    """Read a ``cfg.yml`` back into a :class:`TrainConfig`.

    Raises:
        ConfigError: unreadable file or unknown keys.
    """
    try:
        raw = yaml.safe_load(Path(path).read_text())
        lr = LearningRates(**raw.pop("lr", {}))
        densify = DensifyConfig(**raw.pop("densify", {}))
        mcmc = MCMCConfig(**raw.pop("mcmc", {}))
        for key in ("data", "output", "partition", "cache_dir"):
            if raw.get(key) is not None:
                raw[key] = Path(raw[key])
        return TrainConfig(**raw, lr=lr, densify=densify, mcmc=mcmc)
    except (OSError, yaml.YAMLError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a readable splatforge config: {exc}") from exc
