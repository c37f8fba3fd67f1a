"""Training: configuration, the loop, losses and checkpoints."""

from splatforge.train.config import DensifyConfig, LearningRates, MCMCConfig, TrainConfig, load_config, save_config
from splatforge.train.trainer import Trainer, TrainResult

__all__ = ["DensifyConfig", "LearningRates", "MCMCConfig", "TrainConfig", "TrainResult", "Trainer", "load_config", "save_config"]
