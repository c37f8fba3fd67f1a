"""Trainer features benchmark: each optional feature off and on, same scene, same steps, one run.

Rows per scene (``--scenes``): ``baseline`` (what ``splatforge train SCENE --steps N`` does on a
CPU: the ``fast`` preset, MCMC), then one feature on at a time: ``antialiased``
(``--rasterize-mode antialiased``), ``exposure`` (``--exposure``), ``pose_opt`` (``--pose-opt``;
its test views are aligned before scoring, as evaluation does for such runs), and the default
strategy without and with AbsGS gradients (``default``, ``default_absgrad``: absgrad only acts
on 3DGS's densification, MCMC does not read gradients). Masks have no row: none of these
captures has masks (their effect is tested, see ``tests/test_train.py``).

Every row reports wall time and test PSNR/SSIM/LPIPS as the run's own ``metrics.json`` has them
(the exposure row by Inria's left/right protocol, the pose row after aligning the test views),
and, so that rows compare alike, ``psnr_lr``/``ssim_lr``: every run's test views scored the
exposure row's way (an affine fitted on the left half, metrics on the right half; the table
also gives it as dB over the scene's baseline), and
``psnr_aligned`` for the baseline: its test views aligned as the pose row's are (what
test-time alignment alone gives a model trained on the given poses).

Scenes: skull ``images_8`` (266x177), fox (``transforms.json`` phone photos at ``--fox-size``
pixels on the long side, random initialisation) and the scene ``splatforge prepare`` makes from
``skull_orbit.mp4``. ``--steps`` is the same for every row (default 600, so that the 18 runs fit
in well under an hour on 2 CPU cores: the comparison of each feature with the baseline at equal
steps is the point, not the absolute quality, which longer runs raise for every row).

Run: ``python bench/features.py [--steps 600] [--scenes skull fox orbit]``; writes
``bench/results/features.json`` after every row (``"complete": false`` until the end; ``--resume``
keeps rows an earlier run measured). The load average is recorded; re-measure before believing
a difference under ~0.2 dB or ~20 % in time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from splatforge.products import evaluate, render_split
from splatforge.train import DensifyConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result
from train import DATASETS, cpu_config, prepared_orbit

ROOT = Path(__file__).resolve().parents[1]

#: Row name -> the TrainConfig fields it changes from the baseline.
FEATURES = {
    "baseline": {},
    "antialiased": {"rasterize_mode": "antialiased"},
    "exposure": {"exposure": True},
    "pose_opt": {"pose_opt": True},
    "default": {"strategy": "default"},
    "default_absgrad": {"strategy": "default", "densify": DensifyConfig(absgrad=True)},
}


def measure(cfg, console: Console, label: str, align: bool) -> dict:
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    run = trainer.as_run()
    t1 = time.perf_counter()
    metrics = evaluate(run, ("test",), write_images=False)
    eval_s = time.perf_counter() - t1
    lr = render_split(run, "test", write=False, left_right=True)
    psnr_lr, ssim_lr = lr["psnr"], lr["ssim"]
    aligned = None
    if align:  # how much test-time alignment alone gives a model trained on the given poses
        views = list(run.scene.split["test"])
        run.set_camtoworlds(views, run.align_views(views))
        aligned = render_split(run, "test", write=False)["psnr"]
    row = {
        "steps": result.step,
        "wall_s": wall,
        "eval_s": eval_s,
        "num_gaussians": result.num_gaussians,
        **{f"test_{k}": metrics["test"][k] for k in ("psnr", "ssim", "lpips_vgg")},
        "psnr_lr": psnr_lr,
        "ssim_lr": ssim_lr,
        "psnr_aligned": aligned,
        "protocol": metrics.get("exposure") or metrics.get("test_poses") or "full image",
        "loadavg_after": os.getloadavg(),
    }
    console.log(f"{label}: {row['test_psnr']:.2f} dB ({psnr_lr:.2f} left/right), {wall:.0f} s")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--scenes", nargs="+", default=["skull", "fox", "orbit"], choices=["skull", "fox", "orbit"])
    parser.add_argument("--features", nargs="+", default=list(FEATURES), choices=list(FEATURES))
    parser.add_argument("--fox-size", type=int, default=240, help="long side of the fox images, pixels")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "features.json")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    console = Console(stderr=True)
    load_before = os.getloadavg()
    rows = json.loads(args.out.read_text())["rows"] if args.resume and args.out.exists() else {}

    def save(complete: bool) -> None:
        write_result(
            args.out,
            "features",
            load_before,
            args={k: str(v) for k, v in vars(args).items()},
            rows=rows,
            complete=complete,
        )

    with tempfile.TemporaryDirectory(prefix="bench_features_") as tmp_name:
        tmp = Path(tmp_name)
        scenes = {
            "skull": lambda: (DATASETS / "skull", {"data_factor": 8}),
            "fox": lambda: (DATASETS / "fox", {"max_image_size": args.fox_size}),
            "orbit": lambda: (prepared_orbit(tmp, console), {}),
        }
        for scene in args.scenes:
            keys = [f"{scene}/{f}" for f in args.features if f"{scene}/{f}" not in rows]
            if not keys:
                continue
            data, extra = scenes[scene]()
            for key in keys:
                feature = key.split("/")[1]
                cfg = replace(
                    cpu_config(data, tmp / key.replace("/", "_"), steps=args.steps, **extra), **FEATURES[feature]
                )
                rows[key] = measure(cfg, console, key, align=feature == "baseline")
                save(False)
    save(True)

    table = Table(title=f"trainer features, {args.steps} steps each (CPU, load {load_before[0]:.1f})")
    for col in (
        "scene/feature",
        "PSNR",
        "SSIM",
        "LPIPS",
        "PSNR l/r",
        "vs baseline",
        "SSIM l/r",
        "PSNR aligned",
        "#G",
        "train s",
        "eval s",
    ):
        table.add_column(col, justify="right")
    f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"
    for key, r in rows.items():
        base = rows.get(
            key.split("/")[0] + "/baseline"
        )  # the peer of the same run: dB over the baseline, like for like
        delta = "-" if base is None else f"{r['psnr_lr'] - base['psnr_lr']:+.2f}"
        table.add_row(
            key,
            f(r["test_psnr"]),
            f(r["test_ssim"], 3),
            f(r["test_lpips_vgg"], 3),
            f(r["psnr_lr"]),
            delta,
            f(r["ssim_lr"], 3),
            f(r["psnr_aligned"]),
            f"{r['num_gaussians']:,}",
            f(r["wall_s"], 0),
            f(r["eval_s"], 0),
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
