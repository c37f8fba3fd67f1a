"""This process's shard of a run's Gaussians in sharded training, and what moves them between ranks.

Launched by torchrun, each rank owns a contiguous slice of the Gaussians in one global order (the
shards concatenated in rank order; it starts as the initial set's order): their parameters, Adam
moments and per-Gaussian strategy state. :class:`ShardSet` is the trainer's view of that split: it
cuts the initial set, gathers the whole run (for products and for checkpoints, which hold the run
in the global order and resume on any number of ranks), takes a rank's part of a loaded checkpoint,
evens the shards out when they drift apart and counts the run's Gaussians. In a single process
(a world of one) every method works on the whole set and runs no collective.

The row exchanges themselves are in :mod:`splatforge.train.distributed`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from splatforge.model import Splats
from splatforge.raster.collectives import World, all_gather_same
from splatforge.train.distributed import (
    all_gather_rows,
    even_sizes,
    gather_rows,
    move_rows,
    needs_rebalance,
    offsets,
    per_gaussian,
    shard_sizes,
)

log = logging.getLogger(__name__)

__all__ = ["PARAM_KEYS", "ShardSet"]

#: The optimised parameters (one Adam each), in the order they are gathered and moved.
PARAM_KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")

#: Per-Gaussian parameters by name (``[n, ...]`` each, n this rank's count).
Params = Mapping[str, torch.Tensor]


class ShardSet:
    """This rank's contiguous slice of the run's Gaussians among the ranks of ``world``.

    It holds no tensors: the trainer's parameters, optimizers and strategy state are passed to
    each method (every per-Gaussian tensor has this rank's count of rows). Methods marked as
    collectives must be called by every rank, in the same order.

    Args:
        world: the training processes (a world of one: a single process).
        device: the trainer's device; the process group's tensors live there under NCCL (CUDA)
            and on the CPU under gloo.

    Attributes:
        world_count: the run's Gaussian count, every shard's, as of the last :meth:`take`,
            :meth:`rebalance` (each sharded step) or :meth:`local_part`.
    """

    def __init__(self, world: World, device: torch.device):
        self.world = world
        self.device = device
        self.world_count = 0

    @property
    def distributed(self) -> bool:
        """Whether the run is sharded (more than one rank)."""
        return self.world.distributed

    @property
    def group_device(self) -> torch.device:
        """Where the process group's tensors live (NCCL: the rank's GPU; gloo: the CPU)."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    @contextlib.contextmanager
    def rank0_first(self) -> Iterator[None]:
        """Run the block on rank 0 before the other ranks (a no-op in a single process; a
        collective)."""
        import torch.distributed as dist

        if self.distributed and self.world.rank != 0:
            dist.barrier(group=self.world.group)
        yield
        if self.distributed and self.world.rank == 0:
            dist.barrier(group=self.world.group)

    def take(self, splats: Splats) -> Splats:
        """This rank's part of the run's initial Gaussians ``splats``: even contiguous shards in
        rank order (:func:`~splatforge.train.distributed.even_sizes`), so the global order stays
        the initial one; all of them in a single process. Sets :attr:`world_count`."""
        self.world_count = len(splats)
        if not self.distributed:
            return splats
        sizes = even_sizes(len(splats), self.world.size)
        lo = offsets(sizes)[self.world.rank]
        return splats.select(np.arange(lo, lo + sizes[self.world.rank]))

    def num_gaussians(self, n_local: int) -> int:
        """The run's Gaussian count given this rank's ``n_local``: :attr:`world_count` in
        sharded training (as of the last step), ``n_local`` in a single process."""
        return self.world_count if self.distributed else n_local

    def sizes(self, n_local: int) -> list[int]:
        """Every rank's shard size, this rank's being ``n_local`` (a collective)."""
        return shard_sizes(n_local, self.world, self.group_device)

    def full_splats(self, params: Params) -> Splats:
        """All the run's Gaussians, detached, in the global order, on every rank (a collective;
        ``params``: this rank's, by name as in :data:`PARAM_KEYS`)."""
        if not self.distributed:
            return Splats.from_mapping(params).detach()
        sizes = self.sizes(len(params["means"]))
        return Splats.from_mapping({k: all_gather_rows(params[k].detach(), sizes, self.world) for k in PARAM_KEYS})

    def world_views(self, views: list[int]) -> list[int]:
        """The step's views of every rank in rank order (each rank's ``views`` the same length;
        a collective); ``views`` in a single process."""
        if not self.distributed:
            return views
        mine = torch.tensor(views, dtype=torch.int64, device=self.group_device)
        return [int(v) for v in all_gather_same(mine, self.world.group).flatten()]

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place (a collective; nothing in a single process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, group=self.world.group)

    # ------------------------------------------------------------ checkpoints
    def checkpoint_state(
        self,
        params: Params,
        optimizers: Mapping[str, torch.optim.Optimizer],
        strategy_state: dict[str, Any],
        strategy_rng: torch.Tensor,
    ) -> dict[str, Any] | None:
        """The Gaussians' part of a checkpoint, CPU tensors in the global order: ``params``,
        ``optimizers`` (their ``state_dict()``s) and ``strategy_state``; in sharded training
        (a collective) also ``strategy_rngs`` (every rank's ``strategy_rng`` state, in rank
        order) and ``shard_sizes``, gathered to rank 0; the other ranks get None."""
        from splatforge.train.strategies import state_to

        if not self.distributed:
            return {
                "params": {k: v.detach().cpu().clone() for k, v in params.items()},
                "optimizers": {k: opt.state_dict() for k, opt in optimizers.items()},
                "strategy_state": state_to(strategy_state, torch.device("cpu")),
            }
        n = len(params["means"])
        sizes = self.sizes(n)

        def rows(t: torch.Tensor) -> torch.Tensor | None:
            out = gather_rows(t.detach(), sizes, self.world)
            return None if out is None else out.cpu()

        gathered_params = {k: rows(v) for k, v in params.items()}
        gathered_opts = {}
        for k, opt in optimizers.items():
            sd = opt.state_dict()  # its per-parameter dicts are the optimizer's own: copy, never assign into them
            state = {
                i: {name: rows(v) if name in per_gaussian(st, n) else v for name, v in st.items()}
                for i, st in sd["state"].items()
            }
            gathered_opts[k] = {**sd, "state": state}
        gathered_strategy = state_to(strategy_state, torch.device("cpu"))
        for name in per_gaussian(strategy_state, n):
            gathered_strategy[name] = rows(strategy_state[name])
        rngs = all_gather_same(strategy_rng.to(self.group_device), self.world.group).cpu()
        if self.world.rank != 0:
            return None
        return {
            "params": gathered_params,
            "optimizers": gathered_opts,
            "strategy_state": gathered_strategy,
            "strategy_rngs": [t.clone() for t in rngs],  # each its own storage: set_rng_state takes no views
            "shard_sizes": sizes,
        }

    def local_part(self, ckpt: dict[str, Any], fresh_rng: Callable[[int], torch.Tensor]) -> dict[str, Any]:
        """This rank's part of a whole-run checkpoint ``ckpt`` (one of any world size, or of a
        single process): its rows of every per-Gaussian tensor (the saved ``shard_sizes`` when
        the world has the same size, else even shards) and its own ``strategy_rng``
        (``fresh_rng(step)`` on another world size); ``ckpt`` itself in a single process. Sets
        :attr:`world_count` to the checkpoint's count. No collective."""
        N, W = len(ckpt["params"]["means"]), self.world.size
        self.world_count = N
        if not self.distributed:
            return ckpt
        sizes = list(ckpt.get("shard_sizes") or [])
        if len(sizes) != W or sum(sizes) != N:
            sizes = even_sizes(N, W)
        lo, n = offsets(sizes)[self.world.rank], sizes[self.world.rank]

        def part(v: Any) -> Any:
            return v[lo : lo + n] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == N else v

        out = dict(ckpt)
        out["params"] = {k: part(v) for k, v in ckpt["params"].items()}
        out["optimizers"] = {
            k: {**sd, "state": {i: {name: part(v) for name, v in st.items()} for i, st in sd["state"].items()}}
            for k, sd in ckpt["optimizers"].items()
        }
        out["strategy_state"] = {k: part(v) for k, v in ckpt["strategy_state"].items()}
        rngs = ckpt.get("strategy_rngs") or []
        out["strategy_rng"] = rngs[self.world.rank].clone() if len(rngs) == W else fresh_rng(int(ckpt["step"]))
        return out

    # ------------------------------------------------------------ balance
    def rebalance(
        self,
        params: torch.nn.ParameterDict,
        optimizers: Mapping[str, torch.optim.Optimizer],
        strategy_state: dict[str, Any],
    ) -> None:
        """Update :attr:`world_count` and even the shards out when their sizes drift apart by
        more than 10 % (:data:`~splatforge.train.distributed.REBALANCE_DRIFT`): the rows that
        cross the new boundaries move, with their Adam moments and strategy state, keeping the
        global order. ``params``, the optimizers and ``strategy_state`` are updated in place
        (new Parameters, registered with their optimizers). A collective."""
        n = len(params["means"])
        sizes = self.sizes(n)
        self.world_count = sum(sizes)
        if not needs_rebalance(sizes):
            return
        target = even_sizes(sum(sizes), self.world.size)
        log.debug("rebalancing shards %s -> %s", sizes, target)

        def move(t: torch.Tensor) -> torch.Tensor:
            return move_rows(t, sizes, target, self.world)

        for k in PARAM_KEYS:
            opt, old = optimizers[k], params[k]
            new = torch.nn.Parameter(move(old.detach()), requires_grad=old.requires_grad)
            st = opt.state.pop(old, {})
            opt.state[new] = {name: move(v) if name in per_gaussian(st, n) else v for name, v in st.items()}
            opt.param_groups[0]["params"] = [new]
            params[k] = new
        for name in per_gaussian(strategy_state, n):
            strategy_state[name] = move(strategy_state[name])

    def memory_report(self, params: Params, optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, Any]:
        """This process's memory: ``rank``, ``num_gaussians`` (this shard's), ``param_bytes``
        (its Gaussians' parameters and Adam moments: 1/N of the run's on each of N ranks),
        ``peak_rss_bytes`` (the process's peak resident set) and, on CUDA, ``cuda_peak_bytes``
        (torch's peak allocation on the device). No collective."""
        import resource

        moments = [v for opt in optimizers.values() for st in opt.state.values() for v in st.values()]
        tensors = list(params.values()) + [v for v in moments if isinstance(v, torch.Tensor)]
        out = {
            "rank": self.world.rank,
            "num_gaussians": len(params["means"]),
            "param_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        if self.device.type == "cuda":
            out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return out
