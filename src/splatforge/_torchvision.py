"""torchvision beside the installed torch, for LPIPS (torchmetrics) and transformers (depth priors).

torchvision must be the build that pairs with the installed torch (``torchvision==0.28.0`` with
``torch==2.13.0``). PyPI's 0.28.0 wheel is the CUDA build: beside the CPU torch its compiled ops
cannot load and its import stops on an unguarded fake-kernel registration for two detection ops
(``torchvision::nms``, ``qnms``). :func:`import_torchvision` then declares those two operator
schemas, without kernels, and imports it again: the model zoo LPIPS needs is pure Python and
works; the detection ops stay unavailable, as they already were. As torchmetrics imports
torchvision whenever it is installed, every torchmetrics or transformers import goes through
:func:`ensure_torchvision_importable` first.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["ensure_torchvision_importable", "import_torchvision"]

_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_shim_library = None


def ensure_torchvision_importable() -> bool:
    """Make ``import torchvision`` (and so ``import torchmetrics``, which imports it when it is
    installed) work beside a torch its compiled ops do not fit: if its ``_C`` extension does not
    load, declare the two operator schemas its import registers fake kernels for (see the module
    docstring). Call before importing torchmetrics or torchvision; returns whether torchvision is
    installed. Does nothing when it is already imported or its ops load."""
    global _shim_library
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    if "torchvision" in sys.modules or _shim_library is not None:
        return True
    try:
        torch.ops.load_library(str(next(Path(spec.origin).parent.glob("_C*.so"))))
        return True
    except (OSError, StopIteration):
        pass
    _shim_library = torch.library.Library("torchvision", "FRAGMENT")  # kept alive: the schemas live as long as it
    for schema in _TORCHVISION_SCHEMAS.values():
        _shim_library.define(schema)
    log.info(
        "torchvision's compiled ops do not load beside this torch (a CUDA wheel on a CPU torch): "
        "its detection ops are unavailable, its models work"
    )
    return True


def import_torchvision():
    """``import torchvision`` after :func:`ensure_torchvision_importable`.

    Raises:
        ImportError: torchvision is missing or fails to import.
    """
    if not ensure_torchvision_importable():
        raise ImportError("torchvision is not installed")
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:
        raise ImportError(f"torchvision does not import: {exc}") from exc
