"""Per-rank progress as the agent sees it, and the hang rule built on it.

Progress reaches the agent twice for a script that uses ``ironpod.train.progress``: as a beacon
datagram and as the log line printed next to it. Either counts; a repeat of the step already
seen only refreshes the time, so step durations are not halved. An unmodified script matched
by ``progress_regex`` may give no step number: each matching line then counts as one step for
the timing, and ``last_step`` stays what it was. The step hook (:mod:`ironpod.agent.stephook`)
reports optimizer steps of scripts that report nothing themselves; once a rank reports its own
progress (a beacon of ``ironpod.train``, a progress line, the regex), the hook's beacons only
refresh the time, so the script's own step numbers are the ones kept.

The hang rule (:meth:`RankProgress.overdue`): a rank is hung when nothing came from it for
longer than ``max(factor x median gap, LONGEST_MARGIN x longest recent gap, floor)``, where a
gap is the time between two progress reports. The longest gap of the last hour keeps a periodic
checkpoint or evaluation pass from being taken for a hang once it has been seen. A rank whose
step hook says it is busy (it used CPU in the last ``BUSY_FRESH_S``: an evaluation, a
checkpoint, the teardown after its last step) gets the longer ``max(BUSY_FACTOR x median gap,
BUSY_FLOOR_S)`` instead: a stopped process, or one waiting in a collective, uses no CPU.
"""

from __future__ import annotations

import re
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from ironpod.train.beacon import Metric, parse_progress_line
from ironpod.wire import Assignment

#: Step durations kept per rank for the median (the hang rule and stragglers).
RECENT_STEPS = 20
#: The derived hang timeout is at least this many times the longest gap of the last
#: ``LONGEST_WINDOW_S``: a slow step that recurs (a checkpoint, an evaluation pass) is no hang.
LONGEST_MARGIN = 2.0
LONGEST_WINDOW_S = 3600.0
#: The first gaps after the first report (warm-up, compilation, a cold cache) do not recur:
#: they count for the median, not for the longest gap.
WARMUP_GAPS = 3
#: A busy pulse this recent makes the rank busy (the hook pulses every 0.25 s while it is).
BUSY_FRESH_S = 1.0
#: The timeout of a busy rank: the rule ironpod had before the step hook.
BUSY_FACTOR = 10.0
BUSY_FLOOR_S = 30.0
#: The progress metric with a rank's own compute seconds in a step (no collective waits).
COMPUTE_METRIC = "compute_s"
#: Keys of a beacon or progress line that are not metrics.
_NOT_METRICS = frozenset({"rank", "step", "t", "pid"})


@dataclass(kw_only=True, slots=True)
class ProgressUpdate:
    t: float
    step: int | None
    metrics: dict[str, float | int]
    #: From the step hook: ``step`` counts optimizer steps since the process started.
    hook: bool = False
    #: The hook's pulse: the process used CPU lately (not a step; ``step`` is the hook's count).
    busy: bool = False
    #: The hook's last word: the process is exiting (busy from now on).
    exiting: bool = False


class Overdue(NamedTuple):
    """A rank past its timeout: how long it has been silent, the timeout, and which rule set
    it (``3 x median gap 0.10 s``, ``floor hang_floor_s``, ...), for the hang event."""

    silent: float
    timeout: float
    rule: str


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
    #: Gaps between successive progress reports, for the hang rule (not divided by steps: a
    #: script that reports every 10th step is silent for 10 steps between reports).
    gaps: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    #: (end time, gap) of the gaps of the last LONGEST_WINDOW_S, longest first and each one
    #: longer than all that ended after it (a sliding-window maximum: O(1) per report).
    _longest: deque[tuple[float, float]] = field(default_factory=deque)
    _gaps_seen: int = 0
    #: The rank reports its own progress: the step hook's beacons only refresh the time.
    explicit: bool = False
    last_busy_unix: float | None = None
    exiting: bool = False

    def record(self, update: ProgressUpdate) -> bool:
        """Take one progress report; True if it is this rank's first."""
        first = self.first_progress_unix is None
        t = update.t
        if update.busy:
            self.last_busy_unix = max(t, self.last_busy_unix or t)
            self.exiting = self.exiting or update.exiting
            return False
        if update.hook and self.explicit:
            if self.last_progress_unix is not None:
                self.last_progress_unix = max(t, self.last_progress_unix)
            return False
        if not update.hook and not self.explicit:
            self.explicit = True
            # The hook's count is not the script's step number: no duration across the switch.
            self.last_step = self.last_step_unix = None
        if (
            update.step is None or update.step != self.last_step
        ) and self.last_progress_unix is not None:
            self._add_gap(t, t - self.last_progress_unix)
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

    def _add_gap(self, t: float, gap: float) -> None:
        if gap <= 0:
            return
        self.gaps.append(gap)
        self._gaps_seen += 1
        if self._gaps_seen <= WARMUP_GAPS:
            return
        while self._longest and self._longest[-1][1] <= gap:
            self._longest.pop()
        self._longest.append((t, gap))

    def longest_gap_s(self, now: float) -> float | None:
        """The longest gap between reports that ended in the last hour (warm-up excluded)."""
        while self._longest and self._longest[0][0] < now - LONGEST_WINDOW_S:
            self._longest.popleft()
        return self._longest[0][1] if self._longest else None

    def median_step_s(self) -> float | None:
        return statistics.median(self.step_seconds) if self.step_seconds else None

    def median_gap_s(self) -> float | None:
        return statistics.median(self.gaps) if self.gaps else None

    def median_compute_s(self) -> float | None:
        return statistics.median(self.compute_seconds) if self.compute_seconds else None

    def overdue(
        self,
        assignment: Assignment,
        started_unix: float,
        now: float,
        peers: RankProgress | None = None,
    ) -> Overdue | None:
        """The rank's silence and timeout when it is past the timeout, else None.

        Before the first progress the startup timeout runs from the start. After it: the
        assignment's fixed ``hang_timeout_s``, else ``max(hang_factor x median gap,
        LONGEST_MARGIN x longest recent gap, hang_floor_s)``; while there is no gap to take a
        median of, the startup timeout again (a first step may include compilation and a
        checkpoint load).

        ``peers`` holds what the other ranks of the attempt on this node said of being busy or
        exiting (their latest ``last_busy_unix``, any ``exiting``): a rank that waits in a
        collective uses no CPU while its peer computes (a long evaluation on rank 0, a peer
        slowed by a busy machine, the peer's teardown), so the busy rule is the node's, not
        the rank's alone. A stopped rank and its waiting peers are all idle.
        """
        if self.last_progress_unix is None:
            since, timeout = started_unix, assignment.startup_timeout_s
            rule = "startup_timeout_s, no progress yet"
        else:
            since = self.last_progress_unix
            median = self.median_gap_s()
            if assignment.hang_timeout_s is not None:
                timeout, rule = assignment.hang_timeout_s, "hang_timeout_s"
            elif median is None:
                timeout = assignment.startup_timeout_s
                rule = "startup_timeout_s, one report and no step time yet"
            else:
                timeout, rule = _derived_timeout(
                    assignment.hang_factor, median, self.longest_gap_s(now), assignment.hang_floor_s
                )
                busy_at = max(
                    (t for t in (self.last_busy_unix, peers and peers.last_busy_unix) if t),
                    default=None,
                )
                recent = busy_at is not None and now - busy_at <= BUSY_FRESH_S
                exiting = self.exiting or bool(peers and peers.exiting)
                busy = recent or exiting
                if busy and timeout < max(BUSY_FACTOR * median, BUSY_FLOOR_S):
                    timeout = max(BUSY_FACTOR * median, BUSY_FLOOR_S)
                    why = "exiting" if exiting else "busy (CPU in use on this node)"
                    rule = (
                        f"{why}: max({BUSY_FACTOR:g} x median step {median:.2f} s, "
                        f"{BUSY_FLOOR_S:g} s)"
                    )
        silent = now - since
        return Overdue(silent, timeout, rule) if silent > timeout else None


def _derived_timeout(
    factor: float, median: float, longest: float | None, floor: float
) -> tuple[float, str]:
    """The largest of the three terms of the derived timeout, and which one it is."""
    by_median = factor * median
    terms = [(by_median, f"{factor:g} x median step {median:.2f} s")]
    if longest is not None:
        terms.append(
            (LONGEST_MARGIN * longest, f"{LONGEST_MARGIN:g} x longest recent step {longest:.2f} s")
        )
    terms.append((floor, f"hang_floor_s {floor:g} s (over {factor:g} x median {median:.2f} s)"))
    return max(terms, key=lambda term: term[0])


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
