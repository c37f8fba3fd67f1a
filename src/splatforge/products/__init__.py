"""Products of a trained run: render sets with ground truth, depth maps, metrics."""

from splatforge.products.renders import evaluate, lpips_metric, render_split

__all__ = ["evaluate", "lpips_metric", "render_split"]
