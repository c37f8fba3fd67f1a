"""What the commands share: the stderr console, quiet COLMAP logs, the option prescan."""

from __future__ import annotations

import argparse
from typing import Literal

from rich.console import Console

__all__ = ["STDERR", "Backend", "prescan", "quiet_colmap"]

STDERR = Console(stderr=True)
"""Logs and progress go to stderr; stdout carries only results (JSON summaries, listings)."""
Backend = Literal["auto", "cpu", "gsplat", "reference"]


def quiet_colmap() -> None:
    """COLMAP logs every step at INFO through glog; keep warnings and errors only."""
    import pycolmap

    pycolmap.logging.minloglevel = 1


def prescan(argv: list[str], **defaults: str) -> dict[str, str]:
    """The values of a few options before the full parse (argparse, no abbreviations)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name, default in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default)
    known, _ = parser.parse_known_args(argv)
    return vars(known)
