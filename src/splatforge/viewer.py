"""A browser viewer through viser (its Gaussian-splat scene node), with the training cameras.

``splatforge view RUN|PLY|SPLAT|SPZ`` serves the splats at ``http://HOST:PORT``; ``train
--viewer`` shows the Gaussians while they train (refreshed every few seconds). viser draws the
degree-0 colour (``0.5 + SH_C0 * sh0``) of each Gaussian; view-dependent bands are not shown.
viser is an optional dependency (``pip install "splatforge[viewer]"``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

import numpy as np
import torch

from splatforge.errors import BackendUnavailableError
from splatforge.geometry.quats import quat_scale_to_covar
from splatforge.geometry.sh import SH_C0
from splatforge.model import Splats

log = logging.getLogger(__name__)

__all__ = ["SplatViewer"]


class SplatViewer:
    """A viser server showing one splat scene and, optionally, its cameras.

    Args:
        host, port: where to serve (``0.0.0.0`` to reach it from other machines).
        camtoworlds: ``[N, 4, 4]`` training cameras (OpenCV axes) to draw as frustums; their
            mean up vector sets the viewer's up direction.
        Ks: ``[N, 3, 3]`` intrinsics (pixels) for the frustums' field of view.
        sizes: ``[N, 2]`` image (width, height) for the frustums' aspect.

    Raises:
        BackendUnavailableError: viser is not installed.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        camtoworlds: np.ndarray | None = None,
        Ks: np.ndarray | None = None,
        sizes: np.ndarray | None = None,
    ):
        try:
            import viser
        except ImportError as exc:
            raise BackendUnavailableError('the viewer needs viser: pip install "splatforge[viewer]"') from exc
        from splatforge.products.previews import estimate_up

        with contextlib.redirect_stdout(sys.stderr):  # viser prints a banner; stdout carries results only
            self.server = viser.ViserServer(host=host, port=port, verbose=False)
        self.port = self.server.get_port()
        self._last_update = 0.0
        self._home = None
        self._up = estimate_up(camtoworlds)
        self.server.scene.set_up_direction(tuple(float(v) for v in self._up))
        if camtoworlds is not None:
            self._add_cameras(np.asarray(camtoworlds), Ks, sizes)

    def _add_cameras(self, camtoworlds: np.ndarray, Ks: np.ndarray | None, sizes: np.ndarray | None) -> None:
        from splatforge.geometry.transform import rotmat_to_quat

        centres = camtoworlds[:, :3, 3]
        extent = float(np.linalg.norm(centres - centres.mean(0), axis=1).mean()) if len(centres) > 1 else 1.0
        for i, c2w in enumerate(camtoworlds):
            w, h = sizes[i] if sizes is not None else (4, 3)
            fy = Ks[i][1, 1] if Ks is not None else h
            self.server.scene.add_camera_frustum(
                f"/cameras/{i:05d}",
                fov=float(2 * np.arctan(h / (2 * fy))),
                aspect=float(w / h),
                scale=0.05 * extent,
                wxyz=rotmat_to_quat(c2w[:3, :3]),
                position=c2w[:3, 3],
                color=(255, 160, 0),
            )

    def set_splats(self, splats: Splats | dict) -> None:
        """Show ``splats`` (:class:`~splatforge.model.Splats`, numpy or torch: log scales, logit
        opacities), replacing what was shown."""
        splats = Splats.from_mapping(splats).numpy()
        a = splats.torch(dtype=torch.float64).activated(0)
        rgb = np.clip(0.5 + SH_C0 * splats.sh0.reshape(-1, 3), 0, 1)
        cov = quat_scale_to_covar(a.quats, a.scales).numpy()
        self.server.scene.add_gaussian_splats(
            "/splats",
            centers=splats.means,
            covariances=cov.astype(np.float32),
            rgbs=rgb,
            opacities=a.opacities.numpy().astype(np.float32).reshape(-1, 1),
        )
        if self._home is None:
            self._frame_scene(splats)
        self._last_update = time.monotonic()

    def _frame_scene(self, splats: dict[str, np.ndarray]) -> None:
        """New browser tabs start at the preview's elevated corner view, framing the scene."""
        from splatforge.products.previews import preview_cameras, scene_frame

        try:
            frame = scene_frame(splats, self._up)
        except ValueError:
            return
        viewmat = preview_cameras(frame, 512)["angle"][0]
        eye = -viewmat[:3, :3].T @ viewmat[:3, 3]
        self._home = (tuple(float(v) for v in eye), tuple(float(v) for v in frame.center))

        @self.server.on_client_connect
        def _(client) -> None:
            client.camera.position, client.camera.look_at = self._home
            client.camera.up_direction = tuple(float(v) for v in self._up)

    def maybe_update(self, splats_fn, every_s: float = 3.0) -> None:
        """Call ``splats_fn()`` and show its result if ``every_s`` seconds passed since the last
        update (cheap to call every training step)."""
        if time.monotonic() - self._last_update >= every_s:
            self.set_splats(splats_fn())

    def close(self) -> None:
        self.server.stop()
