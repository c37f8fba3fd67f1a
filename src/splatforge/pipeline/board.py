"""The live table ``splatforge generate`` shows on stderr (rich): jobs running, done and failed
per device, and an ETA from the jobs finished so far."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

__all__ = ["JobBoard"]


class JobBoard:
    """Call it as ``generate``'s ``on_event(event, spec, result, device)``; show it with
    ``with board.live: ...``."""

    def __init__(self, total: int, console: Console | None = None):
        self.total, self.t0 = total, None
        self.per_device: dict[str, dict[str, int]] = {}
        self.durations: list[float] = []
        self.begin: dict[str, float] = {}
        self.live = Live(self._table(), console=console or Console(stderr=True), refresh_per_second=2)

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

    def __call__(self, event: str, spec, result, device: str) -> None:
        c = self.per_device.setdefault(device, {"running": 0, "done": 0, "failed": 0})
        if self.t0 is None:
            self.t0 = time.monotonic()
        if event == "start":
            c["running"] += 1
            self.begin[spec.name] = time.monotonic()
        else:
            c["running"] -= 1
            c["done" if result["status"] == "done" else "failed"] += 1
            self.durations.append(time.monotonic() - self.begin.pop(spec.name, time.monotonic()))
        self.live.update(self._table())
