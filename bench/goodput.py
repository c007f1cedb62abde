"""Goodput under faults: the GPT recipe on 2 nodes, ironpod against plain torchrun.

    python bench/goodput.py                   # 240 steps, 4 faults, 3 systems: about 10 minutes
    python bench/goodput.py --quick           # 30 short steps, 1 crash: the smoke test
    python bench/goodput.py --reference --json goodput.json --systems ironpod,torchrun-fresh

One training job, the GPT recipe's tiny preset (DDP over gloo, 2 ranks, one per simulated node,
one thread each, a checkpoint every K steps, deterministic), runs under each system in turn and
suffers the same seeded fault schedule: one fault per equal slice of the run, kinds shuffled and
ranks drawn by ``--seed``; a fault fires once rank 0 reports its step, and only after the
previous fault was recovered from.

* ``ironpod``: ``ironpod.cluster.local.up`` with 2 nodes for the job and a spare per node loss,
  in a temporary ``IRONPOD_HOME``, up before the clock starts (a standing cluster); the job goes
  in through the client. Hang timeout: the derived max(10 x median step, ``--hang-floor`` 5 s).
* ``torchrun``: two agents, ``python -m torch.distributed.run --nnodes 2 --nproc-per-node 1
  --max-restarts N --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT``, one per node, started
  with the job. The recipe resumes from its own checkpoints, as under ironpod.
* ``torchrun-fresh``: the same with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, torch's opt-out
  that gives each rendezvous round's workers a fresh store. By default the workers share the
  agent's store across rounds and may read the previous round's addresses (pytorch#135712):
  restarts then fail in gloo's connectFullMesh or, after a hang, never get past start-up (seen
  on torch 2.13 CPU).

Faults, real signals to real processes. crash: SIGKILL a rank's worker; both systems restart
all workers. hang: SIGSTOP a rank's worker; ironpod's agents see its progress stop, torchrun
only learns of it when the peer's collective times out, after ``IRONPOD_DIST_TIMEOUT_S`` =
``--dist-timeout`` (60 s, for both; gloo's default is 30 min, so this is generous to torchrun),
and then waits 30 s for the stopped worker to obey SIGTERM. node loss: ironpod: ``kill_agent``
(agent and workers SIGKILLed), the controller moves the job to the spare; torchrun: SIGKILL an
agent and its workers, and start a replacement agent ``--replace-delay`` s later (default 0: a
scheduler with a spare at hand at once, the best case; plain torchrun has no spare pool). The
node lost is node rank 1, whose agent does not host torchrun's c10d store: losing that one ends
a torchrun job for good (``--lose-rdzv-host`` loses it, and ironpod's rank-0 node).

Measured the same way for every system, from rank 0's progress lines (``[ironpod] progress
rank=0 step=N loss=...``) and the recipe's start line (``[gpt] ... resuming after step N``),
read from the workers' log files every 25 ms and stamped when read. A *run* is what follows a
start line.

* wall: launch (job submitted, agents started) to the end (job succeeded, agents exited).
* median step: of the gaps between consecutive steps of a run (saves and evals included).
* ETTR: steps kept x median step / wall, the ledger's definition (ironpod's own ledger figure
  is shown as a cross-check); lost: wall - steps kept x median step.
* per fault, seconds after the injection: detected (ironpod's ``fault_detected`` event,
  torchrun's ``Worker group FAILED``), first step (of a new run), recovered (a step of a new run
  beyond the failed run's last: recomputation included). MTTR: the mean of recovered.
* steps recomputed: steps run more than once. restarts: worker (re)starts minus one, failed
  starts included (ironpod: attempts; torchrun: rendezvous rounds of its longest-lived agent).
* final loss: resumes are bitwise exact (tests/test_resume_bitwise.py), so every finished run
  should end on the same loss; the script says if they do not.

A run not done after ``--cap`` s, or without a new step for ``--stall-limit`` s, is stopped and
reported as not finished, with the reason.

Caveats. A 2-core machine runs both nodes, shared with whatever else runs there: absolute times
move between runs; compare the ratios of one invocation. Both systems' nodes use all CPUs (the
local cluster pins each node to a share by default, which puts the spare on a busy CPU;
``--pin-cpus`` keeps that). Quarantine is off (``--quarantine-after 1000``, as in ironpod's own
recovery tests): a worker killed by a signal counts against its node, so with the product's 2,
two injected crashes of one rank quarantine its node, the spare takes its place, and a later
node loss leaves the job waiting for a healthy node. Real clusters take far longer to start
workers, restore and time out collectives, which scales recovery for both systems.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean, median
from typing import Any
from unittest import mock

import psutil
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ironpod import env
from ironpod.client import IronpodClient, JobView, is_terminal
from ironpod.cluster import local
from ironpod.train.beacon import parse_progress_line
from recipes.gpt.config import load_config
from recipes.gpt.data import prepare
from recipes.gpt.model import Transformer

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("ironpod", "ironpod-memory", "torchrun", "torchrun-fresh")
LABEL = {
    "ironpod": "ironpod",
    "ironpod-memory": "ironpod, memory tier",
    "torchrun": "torchrun",
    "torchrun-fresh": "torchrun, fresh store",
    "reference": "fault-free",
}
STYLE = {
    "ironpod": "green",
    "ironpod-memory": "bright_green",
    "torchrun": "red",
    "torchrun-fresh": "yellow",
    "reference": "cyan",
}
KINDS = ("crash", "hang", "node loss")
POLL_S = 0.05
TAIL_S = 0.025
WINDOW = 8  # steps per window of the median step time
#: Defaults of the flags that ``--quick`` changes.
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(steps=240, checkpoint_every=20, seq_len=128, crashes=2, hangs=1, node_losses=1),
    "quick": dict(steps=30, checkpoint_every=5, seq_len=64, crashes=1, hangs=0, node_losses=0),
}
PRESETS["full"].update(systems=",".join(SYSTEMS), cap=600.0, stall_limit=180.0)
PRESETS["quick"].update(systems="ironpod,torchrun-fresh", cap=75.0, stall_limit=45.0)
_START_RE = re.compile(r"\[gpt\] .*(?:resuming after step (\d+)|from scratch)")


# -- the schedule


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    step: int  # fires once rank 0 has reported this step
    rank: int  # the rank whose worker is hit (crash, hang) or whose node is lost


def make_schedule(
    steps: int, every: int, counts: dict[str, int], seed: int, lose_rdzv_host: bool
) -> list[Fault]:
    """One fault per equal slot of [max(K+1, 15%), 90%] of the run, kinds shuffled by the seed."""
    rng = random.Random(seed)
    kinds = [k for k in KINDS for _ in range(counts[k])]
    rng.shuffle(kinds)
    lo, hi = max(every + 1, round(0.15 * steps)), round(0.9 * steps)
    width = (hi - lo) / max(1, len(kinds))
    faults = []
    for i, kind in enumerate(kinds):
        start = lo + round(i * width)
        step = rng.randint(start, max(start, lo + round((i + 1) * width) - 1))
        rank = (0 if lose_rdzv_host else 1) if kind == "node loss" else rng.randrange(2)
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
                line = self._parse(raw.decode(errors="replace"), now, Path(path).name)
                if line is not None:
                    self.lines.append(line)  # list.append is atomic; readers slice a copy

    @staticmethod
    def _parse(text: str, now: float, source: str) -> Line | None:
        fields = parse_progress_line(text)
        if fields is not None:
            if fields.get("rank") != 0:
                return None
            val = fields.get("val_loss")
            val_loss = float(val) if isinstance(val, int | float) else None
            return Line(now, "step", int(fields["step"]), float(fields["loss"]), val_loss, source)
        if (found := _START_RE.search(text)) is not None:
            return Line(now, "start", int(found.group(1) or 0), source=source)
        if "Worker group FAILED" in text:
            return Line(now, "failed", source=source)
        if "Rendezvous complete for workers" in text:
            return Line(now, "round", source=source)
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# -- the systems


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment minus distributed and ironpod job variables (the recipe's cache dir
    stays), plus ``extra``: what every system's agents start from."""
    drop = {*env.ALL, "GROUP_RANK", "NODE_RANK", "LOGLEVEL", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    out = {
        k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TORCHELASTIC_")
    }
    out.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def rank_of(proc: psutil.Process) -> int | None:
    with contextlib.suppress(psutil.Error, ValueError):
        raw = proc.environ().get(env.RANK)
        return int(raw) if raw is not None else None
    return None


class System:
    """One way to run the job. ``poll`` is None while it runs, else (succeeded, why not)."""

    name = ""

    def __init__(self, root: Path, recipe: list[str], args: argparse.Namespace) -> None:
        self.root = root / self.name
        self.root.mkdir(parents=True)
        self.recipe = [*recipe, "--set", f"checkpoint.dir={self.root / 'ckpt'}"]
        self.args = args
        self.ended: float | None = None
        self._seen: dict[int, float] = {}  # every worker pid we touched -> its create time

    def patterns(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Whatever stands before the job (not timed)."""

    def launch(self) -> None:
        raise NotImplementedError

    def poll(self) -> tuple[bool, str] | None:
        raise NotImplementedError

    def tick(self, now: float) -> None:
        """Called every loop turn: delayed actions (a replacement node)."""

    def agent_pids(self) -> list[int]:
        raise NotImplementedError

    def worker(self, rank: int) -> tuple[psutil.Process, int] | None:
        """The running worker of ``rank`` and the pid of the agent above it."""
        for agent in self.agent_pids():
            for proc in tree(agent)[1:]:
                if rank_of(proc) == rank:
                    with contextlib.suppress(psutil.Error):
                        if proc.status() == psutil.STATUS_ZOMBIE:
                            continue
                        self._seen[proc.pid] = proc.create_time()
                        return proc, agent
        return None

    def lose_node(self, rank: int) -> str:
        raise NotImplementedError

    def finish(self, result: RunResult) -> None:
        """Fill in what only the system knows: restarts, detections, its own accounting."""
        raise NotImplementedError

    def close(self) -> None:
        """SIGKILL whatever we saw and is still there (a stopped worker of a dead agent)."""
        for pid, created in self._seen.items():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if abs(proc.create_time() - created) < 0.05:
                    proc.kill()


class Ironpod(System):
    name = "ironpod"

    def __init__(self, root: Path, recipe: list[str], args: argparse.Namespace) -> None:
        super().__init__(root, recipe, args)
        self.home = self.root / "home"
        self.client: IronpodClient | None = None
        self.job_id: int | None = None
        self.job: JobView | None = None
        self._next_poll = 0.0

    def patterns(self) -> list[str]:
        return [str(self.home / "nodes" / "*" / "logs" / "attempt-*" / "rank-*.log")]

    def prepare(self) -> None:
        unpinned: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if not self.args.pin_cpus:  # every node may use every CPU, as torchrun's workers do
            cpus = sorted(os.sched_getaffinity(0))
            unpinned = mock.patch.object(local, "cpu_shares", lambda n, c=None: [cpus] * n)
        # The agents, and so the workers, inherit our environment: the same one torchrun gets.
        with unpinned, mock.patch.dict(os.environ, clean_env(), clear=True):
            info = local.up(2 + self.args.node_losses, self.home, spares=self.args.node_losses)
        self.client = info.admin_client()

    def launch(self) -> None:
        assert self.client is not None
        spec = {
            "name": "goodput",
            "nodes": 2,
            "nproc_per_node": 1,
            "command": [sys.executable, *self.recipe],
            "workdir": str(ROOT),
            "env": {"OMP_NUM_THREADS": "1", env.DIST_TIMEOUT_S: str(self.args.dist_timeout)},
            "restart": {
                "max_restarts": self.args.max_restarts,
                "hang_floor_s": self.args.hang_floor,
                "node_failures_to_quarantine": self.args.quarantine_after,
            },
        }
        self.job_id = self.client.submit(spec)["id"]

    def poll(self) -> tuple[bool, str] | None:
        if time.time() < self._next_poll or self.client is None or self.job_id is None:
            return None
        self._next_poll = time.time() + 1.0  # the end time is the controller's, not ours
        self.job = job = self.client.job(self.job_id)
        if not is_terminal(job):
            return None
        self.ended = job["ended_unix"]
        return job["state"] == "succeeded", f"job {job['state']}: {job['reason']}"

    def agent_pids(self) -> list[int]:
        info = local.read_cluster(self.home)
        return [a.pid for a in info.agents.values() if a.alive()] if info else []

    def lose_node(self, rank: int) -> str:
        found = self.worker(rank)
        info = local.read_cluster(self.home)
        if found is None or info is None:
            return "no worker found"
        node = next(n for n, a in info.agents.items() if a.pid == found[1])
        killed = local.kill_agent(self.home, node, (found[0].pid,))
        return f"{node}: agent + {len(killed) - 1} worker SIGKILL"

    def finish(self, result: RunResult) -> None:
        if self.client is None or self.job_id is None:
            return
        job = self.client.job(self.job_id)
        result.restarts = len(job.get("attempts") or [0]) - 1
        result.extra = {"ledger": job.get("goodput"), "state": job["state"], "why": job["reason"]}
        if not result.finished and not is_terminal(job):  # stopped by us: say where it stood
            result.reason += f"; the job was {job['state']}: {job['reason']}"
        events = self.client.all_events(job=self.job_id)
        found = sorted(e["data"]["detected_unix"] for e in events if e["kind"] == "fault_detected")
        for f in result.faults:
            if f.injected_t is not None:
                f.detected_t = next((t for t in found if t >= f.injected_t - 0.05), None)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        local.down(self.home)
        super().close()


class IronpodMemory(Ironpod):
    """ironpod with a snapshot of every step in node memory, copied to the other node."""

    name = "ironpod-memory"

    def __init__(self, root: Path, recipe: list[str], args: argparse.Namespace) -> None:
        super().__init__(root, recipe, args)
        self.recipe += ["--set", "checkpoint.memory_every=1"]


class Torchrun(System):
    name = "torchrun"
    fresh_store = False

    def __init__(self, root: Path, recipe: list[str], args: argparse.Namespace) -> None:
        super().__init__(root, recipe, args)
        self.port = 0
        self.agents: dict[int, subprocess.Popen[bytes]] = {}  # node -> its current agent
        self.dead: list[subprocess.Popen[bytes]] = []
        self.replace_at: dict[int, float] = {}
        self.starts = 0

    def patterns(self) -> list[str]:
        return [str(self.root / "agent-*.log")]

    def _start(self, node: int) -> None:
        extra = {env.DIST_TIMEOUT_S: str(self.args.dist_timeout), "LOGLEVEL": "INFO"}
        if self.fresh_store:
            extra["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        cmd = [
            *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"),
            *("--nproc-per-node", "1", "--max-restarts", str(self.args.max_restarts)),
            *("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{self.port}"),
            *("--rdzv-id", self.name, *self.recipe),
        ]
        self.starts += 1
        with open(self.root / f"agent-{self.starts}-node{node}.log", "wb") as out:
            self.agents[node] = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=clean_env(**extra),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def launch(self) -> None:
        self.port = free_port()
        self._start(0)
        self._start(1)

    def poll(self) -> tuple[bool, str] | None:
        if self.replace_at or any(p.poll() is None for p in self.agents.values()):
            return None
        self.ended = time.time()
        codes = {n: p.returncode for n, p in self.agents.items()}
        bad = {n: c for n, c in codes.items() if c != 0}
        return not bad, ", ".join(f"agent of node {n} exited with {c}" for n, c in bad.items())

    def tick(self, now: float) -> None:
        for node, when in list(self.replace_at.items()):
            if now >= when:
                del self.replace_at[node]
                self._start(node)

    def agent_pids(self) -> list[int]:
        return [p.pid for p in self.agents.values() if p.poll() is None]

    def _store_host(self) -> int | None:
        """The node whose agent listens on the rendezvous endpoint (hosts the c10d store)."""
        for node, agent in self.agents.items():
            with contextlib.suppress(psutil.Error):
                for conn in psutil.Process(agent.pid).net_connections("tcp"):
                    if conn.status == psutil.CONN_LISTEN and conn.laddr.port == self.port:
                        return node
        return None

    def lose_node(self, rank: int) -> str:
        host = self._store_host()
        # The bench's node rank 1 is the node without the store; rank 0, the store's node.
        node = (host if rank == 0 else 1 - host) if host is not None else rank
        agent = self.agents[node]
        for proc in tree(agent.pid):
            self._seen.setdefault(proc.pid, proc.create_time())
            with contextlib.suppress(psutil.Error):
                proc.kill()
        agent.wait()
        self.dead.append(agent)
        self.replace_at[node] = time.time() + self.args.replace_delay
        store = "with" if node == host else "without"
        return f"node {node} ({store} c10d store): agent + worker SIGKILL"

    def finish(self, result: RunResult) -> None:
        """Restarts: rendezvous rounds of the longest-lived agent, minus the first."""
        rounds: dict[str, int] = {}
        for ln in result.lines:
            if ln.kind == "round":
                rounds[ln.source] = rounds.get(ln.source, 0) + 1
        result.restarts = max(rounds.values(), default=1) - 1

    def close(self) -> None:
        for agent in [*self.agents.values(), *self.dead]:
            for proc in tree(agent.pid):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(timeout=10)
        super().close()


class TorchrunFresh(Torchrun):
    name = "torchrun-fresh"
    fresh_store = True


class Reference(TorchrunFresh):
    name = "reference"


# -- one run


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
    def lost(self) -> float:
        """Seconds that did not become kept progress: start-up, recovery, recomputation."""
        return self.wall - self.kept * self.median_step

    @property
    def ettr(self) -> float:
        return self.kept * self.median_step / self.wall if self.wall > 0 else float("nan")

    def mean_after(self, attr: str) -> float | None:
        values = [f.after(getattr(f, attr)) for f in self.faults if f.injected_t is not None]
        known = [v for v in values if v is not None]
        return fmean(known) if known and len(known) == len(values) else None

    def final(self) -> Line | None:
        last = [ln for ln in self.executed if ln.step == self.steps]
        return last[-1] if last and self.finished else None


def describe(kind: str, rank: int) -> str:
    return f"node loss (node {rank})" if kind == "node loss" else f"{kind} (rank {rank})"


def inject(system: System, fault: Fault) -> str:
    if fault.kind == "node loss":
        return system.lose_node(fault.rank)
    found = system.worker(fault.rank)
    if found is None:
        return "no worker found"
    proc = found[0]
    sig = signal.SIGKILL if fault.kind == "crash" else signal.SIGSTOP
    with contextlib.suppress(psutil.Error):
        proc.send_signal(sig)
    return f"pid {proc.pid} {sig.name}"


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


def run(
    system: System, faults: list[Fault], args: argparse.Namespace, progress: Progress
) -> RunResult:
    result = RunResult(system.name, steps=args.steps)
    result.faults = [FaultRecord(f.kind, f.step, f.rank) for f in faults]
    label = LABEL[system.name]
    task = progress.add_task(label, total=args.steps, info="starting the cluster")
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
                record.target = inject(system, faults[done])
                progress.console.print(
                    f"{label}: {record.kind} after step {track.high}: {record.target}",
                    highlight=False,
                )
                done += 1
            outcome = system.poll()
            info = f"faults {done}/{len(faults)}" + (", recovering" if pending else "")
            progress.update(task, completed=track.high, info=info)
            where = f"step {track.high}"
            if outcome is None and now - result.started_t > args.cap:
                outcome = False, f"stopped at the {args.cap:.0f} s cap ({where})"
            elif outcome is None and now - track.high_t > args.stall_limit:
                outcome = False, f"no new step for {args.stall_limit:.0f} s (stuck at {where})"
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


# -- the report


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or not theirs or math.isnan(ours) or math.isnan(theirs):
        return "-"
    return f"{ours / theirs:.2f}x"


def summary_rows(r: RunResult) -> dict[str, tuple[str, float | None]]:
    """metric -> (text, value for the ratio)."""
    ledger = (r.extra.get("ledger") or {}).get("ettr")
    return {
        "finished": ("yes" if r.finished else "NO", None),
        "wall time": (fmt_s(r.wall), r.wall),
        "median step": (f"{r.median_step * 1e3:.0f} ms", r.median_step),
        "steps kept / executed": (f"{r.kept} / {len(r.executed)}", None),
        "steps recomputed": (str(r.recomputed), float(r.recomputed)),
        "restarts": (str(r.restarts), float(r.restarts or 0)),
        "ETTR (kept x median step / wall)": (f"{r.ettr:.1%}", r.ettr),
        "lost: wall - kept x median step": (fmt_s(r.lost), r.lost),
        "MTTR: fault to a new step": (
            fmt_s(r.mean_after("recovered_t")),
            r.mean_after("recovered_t"),
        ),
        "mean: fault to first step": (
            fmt_s(r.mean_after("first_step_t")),
            r.mean_after("first_step_t"),
        ),
        "mean: fault to detection": (fmt_s(r.mean_after("detected_t")), r.mean_after("detected_t")),
        "ironpod ledger ETTR": (f"{ledger:.1%}" if ledger is not None else "-", None),
    }


def report(console: Console, results: list[RunResult], args: argparse.Namespace) -> list[str]:
    ours = next((r for r in results if r.system == "ironpod"), None)
    versus = " (ironpod ÷ torchrun)" if ours and len(results) > 1 else ""
    table = Table(title=f"Goodput under faults: {args.steps} steps, 2 nodes{versus}")
    table.add_column("metric")
    rows = {r.system: summary_rows(r) for r in results}
    for r in results:
        table.add_column(LABEL[r.system], justify="right", style=STYLE[r.system])
        if ours is not None and r.system.startswith("torchrun"):
            table.add_column(f"ironpod ÷\n{LABEL[r.system]}", justify="right")
    for metric in rows[results[0].system]:
        cells = []
        for r in results:
            text, value = rows[r.system][metric]
            cells.append(text)
            if ours is not None and r.system.startswith("torchrun"):  # totals of an unfinished
                both = ours.finished and r.finished  # run compare with nothing
                cells.append(ratio(rows["ironpod"][metric][1], value) if both else "-")
        table.add_row(metric, *cells)
    console.print(table)
    notes = [f"{LABEL[r.system]} did not finish: {r.reason}" for r in results if not r.finished]
    for note in notes:
        console.print(note, style="bold red", highlight=False)

    per_fault = Table(title="Per fault: seconds after the injection")
    for col in ("#", "fault", "system", "target", "after step"):
        per_fault.add_column(col)
    for col in ("detected", "first step", "recovered", "resumed from", "steps redone"):
        per_fault.add_column(col, justify="right")
    faulted = [r for r in results if r.faults]
    for i in range(len(faulted[0].faults) if faulted else 0):
        for r in faulted:
            f = r.faults[i]
            redone = (
                str(f.last_step - f.resumed_from)
                if f.last_step is not None and f.resumed_from is not None and f.first_step_t
                else "-"
            )
            per_fault.add_row(
                str(i + 1) if r is faulted[0] else "",
                describe(f.kind, f.rank) if r is faulted[0] else "",
                LABEL[r.system],
                f.target or "not reached",
                "-" if f.at_step is None else str(f.at_step),
                fmt_s(f.after(f.detected_t)),
                fmt_s(f.after(f.first_step_t)),
                fmt_s(f.after(f.recovered_t)),
                "-" if f.resumed_from is None else str(f.resumed_from),
                redone,
                style=STYLE[r.system],
                end_section=r is faulted[-1],
            )
    if faulted:
        console.print(per_fault)
        console.print(
            "detected: the system's first reaction (ironpod: fault_detected event; torchrun: "
            "'Worker group FAILED'); first step: of a new run; recovered: a step beyond the "
            "failed run's last one.",
            style="dim",
        )
    plot(console, results)
    lines = loss_check(console, results)
    return notes + lines


def bar(value: float, top: float, width: int = 48) -> int:
    return max(0, round(width * value / top)) if top > 0 else 0


def plot(console: Console, results: list[RunResult]) -> None:
    console.print()
    console.print(
        "Where the wall time went: █ kept steps (x median step), ▒ recomputed steps, "
        "░ start-up, detection, restart, restore (scaled to the longest run)"
    )
    top = max(r.wall for r in results)
    name = max(len(LABEL[r.system]) for r in results)
    for r in results:
        kept, redo = r.kept * r.median_step, r.recomputed * r.median_step
        k, d = bar(kept, top), bar(redo, top)
        rest = max(0, bar(r.wall, top) - k - d)
        line = Text(f"{LABEL[r.system]:<{name}} ")
        line.append("█" * k, style=STYLE[r.system])
        line.append("▒" * d, style=STYLE[r.system])
        line.append("░" * rest, style=STYLE[r.system])
        line.append(f" {r.wall:.0f} s, ETTR {r.ettr:.0%}" + ("" if r.finished else " (NOT DONE)"))
        console.print(line)
    faulted = [r for r in results if r.faults]
    spans = [f.after(f.recovered_t) for r in faulted for f in r.faults]
    longest = max((s for s in spans if s is not None), default=0.0)
    if not faulted or longest <= 0:
        return
    console.print()
    console.print("Fault to a new step, per fault (scaled to the longest)")
    for i, fault in enumerate(faulted[0].faults):
        for r in faulted:
            span = r.faults[i].after(r.faults[i].recovered_t)
            head = f"{i + 1} {fault.kind:<9}" if r is faulted[0] else " " * 11
            line = Text(f"{head} {LABEL[r.system]:<{name}} ")
            if r.faults[i].injected_t is None:
                line.append("not reached", style="dim")
            elif span is None:
                line.append("no recovery", style="bold red")
            else:
                line.append("█" * max(1, bar(span, longest)), style=STYLE[r.system])
                line.append(f" {span:.1f} s")
            console.print(line)


def loss_check(console: Console, results: list[RunResult]) -> list[str]:
    finals = {r.system: r.final() for r in results}
    console.print()
    shown = ", ".join(
        f"{LABEL[s]} {ln.loss!r} (val {ln.val_loss!r})" if ln else f"{LABEL[s]} -"
        for s, ln in finals.items()
    )
    console.print(f"final loss at step {results[0].steps}: {shown}", highlight=False)
    known = [(ln.loss, ln.val_loss) for ln in finals.values() if ln is not None]
    if len(known) < 2:
        verdict = "fewer than two runs finished: nothing to compare"
    elif len(set(known)) == 1:
        verdict = "identical in every finished run (resumes are bitwise exact)"
    else:
        losses = [loss for loss, _ in known if loss is not None]
        spread = max(losses) - min(losses) if losses else math.nan
        verdict = f"the final losses DIFFER (spread {spread:.3g}): a resume was not exact"
    console.print(verdict, style="bold" if "DIFFER" in verdict else None, highlight=False)
    return [f"final loss: {shown}", verdict]


# -- main


def recipe_sets(args: argparse.Namespace) -> list[str]:
    """The recipe's ``--set`` overrides, the same for every system."""
    return [
        f"train.steps={args.steps}",
        "train.parallel=ddp",
        "train.num_threads=1",
        "train.deterministic=true",
        "train.log_every=1000000",
        f"checkpoint.every={args.checkpoint_every}",
        "checkpoint.keep_last=2",
        f"data.seq_len={args.seq_len}",
        f"data.max_bytes={args.max_bytes}",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Goodput under faults: ironpod vs plain torchrun.")
    p.add_argument("--steps", type=int, help="training steps (default 240)")
    p.add_argument("--checkpoint-every", type=int, help="K: save every K steps (default 20)")
    p.add_argument("--crashes", type=int, help="worker SIGKILLs (default 2)")
    p.add_argument("--hangs", type=int, help="worker SIGSTOPs (default 1)")
    p.add_argument("--node-losses", type=int, help="agent + workers SIGKILLed (default 1)")
    p.add_argument("--seed", type=int, default=0, help="fault schedule seed (default 0)")
    p.add_argument("--systems", help=f"comma-separated from {', '.join(SYSTEMS)} (default all)")
    p.add_argument("--reference", action="store_true", help="also run fault-free (final loss)")
    p.add_argument("--hang-floor", type=float, default=5.0, help="ironpod hang floor, s (5)")
    p.add_argument(
        "--dist-timeout", type=float, default=60.0, help="IRONPOD_DIST_TIMEOUT_S, s (default 60)"
    )
    p.add_argument("--max-restarts", type=int, default=20, help="both systems (default 20)")
    p.add_argument(
        "--replace-delay", type=float, default=0.0, help="torchrun: s before a new node (0)"
    )
    p.add_argument(
        "--quarantine-after",
        type=int,
        default=1000,
        help="ironpod node_failures_to_quarantine (default 1000: off; the product's is 2)",
    )
    p.add_argument("--lose-rdzv-host", action="store_true", help="lose node rank 0 instead")
    p.add_argument("--pin-cpus", action="store_true", help="keep the local cluster's CPU shares")
    p.add_argument("--cap", type=float, help="seconds per run before giving up (default 600)")
    p.add_argument("--stall-limit", type=float, help="seconds without a new step (default 180)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 128, quick 64)")
    p.add_argument("--max-bytes", type=int, default=2_000_000, help="corpus cap (default 2 MB)")
    p.add_argument("--quick", action="store_true", help="smoke test: 30 short steps, 1 crash")
    p.add_argument("--dir", type=Path, help="where the temporary folder goes (default $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep logs and checkpoints, print where")
    p.add_argument("--json", type=Path, help="write the raw numbers here")
    args = p.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.systems or set(args.systems) - set(SYSTEMS):
        p.error(f"--systems: choose from {', '.join(SYSTEMS)}")
    if min(args.crashes, args.hangs, args.node_losses) < 0:
        p.error("fault counts must not be negative")
    if args.checkpoint_every < 1 or args.steps < 2 * args.checkpoint_every + 2:
        p.error("--steps must leave room for faults: at least 2 x --checkpoint-every + 2")
    return args


@contextlib.contextmanager
def workspace(args: argparse.Namespace, console: Console) -> Iterator[Path]:
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="ironpod-goodput-", dir=args.dir))
    try:
        yield root
    finally:
        if args.keep:
            console.print(f"logs and checkpoints kept in {root}", style="dim")
        else:
            shutil.rmtree(root, ignore_errors=True)


def run_json(r: RunResult) -> dict[str, Any]:
    final = r.final()
    return {
        "system": r.system,
        "finished": r.finished,
        "reason": r.reason,
        "wall_s": r.wall,
        "median_step_s": r.median_step,
        "steps_kept": r.kept,
        "steps_executed": len(r.executed),
        "steps_recomputed": r.recomputed,
        "restarts": r.restarts,
        "ettr": r.ettr,
        "mttr_s": r.mean_after("recovered_t"),
        "faults": [
            {
                **asdict(f),
                "detected_s": f.after(f.detected_t),
                "first_step_s": f.after(f.first_step_t),
                "recovered_s": f.after(f.recovered_t),
            }
            for f in r.faults
        ],
        "final_loss": final.loss if final else None,
        "final_val_loss": final.val_loss if final else None,
        "extra": r.extra,
        "progress": [[ln.t - r.started_t, ln.step, ln.loss] for ln in r.executed],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 140)
    counts = {"crash": args.crashes, "hang": args.hangs, "node loss": args.node_losses}
    faults = make_schedule(
        args.steps, args.checkpoint_every, counts, args.seed, args.lose_rdzv_host
    )
    sets = recipe_sets(args)
    recipe = ["-m", "recipes.gpt.train", "--config", "tiny"]
    recipe += [arg for item in sets for arg in ("--set", item)]
    cfg = load_config("tiny", sets)
    prepare(cfg.data)  # tokenize once, here, so no worker pays for it
    params = Transformer(cfg.model, seed=0).num_params()
    classes = {c.name: c for c in (Ironpod, IronpodMemory, Torchrun, TorchrunFresh)}
    plan: list[tuple[type[System], list[Fault]]] = [(classes[s], faults) for s in args.systems]
    if args.reference:
        plan.append((Reference, []))
    started = time.time()
    results: list[RunResult] = []
    columns = (
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with workspace(args, console) as root, Progress(*columns, console=Console(stderr=True)) as bar:
        for cls, schedule in plan:
            results.append(run(cls(root, recipe, args), schedule, args, bar))
    what = ", ".join(f"{describe(f.kind, f.rank)} at step {f.step}" for f in faults) or "none"
    console.print(
        f"GPT recipe, tiny preset: {params / 1e6:.2f}M params, {cfg.data.seq_len} tokens x "
        f"{cfg.train.global_batch} sequences a step; DDP over gloo, 2 nodes x 1 rank, 1 thread "
        f"each; torch {torch.__version__}, {os.cpu_count()} CPUs. {args.steps} steps, checkpoint "
        f"every {args.checkpoint_every}. Faults (seed {args.seed}): {what}",
        highlight=False,
    )
    console.print(
        f"ironpod: hang timeout max(10 x median step, {args.hang_floor:g} s), quarantine after "
        f"{args.quarantine_after} failures, {args.node_losses} spare(s); torchrun: "
        f"IRONPOD_DIST_TIMEOUT_S={args.dist_timeout:g} (gloo default 1800), replacement node "
        f"after {args.replace_delay:g} s; both: max {args.max_restarts} restarts",
        highlight=False,
    )
    notes = report(console, results, args)
    wall = time.time() - started
    console.print(
        f"wall time {wall:.0f} s. A 2-core shared machine: compare the ratios of one run.",
        style="dim",
    )
    if args.json:
        raw = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "schedule": [asdict(f) for f in faults],
            "wall_s": wall,
            "notes": notes,
            "runs": [run_json(r) for r in results],
        }
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
