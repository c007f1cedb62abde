"""Node health checks: GPU faults through a fake NVML at the library boundary, the rest for real.

Real: CPU matmul slowed by CPU hogs pinned to the same CPU, a full tmpfs, gloo all-reduce
between real processes, the kernel log, a ``dcgmi`` executable on PATH. Faked: only NVML (no GPU
here), with the function names and constants of nvidia-ml-py's ``pynvml``;
``test_fake_nvml_matches_pynvml`` holds the fake to the real module where it is installed.
"""

# The fake NVML mirrors pynvml's camelCase names, which is the point of it.
# ruff: noqa: N802, N815

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from ironpod.health import (
    AllReduceCheck,
    Check,
    CheckResult,
    ClockSkewCheck,
    DcgmDiagCheck,
    DiskFreeCheck,
    DiskWriteCheck,
    EccCheck,
    GpuCountCheck,
    HealthContext,
    HealthThresholds,
    KernelXidCheck,
    Level,
    NvlinkCheck,
    PcieCheck,
    RemappedRowsCheck,
    RetiredPagesCheck,
    Status,
    ThermalCheck,
    XidEventCheck,
    bus_bandwidth,
    default_checks,
    pair_allreduce,
    parse_dcgm_diag,
    parse_xid_lines,
    run_checks,
    worst,
)
from ironpod.health import system as health_system
from tests.conftest import clean_env, free_port, python

pytestmark = pytest.mark.timeout(120)


# --- a fake NVML: pynvml's names and constants, GPUs as plain data ---------------------------


class NVMLError(Exception):
    def __init__(self, value: int = 999) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return type(self).__name__.removeprefix("NVMLError_")


def _error(name: str, value: int) -> type[NVMLError]:
    return type(
        f"NVMLError_{name}", (NVMLError,), {"__init__": lambda s: NVMLError.__init__(s, value)}
    )


@dataclass(eq=False)  # handles compare by identity, as NVML's do
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    ecc_volatile: int = 0
    ecc_aggregate: int = 0
    retired_pending: int = 0
    remapped: tuple[int, int, int, int] = (0, 0, 0, 0)  # corr, unc, pending, failure
    temp: int = 45
    reasons: int = 0
    pcie: tuple[int, int, int, int] = (16, 16, 5, 5)  # width, max width, gen, max gen
    nvlinks: list[int] = field(default_factory=lambda: [1] * 18)
    xids: list[int] = field(default_factory=list)
    raises: dict[str, str] = field(default_factory=dict)  # function name -> NVMLError_<name>


class FakeNvml:
    """Enough of ``pynvml`` for ironpod.health.gpu; raises the same exception classes."""

    NVMLError = NVMLError
    NVMLError_NotSupported = _error("NotSupported", 3)
    NVMLError_NoPermission = _error("NoPermission", 4)
    NVMLError_InvalidArgument = _error("InvalidArgument", 2)
    NVMLError_DriverNotLoaded = _error("DriverNotLoaded", 9)
    NVMLError_Timeout = _error("Timeout", 10)
    NVMLError_FunctionNotFound = _error("FunctionNotFound", 13)
    NVMLError_GpuIsLost = _error("GpuIsLost", 15)

    NVML_FEATURE_ENABLED = 1
    NVML_TEMPERATURE_GPU = 0
    NVML_NVLINK_MAX_LINKS = 36
    NVML_VOLATILE_ECC = 0
    NVML_AGGREGATE_ECC = 1
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    nvmlEventTypeXidCriticalError = 0x8
    nvmlClocksEventReasonSwThermalSlowdown = 0x20
    nvmlClocksEventReasonHwThermalSlowdown = 0x40
    nvmlClocksEventReasonHwPowerBrakeSlowdown = 0x80

    def __init__(self, gpus: list[FakeGpu], *, driver: bool = True) -> None:
        self.gpus, self.driver, self.inits = gpus, driver, 0
        self.sets: list[list[FakeGpu]] = []

    def _call(self, fn: str, gpu: FakeGpu) -> None:
        if fn in gpu.raises:
            raise getattr(self, gpu.raises[fn])()

    def nvmlInit(self) -> None:
        if not self.driver:
            raise self.NVMLError_DriverNotLoaded()
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.inits -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetIndex(self, gpu: FakeGpu) -> int:
        return self.gpus.index(gpu)

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str:
        return gpu.name

    def nvmlDeviceGetTotalEccErrors(self, gpu: FakeGpu, kind: int, counter: int) -> int:
        self._call("nvmlDeviceGetTotalEccErrors", gpu)
        assert kind == self.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        return gpu.ecc_volatile if counter == self.NVML_VOLATILE_ECC else gpu.ecc_aggregate

    def nvmlDeviceGetRetiredPagesPendingStatus(self, gpu: FakeGpu) -> int:
        self._call("nvmlDeviceGetRetiredPagesPendingStatus", gpu)
        return gpu.retired_pending

    def nvmlDeviceGetRemappedRows(self, gpu: FakeGpu) -> tuple[int, int, int, int]:
        self._call("nvmlDeviceGetRemappedRows", gpu)
        return gpu.remapped

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        self._call("nvmlDeviceGetTemperature", gpu)
        assert sensor == self.NVML_TEMPERATURE_GPU
        return gpu.temp

    def nvmlDeviceGetCurrentClocksEventReasons(self, gpu: FakeGpu) -> int:
        self._call("nvmlDeviceGetCurrentClocksEventReasons", gpu)
        return gpu.reasons

    def nvmlDeviceGetCurrPcieLinkWidth(self, gpu: FakeGpu) -> int:
        self._call("pcie", gpu)
        return gpu.pcie[0]

    def nvmlDeviceGetMaxPcieLinkWidth(self, gpu: FakeGpu) -> int:
        return gpu.pcie[1]

    def nvmlDeviceGetCurrPcieLinkGeneration(self, gpu: FakeGpu) -> int:
        return gpu.pcie[2]

    def nvmlDeviceGetMaxPcieLinkGeneration(self, gpu: FakeGpu) -> int:
        return gpu.pcie[3]

    def nvmlDeviceGetNvLinkState(self, gpu: FakeGpu, link: int) -> int:
        if not gpu.nvlinks:
            raise self.NVMLError_NotSupported()
        if link >= len(gpu.nvlinks):
            raise self.NVMLError_InvalidArgument()
        return gpu.nvlinks[link]

    def nvmlEventSetCreate(self) -> list[FakeGpu]:
        self.sets.append([])
        return self.sets[-1]

    def nvmlDeviceRegisterEvents(self, gpu: FakeGpu, kinds: int, events: list[FakeGpu]) -> None:
        self._call("nvmlDeviceRegisterEvents", gpu)
        assert kinds == self.nvmlEventTypeXidCriticalError
        events.append(gpu)

    def nvmlEventSetWait_v2(self, events: list[FakeGpu], timeout_ms: int) -> SimpleNamespace:
        for gpu in events:
            if gpu.xids:
                code = gpu.xids.pop(0)
                return SimpleNamespace(device=gpu, eventType=0x8, eventData=code)
        raise self.NVMLError_Timeout()

    def nvmlEventSetFree(self, events: list[FakeGpu]) -> None:
        self.sets.remove(events)


def test_fake_nvml_matches_pynvml() -> None:
    """Every name the fake offers exists in nvidia-ml-py with the same value."""
    pynvml = pytest.importorskip("pynvml")
    for name, value in vars(FakeNvml).items():
        if name.startswith(("nvml", "NVML")):
            assert hasattr(pynvml, name), name
            if isinstance(value, int):
                assert getattr(pynvml, name) == value, name
    assert issubclass(pynvml.NVMLError_NotSupported, pynvml.NVMLError)
    assert pynvml.NVMLError_Timeout(0).value == 10  # the fake's error codes too
    assert pynvml.NVMLError_NotSupported(0).value == 3


def ctx_for(tmp_path: Path, nvml: Any = None, **kwargs: Any) -> HealthContext:
    return HealthContext(work_dir=tmp_path, nvml=nvml, **kwargs)


# --- one conformance test for every check (STYLE.md lesson 4) ------------------------------

_NVML_CHECKS = [
    GpuCountCheck,
    EccCheck,
    RetiredPagesCheck,
    RemappedRowsCheck,
    ThermalCheck,
    PcieCheck,
    NvlinkCheck,
    XidEventCheck,
]


@pytest.mark.parametrize("check", default_checks(Level.DEEP), ids=lambda c: c.name)
def test_every_check_conforms(check: Check, tmp_path: Path) -> None:
    assert isinstance(check, Check)
    assert check.level in (Level.LIGHT, Level.DEEP)
    nvml = FakeNvml([FakeGpu(), FakeGpu()])
    ctx = ctx_for(tmp_path, nvml, expected_gpus=2, controller_time_unix=time.time())
    rows = run_checks([check], ctx, Level.DEEP)
    assert rows, "a check returns at least one row"
    for row in rows:
        assert isinstance(row, CheckResult)
        assert row.check == check.name
        assert row.duration_s > 0
        assert row.status in Status
        json.loads(row.model_dump_json())  # rows cross the wire as JSON
    if type(check) in _NVML_CHECKS:
        assert worst(rows) is Status.PASS, rows  # a healthy fake GPU passes
        assert nvml.inits == (1 if isinstance(check, XidEventCheck) else 0)  # sessions closed
    if isinstance(check, XidEventCheck):
        check.close()
        assert nvml.inits == 0


def test_default_checks_levels() -> None:
    light = {c.name for c in default_checks(Level.LIGHT)}
    deep = {c.name for c in default_checks(Level.DEEP)}
    assert light < deep
    assert {"collective.allreduce", "compute.gpu_memory", "gpu.dcgm_diag"} <= deep - light


# --- NVML faults -------------------------------------------------------------------------

HW_THERMAL, SW_THERMAL, POWER_BRAKE = 0x40, 0x20, 0x80


@pytest.mark.parametrize(
    ("check", "gpu", "status", "words"),
    [
        (EccCheck, FakeGpu(ecc_volatile=2, ecc_aggregate=2), Status.FAIL, "since driver load"),
        (EccCheck, FakeGpu(ecc_aggregate=1), Status.WARN, "lifetime"),
        (RetiredPagesCheck, FakeGpu(retired_pending=1), Status.FAIL, "pending"),
        (RemappedRowsCheck, FakeGpu(remapped=(0, 1, 1, 0)), Status.FAIL, "pending"),
        (RemappedRowsCheck, FakeGpu(remapped=(0, 1, 0, 1)), Status.FAIL, "failed"),
        (RemappedRowsCheck, FakeGpu(remapped=(3, 1, 0, 0)), Status.PASS, "4 rows remapped"),
        (ThermalCheck, FakeGpu(temp=88, reasons=HW_THERMAL), Status.FAIL, "HwThermalSlowdown"),
        (ThermalCheck, FakeGpu(reasons=POWER_BRAKE), Status.FAIL, "HwPowerBrakeSlowdown"),
        (ThermalCheck, FakeGpu(reasons=SW_THERMAL), Status.WARN, "SwThermalSlowdown"),
        (ThermalCheck, FakeGpu(temp=90), Status.WARN, "90 C"),
        (PcieCheck, FakeGpu(pcie=(8, 16, 5, 5)), Status.FAIL, "downtrained: x8"),
        (PcieCheck, FakeGpu(pcie=(16, 16, 1, 5)), Status.PASS, "normal at idle"),
        (NvlinkCheck, FakeGpu(nvlinks=[1] * 17 + [0]), Status.FAIL, "down: [17]"),
        (NvlinkCheck, FakeGpu(nvlinks=[]), Status.SKIP, "no NVLink"),
        (
            RemappedRowsCheck,
            FakeGpu(raises={"nvmlDeviceGetRemappedRows": "NVMLError_NotSupported"}),
            Status.SKIP,
            "NotSupported",
        ),
        (
            EccCheck,
            FakeGpu(raises={"nvmlDeviceGetTotalEccErrors": "NVMLError_NotSupported"}),
            Status.SKIP,
            "NotSupported",
        ),
        (
            ThermalCheck,
            FakeGpu(raises={"nvmlDeviceGetCurrentClocksEventReasons": "NVMLError_NotSupported"}),
            Status.PASS,
            "not supported",
        ),
        (
            ThermalCheck,
            FakeGpu(raises={"nvmlDeviceGetTemperature": "NVMLError_GpuIsLost"}),
            Status.FAIL,
            "GpuIsLost",
        ),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_nvml_fault_on_one_gpu(
    check: type[Check], gpu: FakeGpu, status: Status, words: str, tmp_path: Path
) -> None:
    nvml = FakeNvml([FakeGpu(), gpu])
    rows = run_checks([check()], ctx_for(tmp_path, nvml))
    assert [r.target for r in rows] == ["gpu0", "gpu1"]
    assert rows[0].status is Status.PASS  # the healthy GPU next to it is unaffected
    assert rows[1].status is status, rows[1]
    assert words in rows[1].message
    assert nvml.inits == 0


def test_missing_gpu_fails_count(tmp_path: Path) -> None:
    nvml = FakeNvml([FakeGpu() for _ in range(7)])
    (row,) = run_checks([GpuCountCheck()], ctx_for(tmp_path, nvml, expected_gpus=8))
    assert (row.status, row.value, row.threshold) == (Status.FAIL, 7, 8)
    (row,) = run_checks([GpuCountCheck()], ctx_for(tmp_path, nvml, expected_gpus=7))
    assert row.status is Status.PASS


def test_xid_events_since_the_previous_run(tmp_path: Path) -> None:
    gpus = [
        FakeGpu(),
        FakeGpu(),
        FakeGpu(raises={"nvmlDeviceRegisterEvents": "NVMLError_NotSupported"}),
    ]
    nvml = FakeNvml(gpus)
    ctx = ctx_for(tmp_path, nvml)
    check = XidEventCheck()
    try:
        assert [r.status for r in run_checks([check], ctx)] == [Status.PASS]
        gpus[1].xids.extend([79, 13])
        (row,) = run_checks([check], ctx)
        assert (row.status, row.target, row.details["codes"]) == (Status.FAIL, "gpu1", [13, 79])
        assert "fallen off the bus" in row.message
        gpus[0].xids.append(13)  # an application fault: warn only
        (row,) = run_checks([check], ctx)
        assert (row.status, row.target) == (Status.WARN, "gpu0")
        assert [r.status for r in run_checks([check], ctx)] == [Status.PASS]  # drained
    finally:
        check.close()
    assert nvml.inits == 0 and not nvml.sets


@pytest.mark.parametrize("check", [c() for c in _NVML_CHECKS], ids=lambda c: c.name)
def test_no_nvml_is_one_skip(check: Check, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    rows = run_checks([check], ctx_for(tmp_path))
    assert [(r.status, r.message) for r in rows] == [
        (Status.SKIP, "no NVML (nvidia-ml-py not installed)")
    ]
    rows = run_checks([check], ctx_for(tmp_path, FakeNvml([FakeGpu()], driver=False)))
    assert [(r.status, r.message) for r in rows] == [(Status.SKIP, "no NVML (DriverNotLoaded)")]


# --- the pipeline ------------------------------------------------------------------------


@dataclass
class Boom:
    name: ClassVar[str] = "test.boom"
    level: ClassVar[Level] = Level.LIGHT

    def run(self, ctx: HealthContext) -> list[CheckResult]:
        raise ZeroDivisionError("division by zero")


@dataclass
class Deep:
    name: ClassVar[str] = "test.deep"
    level: ClassVar[Level] = Level.DEEP

    def run(self, ctx: HealthContext) -> list[CheckResult]:
        return [CheckResult(check=self.name, status=Status.WARN)]


def test_run_checks_turns_a_raising_stage_into_a_fail(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path, controller_time_unix=time.time())
    rows = run_checks([Boom(), ClockSkewCheck(), Deep()], ctx, "light")
    assert [(r.check, r.status) for r in rows] == [
        ("test.boom", Status.FAIL),
        ("system.clock_skew", Status.PASS),  # the stage after the broken one still ran
    ]
    assert "ZeroDivisionError" in rows[0].message
    assert worst(rows) is Status.FAIL
    rows = run_checks([Boom(), ClockSkewCheck(), Deep()], ctx, Level.DEEP)
    assert [r.check for r in rows][-1] == "test.deep"


def test_worst() -> None:
    def rows(*statuses: Status) -> list[CheckResult]:
        return [CheckResult(check="x", status=s) for s in statuses]

    assert worst([]) is Status.SKIP
    assert worst(rows(Status.SKIP, Status.PASS)) is Status.PASS
    assert worst(rows(Status.PASS, Status.WARN, Status.SKIP)) is Status.WARN
    assert worst(rows(Status.WARN, Status.FAIL, Status.PASS)) is Status.FAIL


# --- system checks, for real -------------------------------------------------------------


def test_clock_skew(tmp_path: Path) -> None:
    (row,) = ClockSkewCheck().run(ctx_for(tmp_path, controller_time_unix=time.time() - 30))
    assert row.status is Status.FAIL and 29 < (row.value or 0) < 31
    assert "ahead of" in row.message
    (row,) = ClockSkewCheck().run(ctx_for(tmp_path, controller_time_unix=time.time()))
    assert row.status is Status.PASS
    (row,) = ClockSkewCheck().run(ctx_for(tmp_path))
    assert row.status is Status.SKIP


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs (needs root and mount permission)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_fails(tmpfs: Path) -> None:
    limits = HealthThresholds(
        min_free_disk_gib=2 / 1024, disk_write_test_bytes=1 << 20, min_write_mb_s=1
    )
    ctx = HealthContext(work_dir=tmpfs, thresholds=limits)
    checks = [DiskFreeCheck(), DiskWriteCheck()]
    before = run_checks(checks, ctx)
    assert [r.status for r in before] == [Status.PASS, Status.PASS], before
    with (tmpfs / "fill").open("wb") as f, pytest.raises(OSError, match="No space left"):
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
    after = run_checks(checks, ctx)
    assert [(r.check, r.status) for r in after] == [
        ("system.disk_free", Status.FAIL),
        ("system.disk_write", Status.SKIP),  # writing more would only make it worse
    ]
    assert (after[0].value or 0) < 0.001 and after[0].target == str(tmpfs)
    assert not [p for p in tmpfs.iterdir() if p.name != "fill"]  # no test file left behind


def test_missing_checkpoint_dir_fails(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path, checkpoint_dir=tmp_path / "nope")
    rows = run_checks([DiskFreeCheck()], ctx)
    assert [(r.target, r.status) for r in rows] == [
        (str(tmp_path), Status.PASS),
        (str(tmp_path / "nope"), Status.FAIL),
    ]


SAMPLE_KERNEL_LOG = """\
[    5.123456] nvidia: loading out-of-tree module taints kernel.
[  269.517039] NVRM: Xid (PCI:0000:3b:00): 79, pid=1896, GPU has fallen off the bus.
[  300.000001] NVRM: Xid (PCI:0000:3b:00): 48, pid=1896, An uncorrectable double bit error
[ 1000.250000] NVRM: Xid (PCI:0000:5e:00): 13, pid=4242, name=python, Graphics SM Warp Exception
[ 1200.000000] NVRM: Xid (0000:01:00): 3, C 00000005 SC 00000007 M 00001ffc Data ffffffff
Oct 15 12:40:10 host kernel: NVRM: Xid (PCI:0000:10:1c): 63, pid=1, Row Remapper: New row
"""


def test_parse_xid_lines() -> None:
    events = parse_xid_lines(SAMPLE_KERNEL_LOG.splitlines())
    assert [(e.code, e.pci, e.uptime_s) for e in events] == [
        (79, "0000:3b:00", 269.517039),
        (48, "0000:3b:00", 300.000001),
        (13, "0000:5e:00", 1000.25),
        (3, "0000:01:00", 1200.0),
        (63, "0000:10:1c", None),
    ]
    assert events[0].name == "GPU has fallen off the bus"
    assert events[1].name == "double bit ECC error"
    assert events[0].text.startswith("pid=1896")


def test_kernel_xid_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = SAMPLE_KERNEL_LOG.splitlines()
    monkeypatch.setattr(health_system, "read_kernel_log", lambda: lines)
    rows = {r.target: r for r in KernelXidCheck().run(ctx_for(tmp_path))}
    assert rows["0000:3b:00"].status is Status.FAIL
    assert rows["0000:3b:00"].details["codes"] == [48, 79]
    assert rows["0000:5e:00"].status is Status.WARN
    # Only XIDs after since_unix count: the boot-relative stamps put all but the last before it.
    boot = health_system.psutil.boot_time()
    rows_after = KernelXidCheck().run(ctx_for(tmp_path, since_unix=boot + 5000))
    assert [(r.target, r.status) for r in rows_after] == [("0000:10:1c", Status.WARN)]
    monkeypatch.setattr(health_system, "read_kernel_log", lambda: None)
    (row,) = KernelXidCheck().run(ctx_for(tmp_path))
    assert row.status is Status.SKIP


def test_real_kernel_log_reads_or_skips(tmp_path: Path) -> None:
    lines = health_system.read_kernel_log()
    (row, *_) = KernelXidCheck().run(ctx_for(tmp_path))
    assert row.status is (Status.SKIP if lines is None else Status.PASS)  # no GPU, no XIDs


# --- compute: matmul against a baseline, slowed for real -----------------------------------

_MATMUL_UNDER_LOAD = textwrap.dedent(
    """
    import json, os, subprocess, sys
    os.sched_setaffinity(0, {CPU})
    import torch
    torch.set_num_threads(1)
    from pathlib import Path
    from ironpod.health import HealthContext, HealthThresholds, MatmulCheck, run_checks

    limits = HealthThresholds(matmul_seconds=0.5)
    def check(baseline):
        ctx = HealthContext(work_dir=Path("."), thresholds=limits, baselines=baseline)
        (row,) = run_checks([MatmulCheck(cpu_n=512)], ctx)
        return row.model_dump(mode="json")

    idle = check({})
    base = {"matmul_gflops": idle["value"]}
    again = check(base)
    hog = "import os\\nos.sched_setaffinity(0, {CPU})\\nwhile True: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(4)]
    try:
        busy = check(base)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    print(json.dumps({"idle": idle, "again": again, "busy": busy}))
    """
)


def test_matmul_passes_idle_and_fails_on_a_busy_cpu() -> None:
    cpu = min(os.sched_getaffinity(0))
    out = python(["-c", _MATMUL_UNDER_LOAD.replace("{CPU}", f"{{{cpu}}}")], timeout=90)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    idle, again, busy = rows["idle"], rows["again"], rows["busy"]
    assert idle["status"] == "pass" and idle["details"]["baseline_key"] == "matmul_gflops"
    assert idle["value"] > 0 and idle["unit"] == "GFLOP/s"
    # Same CPU, same load: within noise of the baseline. Other tests may share the machine,
    # so only the busy run's verdict is asserted strictly.
    assert again["status"] in ("pass", "warn"), again
    assert busy["status"] == "fail", busy  # one CPU shared with 4 busy loops: ~20% of baseline
    assert busy["details"]["ratio"] < 0.5


# --- collectives: real gloo between real processes ----------------------------------------


def test_bus_bandwidth_convention() -> None:
    algbw, busbw = bus_bandwidth(8 * 10**9, 1.0, 8)
    assert algbw == 8.0 and busbw == pytest.approx(8.0 * 2 * 7 / 8)
    assert bus_bandwidth(10**9, 1.0, 2) == (1.0, 1.0)


def test_intra_node_allreduce_gloo(tmp_path: Path) -> None:
    (row,) = run_checks([AllReduceCheck()], ctx_for(tmp_path), Level.DEEP)
    assert row.status is Status.PASS, row
    assert (row.value or 0) > 0 and row.unit == "GB/s"
    assert row.details["backend"] == "gloo" and row.details["world"] == 2
    assert row.details["wrong"] == 0


_PAIR = textwrap.dedent(
    """
    import sys
    from ironpod.health import pair_allreduce
    rank, port = int(sys.argv[1]), int(sys.argv[2])
    row = pair_allreduce(rank, 2, "127.0.0.1", port, "gloo", 4 << 20, 3, 60.0)
    print(row.model_dump_json())
    """
)


def test_pair_allreduce_between_two_processes() -> None:
    port = free_port()
    env = clean_env(GLOO_SOCKET_IFNAME="lo")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PAIR, str(rank), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        rows.append(CheckResult.model_validate_json(out.strip().splitlines()[-1]))
    for row in rows:
        assert row.status is Status.PASS, row
        assert row.check == "collective.pair_allreduce" and (row.value or 0) > 0
    assert rows[0].value == rows[1].value  # both report the slowest rank's time


def test_pair_allreduce_without_peer_fails() -> None:
    row = pair_allreduce(1, 2, "127.0.0.1", free_port(), "gloo", 1 << 20, 1, 2.0)
    assert row.status is Status.FAIL and "failed" in row.message


# --- DCGM: a dcgmi on PATH ----------------------------------------------------------------

DCGM_OUTPUT = """\
Successfully ran diagnostic for group.
+---------------------------+------------------------------------------------+
| Diagnostic                | Result                                         |
+===========================+================================================+
|-----  Metadata  ----------+------------------------------------------------|
| DCGM Version              | 3.3.5                                          |
+-----  Deployment  --------+------------------------------------------------+
| Denylist                  | Pass                                           |
| Persistence Mode          | Pass                                           |
| Page Retirement/Row Remap | Pass                                           |
+-----  Integration  -------+------------------------------------------------+
| PCIe                      | Fail - GPU: 1                                  |
| Warning                   | GPU 1 Error details: PCIe replay count         |
+-----  Hardware  ----------+------------------------------------------------+
| GPU Memory                | Pass - All                                     |
| Diagnostic                | Skip - All                                     |
+---------------------------+------------------------------------------------+
"""


def test_parse_dcgm_diag() -> None:
    tests = parse_dcgm_diag(DCGM_OUTPUT)
    assert tests == {
        "Denylist": "Pass",
        "Persistence Mode": "Pass",
        "Page Retirement/Row Remap": "Pass",
        "PCIe": "Fail - GPU: 1",
        "GPU Memory": "Pass - All",
        "Diagnostic": "Skip - All",
    }


def _fake_dcgmi(bin_dir: Path, output: str, rc: int) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "out.txt").write_text(output)
    script = bin_dir / "dcgmi"
    script.write_text(
        f'#!/bin/sh\necho "$@" > "{bin_dir}/args"\ncat "{bin_dir}/out.txt"\nexit {rc}\n'
    )
    script.chmod(0o755)


def test_dcgm_diag_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    ctx = ctx_for(tmp_path, thresholds=HealthThresholds(dcgm_level=4))
    if shutil.which("dcgmi") is None:
        (row,) = DcgmDiagCheck().run(ctx)
        assert row.status is Status.SKIP
    _fake_dcgmi(bin_dir, DCGM_OUTPUT, 226)
    (row,) = DcgmDiagCheck().run(ctx)
    assert row.status is Status.FAIL and "PCIe: Fail - GPU: 1" in row.message
    assert (bin_dir / "args").read_text().split() == ["diag", "-r", "4"]
    _fake_dcgmi(bin_dir, DCGM_OUTPUT.replace("Fail - GPU: 1", "Pass - All"), 0)
    (row,) = DcgmDiagCheck().run(ctx)
    assert row.status is Status.PASS
    _fake_dcgmi(bin_dir, "Error: unable to establish a connection to the host engine.\n", 255)
    (row,) = DcgmDiagCheck().run(ctx)
    assert row.status is Status.SKIP


# --- the package as a whole --------------------------------------------------------------


def test_import_is_light() -> None:
    """``import ironpod.health`` pulls in neither torch nor NVML (STYLE.md lesson 9)."""
    code = "import sys, ironpod.health; print(sorted({'torch', 'pynvml'} & set(sys.modules)))"
    out = python(["-c", code], timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_module_main_json(tmp_path: Path) -> None:
    out = python(
        [
            "-m",
            "ironpod.health",
            "--json",
            "--work-dir",
            str(tmp_path / "w"),
            "--baseline",
            "matmul_gflops=0.001",
        ],
        timeout=90,
    )
    assert out.returncode in (0, 1), out.stderr
    rows = [CheckResult.model_validate(r) for r in json.loads(out.stdout)]
    assert {r.check for r in rows} == {c.name for c in default_checks(Level.LIGHT)}
    (matmul,) = [r for r in rows if r.check == "compute.matmul"]
    assert matmul.status is Status.PASS and matmul.details["ratio"] > 1
    assert out.returncode == (1 if worst(rows) is Status.FAIL else 0)
