"""Training: configuration and presets, strategies, the loop, checkpoints, and ``Run`` (a trained
run folder opened for rendering). Importing this package does not import gsplat: the strategies
(gsplat's, subclassed) are imported when a :class:`Trainer` is built."""

from splatforge.train.config import DensifyConfig, LearningRates, MCMCConfig, TrainConfig, load_config, save_config
from splatforge.train.presets import PRESETS, Preset, apply_preset, resolve_preset
from splatforge.train.run import Run
from splatforge.train.trainer import StepTimes, Trainer, TrainResult

__all__ = [
    "PRESETS",
    "DensifyConfig",
    "LearningRates",
    "MCMCConfig",
    "Preset",
    "Run",
    "StepTimes",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "apply_preset",
    "load_config",
    "resolve_preset",
    "save_config",
]
