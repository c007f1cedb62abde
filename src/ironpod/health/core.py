"""The health check contract: results, thresholds, the context a check reads, the pipeline.

A check is a stage (STYLE.md lesson 8): it takes a :class:`HealthContext` and returns
:class:`CheckResult` rows; a suite is a list of checks, run in order by :func:`run_checks`,
which owns timing and turns a stage that raises into a ``fail`` row (lesson 2), so one broken
probe never hides the others. Deciding what a ``fail`` means for a node (quarantine, recheck) is
the controller's job, not this package's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

GIB = 1 << 30
MIB = 1 << 20


class Status(StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"  # could not be checked here (no GPU, no permission, not supported)


class Level(StrEnum):
    """How much a check costs.

    ``light``: seconds, safe before every job start. ``deep``: up to minutes and the whole
    node (GPU memory, all GPUs busy, DCGM), for a node joining, after a failure, or to recheck a
    quarantined node. A deep run includes the light checks.
    """

    LIGHT = "light"
    DEEP = "deep"


_SEVERITY = {Status.SKIP: 0, Status.PASS: 1, Status.WARN: 2, Status.FAIL: 3}


class CheckResult(BaseModel):
    """One measurement of one thing (a GPU, a directory, the node) against its threshold."""

    model_config = ConfigDict(frozen=True)

    check: str
    status: Status
    target: str = ""  # what was measured: "gpu0", a directory, "" for the node as a whole
    value: float | None = None
    threshold: float | None = None
    unit: str = ""
    message: str = ""
    duration_s: float = 0.0
    details: dict[str, Any] = Field(default_factory=dict)


def worst(results: Iterable[CheckResult]) -> Status:
    """The most severe status (fail > warn > pass > skip); ``skip`` when nothing was checked."""
    return max((r.status for r in results), key=_SEVERITY.__getitem__, default=Status.SKIP)


class HealthThresholds(BaseModel):
    """Limits a node must meet. Defaults are floors that catch broken hardware, not benchmarks.

    Performance checks compare against the node class's own baseline (``HealthContext.baselines``)
    rather than absolute numbers, because a good value depends on the hardware.
    """

    model_config = ConfigDict(extra="forbid")

    # Disk (work_dir and checkpoint_dir). A checkpoint of a 7B model with optimizer state is
    # ~100 GB, so a node below a few GiB cannot take even an emergency save.
    min_free_disk_gib: float = 5.0
    min_free_disk_percent: float = 2.0
    disk_write_test_bytes: int = 64 * MIB
    min_write_mb_s: float = 50.0  # MB = 10**6 bytes, as disk vendors quote it

    # /dev/shm: PyTorch DataLoader workers and NCCL's intra-node transport allocate here;
    # container runtimes default it to 64 MiB, which fails them.
    min_shm_bytes: int = 1 * GIB
    min_available_memory_fraction: float = 0.10

    max_clock_skew_s: float = 1.0

    # GPUs. Data center GPUs start slowing down near 85-90 C (nvidia-smi -q reports the
    # per-board "GPU Slowdown Temp"); above this we warn, HW slowdown itself fails.
    max_gpu_temp_c: float = 85.0
    # XIDs that mean the GPU needs a reset, a reboot or an RMA; others only warn. From NVIDIA's
    # XID catalog (https://docs.nvidia.com/deploy/xid-errors/).
    fail_xids: list[int] = Field(default_factory=lambda: [48, 61, 62, 64, 74, 79, 95, 119, 120])

    # Matmul throughput as a fraction of the node class's baseline.
    matmul_warn_fraction: float = 0.8
    matmul_fail_fraction: float = 0.5
    matmul_seconds: float = 0.3  # per device, after one warm-up multiply

    # GPU memory pattern test: this share of each GPU's free memory.
    gpu_memtest_fraction: float = 0.25

    # All-reduce bus bandwidth floors in GB/s (10**9 bytes), per backend. Conservative: they
    # catch NCCL falling back to TCP sockets or a dead NVLink/IB link, not a 10% slowdown.
    min_allreduce_busbw_gbps: dict[str, float] = Field(
        default_factory=lambda: {"gloo": 0.05, "nccl": 5.0}
    )
    allreduce_cpu_bytes: int = 16 * MIB
    allreduce_gpu_bytes: int = 256 * MIB
    allreduce_iters: int = 5
    allreduce_timeout_s: float = 120.0

    # DCGM: `dcgmi diag -r 2` takes about two minutes; -r 3/4 run up to hours (full stress and
    # memory tests), so a deep check uses 4 only when configured.
    dcgm_level: int = 2
    dcgm_timeout_s: float = 600.0


@dataclass(kw_only=True, slots=True)
class HealthContext:
    """What a check may read: where to write, what the node should have, and how to reach NVML.

    ``controller_time_unix`` is the controller's ``time.time()`` as received just before this
    context was made; the skew check corrects for the time elapsed since. ``nvml`` is the NVML
    module (``pynvml`` from nvidia-ml-py, imported on first use when left ``None``); tests pass a
    fake with the same functions.
    """

    work_dir: Path
    checkpoint_dir: Path | None = None
    expected_gpus: int | None = None
    controller_time_unix: float | None = None
    since_unix: float | None = None  # kernel-log XIDs older than this are ignored
    baselines: dict[str, float] = field(default_factory=dict)
    thresholds: HealthThresholds = field(default_factory=HealthThresholds)
    nvml: Any = None
    created_monotonic: float = field(default_factory=time.monotonic)

    def load_nvml(self) -> Any | None:
        """The NVML module, or ``None`` when nvidia-ml-py is not installed (STYLE.md lesson 9)."""
        if self.nvml is None:
            try:
                import pynvml
            except ImportError:
                return None
            self.nvml = pynvml
        return self.nvml


@runtime_checkable
class Check(Protocol):
    """One stage of a suite.

    ``run`` returns one row per thing measured (per GPU, per directory) and may raise:
    :func:`run_checks` times it and turns an exception into a ``fail`` row. Rows should use the
    check's ``name`` so that a policy can key on it.
    """

    name: ClassVar[str]
    level: ClassVar[Level]

    def run(self, ctx: HealthContext) -> list[CheckResult]: ...


def run_checks(
    checks: Sequence[Check], ctx: HealthContext, level: Level | str = Level.LIGHT
) -> list[CheckResult]:
    """Run the checks of ``level`` (deep includes light) in order; never raises.

    A row without a duration gets its stage's wall time.
    """
    level = Level(level)
    results: list[CheckResult] = []
    for check in checks:
        if level is Level.LIGHT and Level(check.level) is not Level.LIGHT:
            continue
        start = time.perf_counter()
        try:
            rows = list(check.run(ctx))
        except Exception as exc:
            log.warning("health check %s raised", check.name, exc_info=True)
            rows = [
                CheckResult(
                    check=check.name,
                    status=Status.FAIL,
                    message=f"check raised {type(exc).__name__}: {exc}",
                    details={"exception": type(exc).__name__},
                )
            ]
        elapsed = time.perf_counter() - start
        results.extend(
            r if r.duration_s else r.model_copy(update={"duration_s": elapsed}) for r in rows
        )
    return results


def result(
    check: str,
    status: Status,
    message: str = "",
    *,
    target: str = "",
    value: float | None = None,
    threshold: float | None = None,
    unit: str = "",
    duration_s: float = 0.0,
    **details: Any,
) -> CheckResult:
    """Shorthand for the checks in this package: extra keywords go to ``details``."""
    return CheckResult(
        check=check,
        status=status,
        target=target,
        value=value,
        threshold=threshold,
        unit=unit,
        message=message,
        duration_s=duration_s,
        details=details,
    )


def below(
    check: str,
    value: float,
    minimum: float,
    unit: str,
    *,
    target: str = "",
    what: str,
    **details: Any,
) -> CheckResult:
    """``fail`` when ``value`` is under ``minimum``, else ``pass``; the message says both."""
    ok = value >= minimum
    status = Status.PASS if ok else Status.FAIL
    relation = ">=" if ok else "<"
    message = f"{what} {value:.4g} {unit} {relation} {minimum:.4g} {unit}"
    return result(
        check,
        status,
        message,
        target=target,
        value=value,
        threshold=minimum,
        unit=unit,
        **details,
    )


def default_checks(level: Level | str = Level.DEEP) -> list[Check]:
    """The standard suite, cheapest and most telling first; ``light`` drops the deep checks."""
    from ironpod.health.collective import AllReduceCheck
    from ironpod.health.compute import GpuMemoryCheck, MatmulCheck
    from ironpod.health.gpu import (
        DcgmDiagCheck,
        EccCheck,
        GpuCountCheck,
        NvlinkCheck,
        PcieCheck,
        RemappedRowsCheck,
        RetiredPagesCheck,
        ThermalCheck,
        XidEventCheck,
    )
    from ironpod.health.system import (
        ClockSkewCheck,
        DiskFreeCheck,
        DiskWriteCheck,
        KernelXidCheck,
        MemoryCheck,
        ShmCheck,
    )

    suite: list[Check] = [
        ClockSkewCheck(),
        MemoryCheck(),
        ShmCheck(),
        DiskFreeCheck(),
        DiskWriteCheck(),
        KernelXidCheck(),
        GpuCountCheck(),
        EccCheck(),
        RetiredPagesCheck(),
        RemappedRowsCheck(),
        ThermalCheck(),
        PcieCheck(),
        NvlinkCheck(),
        XidEventCheck(),
        MatmulCheck(),
        GpuMemoryCheck(),
        AllReduceCheck(),
        DcgmDiagCheck(),
    ]
    level = Level(level)
    return [c for c in suite if level is Level.DEEP or Level(c.level) is Level.LIGHT]
