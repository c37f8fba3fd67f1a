"""Progress as typed events: what every pipeline reports, whoever shows it.

A job's stages (:mod:`splatforge.pipeline.engine`) and its training loop emit these; the CLI's
rich display (:class:`splatforge.cli.progress.RichProgress`), the splatter node's JSON lines
(:class:`splatforge.pipeline.splatter.NodeProgress`) and the server's ``progress`` field are
renderers of the one stream. An event sink is any ``Callable[[Event], None]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

__all__ = [
    "Event",
    "EventSink",
    "StageDone",
    "StageFailed",
    "StageNote",
    "StageStarted",
    "TrainStarted",
    "TrainStep",
    "ignore",
    "train_progress",
]


@dataclass(frozen=True)
class StageStarted:
    """A stage starts (it was not fresh in the manifest)."""

    stage: str


@dataclass(frozen=True)
class StageDone:
    """A stage finished, or was ``skipped`` because its manifest record is fresh (same inputs,
    outputs still there). ``info``: the stage's summary (what it also records in the manifest);
    ``warnings``: what a best-effort part of it could not do."""

    stage: str
    seconds: float
    skipped: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageFailed:
    """A stage raised; ``error`` is its one-line message. The job stops after it."""

    stage: str
    error: str


@dataclass(frozen=True)
class StageNote:
    """Something a running stage says: a phase (``prepare: sfm``), one dataset's frames written,
    a warning (``level="warning"``). ``fraction`` in [0, 1] is how far the stage is, when known."""

    stage: str
    message: str
    level: str = "info"
    fraction: float | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainStarted:
    """Training begins at ``start_step`` (> 0: resumed from a checkpoint) of ``steps``; ``plan`` is
    the one line saying what it will do and about how long it takes (empty when not estimated)."""

    stage: str
    steps: int
    start_step: int
    image_size: tuple[int, int]
    plan: str = ""


@dataclass(frozen=True)
class TrainStep:
    """One reported training step: the loss and PSNR (dB) of that step's views, the Gaussian
    count and the speed in steps per second (of that step)."""

    stage: str
    step: int
    steps: int
    loss: float
    psnr: float
    num_gaussians: int
    its: float

    def line(self) -> dict[str, Any]:
        """The step as a JSON progress line's fields: ``step``, ``steps``, ``loss`` (5 decimals),
        ``psnr`` (dB, 2 decimals), ``num_gaussians`` (what the node's and the dataset jobs' lines
        carry)."""
        return {
            "step": self.step,
            "steps": self.steps,
            "loss": round(self.loss, 5),
            "psnr": round(self.psnr, 2),
            "num_gaussians": self.num_gaussians,
        }

    @property
    def eta_s(self) -> float | None:
        """Seconds left at this step's speed (None when unknown)."""
        return (self.steps - self.step) / self.its if self.its > 0 else None


Event = Union[StageStarted, StageDone, StageFailed, StageNote, TrainStarted, TrainStep]  # noqa: UP007 (a runtime alias)
EventSink = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The sink that drops every event."""


def train_progress(emit: EventSink, stage: str, steps: int) -> Callable[[int, float, float, int, float], None]:
    """The trainer's progress callback (``progress(step, loss, psnr, n, its)``, see
    :meth:`splatforge.train.Trainer.train`) as :class:`TrainStep` events into ``emit``."""

    def progress(step: int, loss: float, psnr: float, n: int, its: float) -> None:
        emit(TrainStep(stage, step, steps, float(loss), float(psnr), int(n), float(its)))

    return progress
