"""``splatforge splatter``: splatter-server's compute-node pipeline on the skull job root.

Independent references: OpenCV's decoder (what the node's ``extract_mp4.py`` uses) for the
frames, ``ply2splat`` (the node's converter) for ``splat_rot.splat``, the rotation written out by
hand for ``splat_rot.ply``, PyAV for the orbit video, splat-transform for the ``.sog``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scenes import datasets_dir, needs_datasets

from splatforge.cli import main
from splatforge.io import read_ply
from splatforge.pipeline.splatter import write_frames

JOB = datasets_dir() / "skull_splatter_job"
DATASET = "2024-05-14_10-21-33"
VIDEO = JOB / "datasets" / DATASET / "Frames.mp4"
MODEL = JOB / "refined" / "global" / "refined_sfm_combined"
needs_job = needs_datasets(str(VIDEO.relative_to(datasets_dir())))


def job_root(tmp: Path, *, second: str | None = None, rename: dict[str, str] | None = None) -> Path:
    """A job root in ``tmp`` reading the shared video in place (symlinks) with a copy of the
    model; ``second``: odd frames renamed to a second dataset of that name (the same video), so
    each dataset's model names every other frame; ``rename``: image names to change."""
    import pycolmap

    root = tmp / "job"
    (root / "datasets" / DATASET).mkdir(parents=True)
    (root / "datasets" / DATASET / "Frames.mp4").symlink_to(VIDEO.resolve())
    model = root / "refined" / "global" / "refined_sfm_combined"
    model.mkdir(parents=True)
    rec = pycolmap.Reconstruction(str(MODEL))
    if second:
        (root / "datasets" / second).mkdir()
        (root / "datasets" / second / "Frames.mp4").symlink_to(VIDEO.resolve())
    for im in rec.images.values():
        index = int(im.name.rsplit("_", 1)[1][:6])
        if second and index % 2:
            im.name = f"{second}_{index:06d}.jpg"
        if rename and im.name in rename:
            im.name = rename[im.name]
    rec.write(str(model))
    return root


def run_cli(args: list[str], capsys) -> tuple[int, list[dict], str]:
    rc = main(["splatter", *args])
    out, err = capsys.readouterr()
    return rc, [json.loads(line) for line in out.splitlines() if line.strip()], err


def opencv_frame(index: int) -> np.ndarray:
    import cv2

    cap = cv2.VideoCapture(str(VIDEO))
    try:
        for _ in range(index + 1):
            ok, bgr = cap.read()
            assert ok
    finally:
        cap.release()
    return bgr[:, :, ::-1].astype(np.float64)


@needs_job
def test_frames_are_the_named_decoded_frames(tmp_path):
    """Only the frames the model names are written, each the decoded frame of that index
    (OpenCV's decoder, as the node's extract_mp4.py); an existing frame is kept (resume)."""
    from PIL import Image

    wanted = {i: (f"{DATASET}_{i:06d}.jpg", 532, 354) for i in (0, 7, 30, 65)}
    out = tmp_path / "Frames"
    summary = write_frames(VIDEO, wanted, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(v[0] for v in wanted.values())
    assert summary["decoded"] == 66 and summary["written"] == 4
    for i, (name, _, _) in wanted.items():
        ours = np.asarray(Image.open(out / name).convert("RGB"), np.float64)
        assert np.abs(ours - opencv_frame(i)).mean() < 3.0
        assert np.abs(ours - opencv_frame(i + 1 if i < 65 else i - 1)).mean() > 6.0  # not off by one
    again = write_frames(VIDEO, wanted | {3: (f"{DATASET}_000003.jpg", 532, 354)}, out)
    assert again["written"] == 1 and again["kept"] == 4


@needs_job
def test_frames_refuse_a_camera_of_another_size(tmp_path):
    from splatforge.errors import DataFormatError

    with pytest.raises(DataFormatError, match=r"532x354.*camera for .* is 354x532"):
        write_frames(VIDEO, {2: ("x_000002.jpg", 354, 532)}, tmp_path / "Frames")
    assert not (tmp_path / "Frames").exists()


@needs_job
@pytest.mark.slow
def test_splatter_job_end_to_end(tmp_path, capsys):
    """Two datasets, each with every other frame named, short training; every output checked."""
    import av
    from PIL import Image
    from processes import checkpoint_in, kill_when

    from splatforge.geometry.transform import named_transform, rotate_sh, transform_splats

    root = job_root(tmp_path, second="second_take")
    args = [
        "--job_root_path",
        str(root),
        "--steps",
        "200",
        "--data-factor",
        "2",
        "--preview-size",
        "256",
        "--job_id",
        "j-1",
        "--artifact-suffix",
        "2024-01-02",
        "--checkpoint-every",
        "50",
    ]
    # the host's retry: killed with SIGKILL during training, started again with the same command
    kill_when(["splatter", *args], checkpoint_in(root / "refined" / "splatter" / "run" / "checkpoints"))
    frames = {p: p.stat().st_mtime_ns for p in (root / "Frames").iterdir()}
    rc, lines, err = run_cli(args, capsys)
    assert rc == 0, err[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (root / "Frames").iterdir()} == frames  # frames not redone
    assert [ln.get("skipped") for ln in lines if ln["stage"] == "frames" and ln["status"] == "completed"] == [True]
    started = next(ln for ln in lines if ln["stage"] == "train" and ln["status"] == "started")
    assert started["resumed_from"] >= 50 and started["steps"] == 200
    # progress: the stages in order, training with its step and loss, the node's final line
    stages = [ln["stage"] for ln in lines]
    assert [s for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]] == [
        "frames",
        "train",
        "export",
        "previews",
        "complete",
    ]
    assert all({"pct", "stage", "status"} <= ln.keys() for ln in lines)
    assert [ln["pct"] for ln in lines] == sorted(ln["pct"] for ln in lines)
    steps = [ln for ln in lines if ln["stage"] == "train" and ln["status"] == "running"]
    assert steps and all({"step", "loss", "num_gaussians"} <= ln.keys() for ln in steps) and steps[-1]["step"] == 200
    assert lines[-1] == {
        "pct": 100,
        "progress": 100,
        "stage": "complete",
        "status": "succeeded",
        "artifacts": [
            "refined_splat_2024-01-02",
            "refined_splat_sog_2024-01-02",
            "refined_splat_preview_top_2024-01-02",
            "refined_splat_preview_angle_2024-01-02",
            "refined_splat_preview_video_2024-01-02",
        ],
    }
    # frames: exactly the 66 named ones, split between the two datasets
    names = sorted(p.name for p in (root / "Frames").iterdir())
    assert len(names) == 66 and sum(n.startswith("second_take_") for n in names) == 33
    assert f"second_take_{1:06d}.jpg" in names and f"{DATASET}_{1:06d}.jpg" not in names
    out = root / "refined" / "splatter"
    result = json.loads((out / "result.json").read_text())
    assert result["job_id"] == "j-1" and result["status"] == "succeeded" and result["train"]["resumed"] is True
    types = {a["name"]: a["data_type"] for a in result["artifacts"]}
    assert types == {
        "refined_splat_2024-01-02": "splat_data",
        "refined_splat_sog_2024-01-02": "splat_data_sog",
        "refined_splat_preview_top_2024-01-02": "splat_preview_top",
        "refined_splat_preview_angle_2024-01-02": "splat_preview_angle",
        "refined_splat_preview_video_2024-01-02": "splat_preview_video",
    }
    for a in result["artifacts"]:
        assert (root / a["file"]).stat().st_size == a["bytes"] > 0
    assert result["train"]["image_size"] == [266, 177] and result["metrics"]["num_views"] == 9
    assert result["metrics"]["psnr"] > 15.0
    # splat_rot.ply: (x, y, z) -> (y, -x, z) of splat.ply, rotations and SH rotated with it
    ply, rot = read_ply(out / "splat.ply"), read_ply(out / "splat_rot.ply")
    np.testing.assert_allclose(
        rot["means"], np.stack([ply["means"][:, 1], -ply["means"][:, 0], ply["means"][:, 2]], 1), atol=1e-6
    )
    R = np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])
    np.testing.assert_allclose(rot["shN"], rotate_sh(ply["shN"], R), atol=1e-5)
    expected = transform_splats(ply, named_transform("splatter"))
    cov = lambda s: _covariances(s)
    np.testing.assert_allclose(cov(rot), cov(expected), atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(cov(rot), R @ cov(ply) @ R.T, atol=1e-6, rtol=1e-4)
    # splat_rot.splat: byte-identical to ply2splat's conversion of splat_rot.ply
    ply2splat = pytest.importorskip("ply2splat")
    ply2splat.convert(str(out / "splat_rot.ply"), str(tmp_path / "theirs.splat"))
    assert (out / "splat_rot.splat").read_bytes() == (tmp_path / "theirs.splat").read_bytes()
    # previews: square JPEGs, not blank; the orbit decodes
    for name in ("preview_top.jpg", "preview_angle.jpg"):
        img = np.asarray(Image.open(out / name))
        assert img.shape == (256, 256, 3) and img.std() > 5
    with av.open(str(out / "preview.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 72
    # the inputs are untouched: still the symlinked video and the model as written
    assert (root / "datasets" / DATASET / "Frames.mp4").is_symlink()


def _covariances(s) -> np.ndarray:
    import torch

    from splatforge.geometry.quats import quat_scale_to_covar

    q = torch.tensor(np.asarray(s["quats"], np.float64))
    return quat_scale_to_covar(
        q / q.norm(dim=1, keepdim=True), torch.tensor(np.exp(np.asarray(s["scales"], np.float64)))
    ).numpy()


def _bad(tmp_path: Path, case: str) -> Path:
    root = job_root(tmp_path)
    model = root / "refined" / "global" / "refined_sfm_combined"
    if case == "no videos":
        shutil.rmtree(root / "datasets")
        (root / "datasets").mkdir()
    elif case == "missing dataset":
        return job_root(tmp_path / "b", rename={f"{DATASET}_000004.jpg": "elsewhere_000004.jpg"})
    elif case == "index past the end":
        return job_root(tmp_path / "b", rename={f"{DATASET}_000004.jpg": f"{DATASET}_000100.jpg"})
    elif case == "missing images.bin":
        (model / "images.bin").unlink()
    elif case == "truncated images.bin":
        data = (model / "images.bin").read_bytes()
        (model / "images.bin").write_bytes(data[: len(data) // 3])
    elif case == "truncated cameras.bin":
        data = (model / "cameras.bin").read_bytes()
        (model / "cameras.bin").write_bytes(data[:20])
    elif case == "undecodable video":
        video = root / "datasets" / DATASET / "Frames.mp4"
        video.unlink()
        video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    return root


BAD = {
    "no videos": "no <dataset>/Frames.mp4",
    "missing dataset": "no datasets/elsewhere/Frames.mp4",
    "index past the end": "names frame 100 .* has 66 frames",
    "missing images.bin": "images.bin: missing",
    "truncated images.bin": "images.bin|COLMAP model could not be read",
    "truncated cameras.bin": "cameras",
    "undecodable video": "Frames.mp4",
}


@needs_job
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_job_roots_fail_with_one_clear_error_and_write_nothing(tmp_path, capsys, case):
    import re

    root = _bad(tmp_path, case)
    rc, lines, err = run_cli([str(root), "--steps", "10"], capsys)
    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(BAD[case], last), last
    assert lines[-1]["status"] == "failed" and re.search(BAD[case], lines[-1]["error"])
    assert not (root / "Frames").exists() or not any((root / "Frames").iterdir())
    assert not (root / "refined" / "splatter" / "result.json").exists()
    assert not list(root.rglob(".*.tmp*")) and not list(root.glob(".frames.*"))


@needs_job
def test_splatter_takes_run_py_flags_and_a_positional_root(tmp_path):
    """The node's runner calls ``python3 run.py --domain_id D --job_id J --job_root_path R
    --log_level info``: the same flags parse here, as does ``splatforge splatter ROOT``."""
    from splatforge.cli import parse

    a = parse(
        ["splatter", "--domain_id", "d", "--job_id", "j", "--job_root_path", str(tmp_path), "--log_level", "info"]
    )
    b = parse(["splatter", str(tmp_path), "--max-gaussians", "5000", "--data_factor", "4"])
    assert (a.job_root_path, a.domain_id, a.job_id, a.log_level) == (tmp_path, "d", "j", "info")
    assert b.root == tmp_path and b.max_gaussians == 5000 and b.data_factor == 4


def test_splatter_cli_runs_as_a_subprocess_with_its_exit_code(tmp_path):
    """What the node's runner sees: a missing job root exits 1 with one last error line."""
    proc = subprocess.run(
        [sys.executable, "-m", "splatforge.cli", "splatter", "--job_root_path", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "nowhere" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["status"] == "failed"
