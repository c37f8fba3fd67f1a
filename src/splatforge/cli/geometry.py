"""``depth-prior``, ``mesh`` and ``mesh-eval``: depth priors and meshes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import tyro
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from splatforge.cli.common import STDERR
from splatforge.products.mesh import MeshConfig


@dataclass
class DepthPriorCommand:
    """Monocular depth priors for a scene: Depth Anything's relative inverse depth per image, fitted
    to the SfM points, in Inria's layout (OUTPUT/<image stem>.png, 16-bit, and
    OUTPUT/depth_params.json); train with --depth-prior OUTPUT."""

    scene: tyro.conf.Positional[Path]
    """Scene folder (COLMAP or transforms.json); never written to."""
    output: Path = tyro.MISSING
    """Folder for the maps and depth_params.json (replaced as a whole when it exists)."""
    model: str = "depth-anything/Depth-Anything-V2-Small-hf"
    """Hugging Face id or local folder of a Depth Anything model (Small: Apache-2.0; Base/Large:
    -Base-hf/-Large-hf, CC-BY-NC-4.0)."""
    data_factor: int | None = None
    """Read images_<k> (default: images/, else the smallest images_<k> there is)."""
    device: str = "auto"
    """torch device for the model: auto, cpu or cuda[:i]."""

    def main(self) -> None:
        from splatforge.data import load_scene
        from splatforge.data.depth import make_depth_priors
        from splatforge.data.load import image_folders
        from splatforge.train.config import resolve_device

        factor = self.data_factor
        if factor is None:
            factor = min(image_folders(self.scene)[1] or {1: None})
        scene = load_scene(
            self.scene, data_factor=factor, test_every=0, cache_dir=self.output.parent / f".{self.output.name}.cache"
        )
        with Progress(
            TextColumn("[bold]depth"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=STDERR,
        ) as bar:
            task = bar.add_task("depth", total=len(scene))
            fits = make_depth_priors(
                scene,
                self.output,
                self.model,
                device=resolve_device(self.device),
                progress=lambda i, n: bar.update(task, completed=i),
            )
        scales = [f.scale for f in fits.values() if f.scale > 0]
        print(
            json.dumps(
                {
                    "output": str(self.output),
                    "images": len(fits),
                    "fitted": len(scales),
                    "median_scale": float(sorted(scales)[len(scales) // 2]) if scales else None,
                },
                indent=2,
            )
        )


@dataclass
class MeshCommand(MeshConfig):
    """A coloured triangle mesh of a trained run: its rendered depth of the training views fused
    into a TSDF (Open3D), in the scene's own world frame and units. Writes the PLY, a JSON of the
    settings used and two pictures (<stem>_top.jpg, <stem>_angle.jpg) beside it."""

    run: tyro.conf.Positional[Path] = tyro.MISSING
    """Run folder written by `splatforge train`."""
    output: Path | None = None
    """Mesh file (default RUN/exports/mesh.ply)."""
    pictures: bool = True
    """Picture the mesh (its vertices drawn by splatforge's rasterizer, shaded)."""
    device: str | None = None
    """torch device (default: the run's, or cpu)."""

    def main(self) -> None:
        from splatforge.products.mesh import mesh_run
        from splatforge.train import Run

        run = Run.open(self.run, device=self.device)
        cfg = MeshConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MeshConfig)})
        with Progress(
            TextColumn("[bold]fuse"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=STDERR,
        ) as bar:
            task = bar.add_task("fuse", total=None)
            info = mesh_run(
                run,
                self.output or run.path / "exports" / "mesh.ply",
                cfg,
                pictures=self.pictures,
                progress=lambda i, n: bar.update(task, completed=i, total=n),
            )
        print(json.dumps(info, indent=2))


@dataclass
class MeshEvalCommand:
    """Precision, recall and F-score of a mesh against a reference mesh or point cloud at distance
    TAU (Tanks and Temples' definition), written as JSON."""

    mesh: tyro.conf.Positional[Path]
    reference: tyro.conf.Positional[Path]
    tau: float | None = None
    """Distance threshold in world units (default: 0.5 % of the diagonal of the reference's
    1st-99th percentile box)."""
    samples: int = 1_000_000
    """Points sampled uniformly on each mesh."""
    output: Path | None = None
    """JSON file (default: MESH with the suffix .eval.json)."""

    def main(self) -> None:
        from splatforge._fs import atomic_path
        from splatforge.products.mesh import default_tau, mesh_metrics, read_geometry

        pts, ref = read_geometry(self.mesh, self.samples), read_geometry(self.reference, self.samples)
        tau = self.tau if self.tau is not None else default_tau(ref)
        result = {
            "mesh": str(self.mesh),
            "reference": str(self.reference),
            **mesh_metrics(pts, ref, tau),
            "tau_rule": "given" if self.tau is not None else "0.005 x diagonal of the reference's 1-99 % box",
        }
        out = self.output or self.mesh.with_suffix(".eval.json")
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
