"""Named presets shared by ``train``, ``run``, ``generate`` and the job server: the run's length,
training resolution and Gaussian cap, chosen together for the device.

========== ======= ======================= ========= ===============================================
preset     steps   longer image side       cap       for
========== ======= ======================= ========= ===============================================
fast       3,000   at most 512 px          300,000   a CPU: minutes per scene (``auto`` on a CPU);
                                                     ``run``'s SfM with 2,048 features, not 4,096
default    30,000  at most 1,600 px        1,000,000 a GPU: gsplat's/Inria's standard run (``auto``
                                                     with a CUDA device)
quality    30,000  full size               3,000,000 a GPU with memory to spare
========== ======= ======================= ========= ===============================================

All use MCMC densification (measured better than 3DGS's default on every capture tried: see the
README's table). Options given on the command line override the preset's values; the resolved
values are written to ``cfg.yml``. :func:`estimate_seconds` times a short warm-up and predicts the
run's duration from the count the strategy will reach, so the command can say how long it takes
before it starts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from splatforge.errors import ConfigError

if TYPE_CHECKING:
    from splatforge.train.config import TrainConfig
    from splatforge.train.trainer import Trainer

log = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "PRESET_NAMES",
    "Preset",
    "PresetName",
    "apply_preset",
    "count_schedule",
    "estimate_seconds",
    "preset_train_config",
    "resolve_preset",
]

GROWTH = 0.5
"""How far towards their neighbour spacing :func:`estimate_seconds` grows shrunk initial
Gaussians, in log scale (0: as initialised, 1: the spacing). Measured on 2 cores at 3,000 steps:
0 predicted 0.34x (the fox video) and 0.70x (skull ``images_8``) of the real time, 1 about 2.2x
and 2.7x, 0.5 gives 1.1x and 1.5x."""
PRESET_NAMES = ("auto", "fast", "default", "quality")
PresetName = Literal["auto", "fast", "default", "quality"]


@dataclass(frozen=True)
class Preset:
    """What a preset sets: ``steps``, ``max_image_size`` (longer side in pixels, 0 = full
    size), ``max_gaussians`` (the cap), the ``strategy`` and, for ``run``'s SfM,
    ``max_features`` (SIFT features per image: exhaustive matching costs the square of it)."""

    name: str
    steps: int
    max_image_size: int
    max_gaussians: int
    strategy: str = "mcmc"
    max_features: int = 4096
    description: str = ""


PRESETS: dict[str, Preset] = {
    # 2,048 SIFT features: SfM on the 67 frames of a 1080x1920 video takes 8.5 min on 2 cores
    # instead of over 20 with 4,096, all frames registered (and 65 of the 66 skull video frames).
    # 512 px: the rasterizer's cost follows the pixels; that video's frames at 299x532 (the most
    # under 640 px) trained in 13 min on 2 cores, 0.42 s/step at the end
    "fast": Preset("fast", 3_000, 512, 300_000, max_features=2_048, description="a CPU: minutes per scene"),
    "default": Preset("default", 30_000, 1_600, 1_000_000, description="a GPU: the standard 30k-step run"),
    "quality": Preset("quality", 30_000, 0, 3_000_000, description="a GPU with memory to spare: full size"),
}


def resolve_preset(name: str, device: str) -> Preset:
    """The preset ``name``; ``auto`` is ``default`` on a CUDA device and ``fast`` otherwise.

    Raises:
        ConfigError: an unknown name.
    """
    if name == "auto":
        return PRESETS["default" if str(device).startswith("cuda") else "fast"]
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return PRESETS[name]


def apply_preset(cfg: TrainConfig, preset: Preset) -> TrainConfig:
    """A copy of ``cfg`` with the preset's steps, image size, cap and strategy."""
    return dataclasses.replace(cfg, **preset_values(preset))


def preset_values(preset: Preset) -> dict:
    """The :class:`~splatforge.train.TrainConfig` fields a preset sets."""
    return {
        "steps": preset.steps,
        "max_image_size": preset.max_image_size,
        "max_gaussians": preset.max_gaussians,
        "strategy": preset.strategy,
    }


def preset_train_config(preset: str = "auto", **fields) -> TrainConfig:
    """The one way a :class:`~splatforge.train.TrainConfig` is made from a preset (``train``,
    ``run``, ``splatter``, ``generate``'s jobs): the preset ``preset`` for the device
    ``fields["device"]`` (``auto`` when absent: :func:`resolve_preset`), then ``fields``
    (``TrainConfig`` fields; a value of ``None`` means "not given": the preset's value or the
    field's default stands). Nothing given is replaced, and nothing passed in is changed.

    Raises:
        ConfigError: an unknown preset, or a CUDA device where there is none.
    """
    from splatforge.train.config import TrainConfig, resolve_device

    chosen = resolve_preset(preset, resolve_device(fields.get("device") or "auto"))
    values = preset_values(chosen) | {k: v for k, v in fields.items() if v is not None}
    return TrainConfig(**values)


def count_schedule(trainer: Trainer) -> list[tuple[int, int]]:
    """``[(first_step, count), ...]``: the Gaussian count from each step on, as far as it is
    known in advance: MCMC grows by 5 % every ``refine_every`` steps inside its refine window up to
    its cap; other strategies are assumed to keep the initial count (the estimate is then a
    lower bound when they grow)."""
    n = len(trainer.params["means"])
    s = trainer.strategy
    out = [(trainer.step, n)]
    cap_max = getattr(s, "cap_max", None)
    if cap_max is None:
        return out
    for step in range(trainer.step, trainer.cfg.steps):
        if s.refine_start_iter < step < s.refine_stop_iter and step % s.refine_every == 0 and n < cap_max:
            n = min(cap_max, int(1.05 * n))
            out.append((step + 1, n))
    return out


def estimate_seconds(trainer: Trainer, repeats: int = 3) -> dict:
    """Predict the remaining training time of ``trainer`` from a short timed warm-up.

    A step costs the rasterizer's forward and backward, which grows with the count and with the
    Gaussians' sizes, plus the loss (SSIM) and about 10 % for Adam, the strategy and Python (the
    breakdown in ``bench/train.py``). The rasterizer is timed on training views (detached copies:
    nothing changes) at the SH degree most of the run uses, with the current Gaussians and with
    each of them doubled the way MCMC grows (a copy in place, the opacity shared as
    ``1 - sqrt(1 - o)``), after one untimed pass (which also compiles the CPU kernels on a
    machine's first run). A run that starts from shrunk points (``init_scale`` < 1: MCMC's 0.1×
    the neighbour spacing) is timed with them grown halfway (:data:`GROWTH`) towards the spacing,
    as training grows them: timed as initialised, the fox video's run was predicted at 2.8 min
    and took 13. The time per step is taken as linear in the count and summed over
    :func:`count_schedule`. Returns
    ``{"seconds", "s_per_step_now", "s_per_step_end", "final_count", "warmup_seconds"}``.
    """
    import math

    import torch

    from splatforge.model import Splats
    from splatforge.train.losses import ssim

    t_start = time.perf_counter()
    cfg = trainer.cfg
    n = len(trainer.params["means"])
    ids = trainer.train_ids
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    base = trainer.splats.detach()
    if trainer.step == 0 and cfg.init_scale is not None and cfg.init_scale < 1.0:
        base = dataclasses.replace(base, scales=base.scales - GROWTH * math.log(cfg.init_scale))

    def timed(splats: Splats) -> float:
        leaves = Splats(*(getattr(splats, k).clone().requires_grad_(True) for k in splats.keys()))  # noqa: SIM118 (Splats is no dict)
        times = []
        for r in range(repeats + 1):
            index = ids[int(torch.randint(len(ids), (1,), generator=gen))]
            t = time.perf_counter()
            render, _, _ = leaves.rasterize(
                trainer.viewmats[index : index + 1],
                trainer.Ks[index : index + 1],
                int(trainer.scene.widths[index]),
                int(trainer.scene.heights[index]),
                sh_degree=cfg.sh_degree,
                backend=cfg.backend,
                rasterize_mode=cfg.rasterize_mode,
                near_plane=trainer.near_plane,
            )
            render.sum().backward()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            if r:
                times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    def timed_loss() -> float:  # SSIM forward and backward at a training view's size (content does not matter)
        i = ids[0]
        image = torch.rand((1, int(trainer.scene.heights[i]), int(trainer.scene.widths[i]), 3), generator=gen)
        image = image.to(trainer.device).requires_grad_(True)
        times = []
        for r in range(repeats + 1):
            t = time.perf_counter()
            (1.0 - ssim(image, image.detach().flip(2))).backward()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            if r:
                times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    with trainer.compute_threads():
        full = timed(base)
        shared = torch.logit(1.0 - torch.sqrt(1.0 - torch.sigmoid(base.opacities)), eps=1e-6)
        doubled = Splats(
            *(torch.cat([getattr(base, k)] * 2) for k in ("means", "quats", "scales")),
            torch.cat([shared, shared]),
            torch.cat([base.sh0] * 2),
            torch.cat([base.shN] * 2),
        )
        double = timed(doubled)
        loss = timed_loss()
    per_gaussian = max(0.0, (double - full) / max(1, n))
    fixed = max(1e-4, full - per_gaussian * n)

    def per_step(count: int) -> float:
        return (fixed + per_gaussian * count) * 1.1 + loss

    sched = count_schedule(trainer) + [(cfg.steps, None)]
    seconds = sum((end - start) * per_step(count) for (start, count), (end, _) in zip(sched[:-1], sched[1:]))  # noqa: RUF007
    final = sched[-2][1]
    return {
        "seconds": seconds,
        "s_per_step_now": per_step(n),
        "s_per_step_end": per_step(final),
        "final_count": final,
        "warmup_seconds": time.perf_counter() - t_start,
    }


def describe_plan(trainer: Trainer, estimate: dict | None = None) -> str:
    """One line saying what ``trainer`` will do and, from ``estimate`` (:func:`estimate_seconds`),
    about how long it will take."""
    cfg, scene = trainer.cfg, trainer.scene
    i = trainer.train_ids[0]
    w, h = int(scene.widths[i]), int(scene.heights[i])
    cap = f"up to {cfg.cap:,} Gaussians" if cfg.cap else "no Gaussian cap"
    text = (
        f"training {cfg.steps - trainer.step:,} steps on {len(trainer.train_ids)} views at {w}x{h} "
        f"(data factor {cfg.data_factor}) on {cfg.device}, {cfg.strategy} densification from "
        f"{trainer.num_gaussians:,} Gaussians, {cap}"
    )
    if estimate is not None:
        text += (
            f": about {estimate['seconds'] / 60:.1f} min ({estimate['s_per_step_now']:.3f} s/step now, "
            f"~{estimate['s_per_step_end']:.3f} s/step at {estimate['final_count']:,} Gaussians)"
        )
    return text
