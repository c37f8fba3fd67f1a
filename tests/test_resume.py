"""Every job resumes: ``splatforge train`` killed with SIGKILL during training and started again
with the same command continues from its checkpoint, skips what is finished, and ends with the
run complete (``run``, ``splatter`` and ``generate`` have theirs in their own test files)."""

from __future__ import annotations

import json

import pytest
from processes import checkpoint_in, kill_when, run_cli

from splatforge.demo import build_demo_scene
from splatforge.pipeline.engine import Stage, StageRunner
from splatforge.pipeline.events import StageDone, StageFailed, StageStarted


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return build_demo_scene(tmp_path_factory.mktemp("demo") / "scene", n_views=12)


def test_train_killed_mid_training_resumes_from_its_checkpoint(scene, tmp_path):
    run = tmp_path / "runs" / "scene"
    args = [
        "train",
        str(scene),
        "--steps",
        "400",
        "--checkpoint-every",
        "50",
        "--sh-degree",
        "1",
        "--init-random-count",
        "2000",
        "--init-extent",
        "0.5",
    ]
    kill_when(args, checkpoint_in(run / "checkpoints"), cwd=tmp_path)  # default run folder: runs/scene
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    assert manifest["train"]["status"] == "running" and not (run / "metrics.json").exists()
    first_ckpt = min(int(p.stem.split("_")[1]) for p in (run / "checkpoints").iterdir())

    res = run_cli(args, cwd=tmp_path)  # the same command: the same folder, not runs/scene-2
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["run"] == "runs/scene" and summary["step"] == 400
    assert summary["resumed_from"] is not None and summary["resumed_from"] >= first_ckpt
    assert f"resuming training from step {summary['resumed_from']:,}" in res.stderr
    assert (run / "metrics.json").is_file() and (run / "point_cloud" / "iteration_400" / "point_cloud.ply").is_file()
    assert not (tmp_path / "runs" / "scene-2").exists()

    # once more: nothing is redone, nothing is touched
    mtimes = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "manifest.json"}
    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["skipped"] == ["train", "eval"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    # another option: another run folder (the finished one is left alone)
    other = run_cli([*args[:2], "--steps", "20", *args[4:]], cwd=tmp_path)
    assert other.returncode == 0, other.stderr[-3000:]
    assert json.loads(other.stdout)["run"] == "runs/scene-2"


def test_engine_skips_fresh_stages_reruns_changed_ones_and_records_failures(tmp_path):
    calls, events = [], []

    def make(name: str, fail: bool = False):
        def fn(ctx):
            calls.append((name, ctx.resumable))
            if fail:
                raise ValueError(f"{name} broke\nsecond line")
            path = ctx.folder / f"{name}.txt"
            path.write_text(name)
            return [path], {"made": name}

        return fn

    def run(digests: dict, fail: str = ""):
        runner = StageRunner(tmp_path / "job", events.append)
        return {n: runner.run(Stage(n, make(n, n == fail), d)).status for n, d in digests.items()}

    assert run({"a": "1", "b": "1"}) == {"a": "done", "b": "done"}
    assert run({"a": "1", "b": "1"}) == {"a": "skipped", "b": "skipped"}
    assert run({"a": "1", "b": "2"}) == {"a": "skipped", "b": "done"}  # a changed digest reruns that stage
    (tmp_path / "job" / "a.txt").write_text("changed size")  # an output that changed is not fresh
    with pytest.raises(ValueError, match="a broke"):
        run({"a": "1"}, fail="a")
    record = json.loads((tmp_path / "job" / "manifest.json").read_text())["stages"]["a"]
    assert record["status"] == "failed" and record["error"] == "a broke"
    assert isinstance(events[-1], StageFailed) and events[-1].error == "a broke"
    run({"a": "1"})
    assert calls[-1] == ("a", True)  # the last attempt had the same digest: resumable
    assert calls[:2] == [("a", False), ("b", False)] and len(calls) == 5
    kinds = [type(e) for e in events]
    assert kinds[:4] == [StageStarted, StageDone, StageStarted, StageDone]
    assert [e.skipped for e in events if isinstance(e, StageDone)][2:4] == [True, True]


def test_a_first_attempt_that_fails_leaves_no_folder(tmp_path):
    def broken(ctx):
        raise OSError("disk full")

    with pytest.raises(OSError):
        StageRunner(tmp_path / "new").run(Stage("x", broken, "1"))
    assert not (tmp_path / "new").exists()


def test_the_trainer_leaves_the_callers_config_alone(scene, tmp_path):
    import dataclasses

    from splatforge.train import TrainConfig, Trainer

    cfg = TrainConfig(data=scene, output=tmp_path / "run", steps=5, init_random_count=500, init_extent=0.5)
    before = dataclasses.asdict(cfg)
    trainer = Trainer(cfg)
    assert dataclasses.asdict(cfg) == before  # resolved on the trainer's own copy
    assert trainer.cfg.device == "cpu" and trainer.cfg.world_unit is not None and cfg.world_unit is None


def test_an_output_that_is_the_scene_is_refused_before_anything_is_written(scene):
    before = sorted(p.relative_to(scene) for p in scene.rglob("*"))
    res = run_cli(["train", str(scene), "--output", str(scene), "--steps", "5"])
    assert res.returncode == 1 and "must not be the input" in res.stderr.strip().splitlines()[-1]
    assert sorted(p.relative_to(scene) for p in scene.rglob("*")) == before  # no manifest.json, nothing
