"""``ironpod launch``: torchrun's flags, ironpod's recovery, inside Slurm or a Kubernetes pod.

Every node runs the same command (``srun ironpod launch --nnodes 2 ... train.py``). Node rank 0
starts an embedded controller whose state (SQLite) lives in the job directory; every node runs
an agent that joins it; node 0 submits the job once enough nodes are in and waits for it. The
workers get a fresh MASTER_PORT per attempt (no stale rendezvous store). Other nodes follow the
job's state and exit with it. Each node prints its own ranks' output, as torchrun does.

The job's identity is the rendezvous id (``--rdzv-id``, else the Slurm job and step, else a
fresh id per invocation): a requeued Slurm job carries on the same job from the state in the
job directory, and a job that already succeeded under that id is not run again; a fresh id
always runs its command (docs/launch.md).

Exit codes:

- 0: the job succeeded (now, or under the same id before a requeue);
- 1: it failed (restart limit reached, an exit code that forbids restarts, cancelled);
- 75 (EX_TEMPFAIL, :data:`ironpod.errors.EXIT_PREEMPTED`) "requeue me": launch got SIGTERM or
  SIGHUP (Slurm's preemption, ``scancel``, a pod's deletion) and stopped the workers with
  SIGTERM and the shutdown grace, or the controller ran out of nodes, or node rank 0 vanished;
- 93 (:data:`ironpod.errors.EXIT_DO_NOT_REQUEUE`): running again cannot help: the command could
  not start (126/127), or attempts failed alike before any progress;
- 130: SIGINT (Ctrl-C): the workers are stopped as for SIGTERM, and no requeue is asked for;
- 2: bad flags (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psutil

from ironpod import env, tls
from ironpod.errors import EXIT_DO_NOT_REQUEUE, EXIT_PREEMPTED, ConfigError, IronpodError
from ironpod.private import private_dir, write_private

EXIT_REQUEUE = EXIT_PREEMPTED
EXIT_INTERRUPTED = 130
TERMINAL = {"succeeded", "failed", "cancelled"}
#: How often launch asks for the job's state while this node's workers run.
RUNNING_POLL_S = 1.0

#: Exit codes of a command that could not start (a shell's convention; the agent's too).
CANNOT_START = {126, 127}
#: Node rank 0 keeps its controller up at most this long after the job ended, until every
#: other node has stopped heartbeating (it saw the outcome and stopped its agent).
FOLLOWER_WAIT_S = 10.0


@dataclass(kw_only=True)
class LaunchConfig:
    min_nodes: int = 1
    max_nodes: int = 1
    #: Nodes expected to join (SLURM_NNODES, else MAX): the start wait ends when all are in.
    expected_nodes: int = 1
    nproc_per_node: int
    node_rank: int
    master_addr: str
    master_port: int
    command: list[str]
    max_restarts: int = 3
    job_dir: Path
    job_name: str = "launch"
    #: The job's identity (TORCHELASTIC_RUN_ID); ``shared_id``: every launch under it is the
    #: same job (an explicit --rdzv-id, or the Slurm job), so a requeue carries on.
    run_id: str = "none"
    shared_id: bool = False
    role: str = "default"
    hang_timeout_s: float | None = None
    node_address: str | None = None
    token: str | None = None
    give_up_waiting_s: float = 120.0
    join_timeout_s: float = 600.0
    last_call_s: float = 30.0
    shutdown_timeout_s: float = 30.0
    log_dir: Path | None = None
    #: Local ranks whose output this launch prints (None: all), and with ``[roleN]:`` or not.
    console_ranks: list[int] | None = None
    console_prefix: bool = False
    #: The agent's health suite before it joins (none, light, deep); then light runs. Off by
    #: default: inside Slurm or a pod the scheduler's own health program usually vets nodes.
    health_level: str = "none"
    node_name: str = field(default_factory=socket.gethostname)

    @property
    def name(self) -> str:
        """The job's name in the controller: one per identity (the state dir may hold many)."""
        digest = hashlib.sha1(self.run_id.encode()).hexdigest()[:10]
        return f"{self.job_name}-{digest}"

    @property
    def single_node(self) -> bool:
        return self.max_nodes == 1 and self.expected_nodes == 1


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--rdzv-endpoint {endpoint!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _my_address(master_addr: str) -> str:
    """The address of this host that the master's network reaches (the route towards it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((master_addr, 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


class _Stop:
    """SIGTERM, SIGINT and SIGHUP to launch: remembered, and every wait wakes at once. Every
    wait also checks the launch's own processes (:meth:`watch`): one that exited before the
    job ended (an agent that could not start) ends the launch with its log's last line."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self._watched: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def watch(self, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self._watched[name] = (proc, log)

    def wait(self, seconds: float) -> bool:
        stopped = self.event.wait(seconds)
        if not stopped:
            for name, (proc, log) in self._watched.items():
                if proc.poll() is not None:
                    raise IronpodError(
                        f"the {name} exited with code {proc.returncode} while the job ran: "
                        f"{_last_line(log)} (all of it in {log})"
                    )
        return stopped

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            self.signum = self.signum or signum
            self.event.set()

        sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {sig: signal.signal(sig, handler) for sig in sigs}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    @property
    def code(self) -> int:
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_REQUEUE


def _tokens(cfg: LaunchConfig, stop: _Stop) -> tuple[str, str]:
    """(admin, join): a shared secret, or the controller's tokens.json on a shared file system."""
    if cfg.token:
        return cfg.token, cfg.token
    path = cfg.job_dir / "controller" / "tokens.json"
    deadline = time.monotonic() + cfg.give_up_waiting_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise ConfigError(
                f"no {path} after {cfg.give_up_waiting_s:.0f} s: give every node the same "
                "IRONPOD_PRESET_TOKEN, or a job directory on a file system they share"
            )
        if stop.wait(0.05):
            raise _StoppedError
    data = json.loads(path.read_text())
    return str(data["admin"]), str(data["join"])


def _last_line(log: Path) -> str:
    """The last non-blank line of a log (an exception's message ends a traceback)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    return next((ln for ln in reversed(lines) if ln), "(an empty log)")


class _StoppedError(Exception):
    """A signal arrived while launch waited."""


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _controller_ca(cfg: LaunchConfig, url: str, join: str, name: str, stop: _Stop) -> Path:
    """The embedded controller's CA: node rank 0 made it; the others fetch it, signed with
    the join token they share (waiting while the controller starts)."""
    if cfg.node_rank == 0:
        return cfg.job_dir / "controller" / "tls" / "ca.pem"
    path = private_dir(cfg.job_dir / "agents") / f"{name}-ca.pem"
    deadline = time.monotonic() + cfg.give_up_waiting_s
    while True:
        try:
            write_private(path, tls.fetch_ca_signed(url, join, timeout_s=5))
            return path
        except tls.NotReachableError:
            if time.monotonic() > deadline:
                raise
        if stop.wait(0.5):
            raise _StoppedError


class _Api:
    def __init__(self, url: str, token: str, ca_file: Path | None = None) -> None:
        self.http = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
            verify=tls.client_context(ca_file) if ca_file else True,
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
    """Run the launch on this node; the exit code (module docstring)."""
    stop = _Stop()
    with stop.installed():
        return _launch(cfg, stop)


def _uses_tls(cfg: LaunchConfig) -> bool:
    """Off loopback the embedded controller listens on every address: it serves TLS then."""
    return not tls.is_loopback(cfg.master_addr)


def _launch(cfg: LaunchConfig, stop: _Stop) -> int:
    scheme = "https" if _uses_tls(cfg) else "http"
    host = f"[{cfg.master_addr}]" if ":" in cfg.master_addr else cfg.master_addr
    url = f"{scheme}://{host}:{cfg.master_port}"
    if cfg.nproc_per_node > 1 and env.OMP_NUM_THREADS not in os.environ:
        print(
            "ironpod launch: setting OMP_NUM_THREADS=1 for each worker (as torchrun) so that "
            f"{cfg.nproc_per_node} processes do not overload the node; tune it as needed",
            file=sys.stderr,
            flush=True,
        )
    controller = agent = None
    name = f"{cfg.node_name}-{cfg.node_rank}"
    workdir = cfg.job_dir / "nodes" / name
    console = _Console(cfg, workdir / "logs")
    try:
        if cfg.node_rank == 0:
            from ironpod.controller.auth import load_or_create_tokens

            # The tokens first, so the agent starts while the controller does (both take a
            # second or more to import); the controller finds them in its state directory.
            tokens = load_or_create_tokens(cfg.job_dir / "controller", cfg.token)
            admin, join = tokens.admin, tokens.join
            if _uses_tls(cfg):  # the CA first too: this node's agent verifies with it
                tls.Authority.load_or_create(cfg.job_dir / "controller" / "tls")
            log = cfg.job_dir / "logs" / "controller.log"
            controller = _spawn(_controller_argv(cfg), log)
            stop.watch("embedded controller", controller, log)
        else:
            admin, join = _tokens(cfg, stop)
        ca_file = _controller_ca(cfg, url, join, name, stop) if _uses_tls(cfg) else None
        api = _Api(url, admin, ca_file)
        _link_log_dir(cfg, workdir)
        console.start()
        log = cfg.job_dir / "logs" / f"agent-{name}.log"
        # The join token in a private file: a command line is readable by every local user.
        token_file = private_dir(cfg.job_dir / "agents") / f"{name}.token"
        write_private(token_file, join.encode())
        agent = _spawn(
            [
                sys.executable, "-m", "ironpod.agent", "--join", url,
                "--token-file", str(token_file),
                *(("--ca-file", str(ca_file)) if ca_file else ()),
                "--name", name, "--workdir", str(workdir),
                "--address", cfg.node_address or _my_address(cfg.master_addr),
                "--health-level", cfg.health_level,
            ],
            log,
        )  # fmt: skip
        stop.watch("agent", agent, log)
        if cfg.node_rank == 0:
            return _lead(cfg, api, stop, name, agent)
        return _follow(cfg, api, stop, agent)
    except _StoppedError:
        return stop.code
    finally:
        if stop.signum is not None:
            sig = signal.Signals(stop.signum).name
            print(f"ironpod launch: {sig}: stopping the workers", file=sys.stderr, flush=True)
        _teardown(cfg, agent, controller, workdir)
        console.close()


def _teardown(
    cfg: LaunchConfig,
    agent: subprocess.Popen[bytes] | None,
    controller: subprocess.Popen[bytes] | None,
    workdir: Path,
) -> None:
    """Nothing of this launch survives it: the agent stops its workers (SIGTERM, the shutdown
    grace, SIGKILL), then the controller goes; whatever is left of the process tree (an agent
    that died and left its workers) is killed."""
    from ironpod.agent.supervisor import kill_stale_workers

    try:
        tree = psutil.Process().children(recursive=True)
    except psutil.Error:
        tree = []
    _stop(agent, cfg.shutdown_timeout_s + 15)
    kill_stale_workers(workdir)
    _stop(controller, 15)
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(tree, timeout=5)


def _controller_argv(cfg: LaunchConfig) -> list[str]:
    # The controller's default heartbeat interval: the agent beats faster on its own after
    # joining and after a failure (agent.main's FAST_INTERVAL_S), when an assignment is due.
    return [
        sys.executable, "-m", "ironpod.launch", "--port", str(cfg.master_port),
        "--state-dir", str(cfg.job_dir / "controller"), "--grace", str(cfg.shutdown_timeout_s),
        *(("--tls-name", cfg.master_addr) if _uses_tls(cfg) else ()),
    ]  # fmt: skip


def _link_log_dir(cfg: LaunchConfig, workdir: Path) -> None:
    """``--log-dir``: the agent's rank logs go to LOG_DIR/<run id>/<node> (a link from the
    agent's work directory, which keeps its layout)."""
    if cfg.log_dir is None:
        return
    target = cfg.log_dir / cfg.run_id / workdir.name
    target.mkdir(parents=True, exist_ok=True)
    link = workdir / "logs"
    workdir.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        print(f"ironpod launch: --log-dir ignored: {link} already holds logs", file=sys.stderr)
        return
    link.symlink_to(target, target_is_directory=True)


class _Console:
    """Prints this node's ranks' output as the agent writes it to their log files: every
    local rank by default (torchrun's console), or those the flags select, with torchrun's
    ``[roleN]:`` prefix when asked. Logs already there (an earlier allocation's) are skipped."""

    def __init__(self, cfg: LaunchConfig, root: Path) -> None:
        self.cfg, self.root = cfg, root
        self.offsets: dict[Path, int] = {}
        self.partial: dict[Path, bytes] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="launch-console", daemon=True)

    def start(self) -> None:
        for path in self._files():
            with contextlib.suppress(OSError):
                self.offsets[path] = path.stat().st_size
        self.thread.start()

    def close(self) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        self._scan(final=True)

    def _files(self) -> list[Path]:
        return sorted(self.root.glob("attempt-*/rank-*.log"))

    def _run(self) -> None:
        while not self.done.wait(0.1):
            self._scan(final=False)

    def _scan(self, *, final: bool) -> None:
        out = sys.stdout.buffer
        wrote = False
        for path in self._files():
            rank = int(path.stem.removeprefix("rank-"))
            local = rank % self.cfg.nproc_per_node
            if self.cfg.console_ranks is not None and local not in self.cfg.console_ranks:
                continue
            offset = self.offsets.get(path, 0)
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            if not data and not (final and self.partial.get(path)):
                continue
            self.offsets[path] = offset + len(data)
            data = self.partial.pop(path, b"") + data
            lines = data.split(b"\n")
            rest = lines.pop()
            if final and rest:
                lines.append(rest)
            elif rest:
                self.partial[path] = rest
            head = f"[{self.cfg.role}{local}]:".encode() if self.cfg.console_prefix else b""
            for line in lines:
                out.write(head + line + b"\n")
                wrote = True
        if wrote:
            with contextlib.suppress(OSError, ValueError):
                out.flush()


def _job(api: _Api, name: str, skip: set[int]) -> dict[str, Any] | None:
    jobs = [j for j in api.get("/api/v1/jobs") if j["name"] == name and j["id"] not in skip]
    return jobs[-1] if jobs else None


def _carries_on(cfg: LaunchConfig, job: dict[str, Any]) -> bool:
    """An existing job with this name is ours to carry on: the same identity and command.
    A finished one counts only if it succeeded (a failed job runs again if launched again)."""
    same = cfg.shared_id and job["spec"].get("command") == cfg.command
    return same and (job["state"] not in TERMINAL or job["state"] == "succeeded")


def _lead(
    cfg: LaunchConfig, api: _Api, stop: _Stop, own: str, agent: subprocess.Popen[bytes]
) -> int:
    deadline = time.monotonic() + cfg.join_timeout_s
    enough_since: float | None = None
    while True:  # the controller is starting
        try:
            job = _job(api, cfg.name, set())
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise IronpodError(
                    "the embedded controller did not start (logs/controller.log)"
                ) from None
            if stop.wait(0.05):
                return stop.code
    if job is not None and not _carries_on(cfg, job):
        if job["state"] not in TERMINAL:  # an abandoned run of another command: not ours
            api.post(f"/api/v1/jobs/{job['id']}/cancel", {})
        job = None
    elif job is not None:
        print(f"ironpod launch: carrying on job {cfg.run_id!r} ({job['state']})", file=sys.stderr)
    while job is None:
        try:
            ready = [n for n in api.get("/api/v1/nodes") if n["state"] in ("ready", "busy")]
        except httpx.HTTPError:
            ready = []
        now = time.monotonic()
        if len(ready) >= cfg.min_nodes:
            enough_since = enough_since or now
        if len(ready) >= cfg.expected_nodes or (
            enough_since is not None and now - enough_since >= cfg.last_call_s
        ):
            job = api.post("/api/v1/jobs", _spec(cfg, len(ready)))
            break
        if now > deadline:
            print(f"ironpod launch: fewer than {cfg.min_nodes} nodes joined", file=sys.stderr)
            return EXIT_REQUEUE
        if stop.wait(0.05):
            return stop.code
    code = _wait(cfg, api, stop, job["id"], agent, lead=True)
    if not cfg.single_node and stop.signum is None:
        _wait_for_followers(api, own, stop)
    return code


def _follow(cfg: LaunchConfig, api: _Api, stop: _Stop, agent: subprocess.Popen[bytes]) -> int:
    """Follow the job node 0 runs under this identity. A job already finished when first seen
    is an earlier run's, unless it is one node 0 carries on (it succeeded, same identity)."""
    skip: set[int] = set()
    silent_since: float | None = None
    while True:
        try:
            job = _job(api, cfg.name, skip)
            silent_since = None
        except httpx.HTTPError:
            job = None
            silent_since = silent_since or time.monotonic()
            if time.monotonic() - silent_since > cfg.give_up_waiting_s:
                print("ironpod launch: node rank 0 is gone; asking for a requeue", file=sys.stderr)
                return EXIT_REQUEUE
        if job is not None:
            if job["state"] not in TERMINAL or _carries_on(cfg, job):
                return _wait(cfg, api, stop, job["id"], agent, lead=False)
            skip.add(job["id"])
        if stop.wait(0.25):
            return stop.code


def _workers_running(agent: subprocess.Popen[bytes]) -> bool:
    """Whether the agent has a child process: its threads' ``children`` lists in /proc (a few
    small reads), else psutil, which reads every process's parent (several ms a call on a
    busy host, ten calls a second while a job ends)."""
    try:
        tasks = os.listdir(f"/proc/{agent.pid}/task")
        return any(Path(f"/proc/{agent.pid}/task/{t}/children").read_bytes().strip() for t in tasks)
    except OSError:  # no /proc children lists (not Linux, CONFIG_PROC_CHILDREN off), or gone
        pass
    try:
        return bool(psutil.Process(agent.pid).children())
    except psutil.Error:
        return False


def _wait(
    cfg: LaunchConfig,
    api: _Api,
    stop: _Stop,
    job_id: int,
    agent: subprocess.Popen[bytes],
    *,
    lead: bool,
) -> int:
    """Until the job ends: its exit code. While this node's workers run, the job is polled
    once a second (each poll is CPU the workers feel on a small node); when none runs (the
    job is ending or restarting), every 0.1 s on one node, so launch ends within about
    0.1 s of the job there."""
    quick = 0.1 if cfg.single_node else 0.5
    silent_since: float | None = None
    waiting_since: float | None = None
    while True:
        interval = RUNNING_POLL_S if _workers_running(agent) else quick
        try:
            job = api.get(f"/api/v1/jobs/{job_id}")
            silent_since = None
        except httpx.HTTPError:
            job = None
            silent_since = silent_since or time.monotonic()
            if time.monotonic() - silent_since > cfg.give_up_waiting_s:
                print("ironpod launch: node rank 0 is gone; asking for a requeue", file=sys.stderr)
                return EXIT_REQUEUE
        if job is not None:
            if job["state"] in TERMINAL:
                code = end_code(job)
                print(f"ironpod launch: job {job['state']}: {job['reason']}", file=sys.stderr)
                return code
            waiting = job["state"] == "recovering" and job["reason"].startswith("waiting")
            waiting_since = (waiting_since or time.monotonic()) if waiting else None
            if lead and waiting_since and time.monotonic() - waiting_since > cfg.give_up_waiting_s:
                print(f"ironpod launch: {job['reason']}; asking for a requeue", file=sys.stderr)
                return EXIT_REQUEUE
        due = time.monotonic() + interval
        while True:  # the slow poll ends early when the workers do
            if stop.wait(quick):
                return stop.code
            if time.monotonic() >= due or not _workers_running(agent):
                break


def end_code(job: dict[str, Any]) -> int:
    """The exit code for a finished job (module docstring). ``end_kind`` is the controller's
    typed account of why it ended; an older controller has only the state."""
    kind = job.get("end_kind", "")
    if job["state"] == "succeeded" or kind == "succeeded":
        return 0
    if kind == "no_progress":
        return EXIT_DO_NOT_REQUEUE
    attempts = job.get("attempts") or []
    if attempts:
        ranks = attempts[-1].get("ranks") or {}
        codes = {(info.get("event") or {}).get("exit_code") for info in ranks.values()}
        if codes & CANNOT_START:
            return EXIT_DO_NOT_REQUEUE
    return 1


def _wait_for_followers(api: _Api, own: str, stop: _Stop) -> None:
    """Keep the controller up until every other live node stopped heartbeating (it has seen
    the outcome and stopped its agent), at most FOLLOWER_WAIT_S."""
    deadline = time.monotonic() + FOLLOWER_WAIT_S
    while time.monotonic() < deadline and not stop.wait(0.2):
        try:
            nodes = api.get("/api/v1/nodes")
        except httpx.HTTPError:
            return
        now = time.time()
        live = [
            n for n in nodes
            if n["name"] != own and n["state"] not in ("lost", "gone")
            and now - (n.get("last_heartbeat_unix") or 0) < 2.5
        ]  # fmt: skip
        if not live:
            return


def _spec(cfg: LaunchConfig, joined: int) -> dict[str, Any]:
    """The job: as many nodes as joined (at most MAX); the rest are its spares. torchrun's
    restart limit is for the whole run, so the restart window is the run's lifetime."""
    size = max(cfg.min_nodes, min(joined, cfg.max_nodes))
    restart: dict[str, Any] = {
        "max_restarts": cfg.max_restarts,
        "window_s": 10 * 365 * 86400.0,
        "no_restart_exit_codes": [2, *sorted(CANNOT_START)],
    }
    if cfg.hang_timeout_s:
        restart["hang_timeout_s"] = cfg.hang_timeout_s
    job_env = {env.TORCHELASTIC_RUN_ID: cfg.run_id, env.ROLE_NAME: cfg.role}
    if env.WANDB_RUN_ID not in os.environ:  # one tracker run per job, across its restarts
        job_env[env.WANDB_RUN_ID] = f"{cfg.name}-{os.urandom(4).hex()}"
    return {
        "apiVersion": "ironpod/v1",
        "name": cfg.name,
        "nodes": size,
        "spares": max(0, joined - size),
        "nproc_per_node": cfg.nproc_per_node,
        "command": cfg.command,
        "workdir": os.getcwd(),
        "env": job_env,
        "restart": restart,
    }


def _controller_main(argv: list[str]) -> int:
    """``python -m ironpod.launch``: the embedded controller, with launch's shutdown grace
    (the agents stop workers with the grace the controller tells them)."""
    from ironpod.controller.server import TlsOptions, serve
    from ironpod.controller.service import ControllerConfig

    p = argparse.ArgumentParser(prog="python -m ironpod.launch")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--grace", type=float, default=30.0)
    p.add_argument("--tls-name", help="serve TLS on every address, for this name of the node")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = ControllerConfig(stop_grace_s=args.grace)
    # Nodes on loopback (one machine): loopback only, plain HTTP; else every address, TLS.
    host, options = "127.0.0.1", None
    if args.tls_name:
        host, options = "0.0.0.0", TlsOptions(names=(args.tls_name,))
    state = args.state_dir.resolve()
    serve(host=host, port=args.port, state_dir=state, config=config, tls=options)
    return 0


if __name__ == "__main__":
    sys.exit(_controller_main(sys.argv[1:]))
