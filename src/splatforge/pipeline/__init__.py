"""Pipelines that chain the layers below: prepare (captures -> posed scene)."""

from splatforge.pipeline.prepare import PrepareConfig, prepare

__all__ = ["PrepareConfig", "prepare"]
