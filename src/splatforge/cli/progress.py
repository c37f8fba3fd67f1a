"""The CLI's renderer of pipeline events (:mod:`splatforge.pipeline.events`): one line per stage
on stderr, the plan before training, and a rich progress bar with the ETA while it trains."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from splatforge.pipeline.events import (
    Event,
    StageDone,
    StageFailed,
    StageNote,
    StageStarted,
    TrainStarted,
    TrainStep,
)

__all__ = ["RichProgress"]


class RichProgress:
    """An event sink that draws on ``console`` (use it as a context manager, so that a bar still
    open when the job stops is closed)."""

    def __init__(self, console: Console, label: str = "train"):
        self.console = console
        self.label = label
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> RichProgress:  # noqa: PYI034 (Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = self._task = None

    def _open_bar(self, steps: int, start: int) -> None:
        self._close_bar()
        columns = [
            TextColumn(f"[bold]{self.label}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        ]
        self._bar = Progress(*columns, console=self.console, transient=False)
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=steps, completed=start, stats="")

    def __call__(self, event: Event) -> None:
        if isinstance(event, TrainStep):
            if self._bar is None:
                self._open_bar(event.steps, 0)
            stats = f"loss {event.loss:.4f}  PSNR {event.psnr:5.2f}  #G {event.num_gaussians:,}  {event.its:5.1f} it/s"
            self._bar.update(self._task, completed=event.step, stats=stats)
        elif isinstance(event, TrainStarted):
            if event.start_step:
                self.console.print(f"resuming training from step {event.start_step:,} of {event.steps:,}")
            if event.plan:
                self.console.print(event.plan, soft_wrap=True)
            self._open_bar(event.steps, event.start_step)
        elif isinstance(event, StageStarted):
            self._close_bar()
            self.console.print(f"[bold]{event.stage}")
        elif isinstance(event, StageDone):
            self._close_bar()
            if event.skipped:
                self.console.print(f"[bold]{event.stage}[/bold]: done by an earlier run with the same inputs, skipped")
            for warning in event.warnings:
                self.console.print(f"[yellow]warning[/yellow]: {event.stage}: {warning}", soft_wrap=True)
        elif isinstance(event, StageFailed):
            self._close_bar()
        elif isinstance(event, StageNote):
            style = "[yellow]warning[/yellow]: " if event.level == "warning" else ""
            self.console.print(f"{style}{event.stage}: {event.message}", soft_wrap=True)
