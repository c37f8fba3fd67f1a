"""Scenes: readers for COLMAP and transforms.json, splits, images."""

from splatforge.data.load import detect_format, load_scene
from splatforge.data.scene import SceneData, make_split

__all__ = ["SceneData", "detect_format", "load_scene", "make_split"]
