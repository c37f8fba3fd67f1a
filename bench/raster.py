"""Rasterizer benchmark: ``cpu`` (ours) against ``reference`` (pure torch) in the same run, and
``gsplat`` when a CUDA GPU is present.

Scene: ``garden/test_garden.npz`` (real Mip-NeRF 360 garden centres and colours, camera 0),
with scales uniform in [0, 0.02), opacities uniform in [0, 1) and random quats drawn seeded as
gsplat's tests draw them; 10k, 50k and all 138,766 Gaussians at 324x210, 648x420 and 1296x840
(intrinsics scaled x0.5, x1, x2). For each cell: one warm-up, then the median of ``--repeats``
forward and forward+backward timings, and the peak memory added during forward+backward
(resident set for CPU backends, CUDA allocator peak for gsplat). The reference is skipped where
its autograd graph (~16 KB per tile intersection) would not fit in memory.

Run: ``python bench/raster.py`` (about 5 minutes on 2 cores); writes
``bench/results/raster.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from splatforge.raster import _cpu_raster, rasterize

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
REF_BYTES_PER_ISECT = 16_000  # measured: the reference keeps ~60 B per (pixel, Gaussian) pair


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> int:
    """Reset the process's peak RSS (Linux clear_refs) and return the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status("VmRSS")


def load_garden(path: Path, n: int, scale: float, device: str):
    d = np.load(path)
    g = torch.Generator().manual_seed(42)
    N_all = d["means3d"].shape[0]
    means = torch.from_numpy(d["means3d"])[:n]
    quats = torch.randn(N_all, 4, generator=g)[:n]
    scales = (torch.rand(N_all, 3, generator=g) * 0.02)[:n]
    opacities = torch.rand(N_all, generator=g)[:n]
    colors = (torch.from_numpy(d["colors"]).float() / 255.0)[:n]
    viewmats = torch.from_numpy(d["viewmats"])[:1].float()
    Ks = torch.from_numpy(d["Ks"])[:1].float().clone()
    Ks[:, :2] *= scale
    W, H = int(round(int(d["width"]) * scale)), int(round(int(d["height"]) * scale))  # noqa: RUF046
    params = [t.float().to(device) for t in (means, quats, scales, opacities, colors)]
    return params, viewmats.to(device), Ks.to(device), W, H


def count_isects(params, viewmats, Ks, W, H) -> int:
    with torch.no_grad():
        _, _, info = rasterize(*[p.cpu() for p in params], viewmats.cpu(), Ks.cpu(), W, H, backend="cpu")
    arrays = [info[k].detach().numpy() for k in ("means2d", "radii", "depths", "conics", "opacities")]
    _, ids, _ = _cpu_raster.bin_gaussians(*arrays, W, H)
    return int(ids.shape[0])


def time_backend(backend: str, params, viewmats, Ks, W, H, repeats: int) -> dict:
    cuda = params[0].is_cuda

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def once(backward: bool) -> float:
        leaves = [p.detach().clone().requires_grad_(backward) for p in params]
        sync()
        t0 = time.perf_counter()
        render, alpha, _info = rasterize(*leaves, viewmats, Ks, W, H, backend=backend)
        if backward:
            (render.sum() + alpha.sum()).backward()
        sync()
        return time.perf_counter() - t0

    once(True)  # warm-up (compiles/loads kernels, fills caches)
    fwd = [once(False) for _ in range(repeats)]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    fb = [once(True) for _ in range(repeats)]
    out = {"forward_s": statistics.median(fwd), "fwd_bwd_s": statistics.median(fb)}
    if cuda:
        out["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def peak_memory_child(backend: str, data: Path, n: int, scale: float) -> float:
    """Peak resident memory (MB) one forward+backward adds, measured in a fresh process: freed
    memory that allocators keep would hide the peak of a second run in this one."""
    code = (
        "import sys; sys.path.insert(0, %r)\n"  # noqa: UP031
        "from raster import _peak_in_this_process\n"
        "print(_peak_in_this_process(%r, %r, %d, %r))\n"
    ) % (str(Path(__file__).parent), backend, str(data), n, scale)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def _peak_in_this_process(backend: str, data: str, n: int, scale: float) -> float:
    params, viewmats, Ks, W, H = load_garden(Path(data), n, scale, "cpu")
    tiny = [p[:10].clone().requires_grad_(True) for p in params]
    render, _, _ = rasterize(*tiny, viewmats, Ks, 32, 32, backend=backend)  # load compiled kernels
    render.sum().backward()
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    base = _reset_peak()
    render, alpha, _ = rasterize(*leaves, viewmats, Ks, W, H, backend=backend)
    (render.sum() + alpha.sum()).backward()
    return (_status("VmHWM") - base) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "garden" / "test_garden.npz")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 138_766])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--no-reference", action="store_true", help="skip the slow reference backend")
    ap.add_argument("--ref-mem-limit-gb", type=float, default=10.0, help="skip reference above this estimate")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "raster.json")
    args = ap.parse_args()
    if not args.data.exists():
        print(f"error: {args.data} not found (pass --data PATH to test_garden.npz)", file=sys.stderr)
        return 2

    console = Console(width=200)
    has_gsplat = torch.cuda.is_available()
    load_before = os.getloadavg()
    rows = []
    for scale in args.scales:
        for n in args.sizes:
            params, viewmats, Ks, W, H = load_garden(args.data, n, scale, "cpu")
            isects = count_isects(params, viewmats, Ks, W, H)
            row = {"n_gaussians": params[0].shape[0], "width": W, "height": H, "n_isects": isects}
            row["cpu"] = time_backend("cpu", params, viewmats, Ks, W, H, args.repeats)
            row["cpu"]["peak_mem_mb"] = peak_memory_child("cpu", args.data, n, scale)
            est = isects * REF_BYTES_PER_ISECT / 2**30
            if args.no_reference or est > args.ref_mem_limit_gb:
                row["reference"] = {
                    "skipped": f"estimated {est:.1f} GB > {args.ref_mem_limit_gb} GB"
                    if not args.no_reference
                    else "--no-reference"
                }
            else:
                row["reference"] = time_backend("reference", params, viewmats, Ks, W, H, args.repeats)
                row["reference"]["peak_mem_mb"] = peak_memory_child("reference", args.data, n, scale)
            if has_gsplat:
                gp, gv, gk, _, _ = load_garden(args.data, n, scale, "cuda")
                row["gsplat"] = time_backend("gsplat", gp, gv, gk, W, H, args.repeats)
            rows.append(row)
            console.log(f"{row['n_gaussians']:>7} Gaussians {W}x{H}: cpu fwd+bwd {row['cpu']['fwd_bwd_s']:.3f} s")

    table = Table(title="rasterize: garden, 1 camera (median times, seconds; peak = memory added, MB)")
    for col in (
        "N",
        "size",
        "isects",
        "cpu fwd",
        "cpu f+b",
        "cpu peak",
        "ref fwd",
        "ref f+b",
        "ref peak",
        "ref/cpu f+b",
    ):
        table.add_column(col, justify="right")
    if has_gsplat:
        for col in ("gsplat fwd", "gsplat f+b", "cpu/gsplat f+b"):
            table.add_column(col, justify="right")
    for r in rows:
        c, ref = r["cpu"], r["reference"]
        cells = [
            f"{r['n_gaussians']:,}",
            f"{r['width']}x{r['height']}",
            f"{r['n_isects']:,}",
            f"{c['forward_s']:.3f}",
            f"{c['fwd_bwd_s']:.3f}",
            f"{c['peak_mem_mb']:.0f}",
        ]
        if "skipped" in ref:
            cells += ["skip", "skip", "-", "-"]
        else:
            cells += [
                f"{ref['forward_s']:.2f}",
                f"{ref['fwd_bwd_s']:.2f}",
                f"{ref['peak_mem_mb']:.0f}",
                f"{ref['fwd_bwd_s'] / c['fwd_bwd_s']:.1f}x",
            ]
        if has_gsplat:
            gs = r["gsplat"]
            cells += [
                f"{gs['forward_s'] * 1e3:.2f} ms",
                f"{gs['fwd_bwd_s'] * 1e3:.2f} ms",
                f"{c['fwd_bwd_s'] / gs['fwd_bwd_s']:.0f}x",
            ]
        table.add_row(*cells)
    console.print(table)

    write_result(args.out, "raster", load_before, repeats=args.repeats, rows=rows)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
