"""Dataset-generation throughput: scenes per hour with 1 vs 2 local workers (CPU), and on an
NVIDIA GPU with 1 vs 2 vs 4 jobs per GPU.

The dataset is ``--scenes`` copies (symlinks) of ``skull`` at images_8, each one job at split
ratio 0.5 through ``--stages`` for ``--steps`` training steps, written to a temp folder. Every
configuration starts from an empty output (no skipping) after one warm-up job that fills the
numba cache. The 1-worker run is the peer of the others in the same process: the table gives
the speed-up ratio. Writes ``bench/results/generate.json``.

Run: ``python bench/generate.py`` (about 10 minutes on 2 cores with the defaults).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from splatforge.pipeline.generate import GenerateConfig, generate, gpu_slots

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result

ROOT = Path(__file__).resolve().parents[1]


def run(root: Path, out: Path, args, **kw) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    summary = generate(
        GenerateConfig(
            dataset_root=root,
            output_dir=out,
            split_ratio=[0.5],
            stages=args.stages,
            steps=args.steps,
            data_factor=8,
            cap_max=50_000,
            **kw,
        )
    )
    wall = time.perf_counter() - t
    return {
        "wall_s": round(wall, 1),
        "done": summary["done"],
        "failed": summary["failed"],
        "scenes_per_hour": round(summary["done"] / wall * 3600, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("SPLATFORGE_DATASETS", ROOT.parent / "shared" / "datasets")) / "skull",
    )
    ap.add_argument("--scenes", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--stages", nargs="+", default=["train", "render", "visibility", "depth"])
    ap.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "generate.json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "root"
        root.mkdir()
        for i in range(args.scenes):
            (root / f"skull_{i:02d}").symlink_to(args.data.resolve())
        warm = tmp / "warm"
        (warm / "skull_00").parent.mkdir()
        (warm / "skull_00").symlink_to(args.data.resolve())
        run(warm, tmp / "warm_out", args, max_workers=1)  # numba cache, image cache, imports
        rows = {}
        gpus = gpu_slots([], "1")
        if gpus:
            for per_gpu in (1, 2, 4):
                rows[f"{len(gpus)} GPU x {per_gpu} jobs"] = run(
                    root, tmp / f"gpu{per_gpu}", args, jobs_per_gpu=str(per_gpu), backend="auto"
                )
        for workers in (1, 2):
            rows[f"cpu x {workers} workers"] = run(
                root, tmp / f"cpu{workers}", args, max_workers=workers, backend="cpu"
            )
    base = rows["cpu x 1 workers"]["scenes_per_hour"]
    table = Table(
        title=f"generate: {args.scenes} skull scenes (images_8), {args.steps} steps, stages {' '.join(args.stages)}"
    )
    for col in ("configuration", "wall", "scenes/hour", "vs 1 CPU worker"):
        table.add_column(col)
    for name, r in rows.items():
        table.add_row(
            name, f"{r['wall_s']:.0f} s", f"{r['scenes_per_hour']:.1f}", f"{r['scenes_per_hour'] / base:.2f}x"
        )
    Console().print(table)
    write_result(
        args.output, "generate", load_before, scenes=args.scenes, steps=args.steps, stages=args.stages, results=rows
    )


if __name__ == "__main__":
    main()
