"""Per-scene camera metadata for datasets, written without training.

- ``partition.json``: ``{"train": [...], "test": [...]}``, 0-based indices into the frames
  **sorted by image name** (the order of every other file here); each index in exactly one list.
- ``cam_extrinsics.npy``: ``[N, 4, 4]`` float64 **camera-to-world**, OpenCV camera axes (+x
  right, +y down, +z forward), world units, same order. ``inv(cam_extrinsics[i])`` maps world
  points into camera ``i``.
- ``cam_intrinsics.npy``: ``[N, 3, 3]`` float64 pinhole ``K`` in pixels **at the rendered
  resolution** (the images that were trained on / rendered), pixel centres at integer + 0.5 as
  in gsplat. A world point ``X`` lands at ``K @ (R X + t)`` (dehomogenised) with ``[R|t]`` the
  inverse extrinsics.
- ``frames.json``: the sorted image names and their (width, height), for readers that want the
  names behind the indices.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from splatforge._fs import atomic_path
from splatforge.errors import DataFormatError

__all__ = ["check_partition", "fix_partition", "read_metadata", "write_metadata"]


def write_metadata(out: Path, scene) -> list[Path]:
    """Write the three files (and ``frames.json``) for ``scene`` (:class:`SceneData`) into ``out``."""
    out = Path(out)
    paths = [out / "partition.json", out / "cam_extrinsics.npy", out / "cam_intrinsics.npy", out / "frames.json"]
    with atomic_path(paths[0]) as tmp:
        tmp.write_text(
            json.dumps({"train": [int(i) for i in scene.split["train"]], "test": [int(i) for i in scene.split["test"]]})
        )
    with atomic_path(paths[1]) as tmp:
        np.save(tmp, np.asarray(scene.camtoworlds, dtype=np.float64))
    with atomic_path(paths[2]) as tmp:
        np.save(tmp, np.asarray(scene.Ks, dtype=np.float64))
    frames = [
        {"name": n, "width": int(w), "height": int(h)}
        for n, w, h in zip(scene.image_names, scene.widths, scene.heights)
    ]
    with atomic_path(paths[3]) as tmp:
        tmp.write_text(json.dumps(frames, indent=1))
    return paths


def read_metadata(out: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """``(partition, cam_extrinsics [N,4,4], cam_intrinsics [N,3,3])`` from ``out``.

    Raises:
        DataFormatError: a missing or unreadable file (named).
    """
    out = Path(out)
    try:
        partition = json.loads((out / "partition.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{out / 'partition.json'}: unreadable: {exc}") from exc
    arrays = []
    for name in ("cam_extrinsics.npy", "cam_intrinsics.npy"):
        try:
            arrays.append(np.load(out / name))
        except (OSError, ValueError) as exc:
            raise DataFormatError(f"{out / name}: unreadable: {exc}") from exc
    return partition, arrays[0], arrays[1]


def check_partition(partition: object, n: int) -> str | None:
    """None if ``partition`` is a valid split of ``n`` frames, else what is wrong."""
    if not isinstance(partition, dict) or set(partition) != {"train", "test"}:
        return "partition.json must be an object with exactly the keys 'train' and 'test'"
    idx = []
    for key in ("train", "test"):
        if not isinstance(partition[key], list) or not all(isinstance(i, int) for i in partition[key]):
            return f"partition.json '{key}' must be a list of integers"
        idx += partition[key]
    if not partition["train"]:
        return "partition.json has no training frame"
    if sorted(idx) != list(range(n)):
        bad = sorted({i for i in idx if not 0 <= i < n})
        dup = len(idx) - len(set(idx))
        return (
            f"partition.json does not split {n} frames exactly once "
            f"(out of range: {bad[:5]}, duplicates: {dup}, covered: {len(set(idx))})"
        )
    return None


def fix_partition(out: Path, expected: dict[str, list[int]]) -> str:
    """Check ``out/partition.json`` against ``out/cam_extrinsics.npy``.

    - consistent and equal to ``expected`` (the split the scene's ratio gives): ``"ok"``;
    - extrinsics readable and of the expected length but the partition missing, invalid or
      different: the partition is rewritten from ``expected``: ``"rewritten: <reason>"``;
    - extrinsics missing, unreadable or of another length (the output cannot be trusted): the
      whole output folder is removed: ``"removed: <reason>"``.
    """
    out = Path(out)
    n_expected = len(expected["train"]) + len(expected["test"])
    try:
        ext = np.load(out / "cam_extrinsics.npy")
        if ext.ndim != 3 or ext.shape[1:] != (4, 4) or ext.shape[0] != n_expected or not np.isfinite(ext).all():
            raise ValueError(f"shape {ext.shape}, expected ({n_expected}, 4, 4) and finite values")
    except (OSError, ValueError) as exc:
        shutil.rmtree(out, ignore_errors=True)
        return f"removed: {out / 'cam_extrinsics.npy'} unusable ({exc})"
    try:
        partition = json.loads((out / "partition.json").read_text())
        problem = check_partition(partition, ext.shape[0])
        if problem is None and partition != expected:
            problem = "partition.json differs from the split of this ratio"
    except (OSError, ValueError) as exc:
        problem = f"unreadable ({exc})"
    if problem is None:
        return "ok"
    with atomic_path(out / "partition.json") as tmp:
        tmp.write_text(json.dumps(expected))
    return f"rewritten: {problem}"
