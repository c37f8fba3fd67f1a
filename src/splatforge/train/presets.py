"""Named presets shared by ``train``, ``run``, ``generate`` and the job server: the run's length,
training resolution and Gaussian cap, chosen together for the device.

========== ======= ======================= ========= ===============================================
preset     steps   longer image side       cap       for
========== ======= ======================= ========= ===============================================
fast       3,000   at most 800 px          300,000   a CPU: minutes per scene (``auto`` on a CPU)
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

__all__ = ["Preset", "PRESETS", "PRESET_NAMES", "resolve_preset", "apply_preset", "estimate_seconds", "count_schedule"]

PRESET_NAMES = ("auto", "fast", "default", "quality")
PresetName = Literal["auto", "fast", "default", "quality"]


@dataclass(frozen=True)
class Preset:
    """What a preset sets: ``steps``, ``max_image_size`` (longer side in pixels, 0 = full
    size), ``max_gaussians`` (the cap) and the ``strategy``."""

    name: str
    steps: int
    max_image_size: int
    max_gaussians: int
    strategy: str = "mcmc"
    description: str = ""


PRESETS: dict[str, Preset] = {
    "fast": Preset("fast", 3_000, 800, 300_000, description="a CPU: minutes per scene"),
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


def apply_preset(cfg: "TrainConfig", preset: Preset) -> "TrainConfig":
    """A copy of ``cfg`` with the preset's steps, image size, cap and strategy."""
    return dataclasses.replace(cfg, steps=preset.steps, max_image_size=preset.max_image_size,
                               max_gaussians=preset.max_gaussians, strategy=preset.strategy)  # fmt: skip


def count_schedule(trainer: "Trainer") -> list[tuple[int, int]]:
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


def estimate_seconds(trainer: "Trainer", repeats: int = 3) -> dict:
    """Predict the remaining training time of ``trainer`` from a short timed warm-up.

    Forward and backward passes (no optimiser step: nothing changes) are timed on training views
    with all the Gaussians and with half of them, after one untimed pass (which also compiles the
    CPU kernels on a machine's first run); the time per step is taken as linear in the count and
    summed over :func:`count_schedule`, plus the measured cost of an optimiser and strategy step
    per Gaussian. Returns ``{"seconds", "s_per_step_now", "s_per_step_end", "final_count",
    "warmup_seconds"}``.
    """
    import torch

    t_start = time.perf_counter()
    n = len(trainer.params["means"])
    ids = trainer.train_ids
    gen = torch.Generator().manual_seed(trainer.cfg.seed + 7)

    def timed(keep) -> float:
        from splatforge.model import Splats

        splats = trainer.splats.detach()
        leaves = Splats(*(getattr(splats, k)[keep] if keep is not None else getattr(splats, k) for k in splats.keys()))
        leaves = Splats(*(t.clone().requires_grad_(True) for t in (getattr(leaves, k) for k in leaves.keys())))
        times = []
        for r in range(repeats + 1):
            index = ids[int(torch.randint(len(ids), (1,), generator=gen))]
            t = time.perf_counter()
            render, _, _ = leaves.rasterize(trainer.viewmats[index : index + 1], trainer.Ks[index : index + 1],
                                            int(trainer.scene.widths[index]), int(trainer.scene.heights[index]),
                                            sh_degree=trainer.sh_degree_at(trainer.step), backend=trainer.cfg.backend)  # fmt: skip
            render.sum().backward()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            if r:
                times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    full = timed(None)
    half = timed(torch.arange(0, n, 2, device=trainer.device)) if n >= 2 else full
    per_gaussian = max(0.0, (full - half) / max(1, n - (n + 1) // 2))
    fixed = max(1e-4, full - per_gaussian * n)
    # loss, SSIM, Adam and strategy: about half the rendering on CPU runs (bench/train.py)
    overhead = 1.5
    sched = count_schedule(trainer) + [(trainer.cfg.steps, None)]
    seconds = 0.0
    for (start, count), (end, _) in zip(sched[:-1], sched[1:]):
        seconds += (end - start) * (fixed + per_gaussian * count) * overhead
    final = sched[-2][1]
    return {"seconds": seconds, "s_per_step_now": full * overhead, "s_per_step_end": (fixed + per_gaussian * final) * overhead,
            "final_count": final, "warmup_seconds": time.perf_counter() - t_start}  # fmt: skip


def describe_plan(trainer: "Trainer", estimate: dict | None = None) -> str:
    """One line saying what ``trainer`` will do and, from ``estimate`` (:func:`estimate_seconds`),
    about how long it will take."""
    cfg, scene = trainer.cfg, trainer.scene
    i = trainer.train_ids[0]
    w, h = int(scene.widths[i]), int(scene.heights[i])
    cap = f"up to {cfg.cap:,} Gaussians" if cfg.cap else "no Gaussian cap"
    text = (f"training {cfg.steps - trainer.step:,} steps on {len(trainer.train_ids)} views at {w}x{h} "
            f"(data factor {cfg.data_factor}) on {cfg.device}, {cfg.strategy} densification from "
            f"{len(trainer.params['means']):,} Gaussians, {cap}")  # fmt: skip
    if estimate is not None:
        text += (f": about {estimate['seconds'] / 60:.1f} min ({estimate['s_per_step_now']:.3f} s/step now, "
                 f"~{estimate['s_per_step_end']:.3f} s/step at {estimate['final_count']:,} Gaussians)")  # fmt: skip
    return text
