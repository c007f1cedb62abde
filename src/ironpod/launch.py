"""``ironpod launch``: torchrun's flags, ironpod's recovery, inside Slurm or a Kubernetes pod.

Every node runs the same command (``srun ironpod launch --nnodes 2 ... train.py``). Node rank 0
starts an embedded controller whose state (SQLite) lives in the job directory; every node runs
an agent that joins it; node 0 submits the job once all nodes are in and waits for it. The
workers get a fresh MASTER_PORT per attempt (no stale rendezvous store). Other nodes follow the
job's state and exit with it.

Exit codes: 0 the job succeeded; 1 it failed; 75 (EX_TEMPFAIL) "requeue me": the controller
ran out of healthy nodes, or node rank 0 vanished. The controller's state in the job directory
survives a requeue, so the next allocation carries on (HyperPod's auto-resume on Slurm).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ironpod import env
from ironpod.errors import EXIT_PREEMPTED, ConfigError, IronpodError

EXIT_REQUEUE = EXIT_PREEMPTED
TERMINAL = {"succeeded": 0, "failed": 1, "cancelled": 1}


@dataclass(kw_only=True)
class LaunchConfig:
    nnodes: int
    nproc_per_node: int
    node_rank: int
    master_addr: str
    master_port: int
    command: list[str]
    max_restarts: int = 3
    job_dir: Path
    job_name: str = "launch"
    hang_timeout_s: float | None = None
    node_address: str | None = None
    token: str | None = None
    give_up_waiting_s: float = 120.0
    #: The agent's health suite before it joins (none, light, deep); then light runs. Off by
    #: default: inside Slurm or a pod the scheduler's own health program usually vets nodes.
    health_level: str = "none"


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--rdzv-endpoint {endpoint!r} is not HOST:PORT")
    return host, int(port)


def _my_address(master_addr: str) -> str:
    """The address of this host that the master's network reaches (the route towards it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((master_addr, 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def _tokens(cfg: LaunchConfig) -> tuple[str, str]:
    """(admin, join): a shared secret, or the controller's tokens.json on a shared file system."""
    if cfg.token:
        return cfg.token, cfg.token
    path = cfg.job_dir / "controller" / "tokens.json"
    deadline = time.monotonic() + 120
    while not path.exists():
        if time.monotonic() > deadline:
            raise ConfigError(
                f"no {path} after 120 s: give every node the same IRONPOD_TOKEN, or a job "
                "directory on a file system they share"
            )
        time.sleep(0.5)
    data = json.loads(path.read_text())
    return str(data["admin"]), str(data["join"])


def _spawn(argv: list[str], log: Path, extra_env: dict[str, str]) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **extra_env},
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class _Api:
    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=5
        )

    def get(self, path: str) -> Any:
        reply = self.http.get(path)
        reply.raise_for_status()
        return reply.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        reply = self.http.post(path, json=body)
        if reply.status_code >= 400:
            raise IronpodError(f"controller refused {path}: {reply.text}")
        return reply.json()


def launch(cfg: LaunchConfig) -> int:
    url = f"http://{cfg.master_addr}:{cfg.master_port}"
    py = sys.executable
    controller = None
    extra = {env.PRESET_TOKEN: cfg.token} if cfg.token else {}
    if cfg.node_rank == 0:
        controller = _spawn(
            [
                py,
                "-m",
                "ironpod.cli",
                "controller",
                "--host",
                "0.0.0.0",
                "--port",
                str(cfg.master_port),
                "--state-dir",
                str(cfg.job_dir / "controller"),
            ],
            cfg.job_dir / "logs" / "controller.log",
            extra,
        )
    admin, join = _tokens(cfg)
    api = _Api(url, admin)
    name = f"{socket.gethostname()}-{cfg.node_rank}"
    agent = _spawn(
        [
            py,
            "-m",
            "ironpod.agent",
            "--join",
            url,
            "--token",
            join,
            "--name",
            name,
            "--workdir",
            str(cfg.job_dir / "nodes" / name),
            "--address",
            cfg.node_address or _my_address(cfg.master_addr),
            "--health-level",
            cfg.health_level,
        ],
        cfg.job_dir / "logs" / f"agent-{name}.log",
        {},
    )
    try:
        if cfg.node_rank == 0:
            return _lead(cfg, api)
        return _follow(cfg, api)
    finally:
        _stop(agent)
        _stop(controller)


#: Node rank 0 keeps its controller up this long after the job ended: the other nodes poll it
#: every second and must see the outcome before it goes, or they wait for it to come back.
LINGER_S = 3.0


def _job(api: _Api, name: str) -> dict[str, Any] | None:
    jobs = [j for j in api.get("/api/v1/jobs") if j["name"] == name]
    return jobs[-1] if jobs else None


def _lead(cfg: LaunchConfig, api: _Api) -> int:
    deadline = time.monotonic() + cfg.give_up_waiting_s
    job: dict[str, Any] | None = None
    while job is None:
        try:
            job = _job(api, cfg.job_name)
            if job is None:
                ready = [n for n in api.get("/api/v1/nodes") if n["state"] in ("ready", "busy")]
                if len(ready) >= cfg.nnodes:
                    job = api.post("/api/v1/jobs", _spec(cfg))
        except httpx.HTTPError:
            pass
        if job is None and time.monotonic() > deadline:
            print(f"ironpod launch: fewer than {cfg.nnodes} nodes joined", file=sys.stderr)
            return EXIT_REQUEUE
        time.sleep(0.5)
    return _wait(cfg, api, lead=True)


def _follow(cfg: LaunchConfig, api: _Api) -> int:
    return _wait(cfg, api, lead=False)


def _wait(cfg: LaunchConfig, api: _Api, *, lead: bool) -> int:
    silent_since: float | None = None
    waiting_since: float | None = None
    while True:
        try:
            job = _job(api, cfg.job_name)
            silent_since = None
        except httpx.HTTPError:
            job = None
            silent_since = silent_since or time.monotonic()
            if time.monotonic() - silent_since > cfg.give_up_waiting_s:
                print("ironpod launch: node rank 0 is gone; asking for a requeue", file=sys.stderr)
                return EXIT_REQUEUE
        if job is not None:
            if job["state"] in TERMINAL:
                print(f"ironpod launch: job {job['state']}: {job['reason']}", file=sys.stderr)
                if lead:  # the controller goes with us: let every follower read the outcome
                    time.sleep(LINGER_S)
                return TERMINAL[job["state"]]
            waiting = job["state"] == "recovering" and job["reason"].startswith("waiting")
            waiting_since = (waiting_since or time.monotonic()) if waiting else None
            if lead and waiting_since and time.monotonic() - waiting_since > cfg.give_up_waiting_s:
                print(f"ironpod launch: {job['reason']}; asking for a requeue", file=sys.stderr)
                return EXIT_REQUEUE
        time.sleep(1.0)


def _spec(cfg: LaunchConfig) -> dict[str, Any]:
    restart: dict[str, Any] = {"max_restarts": cfg.max_restarts}
    if cfg.hang_timeout_s:
        restart["hang_timeout_s"] = cfg.hang_timeout_s
    return {
        "apiVersion": "ironpod/v1",
        "name": cfg.job_name,
        "nodes": cfg.nnodes,
        "nproc_per_node": cfg.nproc_per_node,
        "command": cfg.command,
        "workdir": os.getcwd(),
        "restart": restart,
    }
