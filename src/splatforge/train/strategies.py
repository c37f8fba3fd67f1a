"""Densification strategies: gsplat's, subclassed where splatforge adds behaviour, behind one
interface the trainer calls without knowing which it has.

=========================== ===================================================================
``initialize_state``        the running state (tensors moved to the parameters' device by the
                            trainer, and again after a checkpoint is loaded)
``step_pre_backward``       before ``loss.backward()`` (gsplat's: keep the 2D means' gradient)
``regularization(params)``  a loss term the strategy needs, or None
``step_post_backward(...)`` after the optimiser step: grow, prune, relocate, reset, add noise;
                            ``lr`` is the means' learning rate of the step
``absgrad``                 whether the rasterizer must accumulate absolute 2D gradients
=========================== ===================================================================

- :class:`DefaultStrategy`: gsplat's ``DefaultStrategy`` (3DGS's adaptive density control) plus
  the opacity reset gsplat 1.5.3 means to do but never does (its test ``step % reset_every == 0
  & step > 0`` is a chained comparison with ``0 > 0``).
- :class:`~splatforge.train.mcmc.MCMCStrategy`: gsplat's ``MCMCStrategy`` with a CPU path and
  its trainer's opacity/scale regularisers.
- :class:`NoStrategy` (``--strategy none``): a fixed set of Gaussians (fine-tuning, and the
  equivalence tests of sharded training).

:func:`build_strategy` makes either from the resolved :class:`~splatforge.train.config.TrainConfig`.
Importing this module imports gsplat's Python parts (nothing is compiled).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from gsplat.strategy import DefaultStrategy as _GsplatDefault
from gsplat.strategy.ops import reset_opa
from torch import Tensor

from splatforge.train.config import TrainConfig
from splatforge.train.mcmc import MCMCStrategy

__all__ = ["DefaultStrategy", "MCMCStrategy", "NoStrategy", "build_strategy", "state_to"]


@dataclass
class DefaultStrategy(_GsplatDefault):
    """``gsplat.strategy.DefaultStrategy`` (same fields and meaning) whose opacity reset happens:
    every ``reset_every`` steps before ``refine_stop_iter``, opacities are set to ``2 *
    prune_opa`` and their Adam moments cleared (3DGS, Kerbl et al. 2023, sec. 5.2)."""

    def regularization(self, params) -> Tensor | None:
        return None

    def step_post_backward(
        self, params, optimizers, state: dict[str, Any], step: int, info: dict[str, Any], lr: float = 0.0
    ) -> None:
        super().step_post_backward(params, optimizers, state, step, info, packed=False)
        if 0 < step < self.refine_stop_iter and step % self.reset_every == 0:
            reset_opa(params=params, optimizers=optimizers, state=state, value=self.prune_opa * 2.0)


@dataclass
class NoStrategy:
    """No densification: the Gaussians the run starts with are the ones it ends with (only
    their values are optimised)."""

    absgrad: bool = False

    def check_sanity(self, params, optimizers) -> None:
        return None

    def initialize_state(self, scene_scale: float = 1.0) -> dict[str, Any]:
        return {}

    def step_pre_backward(self, params, optimizers, state, step, info) -> None:
        return None

    def regularization(self, params) -> Tensor | None:
        return None

    def step_post_backward(self, params, optimizers, state, step, info, lr: float = 0.0) -> None:
        return None


def build_strategy(cfg: TrainConfig, cap: int | None = None) -> DefaultStrategy | MCMCStrategy | NoStrategy:
    """The strategy of ``cfg`` (resolved: no ``None`` schedule left), with its fields; ``cap``
    replaces ``cfg.cap`` as MCMC's ``cap_max`` (a shard's share in sharded training)."""
    if cfg.strategy == "none":
        return NoStrategy()
    sub = dataclasses.asdict(cfg.strategy_config())
    if cfg.strategy == "mcmc":
        sub["cap_max"] = cfg.cap if cap is None else cap
        sub["world_unit"] = 1.0 if cfg.world_unit is None else cfg.world_unit
        return MCMCStrategy(**sub)
    return DefaultStrategy(**sub)


def state_to(state: Any, device: torch.device) -> Any:
    """``state`` (nested dicts/lists of tensors and numbers) with every tensor on ``device``."""
    if isinstance(state, Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {k: state_to(v, device) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(state_to(v, device) for v in state)
    return state
