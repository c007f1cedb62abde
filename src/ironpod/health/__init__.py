"""Node health checks: is this node fit to train on?

A suite is a list of checks (stages); :func:`run_checks` runs them against a
:class:`HealthContext` and returns :class:`CheckResult` rows. ``python -m ironpod.health`` runs
the standard suite and prints a table. What to do about a failing node is the controller's
policy, not this package's.

Importing this package imports neither torch nor NVML; the checks that need them import them
when they run.
"""

from ironpod.health.collective import AllReduceCheck, bus_bandwidth, pair_allreduce
from ironpod.health.compute import (
    CPU_BASELINE_KEY,
    GPU_BASELINE_KEY,
    GpuMemoryCheck,
    MatmulCheck,
    measure_matmul,
)
from ironpod.health.core import (
    Check,
    CheckResult,
    HealthContext,
    HealthThresholds,
    Level,
    Status,
    default_checks,
    run_checks,
    worst,
)
from ironpod.health.gpu import (
    DcgmDiagCheck,
    EccCheck,
    GpuCountCheck,
    NvlinkCheck,
    NvmlCheck,
    PcieCheck,
    RemappedRowsCheck,
    RetiredPagesCheck,
    ThermalCheck,
    XidEventCheck,
    parse_dcgm_diag,
)
from ironpod.health.system import (
    XID_NAMES,
    ClockSkewCheck,
    DiskFreeCheck,
    DiskWriteCheck,
    KernelXidCheck,
    MemoryCheck,
    ShmCheck,
    XidEvent,
    parse_xid_lines,
    read_kernel_log,
)

__all__ = [
    "CPU_BASELINE_KEY",
    "GPU_BASELINE_KEY",
    "XID_NAMES",
    "AllReduceCheck",
    "Check",
    "CheckResult",
    "ClockSkewCheck",
    "DcgmDiagCheck",
    "DiskFreeCheck",
    "DiskWriteCheck",
    "EccCheck",
    "GpuCountCheck",
    "GpuMemoryCheck",
    "HealthContext",
    "HealthThresholds",
    "KernelXidCheck",
    "Level",
    "MatmulCheck",
    "MemoryCheck",
    "NvlinkCheck",
    "NvmlCheck",
    "PcieCheck",
    "RemappedRowsCheck",
    "RetiredPagesCheck",
    "ShmCheck",
    "Status",
    "ThermalCheck",
    "XidEvent",
    "XidEventCheck",
    "bus_bandwidth",
    "default_checks",
    "measure_matmul",
    "pair_allreduce",
    "parse_dcgm_diag",
    "parse_xid_lines",
    "read_kernel_log",
    "run_checks",
    "worst",
]
