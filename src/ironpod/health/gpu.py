"""GPU checks through NVML (nvidia-ml-py's ``pynvml``) and DCGM's ``dcgmi diag``.

NVML is reached only through ``HealthContext.load_nvml()``, so a node without nvidia-ml-py or a
driver gets one ``skip`` row per check, and tests pass a fake module. A query the GPU or driver
does not support is a ``skip`` for that GPU, not a failure; any other NVML error (GPU lost,
unknown) fails it. Checks cover every GPU NVML sees, whatever ``CUDA_VISIBLE_DEVICES`` says:
they judge the node's hardware, not one job's share of it.

NVML functions are documented in NVIDIA's NVML API reference
(https://docs.nvidia.com/deploy/nvml-api/).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ironpod.health.core import CheckResult, HealthContext, Level, Status, result, worst
from ironpod.health.system import XidEvent, xid_results

# Errors that mean "this GPU, driver or user cannot answer that", not "this GPU is broken".
_SKIP_ERRORS = ("NVMLError_NotSupported", "NVMLError_FunctionNotFound", "NVMLError_NoPermission")


def _error_types(nvml: Any, names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    return tuple(t for n in names if isinstance(t := getattr(nvml, n, None), type))


def _nvml_error_row(check: str, target: str, nvml: Any, exc: Exception) -> CheckResult:
    status = Status.SKIP if isinstance(exc, _error_types(nvml, _SKIP_ERRORS)) else Status.FAIL
    return result(check, status, f"NVML: {exc}", target=target, error=type(exc).__name__)


class NvmlCheck(ABC):
    """Base of the per-GPU NVML checks: owns NVML init/shutdown and error mapping (lesson 2).

    Subclasses implement ``_probe`` for one GPU; ``nvmlInit`` is reference-counted by NVML, so
    each check may open and close its own session.
    """

    name: ClassVar[str]
    level: ClassVar[Level] = Level.LIGHT

    def run(self, ctx: HealthContext) -> list[CheckResult]:
        nvml = ctx.load_nvml()
        if nvml is None:
            return [result(self.name, Status.SKIP, "no NVML (nvidia-ml-py not installed)")]
        try:
            nvml.nvmlInit()
        except Exception as exc:  # LibraryNotFound, DriverNotLoaded, ...: no GPUs to check
            return [result(self.name, Status.SKIP, f"no NVML ({exc})")]
        try:
            return self._run(nvml, ctx)
        finally:
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()

    def _run(self, nvml: Any, ctx: HealthContext) -> list[CheckResult]:
        rows = []
        for index in range(nvml.nvmlDeviceGetCount()):
            target = f"gpu{index}"
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                rows.append(self._probe(nvml, handle, target, ctx))
            except nvml.NVMLError as exc:
                rows.append(_nvml_error_row(self.name, target, nvml, exc))
        if not rows:
            rows.append(result(self.name, Status.SKIP, "NVML sees no GPUs"))
        return rows

    @abstractmethod
    def _probe(self, nvml: Any, handle: Any, target: str, ctx: HealthContext) -> CheckResult: ...


class GpuCountCheck(NvmlCheck):
    """GPUs NVML sees against the node's expected count: a GPU that fell off the bus is gone."""

    name = "gpu.count"

    def _run(self, nvml: Any, ctx: HealthContext) -> list[CheckResult]:
        count = int(nvml.nvmlDeviceGetCount())
        names = []
        for index in range(count):
            try:
                raw = nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(index))
                names.append(raw.decode() if isinstance(raw, bytes) else str(raw))
            except nvml.NVMLError as exc:
                names.append(f"? ({exc})")
        expected = ctx.expected_gpus
        if expected is None:
            status, message = Status.PASS, f"{count} GPUs (no expected count given)"
        elif count < expected:
            status, message = Status.FAIL, f"{count} GPUs, expected {expected}"
        else:
            status, message = Status.PASS, f"{count} GPUs (expected {expected})"
        threshold = float(expected) if expected is not None else None
        return [
            result(
                self.name,
                status,
                message,
                value=count,
                threshold=threshold,
                unit="GPUs",
                names=names,
            )
        ]

    def _probe(self, nvml: Any, handle: Any, target: str, ctx: HealthContext) -> CheckResult:
        raise NotImplementedError  # _run counts the node as a whole


class EccCheck(NvmlCheck):
    """Uncorrected ECC errors: any since the driver loaded fails; lifetime ones only warn."""

    name = "gpu.ecc"

    def _probe(self, nvml: Any, handle: Any, target: str, ctx: HealthContext) -> CheckResult:
        kind = nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        volatile = int(nvml.nvmlDeviceGetTotalEccErrors(handle, kind, nvml.NVML_VOLATILE_ECC))
        lifetime = int(nvml.nvmlDeviceGetTotalEccErrors(handle, kind, nvml.NVML_AGGREGATE_ECC))
        if volatile > 0:
            status, message = Status.FAIL, f"{volatile} uncorrected ECC errors since driver load"
        elif lifetime > 0:
            status, message = Status.WARN, f"{lifetime} uncorrected ECC errors over its lifetime"
        else:
            status, message = Status.PASS, "no uncorrected ECC errors"
        return result(
            self.name,
            status,
            message,
            target=target,
            value=volatile,
            threshold=0,
            unit="errors",
            aggregate=lifetime,
        )


class RetiredPagesCheck(NvmlCheck):
    """Pages marked for retirement but not yet retired (pre-Ampere GPUs).

    A pending retirement takes effect only after a GPU reset or reboot; until then the bad page
    can still be handed out (NVIDIA, "Dynamic Page Retirement",
    https://docs.nvidia.com/deploy/dynamic-page-retirement/).
    """

    name = "gpu.retired_pages"

    def _probe(self, nvml: Any, handle: Any, target: str, ctx: HealthContext) -> CheckResult:
        pending = int(nvml.nvmlDeviceGetRetiredPagesPendingStatus(handle))
        if pending == nvml.NVML_FEATURE_ENABLED:
            return result(
                self.name,
                Status.FAIL,
                "page retirement pending: reset the GPU",
                target=target,
                value=1,
                threshold=0,
            )
        return result(self.name, Status.PASS, "no retirement pending", target=target, value=0)


class RemappedRowsCheck(NvmlCheck):
    """Row remapping (Ampere and later): a pending remap needs a GPU reset, a failed one service.

    NVIDIA, "GPU Memory Error Management", https://docs.nvidia.com/deploy/a100-gpu-mem-error-mgmt/
    """

    name = "gpu.remapped_rows"

    def _probe(self, nvml: Any, handle: Any, target: str, ctx: HealthContext) -> CheckResult:
        corrected, uncorrected, pending, failed = nvml.nvmlDeviceGetRemappedRows(handle)
        counts = {"correctable_rows": int(corrected), "uncorrectable_rows": int(uncorrected)}
        if failed:
            status, message = Status.FAIL, "row remapping failed: the GPU needs service"
        elif pending:
            status, message = Status.FAIL, "row remapping pending: reset the GPU"
        else:
            status, message = Status.PASS, f"{corrected + uncorrected} rows remapped, none pending"
        return result(
            self.name,
            status,
            message,
            target=target,
            value=int(uncorrected),
            unit="rows",
            **counts,
        )


def _reason_bit(nvml: Any, reason: str) -> int:
    """NVML renamed clocks "throttle" reasons to "event" reasons (12.x); same bit values."""
    for prefix in ("nvmlClocksEventReason", "nvmlClocksThrottleReason"):
        value = getattr(nvml, prefix + reason, None)
        if value is not None:
            return int(value)
    return 0


def _clock_reasons(nvml: Any, handle: Any) -> int | None:
    query = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    query = query or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    try:
        return int(query(handle))
    except _error_types(nvml, _SKIP_ERRORS):
        return None


class ThermalCheck(NvmlCheck):
    """Temperature and active clock slowdowns.

    Hardware thermal slowdown and power-brake slowdown fail (cooling or power delivery is at
    fault and the GPU runs far below its clocks); software thermal slowdown and a temperature
    above ``max_gpu_temp_c`` warn.
    """

    name = "gpu.thermal"

    def _probe(self, nvml: Any, handle: Any, target: str, ctx: HealthContext) -> CheckResult:
        temp = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        reasons = _clock_reasons(nvml, handle)
        limit = ctx.thresholds.max_gpu_temp_c
        active = [
            reason
            for reason in ("HwThermalSlowdown", "HwPowerBrakeSlowdown", "SwThermalSlowdown")
            if reasons is not None and reasons & _reason_bit(nvml, reason)
        ]
        if {"HwThermalSlowdown", "HwPowerBrakeSlowdown"} & set(active):
            status = Status.FAIL
        elif active or temp > limit:
            status = Status.WARN
        else:
            status = Status.PASS
        message = f"{temp:.0f} C"
        if active:
            message += "; slowdown: " + ", ".join(active)
        elif reasons is None:
            message += "; clock event reasons not supported"
        return result(
            self.name,
            status,
            message,
            target=target,
            value=temp,
            threshold=limit,
            unit="C",
            clock_event_reasons=reasons,
            slowdowns=active,
        )


class PcieCheck(NvmlCheck):
    """PCIe link width against the widest the GPU and slot allow.

    A link trained narrower than its maximum (a bad riser, a dusty slot) fails. A lower link
    *generation* alone passes with a note: GPUs drop to a lower generation when idle to save
    power and return to the maximum under load.
    """

    name = "gpu.pcie"

    def _probe(self, nvml: Any, handle: Any, target: str, ctx: HealthContext) -> CheckResult:
        width = int(nvml.nvmlDeviceGetCurrPcieLinkWidth(handle))
        max_width = int(nvml.nvmlDeviceGetMaxPcieLinkWidth(handle))
        gen = int(nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle))
        max_gen = int(nvml.nvmlDeviceGetMaxPcieLinkGeneration(handle))
        link = f"x{width} gen{gen} (max x{max_width} gen{max_gen})"
        if width < max_width:
            status, message = Status.FAIL, f"link downtrained: {link}"
        elif gen < max_gen:
            status, message = Status.PASS, f"{link}; a lower generation is normal at idle"
        else:
            status, message = Status.PASS, link
        return result(
            self.name,
            status,
            message,
            target=target,
            value=width,
            threshold=max_width,
            unit="lanes",
            generation=gen,
            max_generation=max_gen,
        )


class NvlinkCheck(NvmlCheck):
    """Every NVLink the GPU reports must be active; a GPU without NVLink is a ``skip``."""

    name = "gpu.nvlink"

    def _probe(self, nvml: Any, handle: Any, target: str, ctx: HealthContext) -> CheckResult:
        absent = _error_types(nvml, (*_SKIP_ERRORS, "NVMLError_InvalidArgument"))
        states: dict[int, int] = {}
        for link in range(int(nvml.NVML_NVLINK_MAX_LINKS)):
            try:
                states[link] = int(nvml.nvmlDeviceGetNvLinkState(handle, link))
            except absent:
                continue  # the GPU has fewer links than the maximum
        if not states:
            return result(self.name, Status.SKIP, "no NVLink", target=target)
        down = [link for link, state in states.items() if state != nvml.NVML_FEATURE_ENABLED]
        active = len(states) - len(down)
        status = Status.FAIL if down else Status.PASS
        message = f"{active}/{len(states)} links active" + (f"; down: {down}" if down else "")
        return result(
            self.name,
            status,
            message,
            target=target,
            value=active,
            threshold=len(states),
            unit="links",
            down=down,
        )


@dataclass(slots=True)
class XidEventCheck:
    """XID critical-error events from NVML's event API.

    An event set only receives events raised after it was registered, so this check keeps its
    set (and an NVML session) open between runs: keep one instance for the life of the agent,
    and each run reports the XIDs since the previous one. A one-shot run sees only XIDs raised
    while it runs; ``system.kernel_xid`` reads the older record. ``close()`` releases NVML.
    """

    name: ClassVar[str] = "gpu.xid_events"
    level: ClassVar[Level] = Level.LIGHT
    wait_ms: int = 0  # each wait returns at once when no event is queued
    max_events: int = 1000
    _nvml: Any = field(default=None, init=False, repr=False)
    _set: Any = field(default=None, init=False, repr=False)
    _registered: list[int] = field(default_factory=list, init=False, repr=False)

    def run(self, ctx: HealthContext) -> list[CheckResult]:
        nvml = ctx.load_nvml()
        if nvml is None:
            return [result(self.name, Status.SKIP, "no NVML (nvidia-ml-py not installed)")]
        if self._nvml is not nvml:
            self.close()
            try:
                self._open(nvml)
            except Exception as exc:
                self.close()
                return [result(self.name, Status.SKIP, f"no NVML ({exc})")]
        if not self._registered:
            return [result(self.name, Status.SKIP, "XID events not supported on these GPUs")]
        return xid_results(self.name, self._drain(nvml), ctx.thresholds, source="NVML events")

    def _open(self, nvml: Any) -> None:
        nvml.nvmlInit()
        self._nvml = nvml
        self._set = nvml.nvmlEventSetCreate()
        skippable = _error_types(nvml, _SKIP_ERRORS)
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            try:
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, self._set)
            except skippable:
                continue
            self._registered.append(index)

    def _drain(self, nvml: Any) -> list[XidEvent]:
        wait = getattr(nvml, "nvmlEventSetWait_v2", None) or nvml.nvmlEventSetWait
        timeout = _error_types(nvml, ("NVMLError_Timeout",))
        events = []
        for _ in range(self.max_events):
            try:
                data = wait(self._set, self.wait_ms)
            except timeout:
                break
            try:
                target = f"gpu{int(nvml.nvmlDeviceGetIndex(data.device))}"
            except nvml.NVMLError:
                target = "gpu?"
            code = int(data.eventData)
            events.append(XidEvent(code=code, pci=target, text=f"Xid {code}"))
        return events

    def close(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is None:
            return
        if self._set is not None:
            with contextlib.suppress(Exception):
                nvml.nvmlEventSetFree(self._set)
        self._set = None
        self._registered.clear()
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


# "| PCIe                      | Pass - All           |"  (dcgmi diag's result table)
_DCGM_ROW = re.compile(
    r"^\|\s*(?P<test>[^|]*?)\s*\|\s*(?P<result>Pass|Fail|Warn|Skip)\b(?P<rest>[^|]*)", re.I
)
_DCGM_STATUS = {"pass": Status.PASS, "fail": Status.FAIL, "warn": Status.WARN, "skip": Status.SKIP}


def parse_dcgm_diag(text: str) -> dict[str, str]:
    """Test name -> result text ("Pass - All", "Fail - GPU: 0") from ``dcgmi diag`` output."""
    tests = {}
    for line in text.splitlines():
        match = _DCGM_ROW.match(line.strip())
        if match and match["test"]:
            tests[match["test"]] = (match["result"] + match["rest"]).strip()
    return tests


@dataclass(slots=True)
class DcgmDiagCheck:
    """NVIDIA DCGM diagnostics (``dcgmi diag -r N``), when DCGM is installed.

    Level 2 (a couple of minutes) by default; ``HealthThresholds.dcgm_level`` = 3 or 4 adds the
    long stress and memory tests (NVIDIA DCGM user guide, "DCGM Diagnostics").
    """

    name: ClassVar[str] = "gpu.dcgm_diag"
    level: ClassVar[Level] = Level.DEEP
    command: str = "dcgmi"

    def run(self, ctx: HealthContext) -> list[CheckResult]:
        binary = shutil.which(self.command)
        if binary is None:
            return [result(self.name, Status.SKIP, "dcgmi not installed")]
        run_level = ctx.thresholds.dcgm_level
        try:
            done = subprocess.run(
                [binary, "diag", "-r", str(run_level)],
                capture_output=True,
                text=True,
                timeout=ctx.thresholds.dcgm_timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return [
                result(
                    self.name,
                    Status.FAIL,
                    f"dcgmi diag -r {run_level} ran past {ctx.thresholds.dcgm_timeout_s:g} s",
                )
            ]
        output = done.stdout + done.stderr
        tests = parse_dcgm_diag(output)
        if not tests:
            tail = " ".join(output.split())[-300:]
            if "host engine" in output.lower():
                return [result(self.name, Status.SKIP, f"DCGM host engine unreachable: {tail}")]
            return [result(self.name, Status.FAIL, f"no results (exit {done.returncode}): {tail}")]
        statuses = {t: _DCGM_STATUS[r.split()[0].lower()] for t, r in tests.items()}
        overall = worst(result(self.name, s) for s in statuses.values())  # all skipped: skip
        bad = [f"{t}: {tests[t]}" for t, s in statuses.items() if s in (Status.FAIL, Status.WARN)]
        message = "; ".join(bad) if bad else f"{len(tests)} tests, none failed"
        return [
            result(
                self.name,
                overall,
                message,
                value=len(bad),
                threshold=0,
                unit="tests",
                run_level=run_level,
                tests=tests,
                exit_code=done.returncode,
            )
        ]
