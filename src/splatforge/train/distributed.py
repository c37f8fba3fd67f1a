"""Sharded training of one scene on several processes: set-up, shards, launching.

Each rank owns a contiguous slice of the run's Gaussians in one global order (parameters, their
Adam moments and the strategy's per-Gaussian state together), renders its own views of the step
and gets the projected Gaussians of the other shards through
:func:`splatforge.raster.rasterize` (``distributed=True``). This module holds what the trainer
needs around that:

- :func:`init_from_env`: join the process group torchrun describes (``WORLD_SIZE``, ``RANK``,
  ``LOCAL_RANK``): NCCL on CUDA, gloo on the CPU, and the rank's device;
- :func:`even_sizes`, :func:`gather_rows`, :func:`move_rows`: shard sizes and moving rows of
  per-Gaussian tensors between ranks (checkpoints gather them to rank 0 in the global order;
  rebalancing moves the rows that cross a new shard boundary);
- :func:`launch`: ``splatforge train --nproc N`` as ``torchrun --standalone --nproc-per-node N``.

The initial shards are contiguous slices of the initial set, so the global order (the shards
concatenated in rank order) starts as a single process's. gsplat's trainer strides them
(``r, r + W, ...``) so each covers the whole scene, but every rank projects its shard into every
camera of the step, so where a shard's Gaussians lie does not change its work; and with the same
order, equal depths are composited in the same order as in one process (the tile lists break
ties by index), which keeps sharded training equal to single-process training bit for bit with a
fixed set of Gaussians (strided shards differed by 6e-5 in a render after one step).
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from splatforge.errors import ConfigError
from splatforge.model.gaussians import per_gaussian
from splatforge.raster.collectives import World, all_gather_ints, exchange

log = logging.getLogger(__name__)

__all__ = [
    "REBALANCE_DRIFT",
    "SHARD_ALIGN",
    "all_gather_rows",
    "broadcast_object",
    "even_sizes",
    "finish",
    "gather_objects",
    "gather_rows",
    "init_from_env",
    "launch",
    "move_rows",
    "needs_rebalance",
    "offsets",
    "per_gaussian",
    "shard_sizes",
]

#: Shards are evened out when the largest and the smallest differ by more than this fraction of
#: their mean.
REBALANCE_DRIFT = 0.10


def init_from_env(device: str, timeout_s: float = 600.0) -> tuple[World, str]:
    """Join the process group torchrun's environment describes, once per process.

    Returns ``(world, device)``: a world of one and ``device`` unchanged when ``WORLD_SIZE`` is
    unset or 1; otherwise the initialised world and the rank's device (``cuda:LOCAL_RANK`` for a
    CUDA device, NCCL; ``cpu``, gloo, with the compiled kernels' threads divided among the
    processes of the machine). ``timeout_s`` bounds a collective's wait for a rank that is gone.

    Raises:
        ConfigError: a CUDA run with fewer visible GPUs than processes on this machine.
    """
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    if device.startswith("cuda"):
        if torch.cuda.device_count() < local_size:
            raise ConfigError(f"{local_size} processes on this machine but {torch.cuda.device_count()} CUDA devices")
        device, backend = f"cuda:{local_rank}", "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = "cpu", "gloo"
        import numba

        numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, (os.cpu_count() or 1) // local_size)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    world = World.current()
    log.info("rank %d of %d on %s (%s)", world.rank, world.size, device, backend)
    return world, device


#: Shard boundaries fall on multiples of this many Gaussians (see :func:`even_sizes`).
SHARD_ALIGN = 64


def finish(world: World) -> None:
    """Leave the process group (after the last collective of every rank): a gloo group left to
    the interpreter's exit can abort the process (SIGABRT) after point-to-point exchanges.

    A barrier first: gloo's worker threads drop a finished collective's tensors only after the
    caller has moved on, and when a tensor's Python object goes with them the thread takes the
    GIL, which an exiting interpreter no longer gives (SIGABRT from the ``AsyncAllgatherWork``
    destructor in ``ProcessGroupGloo::runLoop``, seen in CI right after training). The barrier's
    round trip outlasts that release, and its own work holds no Python tensors."""
    import torch.distributed as dist

    if world.distributed and dist.is_initialized():
        dist.barrier(group=world.group)
        dist.destroy_process_group(world.group)


def even_sizes(total: int, size: int, align: int = SHARD_ALIGN) -> list[int]:
    """Shard sizes of ``total`` rows over ``size`` ranks, as even as boundaries at multiples of
    ``align`` allow (the last rank takes the rest). The compiled kernels vectorise their loops
    over Gaussians, and LLVM's vector body and scalar remainder may round differently: with
    aligned boundaries every Gaussian keeps the lane position it has in one process, so a fixed
    set trains bit for bit as a single process would (boundaries at 10,953 gave 1-ulp render
    differences after three steps)."""
    total, size = int(total), int(size)
    bounds = [0] + [(total * r // size) // align * align for r in range(1, size)] + [total]
    return [b - a for a, b in itertools.pairwise(bounds)]


def offsets(sizes: Sequence[int]) -> list[int]:
    """Start of each shard in the global order."""
    out, acc = [], 0
    for n in sizes:
        out.append(acc)
        acc += int(n)
    return out


def needs_rebalance(sizes: Sequence[int], drift: float = REBALANCE_DRIFT) -> bool:
    """True when the shards' sizes spread by more than ``drift`` of their mean."""
    mean = sum(sizes) / len(sizes)
    return mean > 0 and (max(sizes) - min(sizes)) > drift * mean


def gather_rows(t: Tensor, sizes: Sequence[int], world: World, dst: int = 0) -> Tensor | None:
    """Every rank's rows of ``t`` (``[sizes[rank], ...]``) concatenated in rank order on rank
    ``dst`` (None on the others); every rank must call it."""
    send = [t if s == dst else t[:0] for s in range(world.size)]
    recv = exchange(send, [int(n) if world.rank == dst else 0 for n in sizes], world.group)
    return torch.cat(recv) if world.rank == dst else None


def all_gather_rows(t: Tensor, sizes: Sequence[int], world: World) -> Tensor:
    """Every rank's rows of ``t`` concatenated in rank order, on every rank (a collective)."""
    return torch.cat(exchange([t] * world.size, [int(n) for n in sizes], world.group))


def move_rows(t: Tensor, now: Sequence[int], target: Sequence[int], world: World) -> Tensor:
    """This rank's rows of ``t`` after moving the shard boundaries from sizes ``now`` to
    ``target`` (same total), keeping the global order: each rank sends the rows that fall in
    another rank's new range to it. Every rank must call it."""
    if sum(now) != sum(target):
        raise ValueError(f"move_rows: sizes {list(now)} and {list(target)} hold different totals")
    mine_lo = offsets(now)[world.rank]
    send, recv_sizes = [], []
    for s, (lo, n) in enumerate(zip(offsets(target), target)):
        a, b = max(lo, mine_lo), min(lo + n, mine_lo + now[world.rank])
        send.append(t[a - mine_lo : b - mine_lo] if b > a else t[:0])
    t_lo = offsets(target)[world.rank]
    for r, (lo, n) in enumerate(zip(offsets(now), now)):
        a, b = max(lo, t_lo), min(lo + n, t_lo + target[world.rank])
        recv_sizes.append(max(0, b - a))
    return torch.cat(exchange(send, recv_sizes, world.group))


def shard_sizes(n_local: int, world: World, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's shard size (one small collective)."""
    if not world.distributed:
        return [int(n_local)]
    return all_gather_ints(n_local, world.group, device)


def broadcast_object(obj: Any, world: World, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, group=world.group)
    return box[0]


def gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj, group=world.group)
    return out


def launch(nproc: int, argv: Sequence[str], capture_stdout: bool = False) -> tuple[int, str]:
    """Run ``splatforge`` with ``argv`` on ``nproc`` processes of this machine through torchrun
    (``--standalone``: a rendezvous on a free local port); returns its exit code and, with
    ``capture_stdout``, what the processes printed on stdout (their logs and progress go to
    stderr as they come). When a process fails, torchrun stops the others; the caller reports it
    once.

    Raises:
        ConfigError: ``nproc`` < 1.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "splatforge",
        *argv,
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    proc = subprocess.run(cmd, env=env, check=False, stdout=subprocess.PIPE if capture_stdout else None, text=True)
    return proc.returncode, proc.stdout or ""
