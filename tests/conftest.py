import os
import sys
from pathlib import Path

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
