"""What this node offers: CPUs, memory and GPUs, as registered with the controller.

NVML comes from nvidia-ml-py (``import pynvml``), imported lazily (STYLE.md lesson 9): a node
without it, or without a driver, simply has no GPUs. ``CUDA_VISIBLE_DEVICES`` narrows the GPUs
the way it narrows them for the workers, who inherit it, so a simulated node of a local cluster
registers only its share.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import psutil

from ironpod.errors import ConfigError
from ironpod.wire import GpuInfo

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class Capacity:
    cpus: int
    memory_bytes: int
    gpus: list[GpuInfo] = field(default_factory=list)


def detect_capacity(cpus: list[int] | None = None) -> Capacity:
    """CPUs (the pinned set if given, else those this process may run on), memory, GPUs."""
    allowed = os.sched_getaffinity(0)
    if cpus and not set(cpus) <= allowed:
        missing = sorted(set(cpus) - allowed)
        raise ConfigError(f"--cpus: CPUs {missing} are not available here ({sorted(allowed)})")
    count = len(set(cpus)) if cpus else len(allowed)
    return Capacity(
        cpus=max(1, count), memory_bytes=psutil.virtual_memory().total, gpus=detect_gpus()
    )


def detect_gpus() -> list[GpuInfo]:
    """The GPUs NVML sees (and ``CUDA_VISIBLE_DEVICES`` lets through); [] without NVML."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...: no GPUs here
        log.info("NVML unavailable (%s): registering no GPUs", exc)
        return []
    try:
        gpus = [_gpu_info(pynvml, index) for index in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()
    return _visible(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))


def _gpu_info(nvml: Any, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    return GpuInfo(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
    )


def _text(value: str | bytes) -> str:
    """Old nvidia-ml-py releases return bytes, new ones str."""
    return value.decode() if isinstance(value, bytes) else value


def _visible(gpus: list[GpuInfo], spec: str | None) -> list[GpuInfo]:
    """Filter by ``CUDA_VISIBLE_DEVICES`` (indices or UUID prefixes, in its order)."""
    if spec is None:
        return gpus
    chosen: list[GpuInfo] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        match = [
            g for g in gpus if (item.isdigit() and g.index == int(item)) or g.uuid.startswith(item)
        ]
        if not match:
            break  # CUDA stops at the first invalid entry, and so do we
        chosen.extend(g for g in match[:1] if g not in chosen)
    return chosen
