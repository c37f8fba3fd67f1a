"""Versioned, atomically written training checkpoints."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from splatforge._fs import atomic_path
from splatforge.errors import DataFormatError

__all__ = ["CHECKPOINT_VERSION", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def save_checkpoint(folder: Path, step: int, payload: dict[str, Any]) -> Path:
    """Write ``folder/ckpt_<step>.pt`` atomically (temp file, then rename).

    ``payload`` holds ``params``, ``optimizers``, ``schedulers``, ``strategy_state``, RNG states
    and ``config``; ``version`` and ``step`` (the next step to run) are added here.
    """
    path = Path(folder) / f"ckpt_{step:06d}.pt"
    with atomic_path(path) as tmp:
        torch.save({"version": CHECKPOINT_VERSION, "step": step, **payload}, tmp)
    return path


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint with the highest step in ``folder``, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def load_checkpoint(path: Path, mmap: bool = True) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with ``weights_only=True`` (tensors, numbers, strings and
    containers only: a run folder from elsewhere cannot execute code through pickle), memory-mapped
    by default (a reader of the parameters alone does not read the optimizer state).

    Raises:
        DataFormatError: unreadable file, content other than plain data, or a version this code
            does not know.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise DataFormatError(f"{path}: not a readable checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise DataFormatError(
            f"{path}: checkpoint version {ckpt.get('version') if isinstance(ckpt, dict) else '?'} "
            f"is not {CHECKPOINT_VERSION}"
        )
    return ckpt
