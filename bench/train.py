"""Training benchmark: the default strategy, one CPU step broken down, and OpenSplat side by side.

Three sections, all in one run (``--sections`` picks some), written to
``bench/results/train.json``:

1. ``strategies``: MCMC and 3DGS's default densification at 3,000 and 7,000 steps on three
   captures: skull ``images_8`` (266x177, 57 train / 9 test views), fox (transforms.json, 1080x1920
   phone photos, random initialisation) and the scene ``splatforge prepare`` makes from
   ``skull_orbit.mp4``. Each run is what ``splatforge train SCENE --steps N --strategy S`` does on
   this machine (the CPU preset otherwise): wall time, s/step, final count, test PSNR/SSIM/LPIPS.
2. ``breakdown``: one step at 30,000 Gaussians on skull ``images_8`` split into rasterizer
   forward, SSIM, the rest of the loss, backward (rasterizer + SSIM), Adam, strategy and Python
   overhead, median over ``--breakdown-steps`` steps after a warm-up, twice in the same process:
   *before* (torchmetrics' SSIM, one unfused Adam per parameter, the compositing kernels of git
   revision ``--baseline-rev`` and the backend glue of ``--baseline-glue-rev`` that calls them,
   loaded from git into this process: the previous trainer) and *after* (the compiled separable
   SSIM, fused Adam, this checkout's rasterizer).
3. ``opensplat``: OpenSplat 1.1.5's CPU trainer (``--opensplat BINARY``, built by
   ``../shared/peers/opensplat/README.md``) and ours, one after the other, on skull ``images_8``
   at 266x177 from step 1, 3,000 steps, the same 57/9 split, ours with ``--mcmc.cap-max 30000``:
   s/step, final count, test PSNR/SSIM and the ratio.

Run: ``python bench/train.py`` (about two and a half hours on 2 cores with every section), or
``--sections breakdown opensplat`` (about 15 minutes). The file is rewritten after every strategy row
and section (``"complete": false`` until the end), and ``--resume`` keeps what an earlier, stopped
run of the same ``--out`` measured. The load average before and after is recorded; re-measure
before believing a difference under ~20 %.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from splatforge.products import evaluate
from splatforge.train import MCMCConfig, StepTimes, TrainConfig, Trainer, apply_preset, resolve_preset

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, module_at, write_result

DATASETS = Path(os.environ.get("SPLATFORGE_DATASETS", ROOT.parent / "shared" / "datasets"))


def cpu_config(data: Path, out: Path, **overrides) -> TrainConfig:
    """What ``splatforge train DATA`` does on a CPU: the ``auto`` preset (``fast``), then the options."""
    base = apply_preset(
        TrainConfig(data=data, output=out, device="cpu", checkpoint_every=0), resolve_preset("auto", "cpu")
    )
    return replace(base, **overrides)


def train_and_test(cfg: TrainConfig, console: Console, label: str) -> dict:
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    result = trainer.train(
        lambda step, loss, psnr, n, its: (
            console.log(f"[{label}] step {step}: #G {n:,}, {time.perf_counter() - t0:.0f} s")
            if step % 1000 == 0
            else None
        )
    )
    wall = time.perf_counter() - t0
    metrics = evaluate(trainer.as_run(), ("test",), write_images=False)
    i = trainer.train_ids[0]
    return {
        "steps": result.step,
        "wall_s": wall,
        "s_per_step": wall / result.step,
        "num_gaussians": result.num_gaussians,
        "image_size": [int(trainer.scene.widths[i]), int(trainer.scene.heights[i])],
        "data_factor": cfg.data_factor,
        "train_views": len(trainer.train_ids),
        "test_views": metrics["test"]["num_views"],
        **{f"test_{k}": metrics["test"][k] for k in ("psnr", "ssim", "lpips_vgg", "lpips_alex")},
    }


def prepared_orbit(tmp: Path, console: Console) -> Path:
    """The scene ``splatforge prepare skull_orbit.mp4`` makes (defaults, seed 0)."""
    from splatforge.pipeline.prepare import PrepareConfig, prepare

    out = tmp / "orbit_scene"
    console.log("prepare skull_orbit.mp4 (SfM, a few minutes)")
    summary = prepare(PrepareConfig(inputs=[DATASETS / "skull" / "skull_orbit.mp4"], output=out))
    console.log(f"prepared: {summary['num_registered']}/{summary['num_images']} registered")
    return out


def section_strategies(args, tmp: Path, console: Console, save) -> dict:
    """One row per scene/steps/strategy; ``save(rows)`` runs after each row, so a stopped run keeps
    what it measured, and rows already in ``--out`` (with ``--resume``) are not measured again."""
    scenes = {
        "skull_images_8": lambda: (DATASETS / "skull", {"data_factor": 8}),
        "fox": lambda: (DATASETS / "fox", {}),
        "skull_orbit_prepared": lambda: (prepared_orbit(tmp, console), {}),
    }
    rows = dict(args.previous.get("strategies", {}))
    for name in args.scenes:
        keys = [f"{name}/{steps}/{strategy}" for steps in args.steps for strategy in args.strategies]
        if all(k in rows for k in keys):
            continue
        data, extra = scenes[name]()
        for key in keys:
            if key in rows:
                console.log(f"{key}: kept from {args.out}")
                continue
            _, steps, strategy = key.split("/")
            cfg = cpu_config(data, tmp / key.replace("/", "_"), steps=int(steps), strategy=strategy, **extra)
            rows[key] = train_and_test(cfg, console, key) | {"loadavg_after": os.getloadavg()}
            console.log(f"{key}: {rows[key]['test_psnr']:.2f} dB, {rows[key]['wall_s']:.0f} s")
            save(rows)
    return rows


def _torchmetrics_ssim(render, gt):
    from splatforge.products.metrics import ensure_torchvision_importable

    ensure_torchvision_importable()
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        render.permute(0, 3, 1, 2), gt.permute(0, 3, 1, 2), data_range=1.0, kernel_size=11, sigma=1.5
    )


def _unfused(trainer: Trainer) -> None:
    lrs = {k: opt.param_groups[0]["lr"] for k, opt in trainer.optimizers.items()}
    trainer.optimizers = {k: torch.optim.Adam([trainer.params[k]], lr=lrs[k], eps=1e-15, foreach=False) for k in lrs}


def backend_at(kernels_rev: str, glue_rev: str, tmp: Path):
    """A ``splatforge.raster.cpu`` module from the past: its glue (``cpu.py``, ``_cpu_project.py``)
    at ``glue_rev``, the compositing kernels (``_cpu_raster.py``) at ``kernels_rev``, imported
    beside this checkout's. Its SH evaluation takes the coefficients concatenated, as the
    trainer then gave them."""
    raster = "src/splatforge/raster/"
    kr = module_at(kernels_rev, raster + "_cpu_raster.py", f"baseline_cpu_raster_{kernels_rev}", tmp)
    kp = module_at(glue_rev, raster + "_cpu_project.py", f"baseline_cpu_project_{glue_rev}", tmp)
    cpu = module_at(
        glue_rev,
        raster + "cpu.py",
        f"baseline_cpu_{glue_rev}_{kernels_rev}",
        tmp,
        {
            "from splatforge.raster import _cpu_project as kp": f"import {kp.__name__} as kp",
            "from splatforge.raster import _cpu_raster as kr": f"import {kr.__name__} as kr",
        },
    )
    sh_colors = cpu.sh_colors

    def concatenated_sh_colors(means, coeffs, *args):
        return sh_colors(means, torch.cat(coeffs, dim=1) if isinstance(coeffs, (tuple, list)) else coeffs, *args)

    cpu.sh_colors = concatenated_sh_colors
    return cpu


def trainer_at_cap(out: Path) -> Trainer:
    """The breakdown's state: skull ``images_8`` trained with MCMC (cap 30,000) until it holds
    30,000 Gaussians and has taken 400 steps (past the kernels' compilation)."""
    cfg = TrainConfig(
        data=DATASETS / "skull",
        output=out,
        data_factor=8,
        steps=3000,
        device="cpu",
        checkpoint_every=0,
        mcmc=MCMCConfig(cap_max=30_000),
    )
    trainer = Trainer(cfg)
    with trainer.compute_threads():
        while len(trainer.params["means"]) < 30_000 or trainer.step < 400:
            trainer.train_step()
    return trainer


def section_breakdown(args, tmp: Path, console: Console, save) -> dict:
    import splatforge.raster as raster_package
    import splatforge.train.trainer as trainer_module

    out = {}
    trainer = trainer_at_cap(tmp / "breakdown")
    state = trainer.state_dict()
    compiled_ssim, backend = trainer_module.ssim, raster_package.cpu
    sys.path.insert(0, str(tmp))
    baseline = backend_at(args.baseline_rev, args.baseline_glue_rev, tmp)
    for label in ("before", "after"):
        trainer.load_state_dict(state)
        if label == "before":
            trainer_module.ssim = _torchmetrics_ssim
            raster_package.cpu = sys.modules["splatforge.raster.cpu"] = baseline
            render, _, _ = trainer.render(trainer.train_ids[0])  # compile the baseline kernels outside the timings
            render.sum().backward()
            for p in trainer.params.values():
                p.grad = None
            _unfused(trainer)
        try:  # 'after' as train() runs it: torch's own ops on one thread, the cores left to the kernels
            with contextlib.nullcontext() if label == "before" else trainer.compute_threads():
                per_step = []
                for _ in range(args.breakdown_steps):
                    times = StepTimes()
                    trainer.train_step(times=times)
                    per_step.append(times)
        finally:
            trainer_module.ssim = compiled_ssim
            raster_package.cpu = sys.modules["splatforge.raster.cpu"] = backend
        med = {
            k: statistics.median(getattr(t, k) for t in per_step)
            for k in ("forward", "ssim", "loss", "backward", "adam", "strategy", "total")
        }
        med["python_overhead"] = max(
            0.0, med["total"] - sum(med[k] for k in ("forward", "ssim", "loss", "backward", "adam", "strategy"))
        )
        out[label] = {
            "ms": {k: round(v * 1000, 2) for k, v in med.items()},
            "num_gaussians": len(trainer.params["means"]),
        }
    with trainer.compute_threads():
        out["raster_share_after"] = _raster_share(trainer)
    return out


def _raster_share(trainer: Trainer, repeats: int = 30) -> dict:
    """The rasterizer's forward+backward alone (render.sum().backward() from the activated
    parameters), against the whole step, medians over the same views."""
    ids = trainer.train_ids
    raster, steps = [], []
    for r in range(repeats):
        i = ids[r % len(ids)]
        t = time.perf_counter()
        render, _, _ = trainer.render(i, trainer.cfg.sh_degree)
        render.sum().backward()
        raster.append(time.perf_counter() - t)
        for p in trainer.params.values():
            p.grad = None
        t = time.perf_counter()
        trainer.train_step()
        steps.append(time.perf_counter() - t)
    r, s = statistics.median(raster), statistics.median(steps)
    return {"raster_fwd_bwd_ms": round(r * 1000, 2), "step_ms": round(s * 1000, 2), "share": round(r / s, 3)}


def opensplat_scene(tmp: Path) -> Path:
    """skull images_8 as OpenSplat reads it: images/ + sparse/0 with the camera at 266x177
    (OpenSplat rescales intrinsics by the image height only)."""
    import pycolmap

    scene = tmp / "opensplat_skull8"
    (scene / "sparse" / "0").mkdir(parents=True)
    (scene / "images").symlink_to(DATASETS / "skull" / "images_8")
    rec = pycolmap.Reconstruction(str(DATASETS / "skull" / "sparse" / "0"))
    for cam in rec.cameras.values():
        cam.rescale(266, 177)
    rec.write(str(scene / "sparse" / "0"))
    return scene


def run_opensplat(binary: Path, scene: Path, out: Path, steps: int) -> dict:
    cmd = [
        str(binary),
        str(scene),
        "-n",
        str(steps),
        "--num-downscales",
        "0",
        "--test-every",
        "8",
        "--keep-crs",
        "-o",
        str(out / "splat.ply"),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"opensplat failed ({proc.returncode}): {proc.stderr[-500:]}")
    loop = re.search(
        r"training loop: ([\d.]+) s for (\d+) steps = ([\d.]+) s/step; final gaussians: (\d+)", proc.stdout
    )
    test = re.search(r"\[test\] mean over (\d+) images: PSNR=([\d.]+) SSIM=([\d.]+)", proc.stdout)
    if not loop or not test:
        raise RuntimeError("opensplat's output lacks the [measure]/[test] lines of the test-split patch")
    return {
        "command": " ".join(cmd),
        "wall_s": wall,
        "loop_s": float(loop.group(1)),
        "s_per_step": float(loop.group(3)),
        "num_gaussians": int(loop.group(4)),
        "test_views": int(test.group(1)),
        "test_psnr": float(test.group(2)),
        "test_ssim_own_11x11": float(test.group(3)),
    }


def section_opensplat(args, tmp: Path, console: Console, save) -> dict:
    out = {}
    cfg = TrainConfig(
        data=DATASETS / "skull",
        output=tmp / "ours_vs_opensplat",
        data_factor=8,
        steps=3000,
        device="cpu",
        checkpoint_every=0,
        strategy="mcmc",
        mcmc=MCMCConfig(cap_max=30_000),
    )
    out["ours"] = train_and_test(cfg, console, "ours (mcmc, cap 30k)")
    if args.opensplat is None:
        out["opensplat"] = None
        out["note"] = "no --opensplat binary given: build it with ../shared/peers/opensplat/README.md"
        return out
    scene = opensplat_scene(tmp)
    work = tmp / "opensplat_run"
    work.mkdir()
    console.log("OpenSplat, 3,000 steps (several minutes)")
    out["opensplat"] = run_opensplat(args.opensplat, scene, work, 3000)
    out["step_ratio_opensplat_over_ours"] = out["opensplat"]["s_per_step"] / out["ours"]["s_per_step"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--sections",
        nargs="+",
        default=["strategies", "breakdown", "opensplat"],
        choices=["strategies", "breakdown", "opensplat"],
    )
    ap.add_argument("--steps", nargs="+", type=int, default=[3000, 7000])
    ap.add_argument(
        "--scenes",
        nargs="+",
        default=["skull_images_8", "fox", "skull_orbit_prepared"],
        choices=["skull_images_8", "fox", "skull_orbit_prepared"],
        help="the strategies section's scenes",
    )
    ap.add_argument("--breakdown-steps", type=int, default=60)
    ap.add_argument(
        "--baseline-rev", default="a928a54", help="git revision whose compositing kernels the breakdown's 'before' uses"
    )
    ap.add_argument(
        "--baseline-glue-rev",
        default="a690dff",
        help="git revision whose cpu.py and _cpu_project.py (the glue those kernels fit) the 'before' uses",
    )
    ap.add_argument("--opensplat", type=Path, default=None, help="OpenSplat binary built with the test-split patch")
    ap.add_argument("--strategies", nargs="+", default=["mcmc", "default"], choices=["mcmc", "default"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train.json")
    ap.add_argument("--resume", action="store_true", help="keep the sections and strategy rows already in --out")
    args = ap.parse_args()
    if not (DATASETS / "skull").is_dir():
        print(f"error: {DATASETS} not found (set SPLATFORGE_DATASETS)", file=sys.stderr)
        return 2
    args.previous = json.loads(args.out.read_text())["results"] if args.resume and args.out.is_file() else {}
    console = Console(width=160, stderr=True)
    load_before = os.getloadavg()
    results: dict = dict(args.previous)
    run_args = {k: str(v) for k, v in vars(args).items() if k != "previous"}

    def save(partial: dict, section: str) -> None:
        write_result(
            args.out, "train", load_before, args=run_args, results=results | {section: partial}, complete=False
        )

    tmp = Path(tempfile.mkdtemp(prefix="splatforge-bench-"))
    try:
        for section in args.sections:
            results[section] = globals()[f"section_{section}"](
                args, tmp, console, lambda rows, s=section: save(rows, s)
            )
            save(results[section], section)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_tables(results)
    write_result(args.out, "train", load_before, args=run_args, results=results, complete=True)
    console.print(f"wrote {args.out}")
    return 0


def print_tables(results: dict) -> None:
    console = Console(width=160)
    if "strategies" in results:
        t = Table(title="strategies on the CPU preset (test views)")
        for col in (
            "scene",
            "steps",
            "strategy",
            "image",
            "wall",
            "s/step",
            "#Gaussians",
            "PSNR",
            "SSIM",
            "LPIPS(vgg)",
        ):
            t.add_column(col, justify="right")
        for key, r in results["strategies"].items():
            scene, steps, strategy = key.split("/")
            lp = r["test_lpips_vgg"]
            t.add_row(
                scene,
                steps,
                strategy,
                "x".join(map(str, r["image_size"])),
                f"{r['wall_s']:.0f} s",
                f"{r['s_per_step']:.3f}",
                f"{r['num_gaussians']:,}",
                f"{r['test_psnr']:.2f}",
                f"{r['test_ssim']:.3f}",
                "-" if lp is None else f"{lp:.3f}",
            )
        console.print(t)
    if "breakdown" in results:
        b = results["breakdown"]
        t = Table(title=f"one step at {b['after']['num_gaussians']:,} Gaussians, skull images_8 (ms, medians)")
        parts = ("forward", "ssim", "loss", "backward", "adam", "strategy", "python_overhead", "total")
        t.add_column("")
        for p in parts:
            t.add_column(p, justify="right")
        for label in ("before", "after"):
            t.add_row(label, *(f"{b[label]['ms'][p]:.1f}" for p in parts))
        console.print(t)
        s = b["raster_share_after"]
        console.print(
            f"rasterizer forward+backward {s['raster_fwd_bwd_ms']:.1f} ms of a {s['step_ms']:.1f} ms step: "
            f"{100 * s['share']:.0f} %"
        )
    if "opensplat" in results:
        o = results["opensplat"]
        t = Table(title="skull images_8, 3,000 steps from step 1 at 266x177, 57/9 views")
        for col in ("trainer", "s/step", "#Gaussians", "test PSNR"):
            t.add_column(col, justify="right")
        t.add_row(
            "splatforge (mcmc, cap 30k)",
            f"{o['ours']['s_per_step']:.3f}",
            f"{o['ours']['num_gaussians']:,}",
            f"{o['ours']['test_psnr']:.2f}",
        )
        if o.get("opensplat"):
            p = o["opensplat"]
            t.add_row(
                "OpenSplat 1.1.5 CPU", f"{p['s_per_step']:.3f}", f"{p['num_gaussians']:,}", f"{p['test_psnr']:.2f}"
            )
        console.print(t)
        if o.get("opensplat"):
            console.print(f"OpenSplat's step / ours: {o['step_ratio_opensplat_over_ours']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
