"""The controller under many nodes: heartbeat throughput and latency, false losses, job start.

    python bench/controller_scale.py [--nodes 1000,3000,10000] [--db sqlite|postgres|both]
        [--with-jobs|--no-jobs|--both] [--jobs 8,128,1000] [--interval 5] [--duration 60]
        [--join-window 30] [--generators 2] [--json FILE] [--logs DIR] [--controller-src DIR]
    python bench/controller_scale.py --quick     # 50 nodes, 1 s beats, one 8-node job (smoke)

Each point starts a real controller (``ironpod controller``, as a subprocess) on 127.0.0.1 and
a free port, with a fresh state directory (SQLite in it) or a fresh PostgreSQL database
(``--postgres-url`` or ``IRONPOD_TEST_POSTGRES_URL``, the test suite's server; created for the
point, dropped after it), ``--heartbeat-interval`` the point's interval and
``--node-lost-after`` three times it. ``--generators`` processes then simulate the nodes
(controller_scale_kit/simulator.py): each an asyncio loop driving thousands of them over
keep-alive connections, speaking the wire protocol as ``ironpod agent`` does. A node joins at
a random point of ``--join-window`` (a join storm) and heartbeats every ``--interval``
(+-``--jitter``); while a reply carries an assignment its beats carry one running
WorkerStatus per rank. Not simulated: health rows, snapshots, notices, worker events, and the
agent's 0.2 s beats for 10 s after joining (``--fast-window 10`` turns those on).

After the join (every node registered, or ``JOIN_GRACE_S`` after the window) ``--duration``
seconds are measured: heartbeats sent in the window (offered) and answered 2xx in it
(achieved), the latency of those sent in it (from when the node meant to send, a wait for a
pooled connection included, to the whole reply), errors by kind. With jobs, one job per
``--jobs`` size that fits in the nodes left (nodes=N, nproc_per_node=1, a command nobody runs)
is submitted at the window's start; submit -> running is the controller's own
``running_unix - created_unix`` (the first rank reported running), and the simulator adds
when the job's last node got its assignment.

Then the nodes stop, and the controller is asked what it decided while they were all alive,
by its own clock: ``node_lost`` events before the stop are false losses, and so would be the
nodes it had not heard from for over lost-after (the simulator's own view, answered beats
further apart than that, is beside them, to tell a late generator from a slow controller).
Asked after the stop, not before, because an overloaded controller answers its admin API
late. CPU over the window comes from /proc: the controller, the generators, the local
PostgreSQL server and the rest of the machine; and the controller's peak RSS.

The generators share the machine's cores with the controller; their CPU is printed so that a
reader sees how much of the machine they took. A point runs at most ``--join-window`` +
``--duration`` (or ``--job-timeout``) + ``MARGIN_S`` seconds, and the controller and the
generators are always stopped, Ctrl-C and a killed bench included. ``--controller-src`` runs
another tree's controller (``git archive HEAD src | tar -x -C /tmp/old``) against the same
simulator: before and after a change, in one invocation's conditions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import httpx
from controller_scale_kit.procfs import CpuSample, cpu_s, cpu_used, peak_rss_bytes
from controller_scale_kit.report import line, report
from controller_scale_kit.simulator import (
    API,
    FAST_INTERVAL_S,
    STOP,
    T0,
    WINDOW_END,
    WINDOW_START,
    GeneratorConfig,
    Point,
    generator_main,
)
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ironpod import env

POSTGRES_ENV = "IRONPOD_TEST_POSTGRES_URL"
T = TypeVar("T")
#: Seconds the controller may take to answer /healthz after its start (migrations included).
START_TIMEOUT_S = 60.0
#: After the join window, how long the window waits for late registrations before it opens.
JOIN_GRACE_S = 30.0
#: Start-up, join grace, end-of-point queries and shutdown: what a point may add to its
#: join window and measured time.
MARGIN_S = START_TIMEOUT_S + JOIN_GRACE_S + 60.0
#: Admin calls (submit, poll, the end-of-point listings of every node and event) may wait this
#: long: the listings of 10,000 nodes are megabytes, and they are not what is measured.
ADMIN_TIMEOUT_S = 30.0

# --- the controller and its database -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def database(kind: str, state_dir: Path, postgres_url: str | None) -> Iterator[str]:
    """SQLite in the state directory, or a new PostgreSQL database dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{state_dir / 'ironpod.db'}"
        return
    import sqlalchemy

    assert postgres_url is not None
    name = f"ironpod_scale_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"create database {name}"))
    try:
        yield postgres_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f"drop database if exists {name} with (force)"))
        engine.dispose()


#: ``ironpod controller`` itself, plus a lifeline: when the bench dies however it dies (a test's
#: timeout kills it), its end of the stdin pipe closes and the controller stops as on SIGTERM.
LIFELINE = (
    "import os, signal, threading\n"
    "def watch():\n"  # the raw descriptor: a buffered read would hold a lock at exit
    "    while os.read(0, 4096):\n"
    "        pass\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "threading.Thread(target=watch, daemon=True).start()\n"
    "from ironpod.cli.main import app\n"
    "app(prog_name='ironpod')\n"
)


@contextlib.contextmanager
def controller(
    point: Point, state_dir: Path, db_url: str
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """A real controller process (the process, its port, its log); terminated on the way out.
    Its own session: Ctrl-C reaches the bench, which stops it in order."""
    port = free_port()
    log = state_dir / "controller.log"
    argv = [
        sys.executable,
        "-c",
        LIFELINE,
        "controller",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--state-dir={state_dir}",
        f"--db={db_url}",
        f"--heartbeat-interval={point.interval_s}",
        f"--node-lost-after={point.lost_after_s}",
        f"--log-level={point.log_level}",
        "--no-tls",
    ]
    child_env = {k: v for k, v in os.environ.items() if k not in env.ALL}
    if point.controller_src:  # ahead of the editable install: another commit's controller
        child_env["PYTHONPATH"] = point.controller_src
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,
        )
    try:
        yield proc, port, log
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:].strip()
    why = (
        f"exited ({proc.returncode})"
        if proc.poll() is not None
        else f"no answer in {timeout_s:g} s"
    )
    raise RuntimeError(f"the controller did not come up: {why}:\n{tail}")


#: How often the running jobs are polled. Each admin read makes the controller write back
#: what fast heartbeats left in memory (Controller.sync): the watch costs it a flush a poll.
JOB_POLL_S = 1.0
#: Where a job's watch ends: it runs, or never will (the last two are the watcher's own).
JOB_SETTLED = {"running", "failed", "succeeded", "cancelled", "skipped", "not submitted"}


class JobWatcher(threading.Thread):
    """Submits the point's jobs at the window's start and polls each until it runs."""

    def __init__(self, admin: httpx.Client, sizes: list[int], free: int, timeout_s: float):
        super().__init__(name="jobs", daemon=True)
        self.admin = admin
        self.sizes = sizes
        self.free = free
        self.timeout_s = timeout_s
        self.jobs: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def pending(self) -> int:
        return sum(j.get("state") not in JOB_SETTLED for j in self.jobs)

    def run(self) -> None:
        free = self.free
        for size in self.sizes:
            job: dict[str, Any] = {"nodes": size}
            self.jobs.append(job)
            if size > free:
                job.update(state="skipped", reason=f"needs {size} nodes, {free} free")
                continue
            free -= size
            spec = {"name": f"scale-{size}", "nodes": size, "command": ["sleep", "infinity"]}
            job["submitted"] = time.monotonic()
            try:
                reply = self.admin.post(f"{API}/jobs", json=spec)
                reply.raise_for_status()
                job.update(id=reply.json()["id"], state=reply.json()["state"])
            except httpx.HTTPError as exc:
                job.update(state="not submitted", reason=f"{type(exc).__name__}: {exc}")
        deadline = time.monotonic() + self.timeout_s
        while self.pending() and not self.stop.wait(JOB_POLL_S) and time.monotonic() < deadline:
            for job in self.jobs:
                if job.get("state") in JOB_SETTLED:
                    continue
                try:
                    view = self.admin.get(f"{API}/jobs/{job['id']}").raise_for_status().json()
                except (httpx.HTTPError, ValueError) as exc:
                    job["poll_errors"] = job.get("poll_errors", 0) + 1
                    job["poll_error"] = f"{type(exc).__name__}: {exc}"
                    continue
                job.update(state=view["state"], reason=view["reason"])
                if view["state"] == "running":  # the exact figure is the controller's own
                    job["observed_s"] = time.monotonic() - job["submitted"]


def retrying(call: Callable[[], T], deadline: float) -> T:
    """``call()`` until it answers or ``deadline`` (monotonic) passes; then its last error."""
    while True:
        try:
            return call()
        except (httpx.HTTPError, ValueError):
            if time.monotonic() + 1 > deadline:
                raise
            time.sleep(1)


def after_stop(
    admin: httpx.Client, jobs: list[dict[str, Any]], stop_unix: float, point: Point, deadline: float
) -> dict[str, Any]:
    """What the controller decided while every node was alive, asked once they have stopped.

    Asked after, not before: an overloaded controller answers its admin API late or not at all
    (its request threads are taken by queued heartbeats). The events' and the attempts' own
    times (the controller's clock, this machine's) say what happened before ``stop_unix``; a
    node lost before then was lost while the simulator kept it alive.
    """
    seen = retrying(lambda: events(admin), deadline)
    nodes = retrying(lambda: admin.get(f"{API}/nodes").raise_for_status().json(), deadline)
    lost = [e for e in seen if e["kind"] == "node_lost" and e["time_unix"] <= stop_unix]
    for job in jobs:
        if "id" not in job:
            continue
        path = f"{API}/jobs/{job['id']}"
        view = retrying(lambda path=path: admin.get(path).raise_for_status().json(), deadline)
        started = [
            a for a in view["attempts"] if a["running_unix"] and a["running_unix"] <= stop_unix
        ]
        job.update(state_after_stop=view["state"], reason=view["reason"])
        job["created_unix"] = view["created_unix"]
        if started:
            job["state"] = "running"
            job["attempt_id"] = started[0]["id"]
            job["submit_to_running_s"] = started[0]["running_unix"] - view["created_unix"]
    return {
        "events": dict(Counter(e["kind"] for e in seen if e["time_unix"] <= stop_unix)),
        "node_lost_events": len(lost),
        "nodes_lost": len({e["node_id"] for e in lost}),
        "lost_causes": [e["cause"] for e in lost[:5]],
        "nodes_known": len(nodes),
        # silent, as far as the controller knew, for longer than lost-after when the nodes
        # stopped: losses it had made or was about to make (a verdict waits for a pass)
        "nodes_unheard_at_stop": sum(
            stop_unix - n["last_heartbeat_unix"] > point.lost_after_s for n in nodes
        ),
    }


def events(admin: httpx.Client) -> list[dict[str, Any]]:
    """Every event (the API pages them by id, at most 10,000 a call, and has no kind filter)."""
    out: list[dict[str, Any]] = []
    while True:
        page = admin.get(
            f"{API}/events", params={"after": out[-1]["id"] if out else 0, "limit": 10_000}
        ).json()
        out += page
        if len(page) < 10_000:
            return out


# --- one point -----------------------------------------------------------------------------


def run_point(
    point: Point,
    postgres_url: str | None,
    progress: Progress,
    console: Console,
    logs: Path | None = None,
) -> dict[str, Any]:
    began = time.monotonic()
    bound = point.join_window_s + max(point.duration_s, point.job_timeout_s) + MARGIN_S
    hard_deadline = began + bound
    ctx = mp.get_context("spawn")  # no fork of a process with threads (Rich's refresh)
    control = ctx.RawArray("d", 4)
    status = ctx.Queue()
    procs: list[Any] = []
    out: dict[str, Any] = {"point": asdict(point)}
    with contextlib.ExitStack() as stack:
        state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ironpod-scale-")))
        if logs is not None:  # copied once the controller has stopped, before the folder goes
            name = f"controller-{point.nodes}-{point.db}-{len(point.jobs)}jobs.log"
            logs.mkdir(parents=True, exist_ok=True)
            stack.callback(
                lambda: (
                    shutil.copyfile(state_dir / "controller.log", logs / name)
                    if (state_dir / "controller.log").exists()
                    else None
                )
            )
        db_url = stack.enter_context(database(point.db, state_dir, postgres_url))
        ctl, port, log = stack.enter_context(controller(point, state_dir, db_url))
        wait_ready(port, ctl, log, START_TIMEOUT_S)
        pid = ctl.pid
        tokens = json.loads((state_dir / "tokens.json").read_text())
        admin = stack.enter_context(
            httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {tokens['admin']}"},
                timeout=ADMIN_TIMEOUT_S,
            )
        )
        share = point.max_requests // point.generators
        for g in range(point.generators):
            config = GeneratorConfig(
                index=g,
                nodes=list(range(g, point.nodes, point.generators)),
                port=port,
                join_token=tokens["join"],
                point=point,
                request_cap=share,
                deadline=hard_deadline - 20,
            )
            proc = ctx.Process(target=generator_main, args=(config, control, status), daemon=True)
            proc.start()
            procs.append(proc)

        def stop_generators() -> None:
            control[STOP] = 1.0
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()

        stack.callback(stop_generators)
        results: dict[int, dict[str, Any]] = {}
        latest: dict[int, dict[str, Any]] = {}

        def drain(until: float) -> None:
            """Read the generators' reports until ``until`` (monotonic)."""
            while True:
                try:
                    kind, index, body = status.get(timeout=max(0.0, until - time.monotonic()))
                except queue.Empty:
                    return
                if kind == "status":
                    latest[index] = body
                elif kind == "result":
                    results[index] = body
                elif kind == "ready":
                    latest[index] = {"registered": 0, "heartbeat_ok": 0, "errors": 0}

        while len(latest) < point.generators:  # every generator imported and built its nodes
            drain(time.monotonic() + 0.2)
            if time.monotonic() > began + START_TIMEOUT_S or not all(p.is_alive() for p in procs):
                raise RuntimeError("the load generators did not start")
        control[T0] = time.monotonic() + 0.2

        def total(key: str) -> int:
            return sum(s.get(key, 0) for s in latest.values())

        label = f"{point.nodes} nodes, {point.db}, {len(point.jobs)} jobs"
        task = progress.add_task(f"{label}: joining", total=point.nodes, status="")
        join_deadline = control[T0] + point.join_window_s + JOIN_GRACE_S
        while total("registered") < point.nodes and time.monotonic() < join_deadline:
            drain(time.monotonic() + 0.25)
            progress.update(task, completed=total("registered"), status=_live(latest))
        joined_at = time.monotonic()
        out["registered_at_window"] = total("registered")
        cpu_start = CpuSample.take(pid, [p.pid for p in procs], point.db)
        control[WINDOW_END] = joined_at + point.duration_s
        control[WINDOW_START] = joined_at
        watcher = JobWatcher(
            admin, point.jobs, total("registered"), max(point.duration_s, point.job_timeout_s)
        )
        watcher.start()
        progress.update(
            task, description=f"{label}: measuring", completed=0, total=point.duration_s
        )
        while time.monotonic() < control[WINDOW_END]:
            drain(min(control[WINDOW_END], time.monotonic() + 0.25))
            progress.update(task, completed=time.monotonic() - joined_at, status=_live(latest))
        cpu_end = CpuSample.take(pid, [p.pid for p in procs], point.db)
        out["cpu"] = cpu_used(cpu_start, cpu_end)
        while watcher.pending() and time.monotonic() < hard_deadline - 40:
            progress.update(task, description=f"{label}: waiting for jobs", status=_live(latest))
            drain(time.monotonic() + 0.25)
        watcher.stop.set()
        watcher.join(timeout=ADMIN_TIMEOUT_S)
        progress.update(task, description=f"{label}: stopping the nodes", status="")
        stop_unix = time.time()
        control[STOP] = 1.0
        while len(results) < point.generators and time.monotonic() < hard_deadline - 30:
            drain(time.monotonic() + 0.25)
            if not any(p.is_alive() for p in procs) and status.empty():
                break
        progress.update(task, description=f"{label}: asking the controller what it saw")
        try:
            out.update(after_stop(admin, watcher.jobs, stop_unix, point, hard_deadline - 20))
        except (httpx.HTTPError, ValueError) as exc:
            out["end_query_error"] = f"{type(exc).__name__}: {exc}"
        out["jobs"] = watcher.jobs
        out["controller_peak_rss_bytes"] = peak_rss_bytes(pid)
        progress.remove_task(task)
        out["controller_alive"] = cpu_s(pid) is not None
    out["wall_s"] = time.monotonic() - began
    out["bound_s"] = bound
    summarise(out, point, [results[i] for i in sorted(results)])
    console.print(line(out))
    return out


def _live(latest: dict[int, dict[str, Any]]) -> str:
    def total(key: str) -> int:
        return sum(s.get(key, 0) for s in latest.values())

    return (
        f"registered {total('registered')}, beats answered {total('heartbeat_ok')}, "
        f"errors {total('errors')}, running {total('running')}"
    )


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(out: dict[str, Any], point: Point, gens: list[dict[str, Any]]) -> None:
    """Merge the generators' results into the point's figures (in place)."""
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for g in gens:
        counts.update(g["counts"])
        errors.update(g["errors_by_kind"])
    lat = [x for g in gens for x in g["latencies"]]
    lags = [x for g in gens for x in g["lags"]]
    firsts = [g["first_registered"] for g in gens if g["first_registered"]]
    lasts = [g["last_registered"] for g in gens if g["last_registered"]]
    assigned: dict[int, list[float]] = {}  # each node is one generator's: counts add up
    for g in gens:
        for attempt, (n, first, last) in g["assigned"].items():
            entry = assigned.setdefault(attempt, [0, first, last])
            entry[0] += n
            entry[1], entry[2] = min(entry[1], first), max(entry[2], last)
    for job in out.get("jobs", []):
        job.pop("submitted", None)  # this process's monotonic clock: nobody else's
        got = assigned.get(job.get("attempt_id", -1))
        if got and job.get("created_unix"):
            job["nodes_assigned"] = got[0]
            job["submit_to_all_assigned_s"] = got[2] - job["created_unix"]
    window = point.duration_s
    out.update(
        generators_reported=len(gens),
        registered=sum(g["registered"] for g in gens),
        target_hb_s=point.nodes / point.interval_s,
        offered_hb_s=counts["heartbeat_sent_window"] / window,
        achieved_hb_s=counts["heartbeat_ok_window"] / window,
        # sent in the window but neither answered nor failed when the nodes stopped
        heartbeats_unfinished=counts["heartbeat_sent_window"]
        - counts["heartbeat_answered_of_window"]
        - counts["heartbeat_failed_of_window"],
        latency_ms={
            "p50": _ms(_pct(lat, 0.5)),
            "p99": _ms(_pct(lat, 0.99)),
            "max": _ms(max(lat, default=None)),
        },
        register_latency_ms={
            "p50": _ms(_pct([x for g in gens for x in g["register_latencies"]], 0.5)),
            "max": _ms(max((x for g in gens for x in g["register_latencies"]), default=None)),
        },
        generator_lag_ms={"p99": _ms(_pct(lags, 0.99)), "max": _ms(max(lags, default=None))},
        errors=dict(errors),
        errors_5xx=sum(n for k, n in errors.items() if ": http 5" in k),
        # a 503 with Retry-After is the controller's designed back-pressure, not a fault
        errors_5xx_not_busy=sum(
            n for k, n in errors.items() if ": http 5" in k and not k.endswith(" busy")
        ),
        requests=dict(counts),
        join_s=max(lasts) - min(firsts) if firsts else None,
        max_answered_gap_s=max((g["max_gap_s"] for g in gens), default=None),
        silent_nodes=sum(len(g["silent_nodes"]) for g in gens),
        reregistered=counts["reregister"],
        capped=any(g["capped"] for g in gens),
        connections_opened=sum(g["connections_opened"] for g in gens),
        generator_crashes=[c for g in gens for c in g["crashed"]],
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# --- report --------------------------------------------------------------------------------


def describe_source(src: Path | None) -> str:
    """Which controller ran: a tree given by --controller-src, or this checkout's commit and
    whether src/ differs from it (a controller being rewritten measures as it stands)."""
    if src is not None:
        return f"{src.resolve()} (--controller-src)"
    root = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "?"
    changed = git("status", "--porcelain", "--", "src")
    return f"{commit} + uncommitted src/ changes" if changed else commit


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--nodes", type=_ints, default=[1000, 3000, 10000], help="comma list of node counts")
    add("--jobs", type=_ints, default=[8, 128, 1000], help="job sizes, in nodes (comma list)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--with-jobs", dest="job_modes", action="store_const", const=[True])
    mode.add_argument("--no-jobs", dest="job_modes", action="store_const", const=[False])
    mode.add_argument(
        "--both", dest="job_modes", action="store_const", const=[False, True], help="(default)"
    )
    add("--db", choices=["sqlite", "postgres", "both"], default="sqlite")
    add("--postgres-url", default=os.environ.get(POSTGRES_ENV), help=f"default ${POSTGRES_ENV}")
    add("--interval", type=float, help="heartbeat interval, seconds (5; --quick 1)")
    add("--lost-after", type=float, help="node lost after S s (3 x interval; --quick 10)")
    add("--join-window", type=float, help="nodes join at random within S s (30; --quick 2)")
    add("--duration", type=float, help="measured seconds after the join (60; --quick 6)")
    add("--job-timeout", type=float, help="a job not running S s after submit is reported")
    add("--timeout", type=float, default=5.0, help="per request, seconds (the agent's 5)")
    add("--jitter", type=float, default=0.1, help="interval x uniform(1-J, 1+J)")
    add("--generators", type=int, default=2, help="load generator processes")
    add("--connections", type=int, default=100, help="keep-alive connections per generator")
    add("--fast-window", type=float, default=0.0, help="0.2 s beats for S s after a join "
        "(the agent's is 10; 0: off)")  # fmt: skip
    add("--max-requests", type=int, help="bound per point (default 4x the expected count)")
    add("--controller-log-level", default="INFO", help="the controller's (INFO, as shipped)")
    add(
        "--controller-src",
        type=Path,
        metavar="DIR",
        help="run the controller from this src/ "
        "(e.g. `git archive HEAD src | tar -x -C /tmp/head`: before and after a change)",
    )
    add("--seed", type=int, default=0)
    add("--logs", type=Path, metavar="DIR", help="keep each point's controller log here")
    add("--quick", action="store_true", help="one tiny point: the smoke test")
    add("--json", type=Path, metavar="FILE", help="write every point's figures here")
    args = parser.parse_args()
    quick = args.quick
    if quick:
        args.nodes, args.jobs = [50], [8]
        args.job_modes = args.job_modes or [True]
    interval = args.interval or (1.0 if quick else 5.0)
    lost_after = args.lost_after or (10.0 if quick else 3 * interval)
    join_window = args.join_window if args.join_window is not None else (2.0 if quick else 30.0)
    duration = args.duration or (6.0 if quick else 60.0)
    job_timeout = args.job_timeout or (30.0 if quick else duration)
    dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    if "postgres" in dbs and not args.postgres_url:
        parser.error(f"--db {args.db} needs --postgres-url or ${POSTGRES_ENV}")
    points = []
    for nodes in args.nodes:
        for with_jobs in args.job_modes or [False, True]:  # default: each point both ways
            for db in dbs:
                expected = nodes / interval * (join_window + duration + job_timeout) + nodes
                if args.fast_window:
                    expected += nodes * args.fast_window / FAST_INTERVAL_S
                points.append(
                    Point(
                        nodes=nodes,
                        jobs=args.jobs if with_jobs else [],
                        db=db,
                        interval_s=interval,
                        lost_after_s=lost_after,
                        join_window_s=join_window,
                        duration_s=duration,
                        job_timeout_s=job_timeout,
                        timeout_s=args.timeout,
                        jitter=args.jitter,
                        generators=args.generators,
                        connections=args.connections,
                        fast_window_s=args.fast_window,
                        max_requests=args.max_requests or int(4 * expected),
                        seed=args.seed,
                        log_level=args.controller_log_level,
                        controller_src=str(args.controller_src.resolve())
                        if args.controller_src
                        else None,
                    )
                )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the controller stops
    console = Console()
    if not console.is_terminal:  # a pipe or CI log: do not wrap the table at 80 columns
        console.width = max(console.width, 220)
    raw: dict[str, Any] = {
        "cores": os.cpu_count(),
        "argv": sys.argv[1:],
        "controller": describe_source(args.controller_src),
        "points": [],
    }
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=True,
    )
    interrupted = False
    try:
        with progress:
            for point in points:
                try:
                    out = run_point(point, args.postgres_url, progress, console, args.logs)
                except Exception as exc:  # the next point still runs; this one says why not
                    console.print(f"[red]{point.nodes} nodes, {point.db}: {exc}[/]")
                    out = {"point": asdict(point), "error": f"{type(exc).__name__}: {exc}"}
                raw["points"].append(out)
                if args.json:
                    args.json.write_text(json.dumps(raw, indent=2))
    except KeyboardInterrupt:  # the point's controller and generators are stopped by now
        interrupted = True
        console.print(f"[yellow]interrupted: {len(raw['points'])} of {len(points)} points ran[/]")
    if raw["points"]:
        report(raw, console)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    if interrupted:
        sys.exit(130)


if __name__ == "__main__":
    main()
