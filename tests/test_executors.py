"""The executor interface (:mod:`splatforge.pipeline.executors`) with its diagnostic ``probe``
job: the local pool of subprocesses and a small local Ray run the same specs, report progress
lines, isolate a failing job, cancel; specs round-trip through JSON."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from splatforge.errors import ConfigError
from splatforge.pipeline.executors import (
    LocalExecutor,
    RayExecutor,
    Slot,
    cpu_slots,
    execute,
    run_spec,
    splatter_config,
    splatter_spec,
)


def wait_all(executor, n: int, timeout: float = 120) -> dict[str, dict]:
    """Poll ``executor`` until ``n`` jobs ended; ``{name: result}``."""
    ended: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(ended) < n:
        assert time.monotonic() < deadline, f"only {sorted(ended)} ended in {timeout:.0f} s"
        for handle, result in executor.poll():
            ended[handle.name] = result
        time.sleep(0.1)
    return ended


def test_run_spec_in_process_and_its_errors(tmp_path):
    lines = []
    assert run_spec({"kind": "probe", "steps": 2}, lines.append)["status"] == "done"
    assert [line["step"] for line in lines] == [1, 2]
    with pytest.raises(ConfigError, match="unknown kind"):
        run_spec({"kind": "bake"})
    assert execute({"kind": "probe", "fail": "no luck"}) == {"status": "failed", "error": "no luck"}
    failed = execute(
        {
            "kind": "dataset_job",
            "scene": "x",
            "scene_root": str(tmp_path),
            "output_dir": str(tmp_path),
            "ratio": 0.5,
            "stages": ["bake"],
        }
    )
    assert failed["status"] == "failed" and "unknown stage" in failed["error"] and failed["job"] == "x_0.5"


def test_splatter_spec_round_trips_through_json(tmp_path):
    from splatforge.pipeline.splatter import SplatterConfig

    cfg = SplatterConfig(job_root_path=tmp_path, job_id="j1", steps=30, captures=[tmp_path / "a.mp4"], exposure=True)
    cfg.densify.absgrad = True
    spec = json.loads(json.dumps(splatter_spec(cfg)))
    assert spec["kind"] == "splatter" and spec["job_root_path"] == str(tmp_path)
    assert splatter_config(spec) == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        splatter_config({**spec, "stepz": 3})


def test_local_pool_runs_specs_isolates_a_failure_and_cancels(tmp_path):
    """Three probes on two CPU slots: progress lines reach the callback and the logs, each job
    sees its share of the cores, the failing one fails alone with its error line; a long probe
    is cancelled (SIGTERM) and reported failed."""
    slots = cpu_slots(2)
    pool = LocalExecutor(slots, tmp_path / "logs")
    seen: dict[str, list[int]] = {}
    specs = {
        "a": {"kind": "probe", "steps": 3},
        "b": {"kind": "probe", "steps": 2, "fail": "b is broken"},
        "c": {"kind": "probe", "steps": 1},
    }
    for name in ("a", "b"):
        pool.submit(
            specs[name], name=name, on_progress=lambda line, n=name: seen.setdefault(n, []).append(line["step"])
        )
    assert not pool.has_room()
    with pytest.raises(ConfigError, match="no free slot"):
        pool.submit(specs["c"], name="c")
    results = wait_all(pool, 2)
    pool.submit(specs["c"], name="c", banner="--- first")
    results |= wait_all(pool, 1)
    assert results["a"]["status"] == "done" and results["c"]["status"] == "done"
    assert results["a"]["threads"] == str(slots[0].threads) and results["a"]["pid"] != results["c"]["pid"]
    assert results["b"] == {"status": "failed", "error": "b is broken"}
    assert seen == {"a": [1, 2, 3], "b": [1, 2]}
    log_a = (tmp_path / "logs" / "a.log").read_text()
    assert [json.loads(x)["step"] for x in log_a.splitlines() if x.startswith("{")] == [1, 2, 3]
    assert "probe: 3 steps done" in log_a
    assert (tmp_path / "logs" / "c.log").read_text().startswith("--- first on cpu\n")
    # cancel
    handle = pool.submit({"kind": "probe", "steps": 600, "sleep_s": 0.1}, name="long")
    time.sleep(1.0)
    handle.cancel(grace_s=5)
    result = wait_all(pool, 1, timeout=30)["long"]
    assert result["status"] == "failed" and "signal" in result["error"]
    pool.close()


def test_local_pool_runs_dataset_jobs_as_before(tmp_path):
    """``run`` (what generate and blocks call) with a job that cannot start, twice: reported
    failed in the dataset job's shape, with its log; the two never run at once."""
    from splatforge.pipeline.job import JobSpec

    job = JobSpec(
        scene="x",
        scene_root=str(tmp_path / "nowhere"),
        output_dir=str(tmp_path / "o"),
        ratio=0.5,
        stages=["postprocess"],
    )
    events, lines = [], []
    pool = LocalExecutor([Slot("cpu"), Slot("cpu")], tmp_path / "logs")
    results = pool.run(  # one name: one at a time, one log
        [job, job], lambda *e: events.append(e[0]), lambda j, line: lines.append((j.name, line))
    )
    assert events == ["start", "end"] * 2 and [r["job"] for r in results] == ["x_0.5"] * 2
    # the stages' events reach the parent as progress lines, per job
    assert ("x_0.5", {"stage": "postprocess", "status": "started"}) in lines
    assert any(n == "x_0.5" and line["status"] == "failed" and "nowhere" in line["error"] for n, line in lines)
    assert results[0]["status"] == "failed" and results[0]["stages"] == {"postprocess": "failed"}
    assert '"status": "failed"' in (tmp_path / "logs" / "x_0.5.log").read_text()


def test_ray_executor_needs_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install \"splatforge\[ray\]\""):
        RayExecutor()


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    yield ray
    if started:
        ray.shutdown()


def test_ray_executor_runs_specs_with_progress_logs_and_cancel(ray_local, tmp_path):
    ex = RayExecutor(logs=tmp_path / "logs", num_cpus=1.0, capacity=2)
    seen = []
    ex.submit({"kind": "probe", "steps": 3}, name="a", on_progress=seen.append, banner="--- attempt 1")
    ex.submit({"kind": "probe", "fail": "b is broken"}, name="b")
    results = wait_all(ex, 2)
    assert results["a"]["status"] == "done" and results["a"]["threads"] == "1"
    assert results["b"] == {"status": "failed", "error": "b is broken"}
    assert [line["step"] for line in seen] == [1, 2, 3]
    log_a = (tmp_path / "logs" / "a.log").read_text()
    assert log_a.startswith("--- attempt 1 on ray\n") and "probe: 3 steps done" in log_a
    assert [json.loads(x)["step"] for x in log_a.splitlines() if x.startswith("{")] == [1, 2, 3]
    handle = ex.submit({"kind": "probe", "steps": 600, "sleep_s": 0.1}, name="long")
    time.sleep(2.0)
    handle.cancel(grace_s=5)
    assert wait_all(ex, 1, timeout=60)["long"] == {"status": "failed", "error": "cancelled"}
    ex.close()
    assert Path(tmp_path / "logs").is_dir()


def test_generate_board_shows_what_each_running_job_does():
    import io
    import types

    from rich.console import Console

    from splatforge.pipeline.board import JobBoard

    def shown(board) -> str:
        out = Console(record=True, width=100, file=io.StringIO())
        out.print(board.renderable())
        return out.export_text()

    board = JobBoard(2, console=Console(file=io.StringIO()))
    job = types.SimpleNamespace(name="skull_0.5")
    board("start", job, None, "cpu0")
    board.progress(job, {"stage": "train", "status": "running", "step": 1200, "steps": 3000, "psnr": 21.5})
    assert "skull_0.5" in shown(board) and "train 1,200/3,000  PSNR 21.50" in shown(board)
    board.progress(job, {"stage": "render", "status": "started"})
    assert "render started" in shown(board)
    board("end", job, {"status": "done"}, "cpu0")
    assert "skull_0.5" not in shown(board) and "1/2 finished" in shown(board)
