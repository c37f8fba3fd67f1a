"""Package-level contracts: layering, public names, the CLI."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scenes import REPO

SRC = REPO / "src" / "splatforge"
LOWER_LAYERS = ("geometry", "raster")
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


def test_cli_demo_procedural_scene(tmp_path):
    """With no dataset in reach (cwd without ../shared), the demo builds its own scene."""
    out = tmp_path / "demo"
    res = cli("demo", "--output", str(out), "--steps", "3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout[res.stdout.index("{") :])
    assert summary["scene"] == "torus" and summary["psnr_end"] > summary["psnr_start"]
    assert sorted(p.name for p in out.iterdir()) == ["torus_fit.png", "torus_view0.png", "torus_view1.png", "torus_view2.png"]


def test_cli_demo_bad_data_names_the_file(tmp_path):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not a zip file")
    for path in (bad, tmp_path / "missing.npz"):
        res = cli("demo", "--data", str(path), "--output", str(tmp_path / "out"), "--steps", "1")
        assert res.returncode == 1
        assert f"error: {path}" in res.stderr and res.stdout == ""
    assert not (tmp_path / "out").exists()


def test_cli_backends():
    res = cli("backends")
    assert res.returncode == 0 and "cpu, reference" in res.stdout
