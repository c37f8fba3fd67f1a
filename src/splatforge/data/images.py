"""Image folders, downscaled copies and image loading."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from splatforge._fs import build_once
from splatforge.errors import DataFormatError

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "WHITE",
    "downscale_into",
    "has_alpha",
    "image_folder",
    "image_size",
    "list_images",
    "load_image",
    "load_rgba",
    "write_png",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".webp", ".tif", ".tiff")


def list_images(folder: Path) -> list[str]:
    """Image file names (relative, sorted) directly in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.suffix in IMAGE_SUFFIXES and p.is_file())


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` in pixels, read from the header only.

    Raises:
        DataFormatError: missing or unreadable image.
    """
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError) as exc:
        raise DataFormatError(f"{path}: not a readable image: {exc}") from exc


def image_folder(root: Path, data_factor: int, cache_dir: Path | None = None, base: str = "images") -> Path:
    """The image folder for ``data_factor``: ``root/images`` (1) or ``root/images_<k>``.

    When ``images_<k>`` is absent but ``images`` exists and ``cache_dir`` is given, a downscaled
    copy (Lanczos, sizes rounded up) is made once in ``cache_dir/downscaled/``; the input folder
    is never written.

    Raises:
        DataFormatError: no suitable folder; the message lists the image folders that exist.
    """
    if data_factor < 1:
        raise DataFormatError(f"data factor must be >= 1, got {data_factor}")
    name = base if data_factor == 1 else f"{base}_{data_factor}"
    folder = root / name
    if folder.is_dir():
        return folder
    full = root / base
    if data_factor > 1 and full.is_dir() and cache_dir is not None:
        return _downscaled(full, data_factor, Path(cache_dir))
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(base)) if root.is_dir() else []
    hint = f"; it has {', '.join(found)}: pass the matching --data-factor" if found else ""
    raise DataFormatError(f"{folder}: no such image folder{hint}")


def downscale_into(src: Path, dst: Path, factor: int) -> None:
    """Write every image of ``src`` into ``dst`` (same names) downscaled by ``factor``
    (Lanczos, sizes rounded up, as COLMAP's ``images_<k>`` convention)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in list_images(src):
        with Image.open(src / name) as im:
            w, h = im.size
            im.resize((-(-w // factor), -(-h // factor)), Image.Resampling.LANCZOS).save(dst / name, quality=95)


def _downscaled(full: Path, factor: int, cache_dir: Path) -> Path:
    key = hashlib.sha1(str(full.resolve()).encode()).hexdigest()[:16]
    log.info("downscaled copy of %s by %d in %s", full, factor, cache_dir)
    return build_once(cache_dir / "downscaled" / f"{key}_{factor}", lambda tmp: downscale_into(full, tmp, factor))


def load_image(path: Path, background: tuple[float, float, float] | None = None) -> np.ndarray:
    """``[H, W, 3]`` float32 RGB in [0, 1]. Images with an alpha channel are composited over
    ``background`` (white when None).

    Raises:
        DataFormatError: missing or unreadable image.
    """
    arr = load_rgba(path)
    if arr.shape[-1] == 3:
        return arr
    bg = np.asarray(background if background is not None else WHITE, dtype=np.float32)
    return np.ascontiguousarray(arr[..., :3] * arr[..., 3:] + bg * (1.0 - arr[..., 3:]))


#: What images with an alpha channel are composited on when the scene names no colour (the
#: NeRF-synthetic habit: nerfstudio's and Inria's white background for Blender scenes).
WHITE = (1.0, 1.0, 1.0)


def load_rgba(path: Path) -> np.ndarray:
    """``[H, W, 4]`` float32 straight (not premultiplied) RGBA in [0, 1] of an image with an
    alpha channel, ``[H, W, 3]`` RGB of one without.

    Raises:
        DataFormatError: missing or unreadable image.
    """
    try:
        with Image.open(path) as im:
            im.load()
            has_alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
            arr = np.asarray(im.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise DataFormatError(f"{path}: not a readable image: {exc}") from exc
    return np.ascontiguousarray(arr)


def has_alpha(path: Path) -> bool:
    """Whether the image at ``path`` has an alpha channel (reads the header only).

    Raises:
        DataFormatError: missing or unreadable image.
    """
    try:
        with Image.open(path) as im:
            return im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
    except (OSError, UnidentifiedImageError) as exc:
        raise DataFormatError(f"{path}: not a readable image: {exc}") from exc


MASK_SUFFIXES = (".png", ".jpg", ".jpeg")


def find_masks(root: Path, image_names: list[str]) -> list[Path] | None:
    """The masks of a scene, one per image, from ``root/masks/`` (OpenSplat's, Brush's and
    nerfstudio's layout): ``masks/<image stem>.png`` (also ``.jpg``, or ``masks/<image name>``
    itself, subfolders as the images'); None without a ``masks/`` folder.

    Raises:
        DataFormatError: a ``masks/`` folder without a mask for some image (names the first
            ones missing and what was looked for).
    """
    folder = Path(root) / "masks"
    if not folder.is_dir():
        return None
    out, missing = [], []
    for name in image_names:
        stem = Path(name).with_suffix("")
        cands = [folder / f"{stem}{s}" for s in MASK_SUFFIXES] + [folder / name, folder / f"{name}.png"]
        hit = next((c for c in cands if c.is_file()), None)
        if hit is None:
            missing.append(name)
        out.append(hit)
    if missing:
        raise DataFormatError(
            f"{folder}: no mask for {len(missing)} of {len(image_names)} images, e.g. "
            f"{', '.join(missing[:3])} (looked for masks/<image stem>.png)"
        )
    return out


def load_mask(path: Path, width: int, height: int, invert: bool = False) -> np.ndarray:
    """``[H, W]`` float32 mask, 1 = keep (white), 0 = ignore, at ``width`` x ``height``: a mask of
    another size (masks made at full size for ``images_<k>``) is box-filtered to it and
    thresholded at one half, so it stays aligned with the downscaled images. Any channel count;
    grey levels above one half count as white.

    Raises:
        DataFormatError: unreadable file, or an aspect ratio other than the image's.
    """
    try:
        with Image.open(path) as im:
            im.load()
            grey = im.convert("L")
    except (OSError, UnidentifiedImageError) as exc:
        raise DataFormatError(f"{path}: not a readable mask image: {exc}") from exc
    if grey.size != (width, height):
        w0, h0 = grey.size
        if abs(w0 / h0 - width / height) > 0.02:
            raise DataFormatError(f"{path}: mask is {w0}x{h0}, its image {width}x{height} (another aspect ratio)")
        grey = grey.resize((width, height), Image.Resampling.BOX)
    keep = np.asarray(grey, dtype=np.float32) / 255.0 > 0.5
    return np.ascontiguousarray((~keep if invert else keep).astype(np.float32))


def load_alpha(path: Path) -> np.ndarray | None:
    """``[H, W]`` float32 alpha in [0, 1] of an image with an alpha channel, else None."""
    try:
        with Image.open(path) as im:
            im.load()
            if not (im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)):
                return None
            return np.ascontiguousarray(np.asarray(im.convert("RGBA"), dtype=np.float32)[..., 3] / 255.0)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataFormatError(f"{path}: not a readable image: {exc}") from exc


def write_png(image, path: Path) -> None:
    """Write ``image [H, W, 3]`` (or ``[H, W, 4]`` straight RGBA; float in [0, 1], numpy or torch)
    as an 8-bit PNG, atomically."""
    from splatforge._fs import atomic_path

    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp)
