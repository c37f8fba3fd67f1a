"""Math shared by every layer: camera conventions, quaternions and spherical harmonics."""

from splatforge.geometry.cameras import look_at
from splatforge.geometry.quats import quat_scale_to_covar, quat_to_rotmat
from splatforge.geometry.sh import SH_C0, eval_sh, num_sh_bases, rgb_to_sh, sh_bases, sh_to_rgb

__all__ = [
    "SH_C0",
    "eval_sh",
    "look_at",
    "num_sh_bases",
    "quat_scale_to_covar",
    "quat_to_rotmat",
    "rgb_to_sh",
    "sh_bases",
    "sh_to_rgb",
]
