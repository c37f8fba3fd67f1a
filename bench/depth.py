"""Geometry benchmark: depth priors and TSDF meshes on skull (images_8).

For each prior (none, sfm, and a Depth Anything folder when ``--depth-folder`` is given or the
model's weights are in the Hugging Face cache), trains ``--steps`` steps with the library's
defaults, then reports test PSNR/SSIM, the median relative error of the rendered depth (the inverse depth
``ID`` the prior supervises, and the median depth ``MD`` meshes fuse) at COLMAP's points of the
test views, and the mesh (``splatforge mesh`` defaults): its size, time,
and precision/recall/F-score against the shipped COLMAP points at tau = 0.5 % of their central
box's diagonal (the points are sparse, so precision is low for any dense surface; recall is the
figure to read). Each prior is trained with several seeds (MCMC runs of skull differ by up to 1 dB from
seed to seed); one table of means, and ``bench/results/depth.json`` with every run.

    python bench/depth.py [--steps 3000] [--seeds 0 1 2 3 4] [--priors none sfm depth-anything] [--work DIR]
        [--out bench/results/depth.json]
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
from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
SKULL = Path(os.environ.get("SPLATFORGE_DATASETS", ROOT.parent / "shared" / "datasets")) / "skull"


def depth_errors(run, split: str = "test") -> dict[str, float]:
    """Median over views of the median relative error at the SfM points each view observes, for
    two rendered depths: ``id`` the expected inverse depth ``ID`` (what the prior supervises),
    ``|ID - 1/z| / (1/z)``, and ``md`` the median depth ``MD`` (what meshes fuse), ``|MD - z| / z``."""
    from splatforge.data.depth import sfm_inverse_depths

    errs: dict[str, list[float]] = {"id": [], "md": []}
    for i in run.scene.split[split]:
        xy, inv = sfm_inverse_depths(run.scene, i)
        for key, mode in (("id", "ID"), ("md", "MD")):
            r = run.render(i, render_mode=mode)[0][0, ..., 0].cpu().numpy()
            px = np.minimum(np.floor(xy).astype(int), [r.shape[1] - 1, r.shape[0] - 1])
            v = r[px[:, 1], px[:, 0]]
            err = np.abs(v - inv) / inv if key == "id" else np.abs(v - 1.0 / inv) * inv
            errs[key].append(float(np.median(err)))
    return {k: float(np.median(v)) for k, v in errs.items()}


def _finished(folder: Path, prior: str, steps: int, seed: int) -> bool:
    """Whether ``folder`` holds a finished run of this row (``--work`` reuse): its ``cfg.yml``
    has the prior, steps and seed, and its ``metrics.json`` the last step."""
    import json

    from splatforge.train.config import load_config

    if not (folder / "metrics.json").is_file() or not (folder / "cfg.yml").is_file():
        return False
    cfg = load_config(folder / "cfg.yml")
    done = json.loads((folder / "metrics.json").read_text()).get("step") == steps
    return done and cfg.steps == steps and cfg.seed == seed and (cfg.depth_prior or "none") == prior


def one(prior: str, steps: int, seed: int, work: Path) -> dict:
    import json

    from splatforge.products import evaluate
    from splatforge.products.mesh import default_tau, extract_mesh, mesh_metrics, write_mesh
    from splatforge.train import Run, Trainer
    from splatforge.train.config import TrainConfig

    folder = work / f"{prior}-s{seed}"
    if _finished(folder, prior, steps, seed):
        run = Run.open(folder, device="cpu")
        saved = json.loads((folder / "metrics.json").read_text())
        train_s, num_gaussians, metrics = saved["train_seconds"], saved["num_gaussians"], saved
    else:
        cfg = TrainConfig(
            data=SKULL,
            output=folder,
            data_factor=8,
            steps=steps,
            seed=seed,
            checkpoint_every=0,
            depth_prior=None if prior == "none" else prior,
        )
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        num_gaussians = trainer.train().num_gaussians
        train_s = time.perf_counter() - t0
        run = trainer.as_run()
        metrics = evaluate(run, ("test",), write_images=False)
    with torch.no_grad():
        derr = depth_errors(run)
    t1 = time.perf_counter()
    mesh, info = extract_mesh(run)
    write_mesh(mesh, folder / "mesh.ply")
    mesh_s = time.perf_counter() - t1
    import open3d as o3d

    o3d.utility.random.seed(0)
    pts = np.asarray(mesh.sample_points_uniformly(number_of_points=500_000).points)
    ref = run.scene.points.astype(np.float64)
    mm = mesh_metrics(pts, ref, default_tau(ref))
    return {
        "seed": seed,
        "steps": steps,
        "train_s": train_s,
        "num_gaussians": num_gaussians,
        "test_psnr": metrics["test"]["psnr"],
        "test_ssim": metrics["test"]["ssim"],
        "depth_rel_err_id": derr["id"],
        "depth_rel_err_md": derr["md"],
        "mesh_depth": info["depth"],
        "mesh_s": mesh_s,
        "mesh_triangles": info["triangles"],
        "mesh_mb": (folder / "mesh.ply").stat().st_size / 1e6,
        "voxel_size": info["voxel_size"],
        "tau": mm["tau"],
        "precision": mm["precision"],
        "recall": mm["recall"],
        "fscore": mm["fscore"],
    }


MEANS = (
    "test_psnr",
    "test_ssim",
    "depth_rel_err_id",
    "depth_rel_err_md",
    "train_s",
    "mesh_s",
    "mesh_triangles",
    "precision",
    "recall",
    "fscore",
)


def summarise(runs: list[dict]) -> dict:
    """The mean over seeds of each figure, and the per-seed list of the two depth errors and PSNR."""
    out = {k: float(np.mean([r[k] for r in runs])) for k in MEANS}
    out.update(
        seeds=[r["seed"] for r in runs],
        psnr_per_seed=[r["test_psnr"] for r in runs],
        id_err_per_seed=[r["depth_rel_err_id"] for r in runs],
        md_err_per_seed=[r["depth_rel_err_md"] for r in runs],
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4],
        help="training seeds per prior: MCMC runs of one scene differ by up to 1 dB from seed to seed",
    )
    ap.add_argument("--priors", nargs="+", default=["none", "sfm", "depth-anything"])
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep the runs here (PRIOR-sSEED); finished runs found there are reused, not retrained",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "depth.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load = os.getloadavg()
    rows: dict[str, dict] = {}
    meta = {"steps": args.steps, "seeds": args.seeds, "scene": "skull images_8"}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
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
            runs = []
            for seed in args.seeds:
                r = one(prior, args.steps, seed, work)
                runs.append(r)
                print(
                    f"{prior:15s} seed {seed}  PSNR {r['test_psnr']:6.2f}  SSIM {r['test_ssim']:.3f}  "
                    f"depth err ID {r['depth_rel_err_id']:.4f} MD {r['depth_rel_err_md']:.4f}  "
                    f"train {r['train_s']:6.0f} s  "
                    f"mesh {r['mesh_triangles']:,} tris {r['mesh_s']:.0f} s  "
                    f"P {r['precision']:.3f} R {r['recall']:.3f} "
                    f"F {r['fscore']:.3f}",
                    flush=True,
                )
            rows[prior] = {"mean": summarise(runs), "runs": runs}
            write_result(args.out, "depth", load, args=meta, results=rows)
    print("\nmean over seeds " + " ".join(map(str, args.seeds)))
    print("| prior | test PSNR | test SSIM | ID error | MD error | train s | mesh s | triangles | P | R | F |")
    for prior, row in rows.items():
        if "mean" in row:
            m = row["mean"]
            print(
                f"| {prior} | {m['test_psnr']:.2f} | {m['test_ssim']:.3f} | {m['depth_rel_err_id']:.2%} | "
                f"{m['depth_rel_err_md']:.2%} | {m['train_s']:.0f} | {m['mesh_s']:.0f} | {m['mesh_triangles']:,.0f} | "
                f"{m['precision']:.3f} | {m['recall']:.3f} | {m['fscore']:.3f} |"
            )
    write_result(args.out, "depth", load, args=meta, results=rows)


if __name__ == "__main__":
    main()
