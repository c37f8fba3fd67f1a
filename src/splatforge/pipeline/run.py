"""``run``: captures to a trained, evaluated and exported splat in one call.

``OUT/scene`` (``prepare``), ``OUT/run`` (training with the preset for the device, then
``eval``), ``OUT/export/scene.{ply,splat,spz}``, ``OUT/export/preview_{top,angle}.jpg`` (and
``OUT/export/mesh.ply`` with ``mesh``), and ``OUT/run.json`` with every phase's summary and wall time. Preview failures are warnings only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from splatforge._fs import atomic_path
from splatforge.train.config import TrainFeatures
from splatforge.pipeline.prepare import PrepareConfig, prepare

log = logging.getLogger(__name__)

__all__ = ["RunConfig", "device_and_preset", "run_pipeline", "run_train_config"]


@dataclass
class RunConfig(TrainFeatures):
    """Options of ``splatforge run``: the capture, the preset and what overrides it."""

    inputs: list[Path]
    """Videos, image files or folders of photos."""
    output: Path
    """Output folder (scene/, run/, export/, run.json)."""
    preset: Literal["auto", "fast", "default", "quality"] = "auto"
    """Training preset: steps, training resolution and cap for the device (auto: default on a
    GPU, fast on a CPU); the options below override it."""
    steps: Optional[int] = None
    """Training steps (default: the preset's)."""
    max_image_size: Optional[int] = None
    """Longer side of the training images in pixels, 0 for the frames' full size (default: the
    preset's)."""
    cap_max: Optional[int] = None
    """Most Gaussians (default: the preset's)."""
    target_frames: int = 150
    """Frames kept from the videos."""
    max_size: int = 1600
    """Longer image side of the frames after import (what SfM and the exports see), pixels."""
    matcher: Literal["auto", "sequential", "exhaustive"] = "auto"
    camera_model: str = "SIMPLE_RADIAL"
    max_features: Optional[int] = None
    """SIFT features per image for SfM (default: the preset's, 2,048 for ``fast``, else 4,096)."""
    backend: Literal["auto", "cpu", "gsplat", "reference"] = "auto"
    device: str = "auto"
    """torch device: auto (cuda when present, else cpu), cpu, cuda[:i]."""
    seed: int = 0
    """Random seed (SfM and training)."""
    preview_size: int = 1024
    mesh: bool = False
    """Also fuse a TSDF mesh of the training views into OUT/export/mesh.ply (splatforge mesh's defaults)."""


def device_and_preset(cfg):
    """``(device, Preset)``: the device ``cfg.device`` resolves to and the preset ``cfg.preset``
    names for it (``cfg``: any options with those two fields, e.g. :class:`RunConfig` or
    :class:`~splatforge.pipeline.splatter.SplatterConfig`).

    Raises:
        ConfigError: an unknown preset or device.
    """
    from splatforge.train import resolve_preset
    from splatforge.train.config import resolve_device

    device = resolve_device(cfg.device)
    return device, resolve_preset(cfg.preset, device)


def prepare_config(cfg: RunConfig) -> PrepareConfig:
    """The ``prepare`` phase's options (scene in ``OUT/scene``), SfM's features from the preset
    for the device unless given."""
    features = cfg.max_features if cfg.max_features is not None else device_and_preset(cfg)[1].max_features
    return PrepareConfig(inputs=list(cfg.inputs), output=Path(cfg.output) / "scene", target_frames=cfg.target_frames,
                         max_size=cfg.max_size, matcher=cfg.matcher, camera_model=cfg.camera_model,
                         max_features=features, seed=cfg.seed)  # fmt: skip


def run_train_config(cfg: RunConfig):
    """The training config: the preset for the device, then the explicit options."""
    from splatforge.train import TrainConfig, apply_preset

    device, preset = device_and_preset(cfg)
    train = apply_preset(TrainConfig(data=Path(cfg.output) / "scene", output=Path(cfg.output) / "run",
                                     backend=cfg.backend, device=device, seed=cfg.seed), preset)  # fmt: skip
    overrides = {"steps": cfg.steps, "max_image_size": cfg.max_image_size, "max_gaussians": cfg.cap_max}
    return cfg.apply(dataclasses.replace(train, **{k: v for k, v in overrides.items() if v is not None}))


def run_pipeline(cfg: RunConfig, *, progress: Optional[Callable] = None, on_phase: Optional[Callable[[str], None]] = None,
                 on_plan: Optional[Callable[[str], None]] = None) -> dict:  # fmt: skip
    """Run prepare -> train -> eval -> export (ply, splat, spz) -> previews into ``cfg.output``.
    ``on_phase(name)`` is called as each phase starts; ``on_plan(text)``, when given, before
    training with what it will do and about how long it takes (a short timed warm-up).

    Returns the summary also written to ``OUT/run.json``.

    Raises:
        DataFormatError / ConfigError: from prepare or training (bad inputs, failed SfM, options).
    """
    from splatforge.io.cameras import read_cameras_json
    from splatforge.products import evaluate
    from splatforge.products.export import export
    from splatforge.products.previews import write_previews
    from splatforge.train import Trainer
    from splatforge.train.presets import describe_plan, estimate_seconds

    output = Path(cfg.output)
    train_cfg = run_train_config(cfg).resolve()  # bad options fail before the slow phases
    output.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    phase = on_phase or (lambda name: None)
    t = time.perf_counter()
    prep = prepare(prepare_config(cfg), on_phase=lambda name: phase(f"prepare: {name}"))
    times["prepare_s"] = time.perf_counter() - t

    phase("train")
    t = time.perf_counter()
    trainer = Trainer(train_cfg)
    if on_plan is not None:
        on_plan(describe_plan(trainer, estimate_seconds(trainer)))
    result = trainer.train(progress)
    times["train_s"] = time.perf_counter() - t
    phase("eval")
    t = time.perf_counter()
    run = trainer.as_run()
    metrics = evaluate(run)
    times["eval_s"] = time.perf_counter() - t

    phase("export")
    t = time.perf_counter()
    exports = {fmt: export(run, output / "export" / f"scene.{fmt}", fmt) for fmt in ("ply", "splat", "spz")}
    times["export_s"] = time.perf_counter() - t
    t = time.perf_counter()
    c2w, Ks, _, sizes = read_cameras_json(output / "run" / "cameras.json")
    previews = write_previews(run.splats, output / "export", camtoworlds=c2w, Ks=Ks,
                              image_size=(int(sizes[0, 0]), int(sizes[0, 1])), size=cfg.preview_size)  # fmt: skip
    times["previews_s"] = time.perf_counter() - t
    mesh_out = None
    if cfg.mesh:
        from splatforge.products.mesh import mesh_run

        phase("mesh")
        t = time.perf_counter()
        mesh_out = output / "export" / "mesh.ply"
        mesh_run(run, mesh_out, pictures=False)
        times["mesh_s"] = time.perf_counter() - t
    times["total_s"] = sum(times.values())
    summary = {
        "prepare": {k: prep[k] for k in ("num_images", "num_registered", "registered_fraction", "mean_reprojection_error_px") if k in prep},
        "train": {"steps": result.step, "num_gaussians": result.num_gaussians, "data_factor": train_cfg.data_factor,
                  "image_size": [int(trainer.scene.widths[0]), int(trainer.scene.heights[0])]},
        "test": {k: metrics["test"][k] for k in ("psnr", "ssim", "lpips", "lpips_vgg", "lpips_alex", "num_views")},
        "exports": {k: v["output"] for k, v in exports.items()}, "previews": previews, "timings": times,
    }  # fmt: skip
    if mesh_out is not None:
        summary["exports"]["mesh"] = str(mesh_out)
    with atomic_path(output / "run.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary
