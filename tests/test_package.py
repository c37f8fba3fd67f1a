"""Package-level contracts: layering, public names, the CLI."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scenes import REPO

SRC = REPO / "src" / "splatforge"
LOWER_LAYERS = ("geometry", "raster", "data", "io")
UPPER = ("splatforge.train", "splatforge.pipeline", "splatforge.server", "splatforge.cli", "splatforge.demo")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_lower_layers_do_not_import_upper_ones(layer):
    offenders = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in (SRC / layer).rglob("*.py")
        for name in imported_modules(path)
        if name.startswith(UPPER)
    ]
    assert not offenders, offenders


def test_public_api_names():
    import splatforge
    import splatforge.raster as raster

    for name in ("rasterize", "available_backends", "resolve_backend", "BackendUnavailableError"):
        assert hasattr(raster, name), name
    for name in ("SplatforgeError", "ConfigError", "DataFormatError", "BackendUnavailableError", "UnsupportedCameraModel"):
        assert issubclass(getattr(splatforge, name), Exception)
        assert issubclass(getattr(splatforge, name), splatforge.SplatforgeError)


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splatforge.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_demo_trains_and_evaluates(tmp_path):
    """The README's main job, short: build the offline scene, train, render test views, metrics."""
    out = tmp_path / "demo"
    res = cli("demo", "--output", str(out), "--steps", "150")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout[res.stdout.index("{") :])
    assert summary["steps"] == 150 and summary["test_psnr"] > 15.0  # random init renders ~10 dB
    run = out / "run"
    for rel in ("cfg.yml", "cameras.json", "metrics.json", "point_cloud/iteration_150/point_cloud.ply",
                "test/ours_150/renders/00000.png", "test/ours_150/gt/00000.png"):  # fmt: skip
        assert (run / rel).is_file(), rel
    # the same run folder, reopened by `render` and `eval`
    res = cli("render", str(run), "--split", "train", "--depth")
    assert res.returncode == 0, res.stderr
    depth = np.load(run / "train" / "ours_150" / "depth" / "00000.npy")
    assert depth.dtype == np.float32 and depth.shape == (120, 160)
    assert 1.0 < np.median(depth[depth > 0]) < 6.0  # the torus is ~3.5 units from the cameras
    res = cli("eval", str(run))
    assert res.returncode == 0, res.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["psnr"] == pytest.approx(summary["test_psnr"], abs=1e-4)
    assert metrics["train"]["num_views"] == 21 and metrics["test"]["lpips"] is None
    res = cli("eval", str(tmp_path))
    assert res.returncode == 1 and "not a splatforge run folder" in res.stderr


def test_cli_bad_input_names_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    for data in (tmp_path / "missing", tmp_path / "empty"):
        res = cli("train", str(data), "--output", str(tmp_path / "out"), "--steps", "1")
        assert res.returncode == 1, res.stderr
        assert f"error: {data}" in res.stderr and res.stdout == ""
    assert not (tmp_path / "out").exists()


def test_cli_backends():
    res = cli("backends")
    assert res.returncode == 0 and "cpu, reference" in res.stdout
