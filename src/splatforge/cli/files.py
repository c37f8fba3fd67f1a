"""``export``, ``preview``, ``view`` and ``backends``: splat files, pictures and viewers."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from splatforge.cli.common import STDERR

# ------------------------------------------------------------------------ exports and viewing


@dataclass
class ExportCommand:
    """Export a run (its latest point cloud) or a .ply/.splat/.spz file to ply, splat, spz or sog."""

    source: tyro.conf.Positional[Path]
    """Run folder or splat file."""
    output: Path
    """File to write; its suffix picks the format unless --format is given."""
    format: Literal["ply", "splat", "spz", "sog"] | None = None
    """ply (Inria), splat (antimatter15, byte-identical to ply2splat's), spz (Niantic), sog (PlayCanvas)."""
    transform: Literal["identity", "opengl", "splatter"] | None = None
    """Named rotation from the COLMAP/OpenCV frame: opengl (y up, three.js/Spark), splatter (Rz(-90 deg))."""
    rotate: str | None = None
    """Extra rotation "x,y,z" in degrees (about the fixed world axes, x first)."""
    matrix: Path | None = None
    """4x4 or 3x4 similarity matrix file (.npy or text), applied after the rotations."""
    scale: float = 1.0
    """Uniform scale applied last (means and scales)."""
    prune_opacity: float = 1 / 255
    """Drop Gaussians whose activated opacity is below this."""
    crop: tuple[float, float, float, float, float, float] | None = None
    """Keep means inside xmin ymin zmin xmax ymax zmax (after the transform)."""
    spz_version: Literal[2, 3, 4] = 3
    """SPZ version (3 is what most viewers read; 4 uses zstd)."""

    def main(self) -> None:
        from splatforge.products.export import build_transform, export

        sim = build_transform(self.transform, self.rotate, self.matrix, self.scale)
        print(
            json.dumps(
                export(
                    self.source,
                    self.output,
                    self.format,
                    transform=sim,
                    prune_opacity=self.prune_opacity,
                    crop_box=self.crop,
                    spz_version=self.spz_version,
                ),
                indent=2,
            )
        )


def _cameras_beside(source: Path):
    """``(camtoworlds, Ks, sizes)`` from the ``cameras.json`` of a run folder or beside a file."""
    from splatforge.io.cameras import read_cameras_json

    cams = source / "cameras.json" if source.is_dir() else source.parent / "cameras.json"
    if not cams.exists():
        return None, None, None
    c2w, Ks, _, sizes = read_cameras_json(cams)
    return c2w, Ks, sizes


@dataclass
class PreviewCommand:
    """Write preview_top.jpg and preview_angle.jpg (and preview_orbit.mp4) of a run or splat file."""

    source: tyro.conf.Positional[Path]
    """Run folder (its cameras.json gives the up axis) or .ply/.splat/.spz file."""
    output: Path | None = None
    """Folder for the images (default: the run folder, or the file's folder)."""
    size: int = 1024
    """Image side in pixels."""
    orbit: bool = False
    """Also write a 360 degree orbit video."""

    def main(self) -> None:
        from splatforge.products.export import load_splats
        from splatforge.products.previews import write_previews

        source = Path(self.source)
        splats = load_splats(source)
        c2w, Ks, sizes = _cameras_beside(source)
        image_size = (int(sizes[0, 0]), int(sizes[0, 1])) if sizes is not None else None
        out = self.output or (source if source.is_dir() else source.parent)
        print(
            json.dumps(
                write_previews(
                    splats, out, camtoworlds=c2w, Ks=Ks, image_size=image_size, size=self.size, orbit=self.orbit
                ),
                indent=2,
            )
        )


@dataclass
class ViewCommand:
    """Open a run or a .ply/.splat/.spz file in a browser viewer (viser), with the run's cameras."""

    source: tyro.conf.Positional[Path]
    """Run folder or splat file."""
    host: str = "127.0.0.1"
    """Interface to serve on (0.0.0.0 for other machines)."""
    port: int = 8080

    def main(self) -> None:
        from splatforge.products.export import load_splats
        from splatforge.viewer import SplatViewer

        splats = load_splats(self.source)
        c2w, Ks, sizes = _cameras_beside(Path(self.source))
        live = SplatViewer(self.host, self.port, camtoworlds=c2w, Ks=Ks, sizes=sizes)
        live.set_splats(splats)
        STDERR.print(f"viewer: http://{self.host}:{live.port}  ({len(splats):,} Gaussians; Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            live.close()


@dataclass
class BackendsCommand:
    """List the rasterizer backends usable on this machine (never builds gsplat)."""

    def main(self) -> None:
        import torch

        from splatforge.raster import available_backends

        print("cpu tensors: ", ", ".join(available_backends("cpu")))
        print("cuda tensors:", ", ".join(available_backends("cuda")) if torch.cuda.is_available() else "no CUDA device")
