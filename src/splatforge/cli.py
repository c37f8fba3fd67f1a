"""The ``splatforge`` command. Thin: it parses arguments and calls one library function."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Literal, Optional

import tyro
from rich.console import Console
from rich.logging import RichHandler

from splatforge.errors import SplatforgeError

def demo(
    output: Path = Path("out/demo"),
    data: Optional[Path] = None,
    steps: int = 30,
    seed: int = 0,
    backend: Literal["auto", "cpu", "gsplat", "reference"] = "auto",
) -> None:
    """Render real Gaussians (the garden test scene if found, else a procedural torus) on the CPU
    and re-learn their colours by gradient descent; writes PNGs to OUTPUT and prints a summary.

    Args:
        output: folder for the PNGs.
        data: garden .npz; by default ../shared/datasets/garden/test_garden.npz if present, else a
            procedural scene (no network needed).
        steps: Adam steps of the colour fit.
        seed: random seed.
        backend: rasterizer backend.
    """
    from splatforge.demo import run_demo

    summary = run_demo(output, data, steps=steps, seed=seed, backend=backend)
    print(json.dumps(summary, indent=2))


def backends() -> None:
    """List the rasterizer backends usable on this machine (never builds gsplat)."""
    import torch

    from splatforge.raster import available_backends

    print("cpu tensors: ", ", ".join(available_backends("cpu")))
    if torch.cuda.is_available():
        print("cuda tensors:", ", ".join(available_backends("cuda")))
    else:
        print("cuda tensors: no CUDA device")


def main(argv: Optional[list[str]] = None) -> int:
    # Logs and progress go to stderr; stdout carries only results (JSON summaries, listings).
    logging.basicConfig(
        level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=Console(stderr=True), show_path=False)]
    )
    try:
        tyro.extras.subcommand_cli_from_dict({"demo": demo, "backends": backends}, args=argv, prog="splatforge")
    except SplatforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)  # one unwrapped line naming the file at fault
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
