"""Node checks that need no GPU: disks, /dev/shm, memory, clock, and XIDs in the kernel log."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import psutil

from ironpod.health.core import (
    GIB,
    CheckResult,
    HealthContext,
    HealthThresholds,
    Level,
    Status,
    below,
    result,
)

# Common XIDs and what they mean, from NVIDIA's "XID Errors" guide and catalog
# (https://docs.nvidia.com/deploy/xid-errors/). Which of them fail a node is a threshold
# (HealthThresholds.fail_xids); the rest warn, since many (13, 31, 43) are usually the
# application's own fault.
XID_NAMES: dict[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup after previous errors",
    48: "double bit ECC error",
    61: "internal micro-controller breakpoint/warning",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recorded",
    64: "ECC page retirement or row remapping failed",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}


def xid_name(code: int) -> str:
    return XID_NAMES.get(code, "see NVIDIA's XID catalog")


def xid_status(codes: Iterable[int], thresholds: HealthThresholds) -> Status:
    """``fail`` if any code is in ``fail_xids``, ``warn`` for other XIDs, ``pass`` for none."""
    codes = list(codes)
    if any(code in thresholds.fail_xids for code in codes):
        return Status.FAIL
    return Status.WARN if codes else Status.PASS


def _directories(ctx: HealthContext) -> list[Path]:
    dirs = [ctx.work_dir]
    if ctx.checkpoint_dir is not None and ctx.checkpoint_dir != ctx.work_dir:
        dirs.append(ctx.checkpoint_dir)
    return dirs


@dataclass(slots=True)
class DiskFreeCheck:
    """Free space of the work and checkpoint directories, in GiB and as a share of the disk."""

    name: ClassVar[str] = "system.disk_free"
    level: ClassVar[Level] = Level.LIGHT

    def run(self, ctx: HealthContext) -> list[CheckResult]:
        limits = ctx.thresholds
        rows = []
        for path in _directories(ctx):
            if not path.is_dir():
                rows.append(result(self.name, Status.FAIL, "not a directory", target=str(path)))
                continue
            usage = shutil.disk_usage(path)
            free_gib = usage.free / GIB
            percent = 100.0 * usage.free / usage.total if usage.total else 0.0
            ok = free_gib >= limits.min_free_disk_gib and percent >= limits.min_free_disk_percent
            rows.append(
                result(
                    self.name,
                    Status.PASS if ok else Status.FAIL,
                    f"{free_gib:.3g} GiB free ({percent:.1f}%); need >= "
                    f"{limits.min_free_disk_gib:g} GiB and >= {limits.min_free_disk_percent:g}%",
                    target=str(path),
                    value=free_gib,
                    threshold=limits.min_free_disk_gib,
                    unit="GiB",
                    free_percent=percent,
                    total_bytes=usage.total,
                )
            )
        return rows


@dataclass(slots=True)
class DiskWriteCheck:
    """Sequential write throughput, fsync included, of a temporary file that is then removed."""

    name: ClassVar[str] = "system.disk_write"
    level: ClassVar[Level] = Level.LIGHT
    chunk_bytes: int = 4 << 20

    def run(self, ctx: HealthContext) -> list[CheckResult]:
        return [self._measure(path, ctx.thresholds) for path in _directories(ctx)]

    def _measure(self, path: Path, limits: HealthThresholds) -> CheckResult:
        size = limits.disk_write_test_bytes
        if not path.is_dir():
            return result(self.name, Status.FAIL, "not a directory", target=str(path))
        if shutil.disk_usage(path).free < 2 * size:
            # Writing would take the last of the space a checkpoint may need; disk_free fails.
            return result(
                self.name, Status.SKIP, "too little free space to test writes", target=str(path)
            )
        chunk = os.urandom(min(self.chunk_bytes, size))  # random: compressing filesystems
        fd, name = tempfile.mkstemp(prefix=".ironpod-health-", dir=path)
        try:
            start = time.perf_counter()
            written = 0
            while written < size:
                written += os.write(fd, chunk[: size - written])
            os.fsync(fd)
            elapsed = time.perf_counter() - start
        except OSError as exc:
            reason = "disk full" if exc.errno == errno.ENOSPC else "write failed"
            return result(self.name, Status.FAIL, f"{reason}: {exc}", target=str(path))
        finally:
            os.close(fd)
            os.unlink(name)
        mb_s = size / 1e6 / max(elapsed, 1e-9)
        return below(
            self.name,
            mb_s,
            limits.min_write_mb_s,
            "MB/s",
            target=str(path),
            what="write+fsync",
            bytes=size,
        )


@dataclass(slots=True)
class ShmCheck:
    """Size of /dev/shm (DataLoader workers, NCCL's shared-memory transport)."""

    name: ClassVar[str] = "system.shm"
    level: ClassVar[Level] = Level.LIGHT
    path: Path = Path("/dev/shm")

    def run(self, ctx: HealthContext) -> list[CheckResult]:
        if not self.path.is_dir():
            return [result(self.name, Status.SKIP, f"no {self.path}", target=str(self.path))]
        usage = shutil.disk_usage(self.path)
        return [
            below(
                self.name,
                usage.total / GIB,
                ctx.thresholds.min_shm_bytes / GIB,
                "GiB",
                target=str(self.path),
                what="size",
                free_bytes=usage.free,
            )
        ]


@dataclass(slots=True)
class MemoryCheck:
    """Share of memory available to new processes (psutil's ``available``, not ``free``)."""

    name: ClassVar[str] = "system.memory"
    level: ClassVar[Level] = Level.LIGHT

    def run(self, ctx: HealthContext) -> list[CheckResult]:
        mem = psutil.virtual_memory()
        return [
            below(
                self.name,
                mem.available / mem.total,
                ctx.thresholds.min_available_memory_fraction,
                "fraction",
                what="available",
                available_bytes=mem.available,
                total_bytes=mem.total,
            )
        ]


@dataclass(slots=True)
class ClockSkewCheck:
    """Wall clock against the controller's: skewed clocks misorder logs, leases and TLS."""

    name: ClassVar[str] = "system.clock_skew"
    level: ClassVar[Level] = Level.LIGHT

    def run(self, ctx: HealthContext) -> list[CheckResult]:
        if ctx.controller_time_unix is None:
            return [result(self.name, Status.SKIP, "no controller time to compare with")]
        # Our clock as it read when the controller's reading arrived (ctx creation).
        local = time.time() - (time.monotonic() - ctx.created_monotonic)
        skew = local - ctx.controller_time_unix
        limit = ctx.thresholds.max_clock_skew_s
        ok = abs(skew) <= limit
        return [
            result(
                self.name,
                Status.PASS if ok else Status.FAIL,
                f"local clock {'ahead of' if skew >= 0 else 'behind'} the controller's by "
                f"{abs(skew):.3g} s ({'<=' if ok else '>'} {limit:g} s)",
                value=abs(skew),
                threshold=limit,
                unit="s",
                signed_skew_s=skew,
            )
        ]


@dataclass(frozen=True, slots=True)
class XidEvent:
    """One ``NVRM: Xid`` kernel log line."""

    code: int
    pci: str
    text: str
    uptime_s: float | None = None  # kernel timestamp (seconds since boot), when the line has one

    @property
    def name(self) -> str:
        return xid_name(self.code)


# "[ 1234.567890] NVRM: Xid (PCI:0000:3b:00): 79, pid=..., GPU has fallen off the bus."
# Older drivers omit "PCI:".
_XID_LINE = re.compile(
    r"(?:^\[\s*(?P<ts>\d+\.\d+)\])?.*?NVRM: Xid \((?:PCI:)?(?P<pci>[0-9A-Fa-f:.]+)\): "
    r"(?P<code>\d+)(?:,\s*(?P<text>.*))?"
)


def parse_xid_lines(lines: Iterable[str]) -> list[XidEvent]:
    """The XID events in kernel log lines (``dmesg`` format); other lines are ignored."""
    events = []
    for line in lines:
        match = _XID_LINE.search(line)
        if match:
            ts = match["ts"]
            events.append(
                XidEvent(
                    code=int(match["code"]),
                    pci=match["pci"],
                    text=(match["text"] or "").strip(),
                    uptime_s=float(ts) if ts else None,
                )
            )
    return events


def read_kernel_log() -> list[str] | None:
    """Kernel log lines as ``[uptime] message``, or ``None`` when neither source is readable.

    /dev/kmsg first (no subprocess; opened non-blocking so reading stops at the end of the
    buffer), then ``dmesg``.
    """
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return _dmesg()
    lines = []
    try:
        while True:
            try:
                record = os.read(fd, 8192)  # one record per read: "pri,seq,usec,flags;text\n"
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # the record was overwritten while we read
                    continue
                return _dmesg()
            if not record:
                break
            head, _, text = record.decode(errors="replace").partition(";")
            fields = head.split(",")
            usec = int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else 0
            lines.append(f"[{usec / 1e6:.6f}] {text.splitlines()[0] if text else ''}")
    finally:
        os.close(fd)
    return lines


def _dmesg() -> list[str] | None:
    if shutil.which("dmesg") is None:
        return None
    try:
        done = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.splitlines() if done.returncode == 0 else None


@dataclass(slots=True)
class KernelXidCheck:
    """XIDs the NVIDIA driver logged in the kernel ring buffer (since ``ctx.since_unix``).

    The record of what happened before this process started, which NVML events cannot give.
    """

    name: ClassVar[str] = "system.kernel_xid"
    level: ClassVar[Level] = Level.LIGHT

    def run(self, ctx: HealthContext) -> list[CheckResult]:
        lines = read_kernel_log()
        if lines is None:
            return [result(self.name, Status.SKIP, "kernel log not readable (/dev/kmsg, dmesg)")]
        events = parse_xid_lines(lines)
        if ctx.since_unix is not None:
            boot = psutil.boot_time()
            events = [
                e for e in events if e.uptime_s is None or boot + e.uptime_s >= ctx.since_unix
            ]
        return xid_results(self.name, events, ctx.thresholds, source="kernel log")


def xid_results(
    check: str, events: list[XidEvent], thresholds: HealthThresholds, *, source: str
) -> list[CheckResult]:
    """One row per GPU (PCI address or index) with XIDs; one ``pass`` row when there are none."""
    if not events:
        return [result(check, Status.PASS, f"no XIDs in the {source}", value=0, unit="events")]
    by_target: dict[str, list[XidEvent]] = {}
    for event in events:
        by_target.setdefault(event.pci, []).append(event)
    rows = []
    for target, found in by_target.items():
        codes = sorted({e.code for e in found})
        summary = ", ".join(f"{c} ({xid_name(c)})" for c in codes)
        rows.append(
            result(
                check,
                xid_status(codes, thresholds),
                f"XID {summary}",
                target=target,
                value=len(found),
                unit="events",
                codes=codes,
                last=found[-1].text,
            )
        )
    return rows
