"""Frame selection and the prepare pipeline's failure paths (SfM quality is issue 4's open part)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from scenes import datasets_dir
from splatforge import DataFormatError
from splatforge.data.frames import extract_video_frames, import_photos, is_near_duplicate, select_windows, sharpness
from splatforge.errors import ConfigError
from splatforge.pipeline import PrepareConfig, prepare

VIDEO = datasets_dir() / "skull" / "skull_orbit.mp4"


def test_sharpness_ranks_blur_below_detail():
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((120, 160)) * 255).astype(np.uint8))
    scores = [sharpness(np.asarray(img.filter(ImageFilter.GaussianBlur(r)))) for r in (0, 1, 2, 4)]
    assert scores == sorted(scores, reverse=True) and scores[0] > 10 * scores[-1]


def test_select_windows_keeps_the_sharpest_per_window_evenly():
    positions = np.arange(0, 100, 2)  # 50 candidates over 100 frames
    scores = np.ones(50)
    scores[[3, 17, 30, 44]] = 5.0  # one sharp candidate in each quarter
    chosen = select_windows(positions, scores, target=4, total=100)
    assert chosen == [3, 17, 30, 44]
    spread = select_windows(positions, np.ones(50), target=10, total=100)
    assert len(spread) == 10 and np.all(np.diff(positions[spread]) == 10)


def test_near_duplicates():
    a = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    assert is_near_duplicate(a, a + 0.001)
    assert not is_near_duplicate(a, np.roll(a, 5, axis=1))


def test_video_frames_are_sharp_spread_and_named(tmp_path):
    stats = extract_video_frames(VIDEO, tmp_path, target=11)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert stats.decoded == 66 and stats.kept == len(names) == 11
    frames = [int(n.split("_")[-1].split(".")[0]) for n in names]
    assert all(n.startswith("skull_orbit_") for n in names)
    assert max(np.diff(frames)) <= 12  # one per window of 6 frames, roughly evenly spread
    with Image.open(tmp_path / names[0]) as im:
        assert im.size == (532, 354)


def test_photos_import_orients_resizes_and_skips_junk(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    img = Image.new("RGB", (400, 200), (200, 10, 10))
    exif = img.getexif()
    exif[274] = 6  # rotated 90 degrees: shown as 200 x 400
    img.save(src / "a.jpg", exif=exif)
    (src / "notes.txt").write_text("not an image")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    written, skipped = import_photos(sorted(src.iterdir()), tmp_path / "out", max_size=100)
    assert written == 1 and len(skipped) == 2
    with Image.open(tmp_path / "out" / "a.jpg") as im:
        assert im.size == (50, 100)


def test_prepare_bad_inputs_leave_nothing_behind(tmp_path):
    out = tmp_path / "scene"
    with pytest.raises(DataFormatError, match="no such file"):
        prepare(PrepareConfig(inputs=[tmp_path / "missing.mp4"], output=out))
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"\x00" * 1000)
    with pytest.raises(DataFormatError, match="fake.mp4"):
        prepare(PrepareConfig(inputs=[fake], output=out))
    two = tmp_path / "two"
    two.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 48), (i * 100, 50, 50)).save(two / f"{i}.jpg")
    with pytest.raises(DataFormatError, match="only 2 usable image"):
        prepare(PrepareConfig(inputs=[two], output=out))
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(5):
        Image.new("RGB", (64, 48), (40 * i, 40, 40)).save(flat / f"{i}.jpg")
    with pytest.raises(DataFormatError, match="SfM"):
        prepare(PrepareConfig(inputs=[flat], output=out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.mp4", "flat", "two"]  # no scene, no .partial
    (tmp_path / "existing").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        prepare(PrepareConfig(inputs=[two], output=tmp_path / "existing"))
