"""The browser viewer: the page served by viser opens in headless Chromium and shows splats."""

from __future__ import annotations

import shutil
import socket
import subprocess

import numpy as np
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _screenshot(url: str, path) -> np.ndarray:
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    cmd = [
        chromium,
        "--headless=new",
        "--no-sandbox",
        "--enable-unsafe-swiftshader",
        "--use-angle=swiftshader",
        "--window-size=640,480",
        "--virtual-time-budget=20000",
        f"--screenshot={path}",
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0 and path.exists(), proc.stderr[-2000:]
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _red_fraction(img: np.ndarray) -> float:
    return float(((img[..., 0] > 150) & (img[..., 1] < 90) & (img[..., 2] < 90)).mean())


@pytest.mark.skipif(
    shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
    reason="headless Chromium not installed (Debian package 'chromium'; .ci/run installs it)",
)
def test_viewer_page_shows_splats_in_headless_chromium(tmp_path):
    pytest.importorskip("viser")
    from splatforge.viewer import SplatViewer

    rng = np.random.default_rng(0)
    n = 4000
    red = {
        "means": (rng.normal(size=(n, 3)) * 0.5 + [4.0, -2.0, 7.0]).astype(np.float32),
        "quats": np.tile([1.0, 0, 0, 0], (n, 1)).astype(np.float32),
        "scales": np.full((n, 3), np.log(0.05), np.float32),
        "opacities": np.full(n, 4.0, np.float32),
        "sh0": np.tile([[[1.7, -1.7, -1.7]]], (n, 1, 1)).astype(np.float32),
        "shN": np.zeros((n, 0, 3), np.float32),
    }
    c2w = np.tile(np.eye(4), (3, 1, 1))
    c2w[:, :3, 3] = [[4, -2, 3], [5, -2, 3], [3, -2, 3]]
    viewer = SplatViewer(port=_free_port(), camtoworlds=c2w)
    try:
        empty = _screenshot(f"http://127.0.0.1:{viewer.port}", tmp_path / "empty.png")
        viewer.set_splats(red)  # off the origin: the viewer must frame the scene itself
        for attempt in range(3):  # the page renders asynchronously; a loaded machine may need another try
            shown = _screenshot(f"http://127.0.0.1:{viewer.port}", tmp_path / f"splats{attempt}.png")
            if _red_fraction(shown) > 0.01:
                break
    finally:
        viewer.close()
    assert _red_fraction(empty) < 0.001
    assert _red_fraction(shown) > 0.01, "no red splats visible in the viewer page"
