"""Shared by the benchmark scripts: the machine description and the JSON result file."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numba
import torch


def machine_info(load_before: tuple[float, float, float]) -> dict:
    """Platform, CPU count, threads, GPU, versions and the load average before/after the run."""
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "versions": {"torch": torch.__version__, "numba": numba.__version__, "python": platform.python_version()},
    }


def write_result(path: Path, benchmark: str, load_before: tuple[float, float, float], **fields) -> None:
    """Write ``{"benchmark", "date", "machine", **fields}`` to ``path`` atomically."""
    payload = {"benchmark": benchmark, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(load_before), **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
