"""Where a training step's time goes: the parts of ``Trainer.train_step(times=...)`` (what
``bench/train.py`` breaks a step down into)."""

from __future__ import annotations

import dataclasses
import time

import torch

__all__ = ["StepClock", "StepTimes"]


@dataclasses.dataclass
class StepTimes:
    """Seconds spent in each part of the steps timed with ``Trainer.train_step(times=...)``:
    rasterizer forward, SSIM (forward), the rest of the loss, backward (rasterizer and SSIM),
    Adam, strategy (and cap); ``total`` is the whole step, the difference is Python overhead."""

    forward: float = 0.0
    ssim: float = 0.0
    loss: float = 0.0
    backward: float = 0.0
    adam: float = 0.0
    strategy: float = 0.0
    total: float = 0.0
    steps: int = 0


class StepClock:
    """Laps of one step into a :class:`StepTimes` (no-op without one)."""

    def __init__(self, times: StepTimes | None, device: torch.device):
        self.times, self.device = times, device
        if times is not None:
            self._sync()
            self.t0 = self.t = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lap(self, name: str) -> None:
        if self.times is None:
            return
        self._sync()
        now = time.perf_counter()
        setattr(self.times, name, getattr(self.times, name) + now - self.t)
        self.t = now

    def done(self) -> None:
        if self.times is not None:
            self.times.total += time.perf_counter() - self.t0
            self.times.steps += 1
