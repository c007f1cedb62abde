"""The ways bench/goodput.py runs a job: ironpod (a standing local cluster, or ``ironpod
launch``) and torchrun (two c10d agents, or one ``--standalone``), each with its defaults.

Every system starts from the same environment (:func:`clean_env`), runs the same command,
and is faulted by the same real signals to real processes (:meth:`System.inject`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import psutil

from goodput_kit.measure import Fault, RunResult
from ironpod import env
from ironpod.client import IronpodClient, JobView, is_terminal
from ironpod.cluster import local

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass(kw_only=True, slots=True)
class Settings:
    """What every system of one invocation shares."""

    max_restarts: int
    dist_timeout_s: float
    node_losses: int  # spares the ironpod cluster keeps (one per planned node loss)
    replace_delay_s: float
    pin_cpus: bool


@dataclass(kw_only=True, slots=True)
class Workload:
    """One training job: ``argv`` after the interpreter; ``{ckpt}`` names its checkpoint dir."""

    name: str
    argv: list[str]
    steps: int
    nodes: int
    nproc_per_node: int
    env: dict[str, str]

    def command(self, ckpt: Path) -> list[str]:
        return [a.replace("{ckpt}", str(ckpt)) for a in self.argv]


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment minus distributed and ironpod job variables (the recipe's cache dir
    stays), plus ``extra``: what every system's processes start from."""
    drop = {*env.ALL, "GROUP_RANK", "NODE_RANK", "LOGLEVEL", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    drop |= {"OMP_NUM_THREADS"}  # each launcher applies its own default
    out = {
        k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TORCHELASTIC_")
    }
    out.update({"PYTHONUNBUFFERED": "1", **extra})
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


def kill_tree(pid: int) -> None:
    for proc in tree(pid):
        with contextlib.suppress(psutil.Error):
            proc.kill()


class System:
    """One way to run the job. ``poll`` is None while it runs, else (succeeded, why not)."""

    name = ""

    def __init__(
        self, root: Path, work: Workload, settings: Settings, *, index: int, faulted: bool
    ) -> None:
        tag = f"{'faults' if faulted else 'free'}{index}"  # index: the run's place in the bench
        self.root = root / f"{work.name}-{self.name}-{tag}"
        self.faulted = faulted
        self.root.mkdir(parents=True)
        self.workload = work.name
        self.steps = work.steps
        self.work = work
        self.command = [sys.executable, *work.command(self.root / "ckpt")]
        self.settings = settings
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

    def inject(self, fault: Fault) -> str:
        if fault.kind == "node loss":
            return self.lose_node(fault.rank)
        found = self.worker(fault.rank)
        if found is None:
            return "no worker found"
        proc = found[0]
        sig = signal.SIGKILL if fault.kind == "crash" else signal.SIGSTOP
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
        return f"pid {proc.pid} {sig.name}"

    def lose_node(self, rank: int) -> str:
        raise NotImplementedError(f"{self.name} runs on one node: no node to lose")

    def finish(self, result: RunResult) -> None:
        """Fill in what only the system knows: restarts, detections, its own accounting."""

    def close(self) -> None:
        """SIGKILL whatever we saw and is still there (a stopped worker of a dead agent)."""
        for pid, created in self._seen.items():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if abs(proc.create_time() - created) < 0.05:
                    proc.kill()


# -- ironpod


class Ironpod(System):
    """A standing local cluster (``ironpod up``: the job's nodes + a spare per node loss); the
    job goes in through the client with the product's defaults and the run's restart budget."""

    name = "ironpod"

    def __init__(
        self, root: Path, work: Workload, settings: Settings, *, index: int, faulted: bool
    ) -> None:
        super().__init__(root, work, settings, index=index, faulted=faulted)
        self.home = self.root / "home"
        self.client: IronpodClient | None = None
        self.job_id: int | None = None
        self.job: JobView | None = None
        self._next_poll = 0.0
        self.spares = settings.node_losses if faulted else 0

    def patterns(self) -> list[str]:
        return [str(self.home / "nodes" / "*" / "logs" / "attempt-*" / "rank-*.log")]

    def prepare(self) -> None:
        unpinned: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if not self.settings.pin_cpus:  # every node may use every CPU, as torchrun's workers do
            cpus = sorted(os.sched_getaffinity(0))
            unpinned = mock.patch.object(local, "cpu_shares", lambda n, c=None: [cpus] * n)
        # The agents, and so the workers, inherit our environment: the same one torchrun gets.
        with unpinned, mock.patch.dict(os.environ, clean_env(**self.work.env), clear=True):
            info = local.up(self.work.nodes + self.spares, self.home, spares=self.spares)
        self.client = info.admin_client()

    def launch(self) -> None:
        assert self.client is not None
        spec = {
            "name": "goodput",
            "nodes": self.work.nodes,
            "nproc_per_node": self.work.nproc_per_node,
            "command": self.command,
            "workdir": str(ROOT),
            "env": {env.DIST_TIMEOUT_S: str(self.settings.dist_timeout_s)},
            "restart": {"max_restarts": self.settings.max_restarts},
        }
        self.job_id = self.client.submit(spec)["id"]

    def poll(self) -> tuple[bool, str] | None:
        if time.time() < self._next_poll or self.client is None or self.job_id is None:
            return None
        self._next_poll = time.time() + 0.5  # the end time is the controller's, not ours
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
        match_detections(result, found)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        local.down(self.home)
        super().close()


class IronpodDurable(Ironpod):
    """ironpod without the memory tier: the recipe's durable checkpoints only (its default
    keeps a memory snapshot as often as 1% of the step time allows, copied to a peer)."""

    name = "ironpod-durable"

    def __init__(
        self, root: Path, work: Workload, settings: Settings, *, index: int, faulted: bool
    ) -> None:
        super().__init__(root, work, settings, index=index, faulted=faulted)
        self.command += ["--set", "checkpoint.memory_every=0"]


def match_detections(result: RunResult, detected: list[float]) -> None:
    for f in result.faults:
        if f.injected_t is not None:
            f.detected_t = next((t for t in detected if t >= f.injected_t - 0.05), None)


class Launch(System):
    """``ironpod launch --nproc-per-node N --max-restarts R script.py``: exactly what a user
    types in place of torchrun, no other flag; its job directory under the run's folder."""

    name = "ironpod-launch"

    def __init__(
        self, root: Path, work: Workload, settings: Settings, *, index: int, faulted: bool
    ) -> None:
        super().__init__(root, work, settings, index=index, faulted=faulted)
        self.proc: subprocess.Popen[bytes] | None = None
        self.out = self.root / "launch.log"

    def patterns(self) -> list[str]:
        return [str(self.out)]

    def launch(self) -> None:
        cmd = [
            *(sys.executable, "-m", "ironpod.cli", "launch"),
            *("--nproc-per-node", str(self.work.nproc_per_node)),
            *("--max-restarts", str(self.settings.max_restarts)),
            *self.command[1:],
        ]
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                # its job directory (a fresh one per invocation) goes under the run's folder
                env=clean_env(**self.work.env, TMPDIR=str(self.root)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def poll(self) -> tuple[bool, str] | None:
        if self.proc is None or self.proc.poll() is None:
            return None
        self.ended = time.time()
        code = self.proc.returncode
        if code == 0:
            return True, "launch exited with 0"
        lines = [ln for ln in self.out.read_text(errors="replace").splitlines() if ln.strip()]
        return False, f"launch exited with {code}: {lines[-1] if lines else '(no output)'}"

    def agent_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def finish(self, result: RunResult) -> None:
        """Attempts and detections from the embedded controller's database in the job dir."""
        events: list[tuple[str, Any]] = []
        for db in self.root.glob("**/controller/*.db"):
            with contextlib.closing(sqlite3.connect(db)) as conn, contextlib.suppress(Exception):
                events += conn.execute("SELECT kind, data FROM events ORDER BY id").fetchall()
        found = sorted(
            json.loads(data)["detected_unix"] for kind, data in events if kind == "fault_detected"
        )
        result.restarts = sum(1 for kind, _ in events if kind == "attempt_created") - 1
        match_detections(result, found)

    def close(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        super().close()


# -- torchrun


class Torchrun(System):
    """``torch.distributed.run`` with the workload's nodes: one ``--standalone`` agent for one
    node; for two, one c10d agent per node on the same endpoint, as on two hosts."""

    name = "torchrun"
    fresh_store = False

    def __init__(
        self, root: Path, work: Workload, settings: Settings, *, index: int, faulted: bool
    ) -> None:
        super().__init__(root, work, settings, index=index, faulted=faulted)
        self.port = 0
        self.agents: dict[int, subprocess.Popen[bytes]] = {}  # node -> its current agent
        self.dead: list[subprocess.Popen[bytes]] = []
        self.replace_at: dict[int, float] = {}
        self.starts = 0

    def patterns(self) -> list[str]:
        return [str(self.root / "agent-*.log")]

    def _start(self, node: int) -> None:
        extra = {env.DIST_TIMEOUT_S: str(self.settings.dist_timeout_s), "LOGLEVEL": "INFO"}
        if self.fresh_store:
            extra["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        if self.work.nodes == 1:
            where = ["--standalone"]
        else:
            where = ["--nnodes", str(self.work.nodes), "--rdzv-backend", "c10d"]
            where += ["--rdzv-endpoint", f"127.0.0.1:{self.port}", "--rdzv-id", self.name]
        cmd = [
            *(sys.executable, "-m", "torch.distributed.run", *where),
            *("--nproc-per-node", str(self.work.nproc_per_node)),
            *("--max-restarts", str(self.settings.max_restarts), *self.command[1:]),
        ]
        self.starts += 1
        with open(self.root / f"agent-{self.starts}-node{node}.log", "wb") as out:
            self.agents[node] = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=clean_env(**self.work.env, **extra),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def launch(self) -> None:
        self.port = free_port()
        for node in range(self.work.nodes):
            self._start(node)

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
        if self.work.nodes < 2:
            return super().lose_node(rank)
        host = self._store_host()
        # The bench's node rank 1 is the node without the store; rank 0, the store's node.
        node = (host if rank == 0 else 1 - host) if host is not None else rank
        agent = self.agents[node]
        for proc in tree(agent.pid):
            self._seen.setdefault(proc.pid, proc.create_time())
        kill_tree(agent.pid)
        agent.wait()
        self.dead.append(agent)
        self.replace_at[node] = time.time() + self.settings.replace_delay_s
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
            kill_tree(agent.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(timeout=10)
        super().close()


class TorchrunFresh(Torchrun):
    """torchrun with torch's opt-out of the shared worker store (pytorch#135712)."""

    name = "torchrun-fresh"
    fresh_store = True


SYSTEMS: dict[str, type[System]] = {
    c.name: c for c in (Ironpod, IronpodDurable, Launch, Torchrun, TorchrunFresh)
}
