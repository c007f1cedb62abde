"""Detection time per check kind: from a real fault on a node to a ``fail`` row in the agent.

    python bench/health.py [--interval 2] [--repeats 3] [--heartbeat 1] [--seed 0] [--json FILE]
    python bench/health.py --quick      # one fault per kind, a 0.5 s interval (the smoke test)

The agent's :class:`~ironpod.agent.health.HealthMonitor` runs as in production: the class the
agent uses, on its own thread, the deep suite once at start and the light suite every
``--interval`` seconds, ``busy=lambda: False`` (no workers on the node). For each kind of fault
the script waits for a light run to finish, waits a random (seeded) part of the interval, injects
the fault, and polls :meth:`HealthMonitor.take` (every 5 ms, as often as no heartbeat would) until
a run hands over a ``fail`` row of the check that should catch it. That time is the detection
time: the wait for the next run plus the whole light run (the row is handed over when the run
ends, not when its check does). Then the fault is undone and the next kind or repeat starts
from a run that passes again. Each fault is as real as this machine allows:

- ``system.disk_free``: the monitor's work_dir is a 16 MiB tmpfs (root only), filled to ENOSPC;
  the disk thresholds are lowered so that the empty tmpfs passes.
- ``compute.matmul``: the baseline is learned, as the agent does, from the first idle run; the
  fault is CPU hogs pinned to every CPU this process may use (a noisy neighbour, a stuck
  process), so throughput falls below ``matmul_fail_fraction`` of it.
- ``system.clock_skew``: the controller's time, as a heartbeat reply would set it, jumps 5 s.
- ``gpu.*``: no GPU here, so NVML is a fake module (pynvml's names) holding one GPU whose state
  changes: an uncorrected ECC error, the GPU falling off the bus (count 0, expected 1), hardware
  thermal slowdown, an XID 79 event.
- ``system.kernel_xid`` is left out: it reads the real /dev/kmsg or ``dmesg``, with no path to
  point elsewhere, and writing an XID line into the host's kernel log is not a bench's business.

The controller acts on a row only when the agent's next heartbeat carries it, up to
``--heartbeat`` seconds later (the agent's default is 1 s): the ``+ heartbeat`` column adds that
to the worst case. Timings are wall-clock on a shared machine: the light run's own time (mostly
the 0.3 s matmul window) varies with load, and under the CPU hogs it grows by design.
"""

# The fake NVML mirrors pynvml's camelCase names, which is the point of it.
# ruff: noqa: N801, N802, N815, N818

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

from rich.console import Console
from rich.table import Table

from ironpod.agent import health as agent_health
from ironpod.agent.health import HealthConfig, HealthMonitor
from ironpod.health import CheckResult, HealthContext, HealthThresholds, Level, Status

MIB = 1 << 20
POLL_S = 0.005
TMPFS_BYTES = 16 * MIB
CLOCK_JUMP_S = 5.0
JOIN_TIMEOUT_S = 300.0


# --- a fake NVML: one GPU as plain data, the functions ironpod.health.gpu calls ------------


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_Timeout(NVMLError):
    pass


@dataclass(eq=False)  # handles compare by identity, as NVML's do
class FakeGpu:
    ecc_volatile: int = 0
    reasons: int = 0
    xids: list[int] = field(default_factory=list)


class FakeNvml:
    """Enough of ``pynvml`` for the light GPU checks; tests/test_health_checks.py has the full
    fake, held to the real module. State is set by the bench thread and read by the monitor's:
    plain attribute writes, so a run sees a fault whole or not at all."""

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_Timeout = NVMLError_Timeout
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

    def __init__(self) -> None:
        self.gpu = FakeGpu()
        self.gpus = [self.gpu]

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetIndex(self, gpu: FakeGpu) -> int:
        return self.gpus.index(gpu)

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetTotalEccErrors(self, gpu: FakeGpu, kind: int, counter: int) -> int:
        return gpu.ecc_volatile

    def nvmlDeviceGetRetiredPagesPendingStatus(self, gpu: FakeGpu) -> int:
        return 0

    def nvmlDeviceGetRemappedRows(self, gpu: FakeGpu) -> tuple[int, int, int, int]:
        return (0, 0, 0, 0)

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        return 90 if gpu.reasons else 45

    def nvmlDeviceGetCurrentClocksEventReasons(self, gpu: FakeGpu) -> int:
        return gpu.reasons

    def nvmlDeviceGetCurrPcieLinkWidth(self, gpu: FakeGpu) -> int:
        return 16

    nvmlDeviceGetMaxPcieLinkWidth = nvmlDeviceGetCurrPcieLinkWidth

    def nvmlDeviceGetCurrPcieLinkGeneration(self, gpu: FakeGpu) -> int:
        return 5

    nvmlDeviceGetMaxPcieLinkGeneration = nvmlDeviceGetCurrPcieLinkGeneration

    def nvmlDeviceGetNvLinkState(self, gpu: FakeGpu, link: int) -> int:
        raise NVMLError_NotSupported  # a PCIe card: gpu.nvlink skips

    def nvmlEventSetCreate(self) -> list[FakeGpu]:
        return []

    def nvmlDeviceRegisterEvents(self, gpu: FakeGpu, kinds: int, events: list[FakeGpu]) -> None:
        events.append(gpu)

    def nvmlEventSetWait_v2(self, events: list[FakeGpu], timeout_ms: int) -> SimpleNamespace:
        for gpu in events:
            if gpu.xids:
                return SimpleNamespace(device=gpu, eventType=0x8, eventData=gpu.xids.pop(0))
        raise NVMLError_Timeout

    def nvmlEventSetFree(self, events: list[FakeGpu]) -> None:
        pass


# --- faults --------------------------------------------------------------------------------


@dataclass
class Fault:
    """One kind of fault: ``inject`` makes it real, ``undo`` heals the node again."""

    kind: str
    check: str
    inject: Callable[[], None]
    undo: Callable[[], None]
    skipped: str | None = None  # why this machine cannot make it real


def _nothing() -> None:
    pass


@contextlib.contextmanager
def small_tmpfs() -> Iterator[tuple[Path, str | None]]:
    """A 16 MiB tmpfs for the work_dir, or a plain temporary folder and the reason why not."""
    with tempfile.TemporaryDirectory(prefix="ironpod-health-bench-") as tmp:
        mnt = Path(tmp)
        if os.geteuid() != 0:
            yield mnt, "mounting a tmpfs needs root"
            return
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            yield mnt, f"cannot mount a tmpfs: {done.stderr.strip()}"
            return
        try:
            yield mnt, None
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write to ``path`` until the file system is full (ENOSPC), as a runaway log would."""
    chunk = b"\0" * MIB
    with path.open("wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


class CpuHogs:
    """Busy loops, ``per_cpu`` pinned to each CPU this process may use."""

    def __init__(self, per_cpu: int) -> None:
        self.per_cpu = per_cpu
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for cpu in sorted(os.sched_getaffinity(0)):
            code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
            self.procs += [
                subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.per_cpu)
            ]

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()
        self.procs.clear()


def faults(
    monitor: HealthMonitor, nvml: FakeNvml, work: Path, tmpfs_skip: str | None, hogs: CpuHogs
) -> list[Fault]:
    gpu = nvml.gpu
    hw_thermal = FakeNvml.nvmlClocksEventReasonHwThermalSlowdown
    filler = work / "fill"

    def set_attr(obj: Any, name: str, value: Any) -> Callable[[], None]:
        return functools.partial(setattr, obj, name, value)

    return [
        Fault(
            "disk full",
            "system.disk_free",
            functools.partial(fill, filler),
            functools.partial(filler.unlink, missing_ok=True),
            tmpfs_skip,
        ),
        Fault(
            f"controller clock +{CLOCK_JUMP_S:g} s",
            "system.clock_skew",
            lambda: monitor.set_controller_time(time.time() + CLOCK_JUMP_S),
            lambda: monitor.set_controller_time(time.time()),
        ),
        Fault(
            "uncorrected ECC error",
            "gpu.ecc",
            set_attr(gpu, "ecc_volatile", 1),
            set_attr(gpu, "ecc_volatile", 0),
        ),
        Fault(
            "GPU fell off the bus",
            "gpu.count",
            set_attr(nvml, "gpus", []),
            set_attr(nvml, "gpus", [gpu]),
        ),
        Fault(
            "HW thermal slowdown",
            "gpu.thermal",
            set_attr(gpu, "reasons", hw_thermal),
            set_attr(gpu, "reasons", 0),
        ),
        Fault("XID 79 event", "gpu.xid_events", lambda: gpu.xids.append(79), gpu.xids.clear),
        Fault(
            "XID in kernel log",
            "system.kernel_xid",
            _nothing,
            _nothing,
            "reads the host's /dev/kmsg (no path to point at a file); not writing XIDs into it",
        ),
        Fault("CPU contention", "compute.matmul", hogs.start, hogs.stop),
    ]


# --- measuring -----------------------------------------------------------------------------


def next_run(monitor: HealthMonitor, timeout_s: float) -> tuple[float, list[CheckResult]]:
    """The next run the monitor hands over, and when it was seen (monotonic)."""
    deadline = time.monotonic() + timeout_s
    while (rows := monitor.take()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no health run in {timeout_s:g} s")
        time.sleep(POLL_S)
    return time.monotonic(), rows


def failed(rows: list[CheckResult], check: str) -> CheckResult | None:
    return next((r for r in rows if r.check == check and r.status is Status.FAIL), None)


def run_time(rows: list[CheckResult]) -> float:
    """A run's wall time from its rows (a multi-row check's rows share one duration)."""
    per_check: dict[str, float] = {}
    for r in rows:
        per_check[r.check] = max(per_check.get(r.check, 0.0), r.duration_s)
    return sum(per_check.values())


def detect_once(
    monitor: HealthMonitor, fault: Fault, interval_s: float, rng: random.Random, timeout_s: float
) -> dict[str, Any]:
    """Inject ``fault`` at a random point of the monitor's wait; time until its ``fail`` row."""
    monitor.take()  # drop a run that ended before now
    while True:  # a run that passes for this check, so the fault is all that changes
        ended, rows = next_run(monitor, timeout_s)
        if failed(rows, fault.check) is None:
            break
    offset = rng.uniform(0.0, interval_s)
    time.sleep(max(0.0, ended + offset - time.monotonic()))
    injected = time.monotonic()
    fault.inject()
    try:
        runs = 0
        while True:
            seen, rows = next_run(monitor, timeout_s)
            runs += 1
            row = failed(rows, fault.check)
            if row is not None:
                break
            if seen - injected > timeout_s:
                raise TimeoutError(f"{fault.check}: no fail row {timeout_s:g} s after the fault")
    finally:
        fault.undo()
    return {
        "offset_s": offset,
        "detect_s": seen - injected,
        "runs": runs,
        "check_s": row.duration_s,
        "light_run_s": run_time(rows),
        "message": row.message,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    nvml = FakeNvml()
    hogs = CpuHogs(args.hogs_per_cpu)
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        work, tmpfs_skip = stack.enter_context(small_tmpfs())
        # Lowered so that the empty 16 MiB tmpfs passes (4 MiB free, the 2% default) and the
        # write test fits in it; everything else at the defaults the agent uses.
        limits = HealthThresholds(min_free_disk_gib=4 / 1024, disk_write_test_bytes=MIB)
        config = HealthConfig(join_level=Level.DEEP, interval_s=args.interval, thresholds=limits)
        # HealthMonitor builds its HealthContext itself, without an ``nvml``; the agent never
        # needs one (pynvml is imported on first use). The bench swaps the name the monitor's
        # module looks up for one that passes the fake, and changes nothing else.
        stack.enter_context(
            mock.patch.object(
                agent_health, "HealthContext", functools.partial(HealthContext, nvml=nvml)
            )
        )
        monitor = HealthMonitor(
            config, work_dir=work, shm_dir=None, expected_gpus=1, busy=lambda: False
        )
        monitor.set_controller_time(time.time())  # as the registration reply would
        stack.callback(monitor.close)
        stack.callback(hogs.stop)
        started = time.monotonic()
        monitor.start()
        if not monitor.first_done.wait(JOIN_TIMEOUT_S):
            raise TimeoutError(f"the join-time deep run took over {JOIN_TIMEOUT_S:g} s")
        join_s = time.monotonic() - started
        kinds = []
        for fault in faults(monitor, nvml, work, tmpfs_skip, hogs):
            entry: dict[str, Any] = {
                "kind": fault.kind,
                "check": fault.check,
                "skipped": fault.skipped,
                "detections": [],
            }
            if fault.skipped is None:
                for _ in range(args.repeats):
                    try:
                        got = detect_once(monitor, fault, args.interval, rng, args.timeout)
                    except TimeoutError as exc:
                        entry.setdefault("missed", []).append(str(exc))
                        continue
                    entry["detections"].append(got)
            kinds.append(entry)
        baselines = dict(monitor.baselines)
    return {
        "interval_s": args.interval,
        "heartbeat_s": args.heartbeat,
        "repeats": args.repeats,
        "seed": args.seed,
        "hogs_per_cpu": args.hogs_per_cpu,
        "cpus": len(os.sched_getaffinity(0)),
        "join_deep_run_s": join_s,
        "baselines": baselines,
        "kinds": kinds,
        "wall_s": time.monotonic() - began,
    }


# --- report --------------------------------------------------------------------------------


def report(raw: dict[str, Any], console: Console) -> None:
    interval, heartbeat = raw["interval_s"], raw["heartbeat_s"]
    table = Table(
        title=f"Detection time per check kind: fault -> fail row from HealthMonitor.take(), "
        f"light run every {interval:g} s",
        caption=f"Each fault injected at a seeded random point of the {interval:g} s wait. The "
        f"controller acts on the row at the agent's next heartbeat: + heartbeat = max + "
        f"{heartbeat:g} s.",
    )
    for col in ("kind", "check", "detections", "min", "median", "max", "check run time"):
        table.add_column(col, justify="left" if col in ("kind", "check") else "right")
    table.add_column("+ heartbeat", justify="right", style="bold")
    times_all: list[float] = []
    tried = 0
    notes = []
    for entry in raw["kinds"]:
        if entry["skipped"]:
            notes.append(f"{entry['check']} skipped: {entry['skipped']}")
            table.add_row(entry["kind"], entry["check"], "[dim]skipped[/]", *[""] * 5)
            continue
        tried += raw["repeats"]
        notes += [f"{entry['check']} missed: {why}" for why in entry.get("missed", [])]
        times = [d["detect_s"] for d in entry["detections"]]
        times_all += times
        shown = f"{len(times)}/{raw['repeats']}"
        if not times:
            table.add_row(entry["kind"], entry["check"], f"[red]{shown}[/]", *["-"] * 5)
            continue
        table.add_row(
            entry["kind"],
            entry["check"],
            shown if len(times) == raw["repeats"] else f"[red]{shown}[/]",
            f"{min(times):.2f} s",
            f"{statistics.median(times):.2f} s",
            f"{max(times):.2f} s",
            _fmt_s(statistics.median(d["check_s"] for d in entry["detections"])),
            f"{max(times) + heartbeat:.2f} s",
        )
    console.print(table)
    if any(e.get("missed") for e in raw["kinds"]):
        notes.append(
            f"(matmul baseline learned at join: {raw['baselines']}; a baseline taken "
            "on a loaded machine hides contention)"
        )
    for note in notes:
        console.print(f"[dim]{note}[/]")
    if not times_all:
        console.print("[red]no fault was detected[/]")
        return
    worst = max(times_all)
    light = [
        d["light_run_s"]
        for e in raw["kinds"]
        if e["check"] != "compute.matmul"  # its runs are slowed by the fault itself
        for d in e["detections"]
    ] or [math.nan]
    console.print(
        f"{len(times_all)}/{tried} faults detected: median {statistics.median(times_all):.2f} s, "
        f"worst {worst:.2f} s after the fault, {worst + heartbeat:.2f} s to the controller "
        f"(expected about interval/2 + a light run = {interval / 2:g} + "
        f"{statistics.median(light):.2f} s); join-time deep run "
        f"{raw['join_deep_run_s']:.1f} s, bench {raw['wall_s']:.0f} s."
    )


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, help="light run every S seconds (default 2)")
    parser.add_argument("--repeats", type=int, help="faults per kind (default 3)")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="agent heartbeat, seconds")
    parser.add_argument("--seed", type=int, default=0, help="seeds the injection points")
    parser.add_argument("--hogs-per-cpu", type=int, default=3, help="busy loops per CPU")
    parser.add_argument(
        "--timeout", type=float, help="a fault not caught in S s is missed (5 intervals + 10)"
    )
    parser.add_argument("--quick", action="store_true", help="1 repeat, a 0.5 s interval")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the raw numbers here")
    args = parser.parse_args()
    if args.interval is None:
        args.interval = 0.5 if args.quick else 2.0
    if args.timeout is None:
        args.timeout = 5 * args.interval + 10
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    # SIGTERM unwinds like Ctrl-C, so the hogs are killed and the tmpfs unmounted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # A fault's fail row is the point; the monitor's warning per failed run is noise here.
    logging.getLogger("ironpod").setLevel(logging.ERROR)
    raw = measure(args)
    console = Console()
    if not console.is_terminal:  # a pipe or CI log: do not wrap the table at 80 columns
        console.width = max(console.width, 130)
    report(raw, console)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
