"""Sharded training benchmark: one scene on 1 and 2 CPU processes (gloo) and, where GPUs exist,
on 1, 2 and 4 of them (NCCL), in one run.

Each row is ``splatforge train SCENE --nproc N --batch-size B`` as a user runs it (skull
``images_8``, MCMC capped at ``--cap`` Gaussians, ``--steps`` optimiser steps, the CPU preset
otherwise), timed by the trainer's own clock (training only: no start-up, no evaluation):
optimiser steps/s, training views/s (``steps x B x N / seconds``), test PSNR/SSIM, the final
count, and per rank the parameter + Adam memory of its shard and its peak resident memory (peak
CUDA allocation on GPUs). The peers of a row are the other rows of the same run: one process with
the same views per step (batch ``N``) is the single-process reference of N ranks x batch 1.

A second section, ``blocks``, trains skull as 2 blocks (``splatforge blocks plan --grid 2x1``,
``blocks train --steps S`` on the local pool, ``blocks merge``) against one model of ``2 S`` steps
on the same split: test PSNR/SSIM, Gaussians and training seconds of each.

Run: ``python bench/distributed.py`` (about 25 minutes on 2 cores at the defaults: 1,000 steps
per sharded row, 1,500 per block); writes ``bench/results/distributed.json``. On a 2-core
machine the 2 processes share the 2 cores (one compiled-kernel thread each) that one process
uses alone: the row measures the overhead of sharding (every rank projects its shard into every
camera of the step, plus the exchange), not a speed-up; that needs a core count or GPUs per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("SPLATFORGE_DATASETS", ROOT.parent / "shared" / "datasets"))


def run_row(scene: Path, out: Path, nproc: int, batch: int, steps: int, cap: int, device: str) -> dict:
    """One ``splatforge train`` run; its JSON summary with the throughput added."""
    cmd = [
        sys.executable,
        "-m",
        "splatforge",
        "train",
        str(scene),
        "--data-factor",
        "8",
        "--steps",
        str(steps),
        "--strategy",
        "mcmc",
        "--mcmc.cap-max",
        str(cap),
        "--batch-size",
        str(batch),
        "--nproc",
        str(nproc),
        "--device",
        device,
        "--checkpoint-every",
        "0",
        "--output",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    secs = summary["train_seconds"]
    return {
        "processes": nproc,
        "batch_size": batch,
        "device": device,
        "steps": steps,
        "train_seconds": secs,
        "steps_per_s": steps / secs,
        "views_per_s": steps * batch * nproc / secs,
        "num_gaussians": summary["num_gaussians"],
        "test_psnr": summary["test_psnr"],
        "test_ssim": summary["test_ssim"],
        "ranks": summary["ranks"],
    }


def blocks_rows(scene: Path, tmp: Path, steps: int) -> dict:
    """2 blocks of ``steps`` through the CLI, merged, against one model of ``2 steps``."""
    cli = [sys.executable, "-m", "splatforge"]

    def run(*args: str) -> dict:
        proc = subprocess.run([*cli, *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"splatforge {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(
            proc.stdout[proc.stdout.index("{") if proc.stdout.lstrip().startswith("{") else proc.stdout.index("[") :]
        )

    plan = tmp / "blocks.json"
    run("blocks", "plan", str(scene), "--grid", "2x1", "--data-factor", "8", "--output", str(plan))
    run("blocks", "train", str(plan), "--output", str(tmp / "blocks"), "--steps", str(steps), "--data-factor", "8")
    merged = run("blocks", "merge", str(plan), "--blocks", str(tmp / "blocks"), "--output", str(tmp / "merged"))
    one = run(
        "train",
        str(scene),
        "--data-factor",
        "8",
        "--steps",
        str(2 * steps),
        "--split-ratio",
        "0.875",
        "--checkpoint-every",
        "0",
        "--output",
        str(tmp / "one"),
    )
    return {
        "block_steps": steps,
        "merged": {k: merged[k] for k in ("test_psnr", "test_ssim", "num_gaussians", "train_seconds", "blocks")},
        "one_model": {k: one[k] for k in ("test_psnr", "test_ssim", "num_gaussians", "train_seconds")},
        "gap_db": one["test_psnr"] - merged["test_psnr"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scene", type=Path, default=DATASETS / "skull")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--cap", type=int, default=30_000)
    ap.add_argument("--block-steps", type=int, default=1500)
    ap.add_argument("--sections", nargs="+", default=["sharded", "blocks"], choices=["sharded", "blocks"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "distributed.json")
    args = ap.parse_args()
    load = os.getloadavg()
    plan = [(1, 1, "cpu"), (1, 2, "cpu"), (2, 1, "cpu")] if "sharded" in args.sections else []
    gpus = torch.cuda.device_count()
    plan += [(n, 1, "cuda") for n in (1, 2, 4) if n <= gpus and "sharded" in args.sections]
    rows: list[dict] = []
    blocks = None
    fields = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (nproc, batch, device) in enumerate(plan):
            rows.append(run_row(args.scene, Path(tmp) / f"run{i}", nproc, batch, args.steps, args.cap, device))
            write_result(args.out, "distributed", load, complete=False, rows=rows, **fields)
        if "blocks" in args.sections:
            blocks = blocks_rows(args.scene, Path(tmp) / "blocks", args.block_steps)
    one = {(r["device"], r["batch_size"]): r for r in rows if r["processes"] == 1}
    for r in rows:  # per-rank parameter memory against the single process's
        ref = one.get((r["device"], 1))
        if ref is not None:
            r["param_bytes_ratio"] = max(k["param_bytes"] for k in r["ranks"]) / ref["ranks"][0]["param_bytes"]
    write_result(args.out, "distributed", load, complete=True, rows=rows, blocks=blocks, gpus=gpus, **fields)
    table = Table(
        title=f"sharded training, skull images_8, {args.steps} steps, MCMC cap {args.cap:,} (load {load[0]:.1f})"
    )
    for col in (
        "device",
        "procs x batch",
        "steps/s",
        "views/s",
        "test PSNR",
        "Gaussians",
        "param MB/rank",
        "ratio to 1 proc",
        "peak RSS MB/rank",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["device"],
            f"{r['processes']} x {r['batch_size']}",
            f"{r['steps_per_s']:.2f}",
            f"{r['views_per_s']:.2f}",
            f"{r['test_psnr']:.2f}",
            f"{r['num_gaussians']:,}",
            " / ".join(f"{k['param_bytes'] / 2**20:.1f}" for k in r["ranks"]),
            f"{r.get('param_bytes_ratio', float('nan')):.2f}",
            " / ".join(f"{k['peak_rss_bytes'] / 2**20:.0f}" for k in r["ranks"]),
        )
    console = Console(width=160)
    if rows:
        console.print(table)
    if blocks is not None:
        m, o = blocks["merged"], blocks["one_model"]
        console.print(
            f"blocks: 2 x {blocks['block_steps']} steps merged {m['test_psnr']:.2f} dB / SSIM {m['test_ssim']:.3f} "
            f"({m['num_gaussians']:,} Gaussians, {m['train_seconds']:.0f} s) against one model of "
            f"{2 * blocks['block_steps']} steps {o['test_psnr']:.2f} dB / {o['test_ssim']:.3f} "
            f"({o['num_gaussians']:,}, {o['train_seconds']:.0f} s): gap {blocks['gap_db']:.2f} dB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
