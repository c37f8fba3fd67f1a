"""Geometry benchmark: depth priors and TSDF meshes on skull (images_8).

For each prior (none, sfm, and a Depth Anything folder when ``--depth-folder`` is given or the
model's weights are in the Hugging Face cache), trains ``--steps`` steps with the library's
defaults, then reports test PSNR/SSIM, the median relative error of the rendered inverse depth at
COLMAP's points of the test views, and the mesh (``splatforge mesh`` defaults): its size, time,
and precision/recall/F-score against the shipped COLMAP points at tau = 0.5 % of their central
box's diagonal (the points are sparse, so precision is low for any dense surface; recall is the
figure to read). One table, and ``bench/results/depth.json``.

    python bench/depth.py [--steps 3000] [--priors none sfm depth-anything] [--out bench/results/depth.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SKULL = Path(os.environ.get("SPLATFORGE_DATASETS", ROOT.parent / "shared" / "datasets")) / "skull"


def depth_error(run, split: str = "test") -> float:
    """Median over views of the median relative error |ID - 1/z| / (1/z) at the SfM points."""
    from splatforge.data.depth import sfm_inverse_depths

    errs = []
    for i in run.scene.split[split]:
        r = run.render(i, render_mode="ID")[0][0, ..., 0].cpu().numpy()
        xy, inv = sfm_inverse_depths(run.scene, i)
        px = np.minimum(np.floor(xy).astype(int), [r.shape[1] - 1, r.shape[0] - 1])
        errs.append(float(np.median(np.abs(r[px[:, 1], px[:, 0]] - inv) / inv)))
    return float(np.median(errs))


def one(prior: str, steps: int, work: Path) -> dict:
    from splatforge.products import evaluate
    from splatforge.products.mesh import default_tau, extract_mesh, mesh_metrics, write_mesh
    from splatforge.train import Trainer
    from splatforge.train.config import TrainConfig

    cfg = TrainConfig(data=SKULL, output=work / prior, data_factor=8, steps=steps, checkpoint_every=0,
                      depth_prior=None if prior == "none" else prior)  # fmt: skip
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    result = trainer.train()
    train_s = time.perf_counter() - t0
    run = trainer.as_run()
    metrics = evaluate(run, ("test",), write_images=False)
    with torch.no_grad():
        derr = depth_error(run)
    t1 = time.perf_counter()
    mesh, info = extract_mesh(run)
    write_mesh(mesh, work / prior / "mesh.ply")
    mesh_s = time.perf_counter() - t1
    import open3d as o3d

    o3d.utility.random.seed(0)
    pts = np.asarray(mesh.sample_points_uniformly(number_of_points=500_000).points)
    ref = run.scene.points.astype(np.float64)
    mm = mesh_metrics(pts, ref, default_tau(ref))
    return {"steps": steps, "train_s": train_s, "num_gaussians": result.num_gaussians,
            "test_psnr": metrics["test"]["psnr"], "test_ssim": metrics["test"]["ssim"], "depth_rel_err": derr,
            "mesh_s": mesh_s, "mesh_triangles": info["triangles"], "mesh_mb": (work / prior / "mesh.ply").stat().st_size / 1e6,
            "voxel_size": info["voxel_size"], "tau": mm["tau"], "precision": mm["precision"], "recall": mm["recall"],
            "fscore": mm["fscore"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--priors", nargs="+", default=["none", "sfm", "depth-anything"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "depth.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load = os.getloadavg()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for prior in args.priors:
            if prior == "depth-anything":
                from splatforge.data.depth import load_depth_model
                from splatforge.errors import ConfigError

                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                try:
                    load_depth_model()
                except ConfigError as exc:
                    rows[prior] = {"skipped": str(exc).split(" (")[0]}
                    print(f"{prior}: skipped ({rows[prior]['skipped']})")
                    continue
            rows[prior] = one(prior, args.steps, Path(tmp))
            r = rows[prior]
            print(f"{prior:15s} PSNR {r['test_psnr']:6.2f}  SSIM {r['test_ssim']:.3f}  depth err {r['depth_rel_err']:.4f}  "
                  f"train {r['train_s']:6.0f} s  mesh {r['mesh_triangles']:,} tris {r['mesh_s']:.0f} s  "
                  f"P {r['precision']:.3f} R {r['recall']:.3f} F {r['fscore']:.3f}", flush=True)  # fmt: skip
            write_result(args.out, "depth", load, args={"steps": args.steps, "scene": "skull images_8"}, results=rows)
    write_result(args.out, "depth", load, args={"steps": args.steps, "scene": "skull images_8"}, results=rows)


if __name__ == "__main__":
    main()
