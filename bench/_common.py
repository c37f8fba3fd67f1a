"""Shared by the benchmark scripts: the machine description, the JSON result file and modules
loaded from earlier git revisions (the baselines of A/B comparisons)."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numba
import torch

ROOT = Path(__file__).resolve().parents[1]


def machine_info(load_before: tuple[float, float, float]) -> dict:
    """Platform, CPU count, threads (torch's and numba's, and numba's threading layer), GPU,
    versions and the load average before/after the run."""
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "versions": {"torch": torch.__version__, "numba": numba.__version__, "python": platform.python_version()},
        "numba_threading_layer": _numba_layer(),
        "numba_threads": numba.get_num_threads(),
    }


def _numba_layer() -> str | None:
    """The threading layer numba's parallel kernels ran on in this process (``tbb`` where a TBB
    library is installed, else ``omp``: they differ by a few %), None when none ran here."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def write_result(path: Path, benchmark: str, load_before: tuple[float, float, float], **fields) -> None:
    """Write ``{"benchmark", "date", "machine", **fields}`` to ``path`` atomically."""
    payload = {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(load_before),
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def module_at(rev: str, path: str, name: str, folder: Path, replace: dict[str, str] | None = None) -> ModuleType:
    """The file ``path`` of git revision ``rev`` imported as the module ``name`` from
    ``folder/name.py`` (its imports rewritten by ``replace``). The file is rewritten only when its
    text changed, so numba's on-disk cache of its kernels (``cache=True``, keyed by the file's
    path and time stamp) survives between runs in a lasting ``folder``.

    Raises:
        subprocess.CalledProcessError: ``path`` does not exist at ``rev``.
    """
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True, check=True
    ).stdout
    for old, new in (replace or {}).items():
        src = src.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{name}.py"
    if not file.is_file() or file.read_text() != src:
        file.write_text(src)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
