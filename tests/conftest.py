import os
import sys
from pathlib import Path

import pytest
import torch

# Let tests import their helpers (tests/scenes.py) as plain modules.
sys.path.insert(0, str(Path(__file__).parent))


def pytest_runtest_logreport(report):
    """With ``SPLATFORGE_FAILURES_LOG=FILE``, append each failure's report to FILE as it happens
    (pytest, and xdist, print them only at the end: a run cut short by a time limit, as on a
    borrowed GPU machine, would otherwise keep no failure text). Off by default."""
    path = os.environ.get("SPLATFORGE_FAILURES_LOG")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # under xdist the controller gets every worker's reports: written once, there
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


_REAL_CUDA_AVAILABLE = torch.cuda.is_available
_ORIGINAL_VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.fixture(scope="session", autouse=True)
def _no_gpu_by_default():
    """Tests see no GPU, on any machine, unless marked ``gpu`` (see ``_gpu_when_marked``): a GPU
    machine runs the suite CI runs, plus the ``gpu`` tests. ``device="auto"`` (the library's
    default) resolves to the CPU, and the processes the tests start get ``CUDA_VISIBLE_DEVICES=""``
    (which the GPU slots of generate, serve and blocks follow). Session-wide, so that module
    fixtures that train (``device="auto"``) train on the CPU too. ``SPLATFORGE_TEST_DEVICE=auto``
    lets every test use the GPU instead (``scripts/gpu_check.sh`` runs the training test files so)."""
    if os.environ.get("SPLATFORGE_TEST_DEVICE", "cpu") != "cpu":
        yield
        return
    _REAL_CUDA_AVAILABLE()  # CUDA reads CUDA_VISIBLE_DEVICES once: let it see the real one first
    mp = pytest.MonkeyPatch()
    mp.setenv("CUDA_VISIBLE_DEVICES", "")
    mp.setattr(torch.cuda, "is_available", lambda: False)
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _gpu_when_marked(request, monkeypatch):
    """A test marked ``gpu`` is skipped without a CUDA device, and otherwise sees the machine's
    GPUs (the environment as it was)."""
    if not request.node.get_closest_marker("gpu"):
        return
    if not _REAL_CUDA_AVAILABLE():
        pytest.skip("needs an NVIDIA GPU")
    if torch.cuda.is_available is not _REAL_CUDA_AVAILABLE:
        monkeypatch.setattr(torch.cuda, "is_available", _REAL_CUDA_AVAILABLE)
        if _ORIGINAL_VISIBLE is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", _ORIGINAL_VISIBLE)
