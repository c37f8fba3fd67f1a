"""The local pool's slots: GPUs by NVML (following ``CUDA_VISIBLE_DEVICES``) or shares of the
cores, and the environment a job gets on one."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ devices


@dataclass
class Slot:
    """Where a job runs: ``gpu`` index (``CUDA_VISIBLE_DEVICES``) or None for CPU."""

    label: str
    gpu: int | None = None
    threads: int = 1


def visible_gpu_entries() -> list[str] | None:
    """The entries of this process's ``CUDA_VISIBLE_DEVICES`` the CUDA runtime would use, or
    None when it is unset (every GPU visible). As CUDA does, the list ends at the first empty or
    negative entry, so ``""`` and ``"-1"`` hide every GPU."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return entries


def _is_visible(index: int, uuid: str, entries: list[str] | None) -> bool:
    """Whether NVML's GPU ``index`` (with ``uuid``, ``GPU-...``) is among ``entries``: an index
    (NVML's numbering, i.e. PCI bus order, as with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``) or a UUID or
    a prefix of one, as CUDA takes them."""
    if entries is None:
        return True
    return any(e == str(index) or (e.startswith("GPU-") and uuid.startswith(e)) for e in entries)


def gpu_slots(excluded: list[int], jobs_per_gpu: str, gib_per_job: float = 6.0) -> list[Slot]:
    """Job slots on the NVIDIA GPUs NVML reports (nvidia-ml-py) and ``CUDA_VISIBLE_DEVICES``
    lets this process use (indices in NVML's numbering, or UUIDs; unset: all, ``""``/``-1``:
    none), minus ``excluded`` (NVML indices); most free memory and least load first; ``[]``
    without NVML or GPUs."""
    try:
        import pynvml
    except ImportError:
        return []
    entries = visible_gpu_entries()
    if entries == []:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            if i in excluded:
                continue
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            if not _is_visible(i, uuid.decode() if isinstance(uuid, bytes) else str(uuid), entries):
                continue
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
            gpus.append((i, mem.free / 2**30, util))
    finally:
        pynvml.nvmlShutdown()
    if entries and not gpus:
        log.warning(
            "CUDA_VISIBLE_DEVICES=%s names none of the GPUs NVML reports (indices in NVML's "
            "numbering or GPU-... UUIDs; MIG devices are not used): running on the CPU",
            os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
    gpus.sort(key=lambda g: (-g[1], g[2]))
    slots = []
    for i, free_gib, _ in gpus:
        n = max(1, min(4, int(free_gib // gib_per_job))) if jobs_per_gpu == "auto" else int(jobs_per_gpu)
        slots += [Slot(f"gpu{i}", gpu=i) for _ in range(n)]
    return slots


def cpu_slots(workers: int) -> list[Slot]:
    """``workers`` CPU slots (at least one), each with an equal share of the cores."""
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    return [Slot("cpu", threads=threads) for _ in range(max(1, workers))]


def local_slots(
    workers: int | None = None, excluded: list[int] | None = None, jobs_per_gpu: str = "auto"
) -> list[Slot]:
    """The local executor's slots: GPU slots by NVML when there are GPUs, else ``workers`` CPU
    slots (default 1)."""
    return gpu_slots(excluded or [], jobs_per_gpu) or cpu_slots(workers or 1)


def slot_env(slot: Slot, base: dict | None = None) -> dict[str, str]:
    """The environment of a job process on ``slot``: its share of the cores (torch/numba/OpenMP
    thread counts) and, on a GPU slot, only that GPU (``CUDA_VISIBLE_DEVICES``, NVML's index with
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that CUDA numbers the GPUs as NVML does: its default order,
    fastest first, differs on machines with mixed GPUs)."""
    env = dict(
        os.environ if base is None else base,
        SPLATFORGE_THREADS=str(slot.threads),
        NUMBA_NUM_THREADS=str(slot.threads),
        OMP_NUM_THREADS=str(slot.threads),
    )
    if slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(slot.gpu)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env


def _set_threads(threads: int) -> None:
    """Use ``threads`` cores for torch in this process (``SPLATFORGE_THREADS`` too). Numba's
    kernels keep the process's count (``NUMBA_NUM_THREADS``, default all cores): the CPU
    kernels' bits depend on it, so that a Ray job gives the bits of a one-slot local pool."""
    import torch

    torch.set_num_threads(threads)
    os.environ["SPLATFORGE_THREADS"] = str(threads)
