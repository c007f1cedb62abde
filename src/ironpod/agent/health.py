"""The agent's health monitor: the deep suite once at start, the light suite every interval.

The agent runs :mod:`ironpod.health` itself and reports rows, never verdicts: the controller's
policy decides what a ``fail`` means (quarantine, label only). So a run's results are handed to
the next heartbeat once (:meth:`HealthMonitor.take`), and the agent registers only after the
join-time run, so that the controller never counts as healthy a node it has not heard checked.

Checks run on one thread of their own: a deep run takes seconds to minutes and must not delay
heartbeats. Two things live across runs: the ``gpu.xid_events`` check (it holds an NVML event
set, so an XID between two runs is still seen) and the node's baselines (the first good matmul
measurement; later runs are compared with it). While the node's workers run, the checks in
:data:`SKIP_WHILE_BUSY` are left out: a throughput benchmark would both slow the job and
measure the job rather than the hardware; nor is a baseline taken then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ironpod.errors import ConfigError
from ironpod.health import (
    Check,
    CheckResult,
    HealthContext,
    HealthThresholds,
    Level,
    Status,
    XidEventCheck,
    default_checks,
    run_checks,
    worst,
)

log = logging.getLogger(__name__)

#: Checks not run while the node trains: they compete with the job for the device.
SKIP_WHILE_BUSY = frozenset(
    {"compute.matmul", "compute.gpu_memory", "collective.allreduce", "system.disk_write"}
)


@dataclass(kw_only=True, slots=True)
class HealthConfig:
    """``join_level`` None runs nothing at all (``--health-level none``); ``interval_s`` paces
    the light runs after the join-time run; ``skip`` names checks never run here."""

    join_level: Level | None = Level.DEEP
    interval_s: float = 30.0
    skip: frozenset[str] = frozenset()
    thresholds: HealthThresholds = field(default_factory=HealthThresholds)


def parse_level(text: str) -> Level | None:
    """``--health-level``: ``none``, ``light`` or ``deep``."""
    if text == "none":
        return None
    try:
        return Level(text)
    except ValueError:
        raise ConfigError(f"--health-level {text!r}: expected none, light or deep") from None


def parse_thresholds(items: list[str]) -> HealthThresholds:
    """``--health-threshold KEY=VALUE`` items over the defaults, validated by the model."""
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--health-threshold {item!r}: expected KEY=VALUE")
        values[key] = value
    try:
        return HealthThresholds.model_validate(values)
    except ValueError as exc:
        first = str(exc).splitlines()
        raise ConfigError(f"--health-threshold: {' '.join(first[1:3]) or exc}") from None


class HealthMonitor:
    """Runs the suites on a thread; :meth:`take` hands each finished run over once."""

    def __init__(
        self,
        config: HealthConfig,
        *,
        work_dir: Path,
        shm_dir: Path | None,
        expected_gpus: int | None,
        busy: Callable[[], bool],
    ) -> None:
        self.config = config
        self._work_dir = work_dir
        self._shm_dir = shm_dir
        self._expected_gpus = expected_gpus
        self._busy = busy
        self._xid = XidEventCheck()
        self._checks: list[Check] = [
            self._xid if isinstance(c, XidEventCheck) else c
            for c in default_checks(Level.DEEP)
            if c.name not in config.skip
        ]
        self.baselines: dict[str, float] = {}
        self._lock = threading.Lock()
        self._pending: list[CheckResult] | None = None
        self._controller_time: tuple[float, float] | None = None  # (its time, our monotonic)
        self._started_unix = time.time()
        self.first_done = threading.Event()
        self._stop = threading.Event()
        self._wanted: Level | None = None  # a level asked for (the controller's recheck)
        self._thread = threading.Thread(target=self._loop, name="agent-health", daemon=True)
        if config.join_level is None:
            self.first_done.set()

    def start(self) -> None:
        if self.config.join_level is not None:
            self._thread.start()

    def set_controller_time(self, controller_unix: float | None) -> None:
        """The controller's clock as of now (from a heartbeat reply), for the skew check."""
        if controller_unix is not None:
            with self._lock:
                self._controller_time = (controller_unix, time.monotonic())

    def take(self) -> list[CheckResult] | None:
        """The newest finished run not yet handed over, or None."""
        with self._lock:
            found, self._pending = self._pending, None
        return found

    def run_once(self, level: Level) -> list[CheckResult]:
        """One run of ``level`` now (on the caller's thread); also queued for :meth:`take`."""
        busy = self._busy()
        checks = [c for c in self._checks if not (busy and c.name in SKIP_WHILE_BUSY)]
        with self._lock:
            skew = self._controller_time
        ctx = HealthContext(
            work_dir=self._work_dir,
            checkpoint_dir=self._shm_dir,
            expected_gpus=self._expected_gpus,
            controller_time_unix=skew[0] if skew else None,
            created_monotonic=skew[1] if skew else time.monotonic(),
            since_unix=self._started_unix,
            baselines=dict(self.baselines),
            thresholds=self.config.thresholds,
        )
        began = time.monotonic()
        results = run_checks(checks, ctx, level)
        if not busy:
            self._learn_baselines(results)
        status = worst(results)
        failed = [f"{r.check} {r.target}".strip() for r in results if r.status == Status.FAIL]
        log_at = logging.WARNING if failed else logging.DEBUG
        log.log(
            log_at,
            "%s health run: %s in %.2f s%s",
            level,
            status,
            time.monotonic() - began,
            f" (failed: {', '.join(failed)})" if failed else "",
        )
        with self._lock:
            self._pending = results
        return results

    def _learn_baselines(self, results: list[CheckResult]) -> None:
        """The first passing measurement of a baseline-less metric becomes its baseline."""
        for r in results:
            key = r.details.get("baseline_key")
            if (
                isinstance(key, str)
                and key not in self.baselines
                and r.status == Status.PASS
                and r.value
            ):
                self.baselines[key] = r.value
                log.info("health baseline %s = %.4g %s", key, r.value, r.unit)

    def request(self, level: Level) -> None:
        """Make the next run (at the usual interval) this level: the controller asks for the
        deep suite to recheck a node it took out for a failed check."""
        with self._lock:
            self._wanted = level

    def _loop(self) -> None:
        level = self.config.join_level or Level.LIGHT
        while not self._stop.is_set():
            try:
                self.run_once(level)
            except Exception:  # run_checks never raises; this guards the monitor's own code
                log.exception("health run failed")
            self.first_done.set()
            self._stop.wait(self.config.interval_s)
            with self._lock:
                level, self._wanted = self._wanted or Level.LIGHT, None

    def close(self) -> None:
        self._stop.set()
        self.first_done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._xid.close()
