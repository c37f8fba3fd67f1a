"""Start a command as a user would, and kill it with SIGKILL mid-way (the resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

CLI = [sys.executable, "-m", "splatforge.cli"]


def kill_when(args: list[str], ready: Callable[[], bool], timeout: float = 600.0, cwd=None) -> None:
    """Run ``splatforge ARGS`` in its own process group and SIGKILL the whole group (the command
    and any process it started) as soon as ``ready()`` is true; fails the test when the command
    ends first or ``timeout`` seconds pass."""
    proc = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, cwd=cwd
    )
    deadline = time.time() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(
                    f"the command ended (exit {proc.returncode}) before it could be killed: "
                    f"{proc.stderr.read()[-2000:]}"
                )
            if time.time() > deadline:
                pytest.fail(f"not ready to kill after {timeout:.0f} s")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def run_cli(args: list[str], timeout: float = 900.0, cwd=None) -> subprocess.CompletedProcess:
    """``splatforge ARGS`` in a subprocess, its output captured as text."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)


def checkpoint_in(folder) -> Callable[[], bool]:
    """True once ``folder`` holds a checkpoint (written atomically: complete when it is there)."""
    return lambda: folder.is_dir() and any(p.name.startswith("ckpt_") for p in folder.iterdir())
