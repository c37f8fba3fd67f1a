"""Large scenes as blocks (CityGaussian's scheme): plan, train each block as an ordinary job on
the executors ``generate`` uses, merge into one run.

1. :func:`splatforge.data.blocks.plan_blocks` writes ``blocks.json``.
2. :func:`train_blocks`: one job per block (``train`` stage, with ``block_plan``/``block_id`` in
   its config: the block's training views and the SfM points of its enlarged box), through the
   local pool or Ray (:mod:`splatforge.pipeline.executors`); a job's manifest makes a rerun skip
   the finished blocks, and a failing block is reported alone.
3. :func:`merge_blocks`: each block keeps the Gaussians whose centres lie in its own box (the
   un-enlarged one; the outer boxes are unbounded, so nothing is lost at the scene's edge); the
   union is written as one run folder (``cfg.yml``, ``point_cloud/iteration_N/point_cloud.ply``,
   ``cameras.json``), then rendered and evaluated by the normal products (``metrics.json``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from splatforge.data.blocks import in_box, load_plan, plane_coords
from splatforge.errors import ConfigError, DataFormatError
from splatforge.pipeline.job import JobSpec

log = logging.getLogger(__name__)

__all__ = ["block_jobs", "coarse_coverage", "merge_blocks", "train_blocks"]


def coarse_coverage(run_dir: Path, scene, device: str = "cpu"):
    """A :data:`~splatforge.data.blocks.Coverage` from the trained (coarse) run ``run_dir``:
    the mean alpha of view ``index`` of ``scene`` rendered with only the selected Gaussians (SH
    degree 0: only coverage matters)."""
    from splatforge.train import Run

    run = Run.open(run_dir, device=device)
    splats = run.splats.detach()
    means = splats.means.cpu().numpy()
    viewmats = torch.from_numpy(scene.viewmats).float().to(run.device)
    Ks = torch.from_numpy(scene.Ks).float().to(run.device)

    def coverage(index: int, inside) -> float:
        keep = torch.from_numpy(inside(means)).to(run.device)
        if not bool(keep.any()):
            return 0.0
        with torch.no_grad():
            _, alpha, _ = splats.select(keep).rasterize(
                viewmats[index : index + 1],
                Ks[index : index + 1],
                int(scene.widths[index]),
                int(scene.heights[index]),
                sh_degree=0,
                backend=run.cfg.backend,
                near_plane=run.near_plane,
            )
        return float(alpha.mean())

    return coverage


def block_jobs(
    plan_path: Path,
    output: Path,
    *,
    ratio: float = 0.875,
    steps: int = 3000,
    data_factor: int = 1,
    strategy: str = "mcmc",
    cap_max: int = 300_000,
    seed: int = 0,
    device: str = "cpu",
    backend: str = "auto",
) -> list[JobSpec]:
    """One :class:`JobSpec` per block of the plan at ``plan_path``, each training into
    ``output/block_<id>_<ratio>`` on the scene's ``ratio`` split (the same split for every block
    and for the merged run)."""
    plan_path = Path(plan_path).resolve()
    plan = load_plan(plan_path)
    return [
        JobSpec(
            scene=f"block_{b['id']}",
            scene_root=plan["scene"],
            output_dir=str(Path(output).resolve()),
            ratio=ratio,
            stages=["train"],
            data_factor=data_factor,
            steps=steps,
            strategy=strategy,
            cap_max=cap_max,
            seed=seed,
            device=device,
            backend=backend,
            extra={"block_plan": str(plan_path), "block_id": b["id"]},
        )
        for b in plan["blocks"]
    ]


def train_blocks(
    plan_path: Path,
    output: Path,
    *,
    executor: Literal["local", "ray"] = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    on_event: Callable | None = None,
    **job_options,
) -> list[dict]:
    """Train every block of the plan (see :func:`block_jobs` for ``job_options``) on the local
    pool (``workers`` CPU slots, or the GPUs) or on Ray (:mod:`splatforge.pipeline.executors`;
    logs in ``output/logs/<job>.log``); returns the jobs' results in the plan's order (``status``
    ``done``/``failed`` with the error line of each).

    Raises:
        ConfigError: an unknown executor, or Ray asked for without ray installed.
    """
    from splatforge.pipeline.executors import LocalExecutor, RayExecutor, local_slots

    if executor not in ("local", "ray"):
        raise ConfigError(f"executor must be 'local' or 'ray', got {executor!r}")
    jobs = block_jobs(plan_path, output, **job_options)
    Path(output).mkdir(parents=True, exist_ok=True)
    logs = Path(output) / "logs"
    if executor == "ray":
        runner = RayExecutor(ray_address, logs=logs)
    else:
        runner = LocalExecutor(local_slots(workers), logs)  # type: ignore[assignment]

    def event(kind, spec, result, where) -> None:
        if kind == "end" and result is not None:
            log.info(
                "block %s: %s%s",
                spec.extra["block_id"],
                result["status"],
                f" ({result['error']})" if result.get("error") else "",
            )
        if on_event is not None:
            on_event(kind, spec, result, where)

    try:
        results = runner.run(jobs, event)
    finally:
        runner.close()
    order = {spec.name: i for i, spec in enumerate(jobs)}
    return sorted(results, key=lambda r: order.get(r["job"], len(order)))


def merge_blocks(
    plan_path: Path,
    output_dir: Path,
    merged: Path,
    *,
    ratio: float = 0.875,
    evaluate_run: bool = True,
    device: str = "cpu",
) -> dict:
    """Merge the block runs of ``output_dir`` (what :func:`train_blocks` wrote for the plan at
    ``plan_path``) into the run folder ``merged`` (built beside it, then renamed into place: an
    error leaves no half-written folder and an earlier one as it was); returns ``{"blocks":
    [{"id", "kept", "trained"}], "num_gaussians", "ply", "metrics"}``.

    Raises:
        DataFormatError: a block's run is missing (train it first) or the blocks' SH degrees
            differ.
    """
    from splatforge._fs import staging_dir
    from splatforge.io import cameras_json, write_cameras_json, write_ply
    from splatforge.model import Splats
    from splatforge.train import Run
    from splatforge.train.config import save_config

    plan = load_plan(plan_path)
    parts, summary, cfg, step, seconds = [], [], None, 0, 0.0
    for block in plan["blocks"]:
        run_dir = Path(output_dir) / f"block_{block['id']}_{ratio:g}"
        try:
            run = Run.open(run_dir, device="cpu")
        except DataFormatError as exc:
            raise DataFormatError(
                f"block {block['id']}: no trained run in {run_dir} ({exc}); run splatforge blocks train first"
            ) from exc
        s = run.splats.detach()
        keep = torch.from_numpy(in_box(plane_coords(s.means.numpy(), plan), block["box"]))
        if parts and s.shN.shape[1] != parts[0].shN.shape[1]:
            raise DataFormatError(f"block {block['id']}: SH degree differs from the other blocks' ({run_dir})")
        parts.append(s.select(keep))
        summary.append({"id": block["id"], "trained": len(s), "kept": int(keep.sum()), "views": len(block["images"])})
        cfg = cfg or run.cfg
        step, seconds = step + run.step, seconds + run.train_seconds
    names = parts[0].keys()  # Splats' own field names (it is no dict)
    all_splats = Splats.from_mapping({k: torch.cat([getattr(p, k) for p in parts]) for k in names})
    merged = Path(merged)
    out_cfg = dataclasses.replace(cfg, output=merged, block_plan=None, block_id=None, steps=step, device=device)
    ply = Path("point_cloud") / f"iteration_{step}" / "point_cloud.ply"
    result = {
        "blocks": summary,
        "num_gaussians": len(all_splats),
        "ply": str(merged / ply),
        "step": step,
        "train_seconds": round(seconds, 1),
    }
    with staging_dir(merged) as tmp:  # the whole run folder appears at once, or not at all
        save_config(out_cfg, tmp / "cfg.yml")
        write_ply(tmp / ply, all_splats, rasterize_mode=out_cfg.rasterize_mode)
        run = Run.open(tmp, device=device)
        run.train_seconds = seconds
        sc = run.scene
        write_cameras_json(
            tmp / "cameras.json", cameras_json(sc.image_names, sc.camtoworlds, sc.Ks, sc.widths, sc.heights)
        )
        if evaluate_run:
            from splatforge.products import evaluate

            result["metrics"] = evaluate(run)
    return result
