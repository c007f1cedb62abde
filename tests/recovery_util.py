"""Helpers of test_recovery.py: the GPT job, its per-rank logs, fault targets, recovery timings.

Everything is read where an operator would read it: the controller's API (attempts, events,
goodput) and the agents' per-rank log files under ``$IRONPOD_HOME/nodes/<node>/logs``. The log
files are read from disk rather than through the API because a node whose agent was killed
can no longer serve its logs, and the failed attempt's logs are exactly what a test inspects.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil

from ironpod.agent.logs import log_path
from ironpod.client import AttemptView, EventView, IronpodClient, JobView, is_terminal
from ironpod.cluster import local
from ironpod.train.beacon import parse_progress_line
from tests.conftest import clean_env

ROOT = Path(__file__).resolve().parent.parent
#: Where the timings go as JSON lines, besides the printed table (`pytest -s` shows it).
REPORT_ENV = "IRONPOD_RECOVERY_REPORT"

STEPS = 80
CHECKPOINT_EVERY = 5
#: Faults land once rank 1 has logged this step: well after the first checkpoint.
FAULT_STEP = 10
# About 0.1 s a step on one core per rank: long enough that a fault lands mid-run and the job
# outlives a controller restart, short enough for the whole module to take a few minutes.
RECIPE_OVERRIDES = [
    f"train.steps={STEPS}",
    "train.global_batch=16",
    "train.warmup=4",
    "train.eval_every=20",
    "train.eval_batches=2",
    "train.parallel=ddp",
    "train.num_threads=1",
    "train.deterministic=true",
    "data.seq_len=128",
    "data.max_bytes=1000000",
    "model.n_layers=2",
    f"checkpoint.every={CHECKPOINT_EVERY}",
    "checkpoint.keep_last=2",
]

T = TypeVar("T")


def poll(what: Callable[[], T | None], timeout: float, desc: str, every: float = 0.05) -> T:
    """``what()`` once it is truthy; AssertionError naming ``desc`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = what()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {desc}")
        time.sleep(every)


@contextlib.contextmanager
def local_cluster(home: Path, nodes: int) -> Iterator[Path]:
    """A local cluster for a test module: heartbeats every 0.5 s, a node lost after 3 s."""
    where = home.resolve()
    try:
        local.up(nodes, where, heartbeat_interval_s=0.5, node_lost_after_s=3.0, timeout_s=90)
        yield where
    finally:
        local.down(where)


def prepare_cache(cache: Path) -> Path:
    """Tokenize the recipe's corpus into ``cache`` once, so no job's ranks race to build it."""

    code = (
        "import sys\n"
        "from recipes.gpt import data\n"
        "from recipes.gpt.config import load_config\n"
        "data.prepare(load_config('tiny', sys.argv[1:]).data)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *RECIPE_OVERRIDES],
        env=clean_env(IRONPOD_CACHE_DIR=str(cache)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return cache


def job_spec(name: str, checkpoint_dir: Path, cache_dir: Path, **restart: Any) -> dict[str, Any]:
    """A 2-node DDP job of the GPT recipe; ``restart`` fields override the test policy."""
    command = [sys.executable, "-m", "recipes.gpt.train", "--config", "tiny"]
    for item in RECIPE_OVERRIDES:
        command += ["--set", item]
    policy = {  # the product's hang rule: its fast path for a stopped rank, its busy one for the
        # teardown after the last step (a fixed few seconds raced that teardown under load)
        "startup_timeout_s": 120.0,
        # One module's jobs fail the same few nodes again and again: none may be quarantined.
        "node_failures_to_quarantine": 1000,
        "max_restarts": 4,
    }
    return {
        "name": name,
        "nodes": 2,
        "nproc_per_node": 1,
        "command": command,
        "workdir": str(ROOT),
        "checkpoint_dir": str(checkpoint_dir),
        "env": {
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "IRONPOD_CACHE_DIR": str(cache_dir),
            "IRONPOD_DIST_BACKEND": "gloo",
        },
        "restart": {**policy, **restart},
    }


# -- the job as the controller sees it


def node_names(api: IronpodClient) -> dict[int, str]:
    return {n["id"]: n["name"] for n in api.nodes()}


def attempts(api: IronpodClient, job: str) -> list[AttemptView]:
    return api.job(job).get("attempts") or []


def attempt_nodes(api: IronpodClient, attempt: AttemptView) -> list[str]:
    names = node_names(api)
    return [names[i] for i in attempt["node_ids"]]


def wait_terminal(api: IronpodClient, job: str, timeout: float) -> JobView:
    def done() -> JobView | None:
        view = api.job(job)
        return view if is_terminal(view) else None

    return poll(done, timeout, f"job {job} to end", every=0.2)


def rank_log(home: Path, api: IronpodClient, attempt: AttemptView, rank: int) -> Path:
    node = attempt_nodes(api, attempt)[rank]  # nproc_per_node=1: rank i runs on node i
    return log_path(home / "nodes" / node / "logs", attempt["id"], rank)


def losses(path: Path) -> dict[int, float]:
    """step -> loss of the progress lines in one rank's log (exact floats: repr round-trips)."""
    out: dict[int, float] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(errors="replace").splitlines():
            fields = parse_progress_line(line)
            if fields is not None and "loss" in fields:
                out[int(fields["step"])] = float(fields["loss"])
    return out


def wait_for_step(
    home: Path, api: IronpodClient, job: str, rank: int, step: int, timeout: float = 120
) -> AttemptView:
    """The running attempt, once ``rank`` has logged ``step``; it must still be that attempt."""

    def reached() -> AttemptView | None:
        found = attempts(api, job)
        if not found or found[-1]["state"] not in {"starting", "running"}:
            return None
        logged = losses(rank_log(home, api, found[-1], rank))
        return found[-1] if logged and max(logged) >= step else None

    return poll(reached, timeout, f"rank {rank} of {job} to reach step {step}")


def wait_pid(api: IronpodClient, job: str, rank: int, timeout: float = 30) -> int:
    """The pid of ``rank`` in the running attempt (reported with the agent's heartbeats)."""

    def pid() -> int | None:
        found = attempts(api, job)
        status = found[-1]["ranks"].get(str(rank), {}) if found else {}
        value = status.get("pid")
        return value if isinstance(value, int) and status.get("state") == "running" else None

    return poll(pid, timeout, f"the pid of rank {rank} of {job}")


def signal_worker(pid: int, sig: signal.Signals) -> float:
    """Signal a worker's process group (it leads its own, as ``chaos`` does); the time sent."""
    sent = time.time()
    os.killpg(pid, sig)
    return sent


def stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` has stopped (SIGSTOP takes effect asynchronously: a
    busy machine can let a thread run on, and commit a snapshot, after ``kill`` returned)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        states = [
            Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0]
            for t in tasks
        ]
    except (OSError, IndexError):
        return False
    return all(state in {"T", "t"} for state in states)


def stop_worker(pid: int, timeout: float = 30) -> None:
    """SIGSTOP a worker and wait until all its threads are stopped."""
    signal_worker(pid, signal.SIGSTOP)
    poll(lambda: stopped(pid), timeout, f"pid {pid} to stop")


def final_losses(home: Path, api: IronpodClient, job: str) -> dict[int, float]:
    """Rank 0's losses in the last attempt, whatever step it resumed from."""
    return losses(rank_log(home, api, attempts(api, job)[-1], 0))


# -- the controller, restarted


def restart_controller(
    home: Path, *, down_s: float = 0.0, timeout_s: float = 60.0
) -> tuple[float, float]:
    """SIGKILL the local cluster's controller, keep it down ``down_s`` seconds, and start it
    again on the same state directory and port, as ``up`` started it; (time killed, time it
    answered again).

    ``ironpod.cluster.local`` has no such operation, so this uses its process helpers.
    """
    info = local.require_cluster(home)
    tree = local.node_processes(info.controller)
    assert tree, f"the controller (pid {info.controller.pid}) is not running"
    killed = time.time()
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(tree, timeout=10)
    time.sleep(max(0.0, killed + down_s - time.time()))  # the outage itself: nothing to poll
    argv = local._controller_argv(info)
    info.controller = local._spawn(argv, home / "logs" / "controller.log", home)
    local._write_cluster(info)  # so that down() stops the new one
    local._wait_controller(info, time.monotonic() + timeout_s)
    return killed, time.time()


# -- recovery timings


def event(events: list[EventView], kind: str, **match: Any) -> EventView:
    for found in events:
        if found["kind"] == kind and all(found.get(k) == v for k, v in match.items()):
            return found
    kinds = [e["kind"] for e in events]
    raise AssertionError(f"no {kind} event matching {match} among {kinds}")


def recovery_timings(api: IronpodClient, job: str, injected_unix: float) -> dict[str, Any]:
    """Seconds from the fault to each stage of the recovery that followed it.

    - detected: the fault's detection (the agent's timestamp, or the controller's for a node
      loss) minus the moment the test injected it;
    - decided: the controller's decision (attempt failed, job recovering) after detection;
    - restarted: the new attempt created, and its workers running, after the decision;
    - first_new_step: rank 0's first step of the new attempt, from the injection;

    and the step the new attempt resumed at, and the failed attempt's end cause.
    """
    view = api.job(job)
    found = view.get("attempts") or []
    assert len(found) >= 2, f"job {job} has no new attempt: {found}"
    events = api.all_events(job=job)
    fault = event(events, "fault_detected", attempt_id=found[0]["id"])
    new = found[1]
    first = event(events, "first_step", attempt_id=new["id"])
    detected = float(fault["data"]["detected_unix"])
    decided = float(fault["data"]["decided_unix"])
    first_step_unix = new["created_unix"] + float(first["data"]["since_attempt_start_s"])
    return {
        "detected_s": detected - injected_unix,
        "decided_s": decided - detected,
        "created_s": new["created_unix"] - decided,
        "running_s": (new["running_unix"] or float("nan")) - decided,
        "first_new_step_s": first_step_unix - injected_unix,
        "resumed_at_step": new["first_step"],
        "cause": found[0]["end_cause"],
    }


def report(fault: str, timings: dict[str, Any], **extra: Any) -> None:
    """Print one row of the timing table; append it as JSON to ``$IRONPOD_RECOVERY_REPORT``."""
    row = {"fault": fault, **timings, **extra}
    row = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
    shown = "  ".join(f"{k}={v}" for k, v in row.items() if k != "fault")
    print(f"\n[recovery] {fault:<18} {shown}", flush=True)
    target = os.environ.get(REPORT_ENV)
    if target:
        with open(target, "a") as out:
            out.write(json.dumps(row) + "\n")
