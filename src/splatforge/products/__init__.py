"""Products of a trained run (a :class:`~splatforge.train.Run`) or of splats
(:class:`~splatforge.model.Splats`): render sets with ground truth, depth maps, metrics,
visibility masks, previews, exports, camera metadata."""

from splatforge.products.metrics import lpips_metrics
from splatforge.products.renders import evaluate, render_depth_split, render_split

__all__ = ["evaluate", "lpips_metrics", "render_depth_split", "render_split"]
