"""``run``: captures to a trained, evaluated and exported splat in one call.

``OUT/scene`` (``prepare``), ``OUT/run`` (``train`` with MCMC densification, then ``eval``),
``OUT/export/scene.{ply,splat,spz}`` and ``OUT/export/preview_{top,angle}.jpg``, and
``OUT/run.json`` with every phase's summary and wall time. Preview failures are warnings only.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

from splatforge._fs import atomic_path
from splatforge.pipeline.prepare import PrepareConfig, prepare

log = logging.getLogger(__name__)

__all__ = ["run_pipeline"]


def run_pipeline(prepare_cfg: PrepareConfig, output: Path, *, steps: int = 30_000, data_factor: int = 1,
                 cap_max: int = 1_000_000, backend: str = "auto", device: str = "cpu", seed: int = 0,
                 preview_size: int = 1024, progress: Optional[Callable] = None,
                 on_phase: Optional[Callable[[str], None]] = None) -> dict:  # fmt: skip
    """Run prepare -> train -> eval -> export (ply, splat, spz) -> previews into ``output``.

    ``prepare_cfg.output`` is replaced by ``output / "scene"``. Returns the summary also written
    to ``output / "run.json"``.

    Raises:
        DataFormatError / ConfigError: from prepare or training (bad inputs, failed SfM, options).
    """
    from splatforge.io.cameras import read_cameras_json
    from splatforge.products import evaluate
    from splatforge.products.export import export, load_splats
    from splatforge.products.previews import write_previews
    from splatforge.train import TrainConfig, Trainer
    from splatforge.train.config import MCMCConfig

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t = time.perf_counter()
    prepare_cfg.output = output / "scene"
    phase = on_phase or (lambda name: None)
    prep = prepare(prepare_cfg, on_phase=lambda name: phase(f"prepare: {name}"))
    times["prepare_s"] = time.perf_counter() - t

    phase("train")
    t = time.perf_counter()
    cfg = TrainConfig(data=output / "scene", output=output / "run", data_factor=data_factor, steps=steps,
                      backend=backend, device=device, seed=seed, strategy="mcmc",
                      mcmc=MCMCConfig(cap_max=cap_max, refine_stop=int(steps * 0.85)))  # fmt: skip
    trainer = Trainer(cfg)
    result = trainer.train(progress)
    times["train_s"] = time.perf_counter() - t
    phase("eval")
    t = time.perf_counter()
    metrics = evaluate(trainer)
    times["eval_s"] = time.perf_counter() - t

    phase("export")
    t = time.perf_counter()
    exports = {fmt: export(output / "run", output / "export" / f"scene.{fmt}", fmt) for fmt in ("ply", "splat", "spz")}
    times["export_s"] = time.perf_counter() - t
    t = time.perf_counter()
    c2w, Ks, _, sizes = read_cameras_json(output / "run" / "cameras.json")
    previews = write_previews(load_splats(output / "run"), output / "export", camtoworlds=c2w, Ks=Ks,
                              image_size=(int(sizes[0, 0]), int(sizes[0, 1])), size=preview_size)  # fmt: skip
    times["previews_s"] = time.perf_counter() - t
    times["total_s"] = sum(times.values())
    summary = {
        "prepare": {k: prep[k] for k in ("num_images", "num_registered", "registered_fraction", "mean_reprojection_error_px") if k in prep},
        "train": {"steps": result.step, "num_gaussians": result.num_gaussians},
        "test": {k: metrics["test"][k] for k in ("psnr", "ssim", "lpips", "num_views")},
        "exports": {k: v["output"] for k, v in exports.items()}, "previews": previews, "timings": times,
    }  # fmt: skip
    with atomic_path(output / "run.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary
