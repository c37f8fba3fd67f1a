"""Kernel A/B: each compiled CPU kernel of a training step, this checkout's against git revision
``--rev``'s, on the same arguments, with a check that both give the same bits.

The arguments are captured from training steps at the state of ``bench/train.py``'s breakdown
(skull ``images_8``, 266x177, MCMC at its 30,000-Gaussian cap): every call of the kernels of
``raster/_cpu_project.py`` (projection, SH), ``raster/_cpu_raster.py`` (binning, compositing,
the per-intersection reduction) and ``train/_cpu_kernels.py`` (SSIM, MCMC's noise) in one step.
The baseline is the same file at ``--rev``, imported beside this checkout's (its own imports,
such as ``raster/constants.py``, are this checkout's); a kernel whose parameters were added since
is called with the captured arguments it takes, one that did not exist is left out.

For each kernel the two versions alternate ``--repeats`` times on fresh copies of the arguments
(copied outside the timing), medians reported with their ratio; "same bits" compares every
output (returned arrays and arrays written in place; of the arguments, those both versions
take). Numba's code compiled in the running process is not what it later loads from its cache
(``splatforge.raster.cpu.from_cache``) and can read up to 30 % slower, so a first child process
compiles both versions into the cache and a second one times them. Re-measure before believing a ratio under ~1.2.

Run: ``python bench/kernels.py --rev 425023d`` (about 2 minutes on 2 cores); writes
``bench/results/kernels.json``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, module_at, write_result
from train import DATASETS, trainer_at_cap

#: Kernel files and the kernels of theirs that a training step calls, in the step's order.
KERNELS = {
    "src/splatforge/raster/_cpu_project.py": ("project_fwd", "sh_fwd", "sh_bwd", "project_bwd"),
    "src/splatforge/raster/_cpu_raster.py": ("bin_gaussians", "raster_fwd", "raster_bwd", "reduce_isects"),
    "src/splatforge/train/_cpu_kernels.py": ("ssim_fwd", "ssim_bwd", "add_covariance_noise"),
}


def _module_name(path: str) -> str:
    return path.removeprefix("src/").removesuffix(".py").replace("/", ".")


def capture(out: Path, tmp: Path) -> None:
    """Pickle ``{kernel: args}`` of the first call of each kernel in a training step at the cap."""
    from splatforge.raster import cpu

    trainer = trainer_at_cap(tmp / "capture")
    captured: dict[str, list] = {}

    def keep(name: str, args: tuple) -> None:
        captured.setdefault(name, [a.copy() if isinstance(a, np.ndarray) else a for a in args])

    patched = []
    for path, names in KERNELS.items():
        module = importlib.import_module(_module_name(path))
        for name in names:
            kernel = getattr(module, name)
            if name == "raster_bwd":  # called through from_cache, which needs the dispatcher itself
                continue

            def wrapper(*args, _kernel=kernel, _name=name):
                keep(_name, args)
                return _kernel(*args)

            patched.append((module, name, kernel))
            setattr(module, name, wrapper)
    from_cache = cpu.from_cache

    def capturing_from_cache(kernel, args):
        keep(kernel.__name__, args)
        return from_cache(kernel, args)

    cpu.from_cache = capturing_from_cache
    try:
        with trainer.compute_threads():
            trainer.train_step()
    finally:
        cpu.from_cache = from_cache
        for module, name, kernel in patched:
            setattr(module, name, kernel)
    out.write_bytes(pickle.dumps({"num_gaussians": len(trainer.params["means"]), "args": captured}))


def _outputs(result, args: list) -> list:
    """What a call produced: its returned value(s) and every array argument (in-place outputs)."""
    returned = list(result) if isinstance(result, tuple) else [result]
    return returned + [a for a in args if isinstance(a, np.ndarray)]


def _same_bits(a: list, b: list) -> bool:
    """Whether two calls' outputs are the same bits (so -0.0 differs from 0.0, a NaN equals itself)."""

    def bits(x) -> tuple:
        x = np.asarray(x)
        return x.dtype.str, x.shape, x.tobytes()

    return len(a) == len(b) and all(bits(x) == bits(y) for x, y in zip(a, b))


def _call(kernel, args: list) -> tuple[float, list]:
    """One timed call on fresh copies of ``args``: ``(seconds, outputs)``."""
    args = [x.copy() if isinstance(x, np.ndarray) else x for x in args]
    t = time.perf_counter()
    result = kernel(*args)
    return time.perf_counter() - t, _outputs(result, args)


def measure(captured: Path, rev: str, folder: Path, repeats: int, only_compile: bool) -> dict:
    """Time every captured kernel against its version at ``rev`` (alternating calls)."""
    data = pickle.loads(captured.read_bytes())
    rows = {}
    for path, names in KERNELS.items():
        new_module = importlib.import_module(_module_name(path))
        try:
            old_module = module_at(rev, path, f"kernels_at_{rev}_{Path(path).stem}", folder)
        except subprocess.CalledProcessError:
            old_module = None
        for name in names:
            args = data["args"].get(name)
            if args is None:
                continue
            old = getattr(old_module, name, None)
            if old is None:
                rows[name] = {"note": f"not in {path} at {rev}"}
                continue
            n_old = len(inspect.signature(old.py_func).parameters)
            versions = {"new": (getattr(new_module, name), args), "old": (old, args[:n_old])}
            outputs = {v: _call(*versions[v])[1] for v in versions}  # compiles (first process) or loads
            if only_compile:
                continue
            times: dict[str, list[float]] = {"new": [], "old": []}
            for _ in range(repeats):
                for v in versions:
                    times[v].append(_call(*versions[v])[0])
            new_ms, old_ms = (statistics.median(times[v]) * 1e3 for v in ("new", "old"))
            rows[name] = {
                "old_ms": round(old_ms, 4),
                "new_ms": round(new_ms, 4),
                "ratio_old_over_new": round(old_ms / new_ms, 3),
                "same_bits": _same_bits(outputs["new"][: len(outputs["old"])], outputs["old"]),
                "args_dropped_for_old": len(args) - n_old,
            }
    return {"num_gaussians": data["num_gaussians"], "kernels": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rev", default="HEAD", help="git revision whose kernels are the baseline")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kernels.json")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child: the captured arguments
    ap.add_argument("--only-compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    rev = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", args.rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    # a lasting folder, so that numba's cache of the baseline's kernels survives between runs
    folder = Path(tempfile.gettempdir()) / "splatforge-bench-kernels" / rev
    if args.measure:
        result = measure(args.measure, rev, folder, args.repeats, args.only_compile)
        if args.result:
            args.result.write_text(json.dumps(result))
        return 0
    if not (DATASETS / "skull").is_dir():
        print(f"error: {DATASETS} not found (set SPLATFORGE_DATASETS)", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    console = Console(width=140, stderr=True)
    tmp = Path(tempfile.mkdtemp(prefix="splatforge-bench-"))
    try:
        console.log("training skull images_8 to the 30k cap to capture the kernels' arguments")
        captured = tmp / "args.pkl"
        capture(captured, tmp)
        child = [sys.executable, __file__, "--rev", rev, "--repeats", str(args.repeats), "--measure", str(captured)]
        console.log(f"compiling both versions into numba's cache, then timing them ({args.repeats} calls each)")
        subprocess.run(child + ["--only-compile"], check=True)
        subprocess.run(child + ["--result", str(tmp / "result.json")], check=True)
        result = json.loads((tmp / "result.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = Table(
        title=f"kernels at {result['num_gaussians']:,} Gaussians, skull images_8: "
        f"{rev} (old) against this checkout (new)"
    )
    for col in ("kernel", "old ms", "new ms", "old / new", "same bits"):
        table.add_column(col, justify="right")
    for name, r in result["kernels"].items():
        if "note" in r:
            table.add_row(name, "-", "-", "-", r["note"])
        else:
            table.add_row(
                name, f"{r['old_ms']:.3f}", f"{r['new_ms']:.3f}", f"{r['ratio_old_over_new']:.2f}", str(r["same_bits"])
            )
    Console(width=140).print(table)
    write_result(args.out, "kernels", load_before, args={"rev": rev, "repeats": args.repeats}, results=result)
    console.log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
