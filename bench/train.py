"""Training benchmark: ``skull`` at images_8 (266x177, 57 train / 9 test views), 3,000 steps.

Runs the full trainer with the ``cpu`` backend for each ``--strategies`` (MCMC and 3DGS's
default densification) and reports wall time, seconds per step, the Gaussian count and test
PSNR/SSIM. As the peer in the same run it times ``--peer-steps`` steps
of the ``reference`` backend from the same initial state (the s/step ratio), and, when a CUDA
GPU is present, the whole run again with the ``gsplat`` backend (time, PSNR; the two must agree
within 0.3 dB). Writes ``bench/results/train.json``.

Run: ``python bench/train.py`` (about 10 minutes on 2 cores for both strategies).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from splatforge.products import evaluate
from splatforge.train import MCMCConfig, TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_cfg(args, strategy: str, backend: str, device: str, out: Path) -> TrainConfig:
    """gsplat's presets: DefaultStrategy as configured for 30k steps; MCMC capped at
    ``--mcmc-cap`` and relocating until 5/6 of the run."""
    return TrainConfig(
        data=args.data, output=out, data_factor=args.data_factor, steps=args.steps, backend=backend, device=device,
        max_gaussians=args.max_gaussians, seed=args.seed, checkpoint_every=0, strategy=strategy,
        mcmc=MCMCConfig(cap_max=args.mcmc_cap, refine_stop=args.steps * 5 // 6),
    )  # fmt: skip


def run(args, strategy: str, backend: str, device: str, out: Path, console: Console) -> dict:
    cfg = make_cfg(args, strategy, backend, device, out)
    trainer = Trainer(cfg)
    marks = {}

    def progress(step, loss, psnr, n, its):
        if step % 500 == 0:
            marks[step] = {"n_gaussians": n, "elapsed_s": round(trainer.train_seconds, 1)}
            console.log(f"[{strategy}/{backend}] step {step}: loss {loss:.4f}, #G {n:,}, {trainer.train_seconds:.0f} s")

    t0 = time.perf_counter()
    result = trainer.train(progress)
    wall = time.perf_counter() - t0
    metrics = evaluate(trainer, ("test",), write_images=False)
    return {
        "strategy": strategy, "backend": backend, "device": device, "steps": result.step, "wall_s": wall, "s_per_step": wall / result.step,
        "num_gaussians": result.num_gaussians, "test_psnr": metrics["test"]["psnr"], "test_ssim": metrics["test"]["ssim"],
        "test_lpips": metrics["test"]["lpips"], "progress": marks,
    }  # fmt: skip


def peer_step_time(args, backend: str, out: Path) -> float:
    """Median seconds per step of ``backend`` over ``--peer-steps`` steps from the initial state."""
    trainer = Trainer(make_cfg(args, args.strategies[0], backend, "cpu", out))
    times = []
    for _ in range(args.peer_steps + 1):
        t = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "skull")
    ap.add_argument("--data-factor", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--strategies", nargs="+", default=["mcmc", "default"], choices=["mcmc", "default"])
    ap.add_argument("--max-gaussians", type=int, default=0)
    ap.add_argument("--mcmc-cap", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer-steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train.json")
    args = ap.parse_args()
    if not args.data.exists():
        print(f"error: {args.data} not found (pass --data)", file=sys.stderr)
        return 2
    console = Console(width=160)
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for strategy in args.strategies:
            results[f"cpu/{strategy}"] = run(args, strategy, "cpu", "cpu", tmp / f"cpu_{strategy}", console)
        ref_s = peer_step_time(args, "reference", tmp / "ref")
        cpu_s = peer_step_time(args, "cpu", tmp / "cpu_peer")
        results["peer"] = {"reference_s_per_step": ref_s, "cpu_s_per_step": cpu_s, "ratio": ref_s / cpu_s,
                           "note": f"median over {args.peer_steps} steps from the same initial state"}  # fmt: skip
        if torch.cuda.is_available():
            for strategy in args.strategies:
                key = f"gsplat/{strategy}"
                results[key] = run(args, strategy, "gsplat", "cuda", tmp / key.replace("/", "_"), console)
                results[key]["psnr_minus_cpu_db"] = results[key]["test_psnr"] - results[f"cpu/{strategy}"]["test_psnr"]

    table = Table(title=f"train: {args.data.name} images_{args.data_factor}, {args.steps} steps")
    for col in ("backend/strategy", "wall", "s/step", "#Gaussians", "test PSNR", "test SSIM"):
        table.add_column(col, justify="right")
    for key, r in results.items():
        if key != "peer":
            table.add_row(key, f"{r['wall_s']:.0f} s", f"{r['s_per_step']:.3f}", f"{r['num_gaussians']:,}",
                          f"{r['test_psnr']:.2f}", f"{r['test_ssim']:.3f}")  # fmt: skip
    console.print(table)
    p = results["peer"]
    console.print(f"peer: reference {p['reference_s_per_step']:.3f} s/step vs cpu {p['cpu_s_per_step']:.3f} s/step "
                  f"at the start: {p['ratio']:.1f}x")  # fmt: skip
    write_result(args.out, "train", load_before, args={k: str(v) for k, v in vars(args).items()}, results=results)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
