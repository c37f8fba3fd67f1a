"""``splatforge run VIDEO`` end to end with the CPU default, on a phone video made from the fox.

The 67 fox photos (1080x1920 portrait, ``../shared/datasets/fox/images``, name order) are encoded
here as an H.264 video at ``--fps`` (one frame per photo), in a temp folder; then the README's own
command, ``splatforge run fox.mp4 --output OUT`` with no other option, runs as a subprocess and is
timed. The table shows each phase's time (from ``run.json``), what training was planned and did,
and the test PSNR/SSIM/LPIPS. Writes ``bench/results/run_video.json``.

Run: ``python bench/run_video.py`` (about 20 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("SPLATFORGE_DATASETS", ROOT.parent / "shared" / "datasets"))


def make_video(photos: Path, path: Path, fps: int) -> int:
    """Encode the photos (sorted by name) as an H.264 video, one frame each; returns the count."""
    import av

    names = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    with av.open(str(path), mode="w") as container:
        stream = None
        for p in names:
            rgb = np.asarray(Image.open(p).convert("RGB"))
            if stream is None:
                stream = container.add_stream("libx264", rate=fps)
                stream.height, stream.width = rgb.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": "18"}
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return len(names)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fps", type=int, default=4)
    ap.add_argument("--keep", type=Path, default=None, help="keep the output folder here")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "run_video.json")
    args = ap.parse_args()
    if not (DATASETS / "fox" / "images").is_dir():
        print(f"error: {DATASETS / 'fox'} not found (set SPLATFORGE_DATASETS)", file=sys.stderr)
        return 2
    console = Console(width=140)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="splatforge-run-video-"))
    try:
        video = tmp / "fox.mp4"
        frames = make_video(DATASETS / "fox" / "images", video, args.fps)
        out = tmp / "out"
        cmd = [sys.executable, "-m", "splatforge.cli", "run", str(video), "--output", str(out)]
        console.log(f"{frames} frames of 1080x1920 -> {video}; running: splatforge run {video.name} --output OUT")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode:
            console.print(proc.stderr[-3000:])
            return 1
        summary = json.loads((out / "run.json").read_text())
        plan = [line for line in proc.stderr.splitlines() if "training " in line and "steps" in line]
        if args.keep:
            shutil.copytree(out, args.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t = Table(title=f"splatforge run fox.mp4 (67 frames 1080x1920), CPU default: {wall / 60:.1f} min")
    for col in ("phase", "seconds"):
        t.add_column(col, justify="right")
    for k, v in summary["timings"].items():
        t.add_row(k, f"{v:.0f}")
    console.print(t)
    test = summary["test"]
    console.print(f"plan: {plan[0].strip() if plan else '?'}")
    console.print(
        f"train: {summary['train']}, test: PSNR {test['psnr']:.2f} dB, SSIM {test['ssim']:.3f}, "
        f"LPIPS(vgg) {test['lpips_vgg']}, registered {summary['prepare']}"
    )
    write_result(
        args.out,
        "run_video",
        load_before,
        args={k: str(v) for k, v in vars(args).items()},
        wall_s=wall,
        frames=frames,
        plan=plan,
        summary=summary,
    )
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
