"""Export formats (.ply, .splat, .spz v2/3/4), transforms with SH rotation, previews.

Independent references: plyfile (PLY), gaussforge (bundles Niantic's reference SPZ code and a
.splat reader), @playcanvas/splat-transform (npm, when installed: ``SPLAT_TRANSFORM`` or
``.ci/node_modules/.bin/splat-transform``), SH evaluated in rotated directions, renders."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scenes import REPO, look_at

from splatforge.cli import main
from splatforge.errors import ConfigError, DataFormatError
from splatforge.geometry.sh import eval_sh
from splatforge.geometry.transform import (
    NAMED_TRANSFORMS,
    euler_transform,
    named_transform,
    rotate_sh,
    transform_splats,
)
from splatforge.io import read_ply, read_splat, read_spz, write_ply, write_sog, write_splat, write_spz
from splatforge.io.spz import decode_spz, encode_spz
from splatforge.products.export import build_transform, load_splats
from splatforge.products.previews import estimate_up, preview_cameras, render_view, scene_frame, write_previews


def make_splats(n: int = 500, degree: int = 3, seed: int = 0, spread: float = 2.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = (degree + 1) ** 2 - 1
    return {
        "means": (rng.normal(size=(n, 3)) * spread).astype(np.float32),
        "quats": rng.normal(size=(n, 4)).astype(np.float32),
        "scales": rng.uniform(-4.5, -1.0, size=(n, 3)).astype(np.float32),
        "opacities": rng.uniform(-3, 4, size=n).astype(np.float32),
        "sh0": rng.uniform(-1.5, 1.5, size=(n, 1, 3)).astype(np.float32),
        "shN": rng.uniform(-0.4, 0.4, size=(n, k, 3)).astype(np.float32),
    }


def unit(q: np.ndarray) -> np.ndarray:
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def covariances(s: dict) -> np.ndarray:
    from splatforge.geometry.quats import quat_scale_to_covar

    return quat_scale_to_covar(
        torch.tensor(s["quats"], dtype=torch.float64), torch.exp(torch.tensor(s["scales"], dtype=torch.float64))
    ).numpy()


def match_order(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Index into ``other`` for each row of ``ref`` (nearest mean)."""
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(other).query(ref)
    assert dist.max() < 1e-2
    return idx


# --- round trips -----------------------------------------------------------------------------


def test_ply_round_trip_is_exact_and_plyfile_reads_it(tmp_path):
    from plyfile import PlyData

    s = make_splats()
    write_ply(tmp_path / "a.ply", s)
    back = read_ply(tmp_path / "a.ply")
    for key in s:
        np.testing.assert_array_equal(back[key], s[key])
    v = PlyData.read(str(tmp_path / "a.ply"))["vertex"]
    np.testing.assert_array_equal(v["f_rest_15"], s["shN"][:, 0, 1])  # channel-major: green's first coefficient


def test_ply_reader_takes_nerfstudio_and_gsplat_variants(tmp_path):
    """ns-export writes no normals and may order properties differently; some tools write doubles."""
    from plyfile import PlyData, PlyElement

    s = make_splats(50, degree=1)
    names = [
        "x",
        "y",
        "z",
        "opacity",
        "rot_0",
        "rot_1",
        "rot_2",
        "rot_3",
        "scale_0",
        "scale_1",
        "scale_2",
        "f_dc_0",
        "f_dc_1",
        "f_dc_2",
    ] + [f"f_rest_{i}" for i in range(9)]
    cols = [
        s["means"][:, 0],
        s["means"][:, 1],
        s["means"][:, 2],
        s["opacities"],
        *s["quats"].T,
        *s["scales"].T,
        *s["sh0"][:, 0].T,
        *s["shN"].transpose(0, 2, 1).reshape(50, 9).T,
    ]
    rec = np.empty(50, dtype=[(n, "f8") for n in names])
    for n, c in zip(names, cols):
        rec[n] = c
    PlyData([PlyElement.describe(rec, "vertex")], byte_order=">").write(str(tmp_path / "ns.ply"))
    back = read_ply(tmp_path / "ns.ply")
    for key in s:
        np.testing.assert_allclose(back[key], s[key], atol=1e-6)


def test_splat_round_trip_within_quantisation_and_sorted(tmp_path):
    s = make_splats(degree=0)
    write_splat(tmp_path / "a.splat", s)
    assert (tmp_path / "a.splat").stat().st_size == 32 * 500
    back = read_splat(tmp_path / "a.splat")
    order = match_order(back["means"], s["means"])
    key = np.exp(s["scales"].sum(1)) / (1 + np.exp(-s["opacities"]))
    assert np.all(np.diff(key[order]) <= 0), "largest-first order of antimatter15's convert.py"
    np.testing.assert_array_equal(back["means"], s["means"][order])
    np.testing.assert_allclose(back["scales"], s["scales"][order], atol=1e-5)
    alpha = lambda x: 1 / (1 + np.exp(-x))
    # bytes are truncated (ply2splat, convert.py): the decoded value is at most one step below
    a_in, a_back = alpha(s["opacities"][order]), alpha(back["opacities"])
    assert np.all((a_in - a_back > -0.5 / 255 - 1e-6) & (a_in - a_back < 1.5 / 255 + 1e-6))
    rgb_in = np.clip(0.5 + 0.28209479 * s["sh0"][order], 0, 1)
    rgb_back = np.clip(0.5 + 0.28209479 * back["sh0"], 0, 1)
    assert np.all((rgb_in - rgb_back > -1e-6) & (rgb_in - rgb_back < 1 / 255 + 1e-6))
    dots = np.abs((unit(back["quats"]) * unit(s["quats"][order])).sum(1))
    assert dots.min() > 0.999


def test_splat_is_byte_identical_to_ply2splat_of_our_ply(tmp_path):
    """ply2splat (PyPI, the converter splatter-server runs) turns our .ply into exactly our .splat,
    ties in the sort key included; numpy's own float32 exp would differ in most scale bytes."""
    ply2splat = pytest.importorskip("ply2splat")
    s = make_splats(4000, degree=1, seed=3)
    s["means"][:20:2] = s["means"][1:20:2]  # pairs with one position and one key: ties
    s["scales"][:20] = s["scales"][0]
    s["opacities"][:20] = s["opacities"][0]
    s["quats"][5] = 0.0  # a zero quaternion: identity by both
    write_ply(tmp_path / "a.ply", s)
    write_splat(tmp_path / "ours.splat", s)
    ply2splat.convert(str(tmp_path / "a.ply"), str(tmp_path / "theirs.splat"))
    ours, theirs = (tmp_path / "ours.splat").read_bytes(), (tmp_path / "theirs.splat").read_bytes()
    assert len(ours) == len(theirs) == 32 * 4000
    rows = np.nonzero(np.frombuffer(ours, np.uint8).reshape(-1, 32) != np.frombuffer(theirs, np.uint8).reshape(-1, 32))[
        0
    ]
    assert ours == theirs, f"{len(set(rows))} records differ, first {sorted(set(rows))[:5]}"


@pytest.mark.parametrize("version", [2, 3, 4])
def test_spz_round_trip_within_quantisation(tmp_path, version):
    s = make_splats()
    write_spz(tmp_path / "a.spz", s, version)
    back = read_spz(tmp_path / "a.spz")
    np.testing.assert_allclose(back["means"], s["means"], atol=0.5 / 4096 + 1e-5)
    np.testing.assert_allclose(back["scales"], s["scales"], atol=1 / 32 + 1e-5)
    np.testing.assert_allclose(back["sh0"], s["sh0"], atol=0.5 / (0.15 * 255) + 1e-5)
    np.testing.assert_allclose(back["shN"], s["shN"], atol=1 / 16 + 0.5 / 128 + 1e-5)  # 4-bit bands, 5-bit band 1
    alpha = lambda x: 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(alpha(back["opacities"]), alpha(s["opacities"]), atol=0.5 / 255 + 1e-6)
    dots = np.abs((unit(back["quats"]) * unit(s["quats"])).sum(1))
    assert dots.min() > (0.99 if version == 2 else 0.9999)


def test_spz_headers_and_large_coordinates():
    s = make_splats(20)
    raw3 = encode_spz(s, 3)
    assert raw3[:2] == b"\x1f\x8b"
    import gzip

    head = gzip.decompress(raw3)[:16]
    assert (
        int.from_bytes(head[:4], "little") == 0x5053474E and head[4] == 3 and int.from_bytes(head[8:12], "little") == 20
    )
    raw4 = encode_spz(s, 4)
    assert raw4[:4] == b"NGSP" and raw4[4] == 4 and raw4[15] == 6  # six streams
    far = dict(s, means=s["means"] + 5000.0)  # beyond 12 fractional bits: fewer bits, still exact to the step
    back = decode_spz(encode_spz(far, 3))
    np.testing.assert_allclose(back["means"], far["means"], atol=1 / 2**9)
    with pytest.raises(DataFormatError, match="truncated"):
        decode_spz(raw4[:-10], source="x.spz")
    with pytest.raises(DataFormatError, match="not an SPZ"):
        decode_spz(b"\0" * 64, source="x.spz")
    with pytest.raises(ConfigError):
        encode_spz(s, 5)


def test_truncated_spz_v4_table_names_the_file(tmp_path):
    """A v4 file cut inside its table of streams (or right after the header) is a
    DataFormatError naming the file, not a struct.error."""
    raw4 = encode_spz(make_splats(20), 4)
    for cut in (32, 32 + 5, 32 + 16 * 3 + 7):
        path = tmp_path / f"cut{cut}.spz"
        path.write_bytes(raw4[:cut])
        with pytest.raises(DataFormatError, match=rf"cut{cut}\.spz: truncated"):
            read_spz(path)


@pytest.mark.parametrize(
    "header, message",
    [
        (
            b"ply\nformat binary_little_endian 1.0\nelement vertex many\nproperty float x\nend_header\n",
            "malformed PLY header, line 3",
        ),
        (b"ply\nformat\nelement vertex 1\nend_header\n", "malformed PLY header, line 2"),
        (b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float\nend_header\n", "malformed PLY header, line 4"),
        (
            b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float x\nend_header\n1 2\n",
            "repeated vertex property",
        ),
        (b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\nabc\n", "not a number"),
        (b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header", "no complete 'end_header'"),
    ],
)
def test_malformed_ply_headers_name_the_file(tmp_path, header, message):
    path = tmp_path / "bad.ply"
    path.write_bytes(header)
    with pytest.raises(DataFormatError, match=message) as info:
        read_ply(path)
    assert str(path) in str(info.value)


# --- independent readers ---------------------------------------------------------------------


def _gf_arrays(result: dict) -> dict[str, np.ndarray]:
    d = result["data"]
    f = lambda k, c: np.frombuffer(d[k], np.float32).reshape(-1, c)
    return {
        "means": f("positions", 3),
        "quats": f("rotations", 4),
        "scales": f("scales", 3),
        "opacities": f("alphas", 1)[:, 0],
        "sh0": f("colors", 3)[:, None],
        "sh": np.frombuffer(d["sh"], np.float32),
    }


@pytest.mark.parametrize("version", [2, 3, 4])
def test_gaussforge_reads_our_spz(version):
    """Niantic's reference decoder (inside gaussforge) returns the file's RUB values: ours after
    the opengl rotation, within the format's quantisation."""
    gaussforge = pytest.importorskip("gaussforge")
    s = make_splats(300)
    res = gaussforge.GaussForge().read(encode_spz(s, version), "spz")
    assert "error" not in res, res.get("error")
    got = _gf_arrays(res)
    rub = transform_splats(s, named_transform("opengl"))
    np.testing.assert_allclose(got["means"], rub["means"], atol=0.5 / 4096 + 1e-5)
    np.testing.assert_allclose(got["scales"], rub["scales"], atol=1 / 32 + 1e-5)
    np.testing.assert_allclose(got["sh0"], rub["sh0"], atol=0.5 / (0.15 * 255) + 1e-5)
    sh = got["sh"].reshape(300, 15, 3)  # coefficient-major, channel inner (the SPZ layout)
    np.testing.assert_allclose(sh, rub["shN"], atol=1 / 16 + 0.5 / 128 + 1e-5)
    dots = np.abs((unit(got["quats"]) * unit(rub["quats"])).sum(1))
    assert dots.min() > (0.99 if version == 2 else 0.9999)


def test_gaussforge_reads_our_splat_and_ply(tmp_path):
    """gaussforge converts our .splat and .ply to its PLY; plyfile reads that back."""
    gaussforge = pytest.importorskip("gaussforge")
    from plyfile import PlyData

    s = make_splats(200, degree=0)
    gf = gaussforge.GaussForge()
    write_splat(tmp_path / "a.splat", s)
    write_ply(tmp_path / "a.ply", s)
    for name, fmt in (("a.splat", "splat"), ("a.ply", "ply")):
        res = gf.convert((tmp_path / name).read_bytes(), fmt, "ply")
        assert "error" not in res, res.get("error")
        (tmp_path / f"gf_{fmt}.ply").write_bytes(res["data"])
        v = PlyData.read(str(tmp_path / f"gf_{fmt}.ply"))["vertex"]
        means = np.stack([v["x"], v["y"], v["z"]], 1)
        idx = match_order(means, s["means"])
        np.testing.assert_allclose(means, s["means"][idx], atol=1e-6)
        scales = np.stack([v[f"scale_{i}"] for i in range(3)], 1)
        np.testing.assert_allclose(scales, s["scales"][idx], atol=1e-4)
        rgb = 0.5 + 0.28209479 * np.stack([v[f"f_dc_{i}"] for i in range(3)], 1)
        np.testing.assert_allclose(
            np.clip(rgb, 0, 1), np.clip(0.5 + 0.28209479 * s["sh0"][idx, 0], 0, 1), atol=1 / 255 + 1e-6
        )


def _splat_transform() -> str | None:
    for cand in (os.environ.get("SPLAT_TRANSFORM"), REPO / ".ci" / "node_modules" / ".bin" / "splat-transform"):
        if cand and Path(cand).exists():
            return str(cand)
    return shutil.which("splat-transform")


@pytest.mark.parametrize("suffix", ["ply", "splat", "spz"])
def test_splat_transform_reads_our_files(tmp_path, suffix):
    """PlayCanvas's splat-transform (npm) converts our file to CSV; its columns give back our values."""
    tool = _splat_transform()
    if tool is None:
        pytest.skip("@playcanvas/splat-transform not installed (.ci/run installs it)")
    s = make_splats(100, degree=0 if suffix == "splat" else 3)
    {"ply": write_ply, "splat": write_splat, "spz": write_spz}[suffix](tmp_path / f"a.{suffix}", s)
    proc = subprocess.run(
        [tool, "-w", str(tmp_path / f"a.{suffix}"), str(tmp_path / "out.csv")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.DictReader(f))
    col = lambda *names: np.array([[float(r[n]) for n in names] for r in rows])
    means = col("x", "y", "z")
    ref = s if suffix != "spz" else transform_splats(s, named_transform("opengl"))  # spz readers see RUB
    idx = match_order(means, ref["means"])
    tol = {"ply": 1e-5, "splat": 1e-5, "spz": 0.5 / 4096 + 1e-5}[suffix]
    np.testing.assert_allclose(means, ref["means"][idx], atol=tol)
    np.testing.assert_allclose(col("scale_0", "scale_1", "scale_2"), ref["scales"][idx], atol=1 / 32 + 1e-4)
    np.testing.assert_allclose(col("f_dc_0", "f_dc_1", "f_dc_2"), ref["sh0"][idx, 0], atol=0.05)


def test_splat_transform_reads_our_sog(tmp_path):
    """splat-transform decodes our .sog (meta.json v2 + lossless WebP in a stored ZIP) to a PLY
    whose values are ours within SOG's quantisation; the SH palette recovers a set of 24 distinct
    higher-band vectors to the resolution of its 256-entry codebook."""
    tool = _splat_transform()
    if tool is None:
        pytest.skip("@playcanvas/splat-transform not installed (.ci/run installs it)")
    s = make_splats(3000, degree=3, seed=4)
    palette = np.random.default_rng(5).normal(scale=0.3, size=(24, 15, 3)).astype(np.float32)
    s["shN"] = palette[np.arange(3000) % 24]
    s["quats"][7] = [0.5, -0.5, 0.5, -0.5]  # four equal magnitudes: the first is dropped
    write_sog(tmp_path / "a.sog", s)
    with zipfile.ZipFile(tmp_path / "a.sog") as z:
        assert z.namelist()[-1] == "meta.json" and all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        meta = json.loads(z.read("meta.json"))
    assert meta["version"] == 2 and meta["count"] == 3000 and meta["shN"]["bands"] == 3
    proc = subprocess.run(
        [tool, "-g", "cpu", "-w", str(tmp_path / "a.sog"), str(tmp_path / "back.ply")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    back = read_ply(tmp_path / "back.ply")
    idx = match_order(back["means"], s["means"])
    assert len(np.unique(idx)) == 3000
    lspan = np.log1p(np.abs(s["means"])).max()  # one 16-bit step of logT, in world units near the edge
    np.testing.assert_allclose(back["means"], s["means"][idx], atol=4 * lspan / 65535 * np.exp(lspan))
    assert np.abs((unit(back["quats"]) * unit(s["quats"][idx])).sum(1)).min() > 0.9995
    assert np.abs(back["scales"] - s["scales"][idx]).max() < 0.05
    assert np.abs(back["sh0"] - s["sh0"][idx]).max() < 0.05
    alpha = lambda x: 1 / (1 + np.exp(-x))
    d = alpha(s["opacities"][idx]) - alpha(back["opacities"])
    assert d.min() > -1e-4 and d.max() < 1 / 255 + 1e-4  # truncated to a byte
    assert meta["shN"]["count"] == 24  # the distinct vectors, exactly
    gap = np.diff(meta["shN"]["codebook"]).max()
    np.testing.assert_allclose(back["shN"], s["shN"][idx], atol=gap / 2 + 1e-6)


# --- transforms and SH rotation ---------------------------------------------------------------


def test_sh_rotation_matches_evaluation_in_rotated_directions():
    rng = np.random.default_rng(1)
    R = euler_transform("30,-70,115").rotation
    coeffs = rng.normal(size=(7, 16, 3))
    rotated = rotate_sh(coeffs, R)
    dirs = rng.normal(size=(7, 3))
    a = eval_sh(3, torch.tensor(dirs @ R.T), torch.tensor(rotated))
    b = eval_sh(3, torch.tensor(dirs), torch.tensor(coeffs))
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    np.testing.assert_allclose(rotate_sh(coeffs[:, 1:], R), rotated[:, 1:], atol=1e-12)  # shN alone (no DC)
    assert not np.allclose(rotated, coeffs)


def test_named_transforms_and_matrix_parsing(tmp_path):
    np.testing.assert_allclose(named_transform("opengl").rotation @ [1, 2, 3], [1, -2, -3])
    np.testing.assert_allclose(named_transform("splatter").rotation @ [1, 2, 3], [2, -1, 3], atol=1e-12)
    for R in NAMED_TRANSFORMS.values():
        assert np.isclose(np.linalg.det(R), 1)
    m = np.eye(4)
    m[:3, :3] = 2.0 * euler_transform("0,0,90").rotation
    m[:3, 3] = [1, 2, 3]
    np.savetxt(tmp_path / "m.txt", m)
    sim = build_transform(matrix=tmp_path / "m.txt")
    assert np.isclose(sim.scale, 2.0) and np.allclose(sim.translation, [1, 2, 3])
    np.savetxt(tmp_path / "bad.txt", np.diag([1.0, 2.0, 1.0, 1.0]))
    with pytest.raises(ConfigError, match="bad.txt"):
        build_transform(matrix=tmp_path / "bad.txt")
    with pytest.raises(ConfigError, match="known"):
        named_transform("unity")


def test_rotated_scene_from_rotated_camera_renders_the_same():
    """Rotate the scene (means, quats, SH) by a similarity and the camera with it: same image."""
    s = make_splats(300, spread=0.6, seed=3)
    s["scales"] = s["scales"] - 0.5
    sim = build_transform("splatter", rotate="20,35,-50", scale=1.7)
    s2 = transform_splats(s, sim)
    viewmat = look_at((0.4, -0.6, -3.5)).numpy()
    K = np.array([[90.0, 0, 48], [0, 90.0, 40], [0, 0, 1]])
    T = sim.matrix()
    T_inv = np.linalg.inv(T)
    # world->camera after the transform: first undo the similarity, then the old viewmat; the
    # camera frame must stay orthonormal, so move the eye and divide out the scale in depth.
    new_view = viewmat @ T_inv
    new_view[:3] *= sim.scale  # uniform scale of camera coordinates leaves the projection unchanged
    a = render_view(s, viewmat, K, 96, 80)
    b = render_view(s2, new_view, K, 96, 80)
    assert a.max() > 0.2
    np.testing.assert_allclose(b, a, atol=2e-4)
    # without rotating the SH the view-dependent colour differs: the test can fail
    b_wrong = render_view(dict(s2, shN=s["shN"]), new_view, K, 96, 80)
    assert np.abs(b_wrong - a).max() > 1e-2


def test_export_cli_prunes_transforms_and_names_bad_input(tmp_path, capsys):
    s = make_splats(400)
    s["opacities"][:100] = -10.0  # below 1/255: pruned
    write_ply(tmp_path / "in.ply", s)
    assert (
        main(["export", str(tmp_path / "in.ply"), "--output", str(tmp_path / "o.spz"), "--transform", "splatter"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_gaussians"] == 300 and summary["format"] == "spz"
    back = load_splats(tmp_path / "o.spz")
    ref = transform_splats({k: v[100:] for k, v in s.items()}, named_transform("splatter"))
    np.testing.assert_allclose(back["means"], ref["means"], atol=1e-3)
    assert (
        main(
            [
                "export",
                str(tmp_path / "in.ply"),
                "--output",
                str(tmp_path / "c.ply"),
                "--crop",
                "0",
                "0",
                "0",
                "9",
                "9",
                "9",
            ]
        )
        == 0
    )
    assert np.all(read_ply(tmp_path / "c.ply")["means"] >= 0)
    capsys.readouterr()
    (tmp_path / "broken.ply").write_bytes(
        b"ply\nformat binary_little_endian 1.0\nelement vertex 10\nproperty float x\nend_header\n"
    )
    assert main(["export", str(tmp_path / "broken.ply"), "--output", str(tmp_path / "x.splat")]) == 1
    assert "broken.ply" in capsys.readouterr().err
    assert not (tmp_path / "x.splat").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "broken.ply",
        "c.ply",
        "in.ply",
        "o.spz",
    ]  # no temp files left


# --- previews ---------------------------------------------------------------------------------


def test_up_estimate_and_preview_framing(tmp_path):
    """A flat disc of Gaussians seen by cameras whose up is +z: the top view sees the disc face-on
    and its projected bounds fill a sensible part of each preview."""
    rng = np.random.default_rng(0)
    n = 3000
    r, a = np.sqrt(rng.uniform(0, 1, n)) * 2.0, rng.uniform(0, 2 * np.pi, n)
    means = np.stack([r * np.cos(a) + 5, 0.6 * r * np.sin(a) - 3, rng.normal(0, 0.05, n)], 1)
    means[:20] += 300.0  # floaters must not shrink the scene
    s = {
        "means": means.astype(np.float32),
        "quats": np.tile([1, 0, 0, 0], (n, 1)).astype(np.float32),
        "scales": np.full((n, 3), np.log(0.06), np.float32),
        "opacities": np.full(n, 3.0, np.float32),
        "sh0": np.full((n, 1, 3), 1.0, np.float32),
        "shN": np.zeros((n, 0, 3), np.float32),
    }
    c2w = np.tile(np.eye(4), (4, 1, 1))
    c2w[:, :3, :3] = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]])  # camera y (down) = world -z
    up = estimate_up(c2w)
    np.testing.assert_allclose(up, [0, 0, 1], atol=1e-12)
    frame = scene_frame(s, up)
    assert frame.half_extent[0] < 2.5 and frame.half_extent[2] < 0.3
    cams = preview_cameras(frame, 128)
    for name, (viewmat, K) in cams.items():
        img = render_view(s, viewmat, K, 128, 128)
        covered = (img.max(-1) > 0.05).mean()
        lo, hi = (0.15, 0.8) if name == "top" else (0.05, 0.8)
        assert lo < covered < hi, (name, covered)
        corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * frame.half_extent
        world = frame.center + corners @ frame.axes
        cam = world @ viewmat[:3, :3].T + viewmat[:3, 3]
        uv = cam[:, :2] / cam[:, 2:] * K[0, 0] + 64
        assert np.all(cam[:, 2] > 0) and np.all(uv > -1) and np.all(uv < 129), name
        assert (uv.max(0) - uv.min(0)).max() > 0.5 * 128, name
    # top view looks straight down: its optical axis is -up
    np.testing.assert_allclose(cams["top"][0][2, :3], -up, atol=1e-9)
    out = write_previews(s, tmp_path, camtoworlds=c2w, size=64, orbit=True)
    assert Path(out["preview_top"]).exists() and Path(out["preview_angle"]).exists()
    import av

    with av.open(out["preview_orbit"]) as video:
        frames = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
    assert len(frames) == 72 and frames[0].shape == (64, 64, 3)
    assert all(f.mean() > 5 for f in frames), "the scene stays in view all around the orbit"


def _blobs(points: np.ndarray, scale: float, colour: float = 1.0) -> dict[str, np.ndarray]:
    n = len(points)
    return {
        "means": points.astype(np.float32),
        "quats": np.tile([1, 0, 0, 0], (n, 1)).astype(np.float32),
        "scales": np.full((n, 3), np.log(scale), np.float32),
        "opacities": np.full(n, 3.0, np.float32),
        "sh0": np.full((n, 1, 3), colour, np.float32),
        "shN": np.zeros((n, 0, 3), np.float32),
    }


def _concat(*parts: dict) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _orbited_sphere():
    """400 small white Gaussians on a sphere of radius 0.5 at the origin, orbited by 12 cameras
    at radius 3, 1 above it: ``(splats, eyes, camtoworlds [12, 4, 4], Ks [12, 3, 3])`` at 80x80."""
    from splatforge.geometry.cameras import look_at

    d = np.random.default_rng(0).normal(size=(400, 3))
    obj = _blobs(0.5 * d / np.linalg.norm(d, axis=1, keepdims=True), 0.05)
    eyes = [(3 * np.cos(a), 3 * np.sin(a), 1.0) for a in np.linspace(0, 2 * np.pi, 12, endpoint=False)]
    c2w = np.stack([look_at(e, (0, 0, 0), (0, 0, 1)) for e in eyes])
    return obj, eyes, c2w, np.tile(np.array([[60.0, 0, 40], [0, 60.0, 40], [0, 0, 1]]), (12, 1, 1))


def test_previews_drop_a_floater_only_one_view_sees(tmp_path):
    """An object's surface (a sphere) orbited by 12 cameras, and a large floater just in front of
    one camera: the previews keep the surface (>= 95 % of it) and drop the floater."""
    from splatforge.products.previews import preview_selection

    obj, eyes, c2w, K = _orbited_sphere()
    floater = _blobs(np.array([np.array(eyes[0]) * 0.85]), 0.08, colour=-1.0)  # 0.45 in front of camera 0
    s = _concat(obj, floater)
    keep, notes = preview_selection(s, c2w, K, 80, 80)
    assert not keep[-1], notes
    assert keep[:-1].mean() >= 0.95, notes
    assert notes["inside"] is False


def test_previews_do_not_depend_on_the_scale_of_the_world(tmp_path):
    """The orbited sphere of the test above with every length times 0.001 (a scene in
    kilometres, its cameras 3 m from the object): the same Gaussians are kept and the previews
    are the same pictures. With the near plane fixed at 0.01 world units nothing was drawn."""
    from PIL import Image

    from splatforge.products.previews import preview_selection

    obj, _, c2w, K = _orbited_sphere()
    k = 1e-3
    tiny = dict(obj, means=obj["means"] * np.float32(k), scales=obj["scales"] + np.float32(np.log(k)))
    tiny_c2w = c2w.copy()
    tiny_c2w[:, :3, 3] *= k
    keep, _ = preview_selection(obj, c2w, K, 80, 80)
    assert keep.mean() > 0.9 and np.array_equal(preview_selection(tiny, tiny_c2w, K, 80, 80)[0], keep)
    images = []
    for name, (splats, cams) in {"unit": (obj, c2w), "tiny": (tiny, tiny_c2w)}.items():
        out = write_previews(splats, tmp_path / name, camtoworlds=cams, Ks=K, image_size=(80, 80), size=64)
        images.append([np.asarray(Image.open(out[f"preview_{v}"]), np.float64) for v in ("top", "angle")])
    for ref, small in zip(*images):
        assert ref.mean() > 10  # the sphere is in the picture
        assert np.abs(ref - small).mean() < 1.0, np.abs(ref - small).mean()


def test_previews_of_a_room_cut_the_ceiling(tmp_path):
    """Cameras inside a room (a floor at z = -1, a ceiling at z = 2, cameras at z 0-1 looking
    outwards): the room counts as captured from inside and the ceiling is left out."""
    from splatforge.geometry.cameras import look_at
    from splatforge.products.previews import preview_selection

    g = np.stack(np.meshgrid(np.linspace(-3, 3, 25), np.linspace(-3, 3, 25)), -1).reshape(-1, 2)
    floor = _blobs(np.column_stack([g, np.full(len(g), -1.0)]), 0.15)
    ceiling = _blobs(np.column_stack([g, np.full(len(g), 2.0)]), 0.15, colour=-1.0)
    walls = [
        _blobs(np.column_stack([np.full(len(g), sgn * 3.0), g[:, 0], g[:, 1] * 0.5 + 0.5])[:, order], 0.15)
        for sgn in (-1, 1)
        for order in ([0, 1, 2], [1, 0, 2])
    ]
    s = _concat(floor, ceiling, *walls)
    eyes, targets = [], []
    for i, a in enumerate(np.linspace(0, 2 * np.pi, 16, endpoint=False)):
        eye = np.array([0.4 * np.cos(a), 0.4 * np.sin(a), 0.2 + 0.6 * (i % 2)])
        eyes.append(eye)
        targets.append(eye + np.array([np.cos(a), np.sin(a), -0.6 if i % 4 == 0 else (0.6 if i % 4 == 2 else 0.0)]))
    c2w = np.stack([look_at(e, t, (0, 0, 1)) for e, t in zip(eyes, targets)])
    K = np.tile(np.array([[40.0, 0, 40], [0, 40.0, 40], [0, 0, 1]]), (16, 1, 1))
    keep, notes = preview_selection(s, c2w, K, 80, 80)
    n = len(g)
    assert notes["inside"] is True, notes
    assert keep[n : 2 * n].sum() == 0, notes  # the ceiling
    assert keep[:n].mean() > 0.5, notes  # the floor the cameras saw


def test_preview_failure_is_a_warning_not_an_error(tmp_path, caplog):
    s = make_splats(10)
    s["means"][:] = np.nan
    out = write_previews(s, tmp_path, size=32)
    assert out["preview_top"] is None and "preview" in caplog.text
