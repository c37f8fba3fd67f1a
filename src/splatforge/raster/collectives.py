"""Collectives for training one scene on several processes (torch.distributed, gloo or NCCL).

The one exchange sharded training needs is an **autograd-aware all-to-all** of variable-sized
tensors: after every rank has projected its shard of the Gaussians into every camera of the step,
rank ``r`` sends the slice for rank ``s``'s cameras to ``s`` (gsplat 1.5.3's distributed
rasterization; Zhao et al. 2024, "On Scaling Up 3D Gaussian Splatting Training", Grendel-GS), and
the backward pass sends the gradients back the same way. :func:`all_to_all` is that exchange,
whatever the backend: the group's variable-split ``all_to_all_single`` where the backend has one
(NCCL, MPI, and gloo in torch 2.13, whose list ``all_to_all`` takes only equal sizes), otherwise
the same exchange from point-to-point sends and receives, which every backend has
(:func:`exchange` with ``method="p2p"``; tested to give the same result).

Everything here takes the process group explicitly (``None``: the default group); nothing is
initialised on import. The kernels layer holds it because :func:`splatforge.raster.rasterize`
(``distributed=True``) exchanges through it and may not import the training layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["World", "all_gather_ints", "all_gather_same", "all_to_all", "exchange"]

#: Backends whose process groups implement ``all_to_all_single`` with split sizes.
_NATIVE = ("nccl", "gloo", "mpi")


@dataclasses.dataclass(frozen=True)
class World:
    """Where this process stands among the training processes: ``rank`` of ``size`` (a single
    process is rank 0 of 1), and its process group (None: the default one)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    @classmethod
    def current(cls, group: Any = None) -> World:
        """The default process group's rank and size when torch.distributed is initialised,
        else a world of one."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _native(group: Any) -> bool:
    try:
        return dist.get_backend(group) in _NATIVE
    except (RuntimeError, ValueError):
        return False


def exchange(
    send: Sequence[Tensor],
    recv_sizes: Sequence[int],
    group: Any = None,
    method: Literal["auto", "native", "p2p"] = "auto",
) -> list[Tensor]:
    """Non-differentiable all-to-all: ``send[s]`` goes to rank ``s``; returns ``recv[r]``, what
    rank ``r`` sent here, of ``recv_sizes[r]`` rows.

    Args:
        send: one tensor per rank, ``[n_s, *F]`` (same trailing shape ``F`` and dtype on every
            rank; ``n_s`` may be 0).
        recv_sizes: rows coming from each rank (the senders' ``n`` for this rank).
        method: ``native`` (the group's ``all_to_all_single`` with split sizes), ``p2p``
            (batched isend/irecv pairs), ``auto`` (native where the backend has it).

    Raises:
        ValueError: ``send``/``recv_sizes`` not one per rank, or trailing shapes that differ.
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if len(send) != size or len(recv_sizes) != size:
        raise ValueError(
            f"all_to_all needs one tensor and one size per rank ({size}), got {len(send)} and {len(recv_sizes)}"
        )
    tail, dtype, device = send[0].shape[1:], send[0].dtype, send[0].device
    if any(t.shape[1:] != tail or t.dtype != dtype for t in send):
        raise ValueError("all_to_all: every tensor sent must have the same trailing shape and dtype")
    if method == "native" or (method == "auto" and _native(group)):
        out = torch.empty((sum(int(n) for n in recv_sizes), *tail), dtype=dtype, device=device)
        dist.all_to_all_single(
            out, torch.cat(list(send)), [int(n) for n in recv_sizes], [int(t.shape[0]) for t in send], group=group
        )
        return list(out.split([int(n) for n in recv_sizes]))
    send = [t.contiguous() for t in send]
    recv = [torch.empty((int(n), *tail), dtype=dtype, device=device) for n in recv_sizes]
    recv[rank].copy_(send[rank])
    ops = []
    for peer in range(size):
        if peer == rank:
            continue
        g_peer = dist.get_global_rank(group, peer) if group is not None else peer
        if send[peer].numel():
            ops.append(dist.P2POp(dist.isend, send[peer], g_peer, group))
        if recv[peer].numel():
            ops.append(dist.P2POp(dist.irecv, recv[peer], g_peer, group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return recv


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, group: Any, method: str, recv_sizes: tuple[int, ...], *send: Tensor
    ):
        ctx.group, ctx.method = group, method
        ctx.send_sizes = tuple(int(t.shape[0]) for t in send)
        return tuple(exchange(send, recv_sizes, group, method))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None):  # type: ignore[override]
        grads = tuple(torch.zeros(0) if g is None else g for g in grads)
        back = exchange(grads, ctx.send_sizes, ctx.group, ctx.method)
        return (None, None, None, *back)


def all_to_all(
    send: Sequence[Tensor],
    recv_sizes: Sequence[int],
    group: Any = None,
    method: Literal["auto", "native", "p2p"] = "auto",
) -> list[Tensor]:
    """:func:`exchange`, differentiable: the gradient of ``recv[r]`` goes back to rank ``r`` as
    the gradient of the ``send`` tensor it came from. Every rank must call it, also with nothing
    to send, and every rank must then run the backward pass (a collective in both directions)."""
    return list(_AllToAll.apply(group, method, tuple(int(n) for n in recv_sizes), *send))


def all_gather_ints(value: int, group: Any = None, device: torch.device | str = "cpu") -> list[int]:
    """``value`` of every rank, in rank order (``device``: where the group's tensors live, the
    rank's CUDA device for NCCL)."""
    return [int(v) for v in all_gather_same(torch.tensor(int(value), dtype=torch.int64, device=device), group)]


def all_gather_same(tensor: Tensor, group: Any = None) -> Tensor:
    """Every rank's ``tensor`` (one shape on all ranks) stacked along a new first axis in rank
    order, ``[size, *shape]``; not differentiable."""
    size = dist.get_world_size(group)
    out = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return torch.stack(out)
