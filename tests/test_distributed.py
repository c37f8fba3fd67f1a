"""Sharded training on 2 CPU processes (gloo), launched by torchrun as a user would.

The references are independent of the code under test's distribution: the exchange's expected
rows are computed from the formula that made them, the distributed render is compared with one
process rendering every Gaussian, and 2 ranks x batch 1 with the same run in one process with
batch 2 (same views per step, same initial Gaussians). The shard bookkeeping that needs no
collective (:class:`~splatforge.train.shards.ShardSet` cutting sets and checkpoints) is tested in
this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from scenes import REPO, datasets_dir, needs_skull

from splatforge.model import Splats
from splatforge.raster.collectives import World
from splatforge.train.distributed import even_sizes
from splatforge.train.shards import PARAM_KEYS, ShardSet

SKULL = datasets_dir() / "skull"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}


def _run_worker(case: str, out: Path, *extra: str) -> list[dict]:
    proc = subprocess.run(
        [*TORCHRUN, str(REPO / "tests" / "dist_worker.py"), case, str(out), *extra],
        check=False,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"{case}_{r}.pt", weights_only=False) for r in range(2)]


def _train(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splatforge", "train", *args],
        check=False,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _params(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"ckpt_{step:06d}.pt", weights_only=True)["params"]


def test_all_to_all_both_methods_and_backward(tmp_path):
    """Rows of different counts (0 included) reach the right rank in order by gloo's own
    all_to_all_single and by point-to-point sends; the gradient of each received row goes back to
    the rank it came from; gather and boundary moves keep the global order."""
    results = _run_worker("exchange", tmp_path)
    W = 2
    counts = [[(2 * a + 3 * b) % 5 for b in range(W)] for a in range(W)]
    for r, res in enumerate(results):
        for method in ("native", "p2p"):
            got = res[method]
            for a in range(W):
                want = torch.arange(counts[a][r] * 3, dtype=torch.float32).reshape(-1, 3) + 1000 * a + 100 * r
                assert torch.equal(got["recv"][a], want), (method, r, a)
                # the rows this rank r sent to rank a got, on a, the weight 1 + r + 10 a
                assert torch.equal(got["grad"][a], torch.full((counts[r][a], 3), 1.0 + r + 10.0 * a)), (method, r, a)
    sizes = [3, 5]
    assert torch.equal(results[0]["gathered"], torch.arange(8, dtype=torch.float32))
    assert results[1]["gathered"] is None
    assert results[0]["target"] == [4, 4]
    assert torch.equal(
        torch.cat([results[0]["moved"], results[1]["moved"]]), torch.arange(sum(sizes), dtype=torch.float32)
    )
    assert [len(results[r]["moved"]) for r in range(2)] == [4, 4]
    assert all(t.shape == (0, 3) for r in range(2) for t in results[r]["empty"])


def test_distributed_rasterize_equals_one_process(tmp_path):
    """Each rank's images (RGB + inverse depth, SH degree 3) from its shard and the other's
    equal one process's render of every Gaussian, and so do the gradients each shard gets."""
    for r, res in enumerate(_run_worker("rasterize", tmp_path)):
        single, dist = res["single"], res["dist"]
        assert torch.allclose(dist["img"], single["img"], rtol=0, atol=1e-6)
        for got, want in zip(dist["grads"], single["grads"]):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-7 * want.abs().max().item())
        assert dist["means2d"] == [4, res["own"][1], 2]  # every rank's cameras, this rank's Gaussians
        assert dist["n_cameras"] == 4 and dist["counts"] == [192, 208] and dist["means2d_grad"]


def _numbered(n: int) -> dict[str, torch.Tensor]:
    """Per-Gaussian tensors whose rows hold their global index."""
    idx = torch.arange(n, dtype=torch.float32)
    widths = {"means": 3, "scales": 3, "quats": 4, "opacities": 0, "sh0": (1, 3), "shN": (3, 3)}
    out = {}
    for k, w in widths.items():
        shape = (n, *w) if isinstance(w, tuple) else (n, w) if w else (n,)
        out[k] = idx.reshape(n, *([1] * (len(shape) - 1))).expand(shape).clone()
    return out


def _checkpoint(n: int, **extra) -> dict:
    params = _numbered(n)
    moments = {
        k: {"state": {0: {"step": torch.tensor(3.0), "exp_avg": v + 0.5}}, "param_groups": []}
        for k, v in params.items()
    }
    return {"step": 7, "params": params, "optimizers": moments, "strategy_state": {"grad2d": torch.arange(n)}, **extra}


def test_shard_set_cuts_the_initial_set_and_checkpoints_by_rank():
    """Rank r of 2 takes the r-th even shard of the initial set and of a checkpoint (its saved
    shard sizes when they fit the world, else even ones, boundaries on multiples of 64), with its
    own strategy RNG (a fresh one, seeded from the step, on another world size); no collective."""
    n = 1000
    splats = Splats.from_mapping(_numbered(n))
    even = even_sizes(n, 2)
    assert even == [448, 552]
    saved = [600, 400]
    rngs = [torch.full((4,), r, dtype=torch.uint8) for r in range(2)]
    fresh = torch.full((4,), 9, dtype=torch.uint8)
    for r in range(2):
        shards = ShardSet(World(rank=r, size=2), torch.device("cpu"))
        lo = [0, even[0]][r]
        mine = shards.take(splats)
        assert shards.world_count == n and shards.num_gaussians(len(mine)) == n
        assert torch.equal(torch.as_tensor(mine.means)[:, 0], torch.arange(lo, lo + even[r], dtype=torch.float32))

        part = shards.local_part(_checkpoint(n, shard_sizes=saved, strategy_rngs=rngs), lambda step: None)
        lo = [0, saved[0]][r]
        want = torch.arange(lo, lo + saved[r], dtype=torch.float32)
        assert all(torch.equal(part["params"][k].reshape(saved[r], -1)[:, 0], want) for k in PARAM_KEYS)
        assert torch.equal(part["optimizers"]["means"]["state"][0]["exp_avg"][:, 0], want + 0.5)
        assert part["optimizers"]["means"]["state"][0]["step"].item() == 3.0  # not per-Gaussian
        assert torch.equal(part["strategy_state"]["grad2d"], want.long())
        assert torch.equal(part["strategy_rng"], rngs[r]) and part["strategy_rng"] is not rngs[r]

        part = shards.local_part(_checkpoint(n, shard_sizes=[n], strategy_rngs=rngs[:1]), lambda step: fresh + step)
        lo = [0, even[0]][r]
        assert torch.equal(part["params"]["means"][:, 0], torch.arange(lo, lo + even[r], dtype=torch.float32))
        assert torch.equal(part["strategy_rng"], fresh + 7)
        assert shards.world_count == n


def test_shard_set_of_one_process_keeps_the_whole_set():
    """In a world of one: the whole set, a checkpoint's part is the checkpoint itself, and the
    checkpoint state is a copy on the CPU (the parameters, their Adam moments, the strategy's)."""
    shards = ShardSet(World(), torch.device("cpu"))
    splats = Splats.from_mapping(_numbered(10))
    assert shards.take(splats) is splats and shards.world_count == 10
    assert shards.num_gaussians(12) == 12  # a single process counts its own parameters
    ckpt = _checkpoint(10)
    assert shards.local_part(ckpt, lambda step: None) is ckpt
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in _numbered(10).items()})
    optimizers = {k: torch.optim.Adam([params[k]], lr=0.1) for k in PARAM_KEYS}
    sum(p.sum() for p in params.values()).backward()
    for opt in optimizers.values():
        opt.step()
    state = shards.checkpoint_state(params, optimizers, {"count": torch.ones(10)}, torch.get_rng_state())
    assert set(state) == {"params", "optimizers", "strategy_state"}
    for k in PARAM_KEYS:
        assert torch.equal(state["params"][k], params[k].detach())
        assert state["params"][k].data_ptr() != params[k].data_ptr()
    assert torch.equal(state["optimizers"]["means"]["state"][0]["exp_avg"], torch.full((10, 3), 0.1))
    assert torch.equal(shards.full_splats(params).as_dict()["quats"], params["quats"].detach())
    report = shards.memory_report(params, optimizers)
    assert report["rank"] == 0 and report["num_gaussians"] == 10
    assert report["param_bytes"] == 3 * sum(p.numel() * 4 for p in params.values()) + 6 * 4  # + the steps


@needs_skull
def test_rebalance_moves_rows_with_their_state(tmp_path):
    """Shards 2:1 apart are evened out; the whole run (parameters, Adam moments) gathered
    before and after is the same, in the same order, and training goes on."""
    res = _run_worker("rebalance", tmp_path, str(SKULL))
    before, after = res[0]["before"], res[0]["after"]
    n0, n1 = res[0]["sizes"][0], res[1]["sizes"][0]
    assert n1 < 0.75 * n0
    assert [res[0]["sizes"][1], res[1]["sizes"][1]] == even_sizes(n0 + n1, 2)  # boundaries on multiples of 64
    assert abs(res[0]["sizes"][1] - res[1]["sizes"][1]) < 2 * 64
    assert after["shard_sizes"] != before["shard_sizes"]
    for k, v in before["params"].items():
        assert torch.equal(after["params"][k], v), k
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(after["optimizers"][k]["state"][0][name], before["optimizers"][k]["state"][0][name])


@pytest.mark.slow
@needs_skull
def test_two_ranks_equal_one_process_with_batch_two(tmp_path):
    """30 steps of skull (images_8) with a fixed set of Gaussians: 2 ranks x batch 1 (through
    ``--nproc 2``) end with the parameters of 1 process x batch 2 to 1e-5 relative (in fact
    equal); the sharded run's PLY and checkpoint hold the whole run."""
    common = [
        str(SKULL),
        "--data-factor",
        "8",
        "--steps",
        "30",
        "--strategy",
        "none",
        "--no-eval",
        "--checkpoint-every",
        "0",
    ]
    one = _train(*common, "--batch-size", "2", "--output", str(tmp_path / "one"))
    two = _train(*common, "--nproc", "2", "--output", str(tmp_path / "two"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _params(tmp_path / "one", 30), _params(tmp_path / "two", 30)
    assert len(a["means"]) > 5000
    for k in a:
        rel = ((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-12)).item()
        assert rel <= 1e-5, (k, rel)
    from plyfile import PlyData

    ply = PlyData.read(str(tmp_path / "two" / "point_cloud" / "iteration_30" / "point_cloud.ply"))
    assert ply["vertex"].count == len(a["means"])
    assert torch.allclose(torch.tensor(ply["vertex"]["x"]), b["means"][:, 0])
    assert (tmp_path / "two" / "cameras.json").is_file()


@pytest.mark.slow
@needs_skull
def test_two_ranks_densify_to_the_same_count(tmp_path):
    """With the default strategy refining once (step 15), 2 ranks grow and prune exactly the
    Gaussians one process does: the same count; the shards' sizes add up to it."""
    common = [
        str(SKULL),
        "--data-factor",
        "8",
        "--steps",
        "30",
        "--strategy",
        "default",
        "--no-eval",
        "--densify.refine-start-iter",
        "14",
        "--densify.refine-every",
        "15",
        "--densify.refine-stop-iter",
        "29",
        "--densify.reset-every",
        "1000",
        "--checkpoint-every",
        "0",
    ]
    one = _train(*common, "--batch-size", "2", "--output", str(tmp_path / "one"))
    two = _train(*common, "--nproc", "2", "--output", str(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    ckpt = torch.load(tmp_path / "two" / "checkpoints" / "ckpt_000030.pt", weights_only=True)
    n_one = len(_params(tmp_path / "one", 30)["means"])
    assert len(ckpt["params"]["means"]) == n_one and sum(ckpt["shard_sizes"]) == n_one
    assert n_one > 11_500  # it did grow (skull's 10,953 points)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
@needs_skull
def test_killed_rank_fails_the_run_and_resume_finishes_it(tmp_path):
    """SIGKILL of one rank past the first checkpoint: the command exits 1 with one ``error:``
    line saying how to continue; the same command then finishes the run from its checkpoint, and
    ``--resume`` continues it with more steps on one process."""
    run = tmp_path / "run"
    args = [
        str(SKULL),
        "--data-factor",
        "8",
        "--steps",
        "60",
        "--strategy",
        "mcmc",
        "--no-eval",
        "--checkpoint-every",
        "10",
        "--output",
        str(run),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "splatforge", "train", *args, "--nproc", "2"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "ckpt_000010.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the kill"
        time.sleep(0.2)
    torchrun = _children(proc.pid)
    workers = [c for t in torchrun for c in _children(t)]
    assert len(workers) == 2, (torchrun, workers)
    os.kill(workers[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: training on 2 processes stopped") and "--resume" in last, last
    assert not (run / "point_cloud").exists()
    resumed = _train(*args, "--nproc", "2")  # the same command: the train stage resumes
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["resumed_from"] >= 10
    ckpt = torch.load(run / "checkpoints" / "ckpt_000060.pt", weights_only=True)
    assert ckpt["step"] == 60 and len(ckpt["shard_sizes"]) == 2
    assert (run / "point_cloud" / "iteration_60" / "point_cloud.ply").is_file()
    # the sharded run's checkpoint also resumes on one process (the whole run in one order)
    more = _train(*[a if a != "60" else "70" for a in args], "--resume")
    assert more.returncode == 0, more.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "ckpt_000070.pt", weights_only=True)["step"] == 70
