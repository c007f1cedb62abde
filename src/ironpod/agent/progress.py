"""Per-rank progress as the agent sees it, and the hang rule built on it.

Progress reaches the agent twice for a script that uses ``ironpod.train.progress``: as a beacon
datagram and as the log line printed next to it. Either counts; a repeat of the step already
seen only refreshes the time, so step durations are not halved. An unmodified script matched
by ``progress_regex`` may give no step number: each matching line then counts as one step for
the timing, and ``last_step`` stays what it was.
"""

from __future__ import annotations

import re
import statistics
from collections import deque
from dataclasses import dataclass, field

from ironpod.train.beacon import Metric, parse_progress_line
from ironpod.wire import Assignment

#: Step durations kept per rank for the median (the hang rule and stragglers).
RECENT_STEPS = 20
#: The progress metric with a rank's own compute seconds in a step (no collective waits).
COMPUTE_METRIC = "compute_s"
#: Keys of a beacon or progress line that are not metrics.
_NOT_METRICS = frozenset({"rank", "step", "t", "pid"})


@dataclass(kw_only=True, slots=True)
class ProgressUpdate:
    t: float
    step: int | None
    metrics: dict[str, float | int]


@dataclass(slots=True)
class RankProgress:
    last_step: int | None = None
    last_step_unix: float | None = None
    first_progress_unix: float | None = None
    last_progress_unix: float | None = None
    step_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    #: The rank's own compute time per step (``compute_s``, if the script reports it): in
    #: synchronous training every rank's step takes as long as the slowest's, so stragglers
    #: show only in the time each spends computing rather than waiting in collectives.
    compute_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    metrics: dict[str, float | int] = field(default_factory=dict)

    def record(self, update: ProgressUpdate) -> bool:
        """Take one progress report; True if it is this rank's first."""
        first = self.first_progress_unix is None
        t = update.t
        if update.step is None:
            if self.last_progress_unix is not None and t > self.last_progress_unix:
                self.step_seconds.append(t - self.last_progress_unix)
        elif update.step != self.last_step:
            # A step arrives twice (beacon and log line): count its checkpoint stall once.
            compute = update.metrics.get(COMPUTE_METRIC)
            if isinstance(compute, int | float) and compute > 0:
                self.compute_seconds.append(float(compute))
            stall = update.metrics.get("ckpt_block_s")
            if isinstance(stall, int | float):
                total = float(self.metrics.get("ckpt_block_total_s", 0.0)) + float(stall)
                self.metrics["ckpt_block_total_s"] = total
            if self.last_step is not None and self.last_step_unix is not None:
                steps = update.step - self.last_step
                if steps > 0 and t > self.last_step_unix:
                    self.step_seconds.append((t - self.last_step_unix) / steps)
            self.last_step, self.last_step_unix = update.step, t
        if first:
            self.first_progress_unix = t
        self.last_progress_unix = max(t, self.last_progress_unix or t)
        self.metrics.update(update.metrics)
        return first

    def median_step_s(self) -> float | None:
        return statistics.median(self.step_seconds) if self.step_seconds else None

    def median_compute_s(self) -> float | None:
        return statistics.median(self.compute_seconds) if self.compute_seconds else None

    def overdue(
        self, assignment: Assignment, started_unix: float, now: float
    ) -> tuple[float, float] | None:
        """(seconds without progress, timeout) when the rank is past its timeout, else None.

        Before the first progress the startup timeout runs from the start. After it: the
        assignment's fixed ``hang_timeout_s``, else ``max(factor x median step, floor)``; while
        there is no step duration to take a median of, the startup timeout again (a first step
        may include compilation and a checkpoint load).
        """
        if self.last_progress_unix is None:
            since, timeout = started_unix, assignment.startup_timeout_s
        else:
            since = self.last_progress_unix
            median = self.median_step_s()
            if assignment.hang_timeout_s is not None:
                timeout = assignment.hang_timeout_s
            elif median is None:
                timeout = assignment.startup_timeout_s
            else:
                timeout = max(assignment.hang_factor * median, assignment.hang_floor_s)
        silent = now - since
        return (silent, timeout) if silent > timeout else None


def numeric_metrics(fields: dict[str, object]) -> dict[str, float | int]:
    """The numeric metrics of a beacon or progress line (loss, tok_s, ckpt_block_s, ...)."""
    return {
        key: value
        for key, value in fields.items()
        if key not in _NOT_METRICS
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }


class LineMatcher:
    """Decides whether a worker's log line is progress: an ironpod progress line or the regex.

    A regex may name a group ``step`` (or have one unnamed group) holding the step number.
    """

    def __init__(self, progress_regex: str | None) -> None:
        self._regex = re.compile(progress_regex) if progress_regex else None

    def match(self, line: str, t: float) -> ProgressUpdate | None:
        fields: dict[str, Metric] | None = parse_progress_line(line)
        if fields is not None:
            step = fields.get("step")
            return ProgressUpdate(
                t=t,
                step=step if isinstance(step, int) else None,
                metrics=numeric_metrics(dict(fields)),
            )
        if self._regex is None:
            return None
        found = self._regex.search(line)
        if found is None:
            return None
        return ProgressUpdate(t=t, step=_step_of(found), metrics={})


def _step_of(found: re.Match[str]) -> int | None:
    raw = found.groupdict().get("step")
    if raw is None and found.re.groups >= 1:
        raw = found.group(1)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None
