"""What bench/goodput.py measures, the same way for every system: lines, faults, one run.

A run is read from the workers' output only (files that the system writes, followed every
25 ms, each line stamped when read): rank 0's steps (``[ironpod] progress rank=0 step=N`` of
the recipe, ``step=N loss=X`` of the plain script), the start line of each worker run
(``[gpt] ...`` / ``[ddp] resuming after step N`` or ``from scratch``) and torchrun's own
"Worker group FAILED" and "Rendezvous complete" notes.
"""

from __future__ import annotations

import glob
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, median
from typing import TYPE_CHECKING, Any

from rich.progress import Progress

from ironpod.train.beacon import parse_progress_line

if TYPE_CHECKING:
    from goodput_kit.systems import System

KINDS = ("crash", "hang", "node loss")
POLL_S = 0.05
TAIL_S = 0.025
WINDOW = 8  # steps per window of the median step time
_START_RE = re.compile(r"\[(?:gpt|ddp)\] .*?(?:resuming after step (\d+)|from scratch)")
_STEP_RE = re.compile(r"\bstep=(\d+) loss=(\S+)")
#: torchrun's own notes (LOGLEVEL=INFO): a failure seen, a rendezvous round done.
_NOTES = {"Worker group FAILED": "failed", "Rendezvous complete for workers": "round"}


# -- the schedule


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    step: int  # fires once rank 0 has reported this step
    rank: int  # the rank whose worker is hit (crash, hang) or whose node is lost


def make_schedule(
    steps: int, every: int, counts: dict[str, int], seed: int, *, ranks: int, lose_rank: int
) -> list[Fault]:
    """One fault per equal slot of [max(K+1, 15%), 90%] of the run, kinds shuffled by the seed."""
    rng = random.Random(seed)
    kinds = [k for k in KINDS for _ in range(counts.get(k, 0))]
    rng.shuffle(kinds)
    lo, hi = max(every + 1, round(0.15 * steps)), round(0.9 * steps)
    width = (hi - lo) / max(1, len(kinds))
    faults = []
    for i, kind in enumerate(kinds):
        start = lo + round(i * width)
        step = rng.randint(start, max(start, lo + round((i + 1) * width) - 1))
        rank = lose_rank if kind == "node loss" else rng.randrange(ranks)
        faults.append(Fault(kind, step, rank))
    return faults


# -- what the workers print


@dataclass(slots=True)
class Line:
    """One time-stamped line that matters: a run's start, a rank-0 step, an agent's note."""

    t: float
    kind: str  # "start" | "step" | "failed" | "round"
    step: int = 0
    loss: float | None = None
    val_loss: float | None = None
    source: str = ""


def parse(text: str, now: float, source: str) -> Line | None:
    fields = parse_progress_line(text)
    if fields is not None:
        if fields.get("rank") != 0:
            return None
        val = fields.get("val_loss")
        val_loss = float(val) if isinstance(val, int | float) else None
        return Line(now, "step", int(fields["step"]), float(fields["loss"]), val_loss, source)
    if (found := _STEP_RE.search(text)) is not None:
        return Line(now, "step", int(found.group(1)), float(found.group(2)), source=source)
    if (found := _START_RE.search(text)) is not None:
        return Line(now, "start", int(found.group(1) or 0), source=source)
    for marker, kind in _NOTES.items():
        if marker in text:
            return Line(now, kind, source=source)
    return None


class Tail:
    """Follows every file matching some globs from a thread; lines are stamped when read."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = patterns
        self.lines: list[Line] = []
        self._offsets: dict[str, int] = {}
        self._partial: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tail", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(TAIL_S):
            self._pass()
        self._pass()

    def _pass(self) -> None:
        for path in sorted(p for pattern in self.patterns for p in glob.glob(pattern)):
            try:
                with open(path, "rb") as f:
                    f.seek(self._offsets.get(path, 0))
                    data = f.read()
            except OSError:
                continue
            if not data:
                continue
            now = time.time()
            self._offsets[path] = self._offsets.get(path, 0) + len(data)
            *complete, rest = (self._partial.pop(path, b"") + data).split(b"\n")
            self._partial[path] = rest
            for raw in complete:
                line = parse(raw.decode(errors="replace"), now, Path(path).name)
                if line is not None:
                    self.lines.append(line)  # list.append is atomic; readers slice a copy

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# -- one run's record


@dataclass(slots=True)
class FaultRecord:
    kind: str
    planned_step: int
    rank: int
    target: str = ""
    injected_t: float | None = None
    at_step: int | None = None  # rank 0's last step when the fault fired
    last_step: int | None = None  # the failed run's last step (may be one more, in flight)
    detected_t: float | None = None
    restarted: bool = False  # a new run has started since
    resumed_from: int | None = None
    first_step_t: float | None = None
    recovered_t: float | None = None

    def after(self, t: float | None) -> float | None:
        return None if t is None or self.injected_t is None else t - self.injected_t


@dataclass(slots=True)
class RunResult:
    system: str
    workload: str
    fault_free: bool = False
    finished: bool = False
    reason: str = ""
    started_t: float = 0.0
    ended_t: float = 0.0
    steps: int = 0
    faults: list[FaultRecord] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    stretches: list[list[float]] = field(default_factory=list)  # times of consecutive steps
    restarts: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: The step time that counts as one step of progress: bare torchrun's fault-free median
    #: step on this workload in the same invocation (set once it is known). A run whose own
    #: steps got slower then shows a lower ETTR instead of hiding the slowdown.
    yardstick_s: float | None = None

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.system}" + (" fault-free" if self.fault_free else "")

    @property
    def wall(self) -> float:
        return self.ended_t - self.started_t

    @property
    def executed(self) -> list[Line]:
        return [ln for ln in self.lines if ln.kind == "step"]

    @property
    def high_water(self) -> int:
        return max((ln.step for ln in self.executed), default=0)

    @property
    def kept(self) -> int:
        return self.steps if self.finished else self.high_water

    @property
    def recomputed(self) -> int:
        return len(self.executed) - len({ln.step for ln in self.executed})

    @property
    def median_step(self) -> float:
        """Median over windows of up to 8 consecutive steps of their time per step: lines are
        read every 25 ms, which blurs the gap between two steps but hardly an 8-step span."""
        width = min(WINDOW, max((len(ts) for ts in self.stretches), default=0) - 1)
        spans = [
            (ts[i + width] - ts[i]) / width
            for ts in self.stretches
            for i in range(len(ts) - width)
            if width > 0
        ]
        return median(spans) if spans else float("nan")

    @property
    def step_unit(self) -> float:
        return self.yardstick_s if self.yardstick_s else self.median_step

    @property
    def lost(self) -> float:
        """Seconds that did not become kept progress: start-up, recovery, recomputation,
        and any slowdown of the steps themselves against the yardstick."""
        return self.wall - self.kept * self.step_unit

    @property
    def ettr(self) -> float:
        return self.kept * self.step_unit / self.wall if self.wall > 0 else float("nan")

    def mean_after(self, attr: str, kind: str | None = None) -> float | None:
        chosen = [f for f in self.faults if f.injected_t is not None and kind in (None, f.kind)]
        values = [f.after(getattr(f, attr)) for f in chosen]
        known = [v for v in values if v is not None]
        return fmean(known) if known and len(known) == len(values) else None

    def final(self) -> Line | None:
        last = [ln for ln in self.executed if ln.step == self.steps]
        return last[-1] if last and self.finished else None


def describe(kind: str, rank: int) -> str:
    return f"node loss (node {rank})" if kind == "node loss" else f"{kind} (rank {rank})"


class Tracker:
    """Reads the lines in order: step times, the high-water step, each fault's recovery."""

    def __init__(self, result: RunResult) -> None:
        self.result = result
        self.high, self.high_t = 0, result.started_t
        self._seen = 0
        self._previous: Line | None = None

    def feed(self, lines: list[Line]) -> FaultRecord | None:
        """Take the lines not seen yet; returns the fault not yet recovered from, if any."""
        new = lines[self._seen :]
        self._seen += len(new)
        faults = self.result.faults
        pending = next((f for f in faults if f.injected_t and not f.recovered_t), None)
        for ln in new:
            if ln.kind == "start":
                if pending is not None and not pending.first_step_t:
                    pending.restarted, pending.resumed_from = True, ln.step
                self._previous = None
            elif ln.kind == "failed" and pending is not None and pending.detected_t is None:
                pending.detected_t = ln.t
            elif ln.kind == "step":
                if pending is not None and not pending.restarted:  # the failed run, in flight
                    pending.last_step = max(pending.last_step or 0, ln.step)
                elif pending is not None:
                    pending.first_step_t = pending.first_step_t or ln.t
                    if ln.step > (pending.last_step or 0):
                        pending.recovered_t, pending = ln.t, None
                if self._previous is not None and ln.step == self._previous.step + 1:
                    self.result.stretches[-1].append(ln.t)
                else:
                    self.result.stretches.append([ln.t])
                self._previous = ln
                if ln.step > self.high:
                    self.high, self.high_t = ln.step, ln.t
        return pending


@dataclass(kw_only=True, slots=True)
class Limits:
    cap_s: float  # a run not done by then is stopped
    stall_s: float  # nor one without a new step for this long


def run(
    system: System, faults: list[Fault], limits: Limits, progress: Progress, label: str
) -> RunResult:
    result = RunResult(system.name, system.workload, fault_free=not faults, steps=system.steps)
    result.faults = [FaultRecord(f.kind, f.step, f.rank) for f in faults]
    task = progress.add_task(label, total=system.steps, info="starting")
    system.prepare()
    progress.update(task, info="launching")
    tail = Tail(system.patterns())
    result.started_t = time.time()
    system.launch()
    track = Tracker(result)
    done = 0
    outcome: tuple[bool, str] | None = None
    try:
        while outcome is None:
            now = time.time()
            system.tick(now)
            pending = track.feed(tail.lines)
            if done < len(faults) and track.high >= faults[done].step and pending is None:
                record = result.faults[done]
                record.injected_t, record.at_step = time.time(), track.high
                record.last_step = track.high
                record.target = system.inject(faults[done])
                progress.console.print(
                    f"{label}: {record.kind} after step {track.high}: {record.target}",
                    highlight=False,
                )
                done += 1
            outcome = system.poll()
            info = f"faults {done}/{len(faults)}" + (", recovering" if pending else "")
            progress.update(task, completed=track.high, info=info)
            where = f"step {track.high}"
            if outcome is None and now - result.started_t > limits.cap_s:
                outcome = False, f"stopped at the {limits.cap_s:.0f} s cap ({where})"
            elif outcome is None and now - track.high_t > limits.stall_s:
                outcome = False, f"no new step for {limits.stall_s:.0f} s (stuck at {where})"
            time.sleep(POLL_S)
    finally:
        result.ended_t = system.ended or time.time()
        tail.close()
        track.feed(tail.lines)  # what the last read brought in
        result.finished, result.reason = outcome or (False, "interrupted")
        stuck = next((f for f in result.faults if f.injected_t and not f.restarted), None)
        if not result.finished and stuck is not None:
            result.reason += f"; no run got past start-up after the {stuck.kind}"
        result.lines = list(tail.lines)
        try:
            system.finish(result)
        finally:
            system.close()
    progress.update(task, info="done" if result.finished else "NOT FINISHED")
    return result
