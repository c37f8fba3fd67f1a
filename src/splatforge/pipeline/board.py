"""The live view ``splatforge generate`` shows on stderr (rich): jobs running, done and failed
per device, an ETA from the jobs finished so far, and what each running job is doing (its stage,
its training step), from the progress lines its stages' events become."""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

__all__ = ["JobBoard"]


class JobBoard:
    """Call it as ``generate``'s ``on_event(event, spec, result, device)`` and give
    :meth:`progress` as its ``on_progress``; show it with ``with board.live: ...``."""

    def __init__(self, total: int, console: Console | None = None):
        self.total, self.t0 = total, None
        self.per_device: dict[str, dict[str, int]] = {}
        self.durations: list[float] = []
        self.begin: dict[str, float] = {}
        self.doing: dict[str, str] = {}  # running job -> what it is doing
        self.live = Live(self.renderable(), console=console or Console(stderr=True), refresh_per_second=2)

    def _table(self) -> Table:
        table = Table(title="splatforge generate")
        for col in ("device", "running", "done", "failed"):
            table.add_column(col)
        for dev, c in sorted(self.per_device.items()):
            table.add_row(dev, str(c["running"]), str(c["done"]), str(c["failed"]))
        finished = sum(c["done"] + c["failed"] for c in self.per_device.values())
        running = sum(c["running"] for c in self.per_device.values())
        eta = ""
        if self.durations and self.t0 is not None:
            rate = finished / max(time.monotonic() - self.t0, 1e-9)
            eta = f"  ETA {(self.total - finished) / max(rate, 1e-9) / 60:.1f} min"
        table.caption = (
            f"{self.total - finished - running} queued, {running} running, {finished}/{self.total} finished{eta}"
        )
        return table

    def renderable(self) -> Group:
        """The device table, then one row per running job with its stage."""
        if not self.doing:
            return Group(self._table())
        jobs = Table(show_header=True, box=None)
        jobs.add_column("job")
        jobs.add_column("doing")
        for name, text in sorted(self.doing.items()):
            jobs.add_row(name, text)
        return Group(self._table(), jobs)

    def __call__(self, event: str, spec, result, device: str) -> None:
        c = self.per_device.setdefault(device, {"running": 0, "done": 0, "failed": 0})
        if self.t0 is None:
            self.t0 = time.monotonic()
        if event == "start":
            c["running"] += 1
            self.begin[spec.name] = time.monotonic()
            self.doing[spec.name] = "starting"
        else:
            c["running"] -= 1
            c["done" if result["status"] == "done" else "failed"] += 1
            self.durations.append(time.monotonic() - self.begin.pop(spec.name, time.monotonic()))
            self.doing.pop(spec.name, None)
        self.live.update(self.renderable())

    def progress(self, spec, line: dict) -> None:
        """A progress line of a running job (``{"stage", "status", ...}``: see
        :mod:`splatforge.pipeline.specs`): its stage and, training, the step and PSNR."""
        if spec.name not in self.doing:
            return  # a late line of a job that ended
        text = f"{line.get('stage', '?')} {line.get('status', '')}".strip()
        if "step" in line and "steps" in line:
            text = f"{line.get('stage')} {line['step']:,}/{line['steps']:,}"
            if line.get("psnr") is not None:
                text += f"  PSNR {line['psnr']:.2f}"
        self.doing[spec.name] = text
        self.live.update(self.renderable())
