"""The same trained run rendered by the ``cpu`` backend and by gsplat's CUDA kernels: per test
view, the largest absolute difference and the PSNR between the two images, and each one's PSNR
against the photo. The claim it checks: both backends give the same images to within float
tolerance on a real model, not only on the random scenes of the tests.

Run: ``python bench/backends.py RUN_FOLDER [--out bench/results/backends.json]`` where a CUDA GPU
and gsplat are present; ``--a``/``--b`` name other ``device:backend`` pairs (``cpu:reference``
runs without a GPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from splatforge.products.metrics import psnr
from splatforge.train import Run

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, write_result


def psnr_uncapped(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two renders in [0, 1], in float64, without the 100 dB cap of the
    reported metric (:func:`splatforge.products.metrics.psnr`): two backends land above it."""
    return float(-10.0 * torch.log10(((a.double() - b.double()) ** 2).mean()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--a", default="cpu:cpu", help="device:backend of the first renderer")
    ap.add_argument("--b", default="cuda:gsplat", help="device:backend of the second renderer")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "backends.json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    pairs = {"a": args.a.partition(":")[::2], "b": args.b.partition(":")[::2]}
    if any(d.startswith("cuda") for d, _ in pairs.values()) and not torch.cuda.is_available():
        raise SystemExit("bench/backends.py: torch sees no CUDA GPU here (try --b cpu:reference)")
    runs = {name: Run.open(args.run, device=d, backend=b) for name, (d, b) in pairs.items()}
    rows = []
    for index in runs["a"].scene.split["test"]:
        images = {name: run.render(index)[0][0, ..., :3].clamp(0, 1).cpu() for name, run in runs.items()}
        gt = runs["a"].image(index).cpu()[..., :3]
        rows.append(
            {
                "index": index,
                "max_abs_diff": float((images["a"] - images["b"]).abs().max()),
                "psnr_a_vs_b": psnr_uncapped(images["a"], images["b"]),
                "psnr_a": psnr(images["a"][None], gt[None]),
                "psnr_b": psnr(images["b"][None], gt[None]),
            }
        )
    table = Table(title=f"{args.run}: {runs['a'].num_gaussians} Gaussians, test views; a = {args.a}, b = {args.b}")
    for key in rows[0]:
        table.add_column(key, justify="right")
    for r in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()))
    Console().print(table)
    summary = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "index"}
    summary["max_abs_diff"] = max(r["max_abs_diff"] for r in rows)
    Console().print("median over views (max_abs_diff: the largest):", summary)
    write_result(args.out, "backends", load_before, run=str(args.run), a=args.a, b=args.b, views=rows, summary=summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
