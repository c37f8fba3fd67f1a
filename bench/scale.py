"""Does training depend on the arbitrary scale of a scene? The demo scene with every length
(camera centres, points) multiplied by k, trained the same way with MCMC's scale-dependent terms
and the near plane in the scene's own units (``--world-unit 1``, the trainer before 2026-12-04)
and in gsplat's normalised unit (the default, ``world_unit`` resolved from the scene). Prints a
table of test PSNR and writes ``bench/results/scale.json``.

    python bench/scale.py [--scales 0.001 0.125 1 8 64] [--steps 300] [--out bench/results/scale.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, write_result
from rich.console import Console
from rich.table import Table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.001, 0.125, 1.0, 8.0, 64.0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    args = ap.parse_args()
    load_before = os.getloadavg()

    from splatforge.data import load_scene
    from splatforge.demo import build_demo_scene, demo_train_config
    from splatforge.errors import TrainingError
    from splatforge.products import evaluate
    from splatforge.train import Trainer

    console = Console()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scene_dir = build_demo_scene(Path(tmp) / "scene")
        scene = load_scene(scene_dir)
        for k in args.scales:
            c2w = scene.camtoworlds.copy()
            c2w[:, :3, 3] *= k
            scaled = dataclasses.replace(scene, camtoworlds=c2w, points=scene.points * k)
            row = {"scale": k}
            for label, unit in (("scene_units", 1.0), ("world_unit", None)):
                cfg = demo_train_config(
                    scene_dir, Path(tmp) / f"run_{k}_{label}", steps=args.steps, seed=args.seed, world_unit=unit
                )
                trainer = Trainer(cfg, scene=scaled)
                row["world_unit"] = trainer.cfg.world_unit if unit is None else row.get("world_unit")
                try:
                    with trainer.compute_threads():
                        for _ in range(args.steps):
                            trainer.train_step()
                except TrainingError as exc:  # e.g. nothing in front of the near plane: all Gaussians fade
                    row[f"{label}_psnr"], row[f"{label}_error"] = None, str(exc)
                    console.log(f"x{k} {label}: {exc}")
                    continue
                metrics = evaluate(trainer.as_run(), splits=("test",), write_images=False)
                row[f"{label}_psnr"] = metrics["test"]["psnr"]
                console.log(f"x{k} {label}: {row[f'{label}_psnr']:.2f} dB")
            rows.append(row)
    table = Table(title=f"demo scene scaled, {args.steps} steps, seed {args.seed}: test PSNR (dB)")
    for col in ("scale", "world_unit", "in scene units (before)", "in world_unit (now)"):
        table.add_column(col, justify="right")

    def cell(psnr):
        return "failed" if psnr is None else f"{psnr:.2f}"

    for r in rows:
        table.add_row(
            f"{r['scale']:g}", f"{r['world_unit']:.4g}", cell(r["scene_units_psnr"]), cell(r["world_unit_psnr"])
        )
    console.print(table)
    write_result(
        args.out, "scale", load_before, args={"scales": args.scales, "steps": args.steps, "seed": args.seed}, rows=rows
    )


if __name__ == "__main__":
    main()
