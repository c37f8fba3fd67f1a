"""Dataset products and bulk generation: visibility masks, metadata conventions, the manifest,
generate over a temp dataset root built from ../shared/datasets (skull + fox), resume after
SIGKILL, failure isolation, the Ray executor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scenes import datasets_dir, intrinsics, look_at, needs_datasets

from splatforge.cli import main
from splatforge.pipeline.generate import GenerateConfig, generate
from splatforge.pipeline.job import JobSpec, run_job
from splatforge.products.metadata import check_partition, fix_partition, read_metadata
from splatforge.products.visibility import gaussian_scores, score_maps, second_pick
from splatforge.raster import transmittance_stats

DATA = datasets_dir()
needs_data = needs_datasets("skull", "fox")


# --- accumulators and visibility -------------------------------------------------------------


def test_transmittance_stats_cpu_matches_reference_and_hand_case():
    from scenes import random_scene

    s = random_scene(5, n=300, n_cameras=2, width=64, height=48)
    args = (
        s.means.float(),
        s.quats.float(),
        s.scales.float(),
        s.opacities.float(),
        s.viewmats.float(),
        s.Ks.float(),
        64,
        48,
    )
    a, ca = transmittance_stats(*args, backend="cpu")
    b, cb = transmittance_stats(*args, backend="reference")
    assert torch.equal(ca, cb) and ca.sum() > 1000
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
    # hand case: two identical opaque-ish Gaussians one behind the other, seen head-on: the front
    # one sees T = 1 everywhere, the back one T = 1 - alpha_front(pixel) < 1.
    means = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 4.0]])
    quats = torch.tensor([[1.0, 0, 0, 0]] * 2)
    scales = torch.tensor([[0.3, 0.3, 0.3]] * 2)
    opac = torch.tensor([0.8, 0.8])
    view = torch.eye(4)[None]
    K = intrinsics(32, 32, 40.0)[None].float()
    sum_T, count = transmittance_stats(means, quats, scales, opac, view, K, 32, 32, backend="cpu")
    assert count[0, 0] > 0 and torch.isclose(sum_T[0, 0] / count[0, 0], torch.tensor(1.0, dtype=torch.float64))
    assert 0.2 < float(sum_T[0, 1] / count[0, 1]) < 0.9


def test_visibility_masks_a_gaussian_seen_by_one_training_view():
    """Blob A is seen by one training camera only, blob B by three: a test view that sees both
    is masked (white) on A and not on B."""
    rng = np.random.default_rng(0)

    def blob(center, n=150):
        return torch.tensor(rng.normal(size=(n, 3)) * 0.08 + center, dtype=torch.float32)

    means = torch.cat([blob([-1.0, 0, 0]), blob([1.0, 0, 0])])
    n = means.shape[0]
    g = {
        "means": means,
        "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
        "scales": torch.full((n, 3), 0.06),
        "opacities": torch.full((n,), 0.9),
    }
    K = intrinsics(64, 64, 60.0).float()
    # train views: one looking at A (B outside its frame), three looking at B only.
    train = torch.stack(
        [
            look_at((-1.0, 0, -2.5), (-1.0, 0, 0)),
            look_at((1.0, 0, -2.5), (1.0, 0, 0)),
            look_at((1.3, 0.3, -2.5), (1.0, 0, 0)),
            look_at((0.7, -0.3, -2.5), (1.0, 0, 0)),
        ]
    ).float()
    scores = gaussian_scores(g, train, K.expand(4, 3, 3), 64, 64, backend="cpu")
    vis = second_pick(scores)
    assert vis[:150].max() < 0.5 and (vis[150:] > 0.5).sum() > 10  # inner Gaussians of a blob are hidden: low score
    test_view = look_at((0.0, 0, -5.0), (0.0, 0, 0))[None].float()
    maps = score_maps(g, vis, test_view, K[None], 64, 64, backend="cpu")[0]
    cam = means @ test_view[0, :3, :3].T + test_view[0, :3, 3]
    uv = (cam[:, :2] / cam[:, 2:] * 60 + 32).long()
    a_px, b_px = uv[:150].float().mean(0).long(), uv[150:].float().mean(0).long()
    assert maps[a_px[1], a_px[0]] < 0.5, "blob A (one training view) must be masked"
    assert maps[b_px[1], b_px[0]] > 0.5, "blob B (three training views) must not be masked"


def test_second_pick_rules():
    s = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(second_pick(s), torch.tensor([0.7, 0.1], dtype=torch.float64))
    torch.testing.assert_close(second_pick(s[:1]), torch.zeros(2, dtype=torch.float64))


# --- generate over skull + fox ---------------------------------------------------------------


def _root(tmp: Path, broken: bool = False) -> Path:
    """A dataset root of symlinks (nothing copied), optionally with a skull whose images.bin is
    truncated (a copy of the small sparse files only)."""
    root = tmp / "root"
    root.mkdir()
    (root / "skull").symlink_to(DATA / "skull")
    (root / "fox").symlink_to(DATA / "fox")
    if broken:
        bad = root / "broken_skull"
        (bad / "sparse" / "0").mkdir(parents=True)
        (bad / "images_8").symlink_to(DATA / "skull" / "images_8")
        for f in (DATA / "skull" / "sparse" / "0").iterdir():
            data = f.read_bytes()
            (bad / "sparse" / "0" / f.name).write_bytes(data[: len(data) // 3] if f.name == "images.bin" else data)
    return root


FAST = {"steps": 40, "data_factor": 8, "cap_max": 20_000, "train_extra": {"init_random_count": 20_000}}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    root = _root(tmp, broken=True)
    out = tmp / "out"
    cfg = GenerateConfig(
        dataset_root=root,
        output_dir=out,
        split_ratio=[0.3, 0.7],
        stages=["train", "render", "visibility", "depth"],
        max_workers=2,
        **FAST,
    )
    summary = generate(cfg)
    return root, out, summary


@needs_data
def test_dry_run_lists_jobs_and_writes_nothing(tmp_path, capsys):
    root = _root(tmp_path)
    out = tmp_path / "out"
    assert (
        main(
            [
                "generate",
                "--dataset-root",
                str(root),
                "--output-dir",
                str(out),
                "--split-ratio",
                "0.1",
                "0.3",
                "--data-factor",
                "8",
                "--dry-run",
            ]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert sorted(j["job"] for j in plan["jobs"]) == ["fox_0.1", "fox_0.3", "skull_0.1", "skull_0.3"]
    assert not out.exists()


@needs_data
def test_generate_outputs_layout_and_failure_isolation(generated):
    _root, out, summary = generated
    by_job = {r["job"]: r for r in summary["results"]}
    assert {"skull_0.3", "skull_0.7", "fox_0.3", "fox_0.7"} <= set(by_job)
    for job in ("skull_0.3", "skull_0.7", "fox_0.3", "fox_0.7"):
        assert by_job[job]["status"] == "done", by_job[job]
        d = out / job
        partition, ext, K = read_metadata(d)
        n = ext.shape[0]
        assert check_partition(partition, n) is None
        ratio = float(job.split("_")[1])
        assert len(partition["train"]) == round(ratio * n)
        assert ext.shape == (n, 4, 4) and K.shape == (n, 3, 3)
        assert (d / "point_cloud" / "iteration_40" / "point_cloud.ply").is_file() and (d / "cameras.json").is_file()
        for split in ("train", "test"):
            m = len(partition[split])
            folder = d / split / "ours_40"
            for sub, pattern in (
                ("renders", "*.png"),
                ("gt", "*.png"),
                ("depth", "*.npy"),
                ("depth", "*.png"),
                ("visibility_mask_global_2ndpick_th0.5", "frame_*.png"),
            ):
                assert len(list((folder / sub).glob(pattern))) == m, (job, split, sub)
            depth = np.load(folder / "depth" / "00000.npy")
            frames = json.loads((d / "frames.json").read_text())
            first = partition[split][0]
            assert depth.dtype == np.float32
            assert depth.shape == (frames[first]["height"], frames[first]["width"]), (job, split, depth.shape)
            assert (depth > 0).mean() > 0.05 and np.isfinite(depth).all()
    # the broken scene fails alone, with its reason in the summary
    broken = [r for r in summary["results"] if r["scene"] == "broken_skull"] + [
        u for u in summary["unready"] if u["scene"] == "broken_skull"
    ]
    assert broken, summary
    reason = broken[0].get("error") or broken[0].get("reason")
    assert "images.bin" in reason or "broken_skull" in reason
    md = (out / "summary.md").read_text()
    assert "broken_skull" in md and "skull | 0.3 | done" in md
    assert (out / "logs" / "skull_0.3.log").is_file()


@needs_data
def test_metadata_projects_sparse_points_onto_colmap_observations(generated):
    """cam_intrinsics @ inv(cam_extrinsics) maps COLMAP's 3D points onto their 2D observations,
    scaled to the rendered resolution (images_8)."""
    import pycolmap

    _, out, _ = generated
    _, ext, K = read_metadata(out / "skull_0.3")
    frames = json.loads((out / "skull_0.3" / "frames.json").read_text())
    rec = pycolmap.Reconstruction(str(DATA / "skull" / "sparse" / "0"))
    by_name = {im.name: im for im in rec.images.values()}
    full_w = next(iter(rec.cameras.values())).width
    errors = []
    for i, f in enumerate(frames[:10]):
        im = by_name[f["name"]]
        scale = f["width"] / full_w
        w2c = np.linalg.inv(ext[i])
        for p in im.points2D:
            if not p.has_point3D():
                continue
            X = rec.points3D[p.point3D_id].xyz
            c = w2c[:3, :3] @ X + w2c[:3, 3]
            uv = (K[i] @ c)[:2] / c[2]
            errors.append(np.linalg.norm(uv - (p.xy * scale)))
    assert len(errors) > 500 and np.median(errors) < 0.5


@needs_data
def test_partition_fix_rewrites_or_removes(generated, tmp_path):
    import shutil

    _, out, _ = generated
    d = tmp_path / "copy"
    shutil.copytree(out / "skull_0.3", d, ignore=shutil.ignore_patterns("train", "test", "checkpoints", "point_cloud"))
    expected = json.loads((d / "partition.json").read_text())
    assert fix_partition(d, expected) == "ok"
    (d / "partition.json").write_text(json.dumps({"train": [0, 0, 1], "test": []}))
    verdict = fix_partition(d, expected)
    assert verdict.startswith("rewritten") and json.loads((d / "partition.json").read_text()) == expected
    np.save(d / "cam_extrinsics.npy", np.zeros((3, 4, 4)))
    assert fix_partition(d, expected).startswith("removed") and not d.exists()


@needs_data
def test_sigkill_and_restart_redoes_only_unfinished_stages(tmp_path):
    """Killed with SIGKILL during training (generate and its job subprocess), the same command
    finishes the job: postprocess is not redone, training continues from its checkpoint."""
    from processes import checkpoint_in, kill_when

    root = tmp_path / "root"
    root.mkdir()
    (root / "skull").symlink_to(DATA / "skull")
    out = tmp_path / "out"
    args = [
        "generate",
        "--dataset-root",
        str(root),
        "--output-dir",
        str(out),
        "--split-ratio",
        "0.5",
        "--steps",
        "300",
        "--data-factor",
        "8",
        "--cap-max",
        "20000",
    ]
    cmd = [sys.executable, "-m", "splatforge.cli", *args]
    job = out / "skull_0.5"
    kill_when(args, checkpoint_in(job / "checkpoints"))  # the job checkpoints every 100 steps
    manifest = job / "manifest.json"
    first = json.loads(manifest.read_text())["stages"]
    assert first["postprocess"]["status"] == "done" and first["train"]["status"] == "running"
    # a kill can interrupt a write, but only ever a hidden temp file, never a file under its final name
    temps = [p for p in job.rglob("*") if ".tmp" in p.name]
    assert all(p.name.startswith(".") for p in temps), temps
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False).returncode == 0
    assert not [p for p in job.rglob("*") if ".tmp" in p.name]  # the restart cleared them
    second = json.loads(manifest.read_text())["stages"]
    assert second["postprocess"]["finished_at"] == 1, "postprocess was redone"
    assert (
        second["train"]["status"] == "done" and second["train"]["finished_at"] == 2 and second["train"]["step"] == 300
    )
    assert "resumed training at step" in (out / "logs" / "skull_0.5.log").read_text()
    for s in ("render", "visibility", "depth"):
        assert second[s]["status"] == "done" and second[s]["finished_at"] == 2
    # a changed option reruns exactly the stages it affects
    assert (
        subprocess.run(
            cmd + ["--stages", "visibility"], capture_output=True, text=True, timeout=600, check=False
        ).returncode
        == 0
    )
    third = json.loads(manifest.read_text())["stages"]
    assert third["visibility"]["finished_at"] == second["visibility"]["finished_at"]  # same hash: skipped


@needs_data
def test_ray_executor_gives_the_same_outputs(tmp_path):
    pytest.importorskip("ray")
    root = tmp_path / "root"
    root.mkdir()
    (root / "skull").symlink_to(DATA / "skull")
    outs = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        summary = generate(
            GenerateConfig(
                dataset_root=root,
                output_dir=out,
                split_ratio=[0.5],
                stages=["train", "render"],
                executor=executor,
                **FAST,
            )
        )
        assert summary["done"] == 1, summary
        outs[executor] = out / "skull_0.5"
    a = (outs["local"] / "point_cloud" / "iteration_40" / "point_cloud.ply").read_bytes()
    b = (outs["ray"] / "point_cloud" / "iteration_40" / "point_cloud.ply").read_bytes()
    assert a == b
    ma, mb = (json.loads((outs[k] / "metrics.json").read_text())["test"]["psnr"] for k in ("local", "ray"))
    assert ma == mb


def test_job_spec_rejects_unknown_stage(tmp_path):
    from splatforge.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown stage"):
        run_job(JobSpec(scene="x", scene_root=str(tmp_path), output_dir=str(tmp_path), ratio=0.5, stages=["bake"]))


@needs_data
def test_presets_find_dl3dv_and_mipnerf360_layouts(tmp_path):
    from splatforge.pipeline.generate import discover_scenes, plan_jobs

    dl3dv = tmp_path / "dl3dv"
    (dl3dv / "1K").mkdir(parents=True)
    (dl3dv / "1K" / "fox").symlink_to(DATA / "fox")
    (dl3dv / "1K" / "not_a_scene").mkdir()
    cfg = GenerateConfig(dataset_root=dl3dv, output_dir=tmp_path / "o1", dataset="dl3dv", split_ratio=[0.1])
    scenes = discover_scenes(cfg)
    assert [(s.name, s.subset, s.data_factor, s.ready) for s in scenes] == [
        ("fox", "1K", 4, True),
        ("not_a_scene", "1K", 4, False),
    ]
    assert "transforms.json" in scenes[1].reason
    jobs = plan_jobs(cfg, scenes)
    assert [str(j.out) for j in jobs] == [str(tmp_path / "o1" / "1K" / "fox_0.1")]
    m360 = tmp_path / "m360"
    m360.mkdir()
    (m360 / "skull").symlink_to(DATA / "skull")
    cfg = GenerateConfig(
        dataset_root=m360, output_dir=tmp_path / "o2", dataset="mipnerf360", split_ratio=[0.1], cut_start=0, cut_end=1
    )
    assert [(s.name, s.data_factor, s.ready) for s in discover_scenes(cfg)] == [("skull", 4, True)]


def test_remove_stale_temps_only_touches_atomic_temp_files(tmp_path):
    from splatforge._fs import atomic_path, remove_stale_temps

    (tmp_path / "a" / "renders").mkdir(parents=True)
    (tmp_path / "a" / "renders" / ".00001.k3j2.tmp.png").write_bytes(b"half")  # as atomic_path names them
    (tmp_path / "a" / "renders" / "00000.png").write_bytes(b"done")
    (tmp_path / "a" / "notes.tmp.txt").write_text("a user's file, not hidden")
    with atomic_path(tmp_path / "a" / "x.json") as tmp:
        tmp.write_text("{}")
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["00000.png", "notes.tmp.txt", "x.json"]


# --- GPU slots --------------------------------------------------------------------------------


def fake_nvml(free_gib: list[float], uuids: list[str]):
    """A stand-in for ``pynvml`` reporting GPUs with ``free_gib`` free and ``uuids``, counting
    its init calls (the real one needs a driver)."""
    import types

    class NVMLError(Exception):
        pass

    calls = {"init": 0}

    def init():
        calls["init"] += 1

    mod = types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=init,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: len(free_gib),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUUID=lambda h: uuids[h].encode() if h % 2 else uuids[h],  # old pynvml gives bytes
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(free=free_gib[h] * 2**30),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=0),
    )
    return mod, calls


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        (None, ["gpu2", "gpu0", "gpu1"]),  # unset: every GPU, most free memory first
        ("2,0", ["gpu2", "gpu0"]),
        ("1,-1,2", ["gpu1"]),  # CUDA stops reading at the first negative entry
        ("", []),
        ("-1", []),
        ("GPU-bbbb", ["gpu1"]),  # a UUID prefix
        ("GPU-cccc-0003, 0", ["gpu2", "gpu0"]),
        ("MIG-aaaa", []),  # MIG devices are not used: the CPU
        ("7", []),  # no such GPU
    ],
)
def test_gpu_slots_follow_cuda_visible_devices(monkeypatch, visible, expected):
    from splatforge.pipeline.generate import Slot, gpu_slots, slot_env

    nvml, calls = fake_nvml([20.0, 10.0, 30.0], ["GPU-aaaa-0001", "GPU-bbbb-0002", "GPU-cccc-0003"])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    slots = gpu_slots([], "1")
    assert [s.label for s in slots] == expected
    assert calls["init"] == (0 if visible in ("", "-1") else 1)  # hidden GPUs: NVML not even asked
    if visible is None:
        assert [s.label for s in gpu_slots([2], "2")] == ["gpu0", "gpu0", "gpu1", "gpu1"]  # excluded, 2 per GPU
        assert [s.label for s in gpu_slots([], "auto")] == ["gpu2"] * 4 + ["gpu0"] * 3 + ["gpu1"]  # 6 GiB a job, 1-4
    env = slot_env(Slot("gpu2", gpu=2), {"CUDA_VISIBLE_DEVICES": "0,2"})
    assert (env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"]) == ("2", "PCI_BUS_ID")
