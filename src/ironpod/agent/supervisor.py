"""Converges this node's workers to the controller's desired assignment, and watches them.

The heartbeat loop only *sets* the desired state; a converge thread acts on it, so a slow stop
(SIGTERM, a grace period for the workers to save, SIGKILL) never delays a heartbeat. A monitor
thread applies the hang rule (:meth:`RankProgress.overdue`) to every running rank. Exits, hangs
and first progress go out as :class:`~ironpod.wire.WorkerEvent` through ``report`` at once.

The agent never kills a worker on its own judgement: a hang is reported, and the controller
decides by changing the assignment.

``workers.json`` in the workdir lists the running workers' process groups, so an agent that
restarts after a crash kills the workers its predecessor left behind (:func:`kill_stale_workers`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from ironpod.agent.logs import RankLog, log_path
from ironpod.agent.progress import (
    LineMatcher,
    Overdue,
    ProgressUpdate,
    RankProgress,
    numeric_metrics,
)
from ironpod.agent.stacks import capture_stacks
from ironpod.agent.worker import Worker, split_returncode, worker_env
from ironpod.wire import Assignment, WorkerEvent, WorkerStatus

log = logging.getLogger(__name__)

DEFAULT_STOP_GRACE_S = 10.0
#: ``detail`` of an exit the agent caused (the assignment changed): not a failure.
STOPPED_BY_AGENT = "stopped by the agent"
#: How often the hang rule runs: it adds to the detection time, so it is kept well under the
#: smallest derived timeout (hang_floor_s, 1 s); one pass is a few comparisons per rank.
_MONITOR_INTERVAL_S = 0.05
_KILL_WAIT_S = 5.0
#: Longest wait for a hang's stack dump before its worker is stopped (the dump's own limit).
_STACKS_WAIT_S = 12.0
#: Most processes of one worker whose stacks are dumped on a hang.
_MAX_STACK_PIDS = 4


class AttemptNotStartedError(Exception):
    """Raised by the prepare hook: this attempt's workers must not start (the reason goes to
    the ranks' logs; the controller hears of it separately and ends the attempt)."""


class Supervisor:
    def __init__(
        self,
        *,
        workdir: Path,
        beacon_socket: str,
        cpus: list[int] | None,
        report: Callable[[WorkerEvent], None],
        prepare: Callable[[Assignment], tuple[dict[str, str], dict[int, list[str]]]] | None = None,
    ) -> None:
        self.workdir = workdir
        #: Called before an attempt's workers start: extra env for them and notes per rank
        #: (the snapshot store fetches a restore plan's copies here).
        self._prepare = prepare
        self.logs_root = workdir / "logs"
        self._beacon_socket = beacon_socket
        self._cpus = cpus
        self._report = report
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._closed = threading.Event()
        self._desired: Assignment | None = None
        self._grace_s = DEFAULT_STOP_GRACE_S
        self._current: Assignment | None = None
        self._workers: dict[int, Worker] = {}  # rank -> worker of the current attempt
        self._threads = [
            threading.Thread(target=self._converge_loop, name="agent-converge", daemon=True),
            threading.Thread(target=self._monitor_loop, name="agent-monitor", daemon=True),
        ]

    # -- the heartbeat loop's side

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def set_desired(self, assignment: Assignment | None, stop_grace_s: float) -> None:
        with self._changed:
            self._desired = assignment
            self._grace_s = stop_grace_s
            self._changed.notify_all()

    def statuses(self) -> list[WorkerStatus]:
        """The current attempt's workers, exited ones included."""
        with self._lock:
            return [w.status() for w in sorted(self._workers.values(), key=lambda w: w.rank)]

    @property
    def attempt_id(self) -> int | None:
        with self._lock:
            return self._current.attempt_id if self._current else None

    def close(self) -> None:
        """Stop the workers (SIGTERM, the last grace period, SIGKILL) and the threads."""
        self._closed.set()
        with self._changed:
            self._changed.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=self._grace_s + _KILL_WAIT_S + 5)
        self._stop_workers()

    # -- input from workers

    def on_beacon(self, beacon: dict[str, Any]) -> None:
        """A beacon counts for the current worker of its rank if its sender is in that
        worker's process group (a beacon from a previous attempt's dying worker does not)."""
        with self._lock:
            worker = self._workers.get(beacon["rank"])
            if worker is None or not worker.running or not _in_group(beacon.get("pid"), worker):
                return
        t = beacon.get("t")
        update = ProgressUpdate(
            t=float(t) if isinstance(t, int | float) else time.time(),
            step=beacon["step"],
            metrics=numeric_metrics(beacon),
            hook=beacon.get("src") == "hook",
            busy=bool(beacon.get("busy")),
            exiting=bool(beacon.get("exiting")),
        )
        self._on_progress(worker, update)

    def _on_progress(self, worker: Worker, update: ProgressUpdate) -> None:
        with self._lock:
            first = worker.progress.record(update)
        if first:
            # The controller reads ``step=N`` as the script's step: the hook's count is not one.
            detail = f"step={update.step}" if update.step is not None else ""
            if update.hook:
                detail = f"optimizer step {update.step} (step hook)"
            log.info("rank %d: first progress (%s)", worker.rank, detail or "no step number")
            self._report(
                WorkerEvent(
                    attempt_id=worker.attempt_id,
                    rank=worker.rank,
                    kind="first_progress",
                    time_unix=update.t,
                    detail=detail,
                )
            )

    def _on_exit(self, worker: Worker) -> None:
        code, sig = split_returncode(worker.returncode)
        how = f"code {code}" if sig is None else f"signal {sig}"
        detail = STOPPED_BY_AGENT if worker.stopping else ""
        if worker.start_error:
            detail = worker.start_error
        log.info("worker rank %d (attempt %d) exited: %s", worker.rank, worker.attempt_id, how)
        error = None
        if code != 0 and not worker.stopping:
            error = read_error_file(error_file(self.logs_root, worker.attempt_id, worker.rank))
        self._report(
            WorkerEvent(
                attempt_id=worker.attempt_id,
                rank=worker.rank,
                kind="exited",
                time_unix=worker.ended_unix or time.time(),
                exit_code=code,
                signal=sig,
                detail=detail,
                error=error,
            )
        )

    # -- converge

    def _converge_loop(self) -> None:
        while True:
            with self._changed:
                while not self._closed.is_set() and _same_attempt(self._desired, self._current):
                    self._changed.wait()
                if self._closed.is_set():
                    return
                desired = self._desired
            try:
                if self._current is not None:
                    self._stop_workers()
                if desired is not None and not self._closed.is_set():
                    self._start_workers(desired)
            except Exception:  # this thread must outlive any one bad assignment
                log.exception("converging to attempt %s failed", desired and desired.attempt_id)
                self._closed.wait(1.0)

    def _start_workers(self, a: Assignment) -> None:
        cwd = a.workdir or str(self.workdir)
        try:
            matcher = LineMatcher(a.progress_regex)
        except re.error as exc:
            log.error("attempt %d: progress_regex ignored: %s", a.attempt_id, exc)
            matcher = LineMatcher(None)
        workers: dict[int, Worker] = {}
        for local_rank, rank in enumerate(a.ranks):
            workers[rank] = Worker(
                assignment=a,
                rank=rank,
                local_rank=local_rank,
                log=_open_log(log_path(self.logs_root, a.attempt_id, rank)),
                matcher=matcher,
                on_progress=self._on_progress,
                on_exit=self._on_exit,
            )
        extra: dict[str, str] = {}
        if self._prepare is not None:
            try:
                extra, notes = self._prepare(a)
            except AttemptNotStartedError as exc:
                for worker in workers.values():
                    worker.log.note(f"not started: {exc}")
                    worker.log.close()
                with self._lock:  # converged to this attempt: with no workers, by decision
                    self._current, self._workers = a, {}
                log.warning("attempt %d not started: %s", a.attempt_id, exc)
                return
            for rank, lines in notes.items():
                if rank in workers:
                    for line in lines:
                        workers[rank].log.note(line)
        with self._lock:
            self._current, self._workers = a, workers
        for worker in workers.values():
            errors = error_file(self.logs_root, a.attempt_id, worker.rank)
            errors.unlink(missing_ok=True)  # only this start's failure may be read after it
            env = worker_env(
                a,
                rank=worker.rank,
                local_rank=worker.local_rank,
                beacon_socket=self._beacon_socket,
                error_file=str(errors),
            )
            env.update(extra)
            with self._lock:
                if os.path.isdir(cwd):
                    worker.start(env, cwd, self._cpus)
                else:
                    # as a command not found (127): the controller fails the job at once
                    worker.not_started(f"cannot start: workdir {cwd!r} does not exist")
            if worker.start_error:
                self._on_exit(worker)
            self._write_workers_file()  # after each start: an agent may die between two
        pids = [w.pid for w in workers.values()]
        log.info("started attempt %d: ranks %s, pids %s", a.attempt_id, a.ranks, pids)

    def _stop_workers(self) -> None:
        with self._lock:
            current, workers, grace = self._current, list(self._workers.values()), self._grace_s
            for worker in workers:
                worker.stopping = True
        if current is None:
            return
        running = [w for w in workers if w.running]
        if running:
            log.info(
                "stopping attempt %d: ranks %s (grace %.1f s)",
                current.attempt_id,
                [w.rank for w in running],
                grace,
            )
        for worker in workers:  # a hang's stacks first: the dump needs the process alive
            worker.stacks_done.wait(_STACKS_WAIT_S)
        for worker in workers:
            # A rank reported hung, or stopped, does nothing with SIGTERM but use up the grace.
            hopeless = worker.hang_reported or worker.frozen()
            worker.signal_group(signal.SIGKILL if hopeless else signal.SIGTERM)
        deadline = time.monotonic() + grace
        for worker in workers:
            worker.wait(max(0.0, deadline - time.monotonic()))
        for worker in workers:  # also the stragglers of leaders that already exited
            worker.signal_group(signal.SIGKILL)
        for worker in workers:
            if not worker.wait(_KILL_WAIT_S):
                log.error("rank %d (pid %d) survived SIGKILL", worker.rank, worker.pid)
        with self._lock:
            self._current, self._workers = None, {}
        self._write_workers_file()
        log.info("stopped attempt %d", current.attempt_id)

    # -- hang detection

    def _monitor_loop(self) -> None:
        while not self._closed.wait(_MONITOR_INTERVAL_S):
            now = time.time()
            with self._lock:
                hung = []
                running = [w for w in self._workers.values() if w.running]
                for worker in self._workers.values():
                    if worker.hang_reported or worker.stopping or not worker.running:
                        continue
                    peers = _peers_busy(worker, running)
                    late = worker.progress.overdue(
                        worker.assignment, worker.started_unix, now, peers
                    )
                    if late is not None:
                        worker.hang_reported = True
                        worker.stacks_done.clear()  # before any stop can look
                        hung.append((worker, late))
            for worker, late in hung:
                threading.Thread(
                    target=self._report_hang,
                    args=(worker, late),
                    name=f"hang-r{worker.rank}",
                    daemon=True,
                ).start()

    def _report_hang(self, worker: Worker, late: Overdue) -> None:
        """Report at once (the controller's decision overlaps the dump), then dump the stacks;
        stopping the worker waits for the dump (``stacks_done``)."""
        detected = time.time()
        try:
            detail = (
                f"no progress for {late.silent:.1f} s, timeout {late.timeout:.1f} s = "
                f"{late.rule}, last step {worker.progress.last_step}"
            )
            log.warning("hang detected: rank %d (pid %d): %s", worker.rank, worker.pid, detail)
            worker.log.note(f"hang detected: {detail}; Python stacks follow")
            self._report(
                WorkerEvent(
                    attempt_id=worker.attempt_id,
                    rank=worker.rank,
                    kind="hung",
                    time_unix=detected,
                    detail=detail,
                )
            )
            announced = bool(worker.progress.metrics.get("stacks_sigusr1"))
            worker.log.note(
                capture_stacks(_stack_pids(worker), sigusr1_pid=worker.pid if announced else None)
            )
        finally:
            worker.stacks_done.set()

    # -- restart safety

    def _write_workers_file(self) -> None:
        path = self.workdir / "workers.json"
        with self._lock:
            entries = [
                {"pid": w.pid, "create_time": _create_time(w.pid), "rank": w.rank}
                for w in self._workers.values()
                if w.pid > 0
            ]
            attempt_id = self._current.attempt_id if self._current else None
        if not entries:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"attempt_id": attempt_id, "workers": entries}))
        tmp.replace(path)


def error_file(logs_root: Path, attempt_id: int, rank: int) -> Path:
    """``TORCHELASTIC_ERROR_FILE`` of a rank: next to its log, in the attempt's directory."""
    return log_path(logs_root, attempt_id, rank).with_name(f"error-{rank}.json")


#: A traceback's frame line: ``  File "/path/train.py", line 42, in main``.
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def read_error_file(path: Path) -> str | None:
    """One line from the JSON that ``@record`` (torch.distributed.elastic's error handler)
    writes for an uncaught exception: ``ValueError: bad shape (train.py:42)``, the innermost
    frame of the traceback. None if there is no file or it is not that format."""
    try:
        data = json.loads(path.read_text(errors="replace"))
    except (OSError, ValueError):
        return None
    message = data.get("message") if isinstance(data, dict) else None
    stack = ""
    if isinstance(message, dict):
        info = message.get("extraInfo")
        stack = str(info.get("py_callstack", "")) if isinstance(info, dict) else ""
        message = message.get("message")
    if not isinstance(message, str) or not message.strip():
        return None
    line = " ".join(message.split())[:500]
    frames = _FRAME.findall(stack)
    if frames:
        file, number = frames[-1]
        line += f" ({os.path.basename(file)}:{number})"
    return line


def _open_log(path: Path) -> RankLog:
    """The rank's log; if it cannot be written (disk full, say), the worker runs without."""
    try:
        return RankLog(path)
    except OSError as exc:
        log.error("cannot write %s (%s): this rank's output is discarded", path, exc)
        return RankLog(Path(os.devnull))


def _same_attempt(a: Assignment | None, b: Assignment | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.attempt_id == b.attempt_id


def _in_group(pid: object, worker: Worker) -> bool:
    if not isinstance(pid, int):
        return True  # a beacon without a pid is taken on its rank alone
    if pid == worker.pid:
        return True
    try:
        return os.getpgid(pid) == worker.pid
    except OSError:
        return False


def _stack_pids(worker: Worker) -> list[int]:
    """The worker's process first, then its descendants (the trainer under a shell, say)."""
    try:
        children = psutil.Process(worker.pid).children(recursive=True)
    except psutil.Error:
        children = []
    return [worker.pid, *(c.pid for c in children)][:_MAX_STACK_PIDS]


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def kill_stale_workers(workdir: Path, timeout_s: float = _KILL_WAIT_S) -> list[int]:
    """SIGKILL the process groups a previous agent left in ``workers.json``; their pids.

    A process counts as stale if it is in a recorded group and was created no earlier than
    the group's leader was (a recycled pid after a reboot is left alone).
    """
    path = workdir / "workers.json"
    try:
        recorded = json.loads(path.read_text())["workers"]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring unreadable %s", path)
        path.unlink(missing_ok=True)
        return []
    groups = {int(w["pid"]): w.get("create_time") for w in recorded}
    victims: list[psutil.Process] = []
    for proc in psutil.process_iter():
        try:
            pgid = os.getpgid(proc.pid)
            if pgid in groups and proc.create_time() >= (groups[pgid] or 0.0) - 1.0:
                victims.append(proc)
        except (OSError, psutil.Error):
            continue
    for proc in victims:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _wait_gone(victims, timeout_s)
    path.unlink(missing_ok=True)
    if victims:
        log.warning("killed stale workers of a previous agent: pids %s", [p.pid for p in victims])
    return [p.pid for p in victims]


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> None:
    """Wait until each process is gone or a zombie (its parent, not us, reaps it)."""
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        while time.monotonic() < deadline:
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)


def _peers_busy(worker: Worker, running: list[Worker]) -> RankProgress:
    """What the attempt's other ranks here said of being busy: the newest busy pulse, and
    whether any is exiting (see :meth:`RankProgress.overdue`)."""
    out = RankProgress()
    for peer in running:
        if peer is worker or peer.attempt_id != worker.attempt_id:
            continue
        p = peer.progress
        if p.last_busy_unix is not None:
            out.last_busy_unix = max(p.last_busy_unix, out.last_busy_unix or p.last_busy_unix)
        out.exiting = out.exiting or p.exiting
    return out
