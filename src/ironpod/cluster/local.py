"""``ironpod up`` / ``ironpod down``: a controller and N agents as background processes here.

Everything lives under one home directory (``$IRONPOD_HOME``, default ``~/.ironpod``)::

    cluster.json            what is running: URL, pids (with start times), each node's share
    controller/             the controller's state: SQLite database, tokens.json
    nodes/node-0/ ...       each agent's work directory (worker logs, beacon socket)
    logs/controller.log     stdout and stderr of each process
    logs/node-0.log ...

Each node also gets a shared-memory area, ``/dev/shm/ironpod-<hash of home>/node-i`` (label
``shm_dir`` of the node), for the in-memory checkpoint tier: a directory per node, so a
simulated node loss can lose exactly that node's memory.

The processes are detached (their own sessions, output to files) so they outlive the command
that started them; ``cluster.json`` keeps each pid with its start time, so a later ``down``
never signals an unrelated process that reused a pid. The file is written as soon as the first
process starts (and rewritten atomically), so even an interrupted ``up`` can be taken ``down``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ironpod import env
from ironpod.client import IronpodClient
from ironpod.errors import IronpodError
from ironpod.private import write_private

CLUSTER_FILE = "cluster.json"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
#: States a node may show right after joining: "busy" when a job left in the database from an
#: earlier run is scheduled at once; the others when an operator or the health policy set them
#: in an earlier run (they survive a restart, by design).
_JOINED_STATES = frozenset({"ready", "busy", "draining", "drained", "quarantined"})


class ClusterError(IronpodError):
    """The local cluster could not be started, found or changed."""

    exit_code = 1


@dataclass(kw_only=True, slots=True)
class Proc:
    """A process we started; ``create_time`` tells it apart from a later one with its pid."""

    pid: int
    create_time: float

    def process(self) -> psutil.Process | None:
        """The live process, or None if it ended (a zombie counts as ended)."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.05:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            return None
        return proc

    def alive(self) -> bool:
        return self.process() is not None


@dataclass(kw_only=True, slots=True)
class AgentProc(Proc):
    name: str
    workdir: str
    cpus: list[int]
    shm_dir: str
    log: str


@dataclass(kw_only=True)
class ClusterInfo:
    home: str
    url: str
    port: int
    started_unix: float
    heartbeat_interval_s: float
    node_lost_after_s: float
    spares: int
    shm_root: str
    controller: Proc
    agents: dict[str, AgentProc] = field(default_factory=dict)
    health_level: str = "none"
    health_interval_s: float = 30.0
    #: Extra agent options for the health checks (``--health-threshold K=V``, ...), all agents.
    health_args: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClusterInfo:
        fields = dict(data)
        fields["controller"] = Proc(**data["controller"])
        fields["agents"] = {k: AgentProc(**v) for k, v in data.get("agents", {}).items()}
        return cls(**fields)

    def admin_client(self) -> IronpodClient:
        return IronpodClient(self.url, _tokens(Path(self.home))["admin"])


def cluster_file(home: Path) -> Path:
    return home / CLUSTER_FILE


def read_cluster(home: Path) -> ClusterInfo | None:
    path = cluster_file(home)
    try:
        return ClusterInfo.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClusterError(f"{path}: unreadable ({exc}); remove it if no cluster runs") from None


def require_cluster(home: Path) -> ClusterInfo:
    info = read_cluster(home)
    if info is None:
        raise ClusterError(f"no local cluster in {home} (start one with `ironpod up`)")
    return info


def _write_cluster(info: ClusterInfo) -> None:
    path = cluster_file(Path(info.home))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        json.dump(asdict(info), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tokens(home: Path) -> dict[str, str]:
    path = home / "controller" / "tokens.json"
    try:
        data = json.loads(path.read_text())
        return {"admin": str(data["admin"]), "join": str(data["join"])}
    except (OSError, ValueError, KeyError) as exc:
        raise ClusterError(f"{path}: cannot read the cluster's tokens ({exc})") from None


def _join_token_file(home: Path) -> Path:
    """The join token in a 0600 file for the agents' ``--token-file``: on a command line any
    local user would read it (``/proc/PID/cmdline``)."""
    path = home / "controller" / "join-token"
    write_private(path, _tokens(home)["join"].encode())
    return path


def shm_root(home: Path) -> Path:
    """Per home, so two local clusters on one machine never share memory areas."""
    digest = hashlib.sha256(str(home).encode()).hexdigest()[:12]
    base = Path("/dev/shm")
    return base / f"ironpod-{digest}" if base.is_dir() else home / "shm"


def cpu_shares(nodes: int, cpus: list[int] | None = None) -> list[list[int]]:
    """Round-robin shares of this process's CPUs; nodes share CPUs when there are too few."""
    pool = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    per = max(1, len(pool) // nodes)
    return [[pool[(i * per + j) % len(pool)] for j in range(per)] for i in range(nodes)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _child_env() -> dict[str, str]:
    """Our environment minus the CLI's URL and token: a controller adopts ``IRONPOD_TOKEN`` as
    the token of a new state directory, and a local cluster must make its own."""
    out = {k: v for k, v in os.environ.items() if k not in {env.URL, env.TOKEN}}
    out["PYTHONUNBUFFERED"] = "1"
    return out


def _spawn(argv: list[str], log: Path, cwd: Path) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=_child_env(),
            start_new_session=True,  # own process group: signalled as one, outlives the CLI
        )
    try:
        created = psutil.Process(popen.pid).create_time()
    except psutil.Error:
        created = 0.0  # already gone: the start-up wait reports it with the log's tail
    return Proc(pid=popen.pid, create_time=created)


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:]) or "(empty log)"


def _controller_argv(info: ClusterInfo) -> list[str]:
    home = Path(info.home)
    return [
        *(sys.executable, "-m", "ironpod.cli", "controller"),
        *("--host", "127.0.0.1", "--port", str(info.port)),
        *("--state-dir", str(home / "controller")),
        *("--node-lost-after", str(info.node_lost_after_s)),
        *("--heartbeat-interval", str(info.heartbeat_interval_s)),
        *("--spares", str(info.spares)),
    ]


def _agent_argv(info: ClusterInfo, agent: AgentProc, token_file: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "ironpod.cli", "agent"),
        *("--join", info.url, "--token-file", str(token_file), "--name", agent.name),
        *("--workdir", agent.workdir, "--address", "127.0.0.1"),
        *("--cpus", ",".join(map(str, agent.cpus))),
        *("--shm-dir", agent.shm_dir, "--label", f"shm_dir={agent.shm_dir}"),
        *("--label", "cluster=local"),
        *("--heartbeat-interval", str(info.heartbeat_interval_s)),
        *("--health-level", info.health_level),
        *("--health-interval", str(info.health_interval_s)),
        # Simulated nodes share this machine's CPUs: a throughput benchmark against the node's
        # own baseline would measure its neighbours' load, not its hardware.
        *("--health-skip", "compute.matmul"),
        *info.health_args,
    ]


def _start_agent(info: ClusterInfo, name: str, cpus: list[int], token_file: Path) -> AgentProc:
    home = Path(info.home)
    shm = Path(info.shm_root) / name
    shm.mkdir(parents=True, exist_ok=True, mode=0o700)
    spec = AgentProc(
        pid=0,
        create_time=0.0,
        name=name,
        workdir=str(home / "nodes" / name),
        cpus=cpus,
        shm_dir=str(shm),
        log=str(home / "logs" / f"{name}.log"),
    )
    proc = _spawn(_agent_argv(info, spec, token_file), Path(spec.log), home)
    spec.pid, spec.create_time = proc.pid, proc.create_time
    return spec


def up(
    nodes: int,
    home: Path,
    port: int | None = None,
    spares: int = 0,
    heartbeat_interval_s: float = 1.0,
    node_lost_after_s: float = 6.0,
    *,
    timeout_s: float = START_TIMEOUT_S,
    health_level: str = "none",
    health_interval_s: float = 30.0,
    health_args: list[str] | None = None,
) -> ClusterInfo:
    """Start the cluster and return once every node is in; on any failure stop it all.

    ``health_level`` (none, light, deep) is each agent's suite before it joins, then a light
    run every ``health_interval_s``; ``health_args`` go to every agent (``--health-threshold
    min_free_disk_gib=0.01``, say)."""
    if nodes < 1:
        raise ClusterError(f"--nodes {nodes}: a cluster needs at least one node")
    home = home.expanduser().resolve()
    _refuse_if_running(home)
    if port is None:
        port = _free_port()
    elif not _port_free(port):
        raise ClusterError(f"port {port} on 127.0.0.1 is in use; pick another with --port")
    for sub in ("controller", "nodes", "logs"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    root = shm_root(home)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = ClusterInfo(
        home=str(home),
        url=f"http://127.0.0.1:{port}",
        port=port,
        started_unix=time.time(),
        heartbeat_interval_s=heartbeat_interval_s,
        node_lost_after_s=node_lost_after_s,
        spares=spares,
        shm_root=str(root),
        controller=Proc(pid=0, create_time=0.0),
        health_level=health_level,
        health_interval_s=health_interval_s,
        health_args=list(health_args or []),
    )
    try:
        info.controller = _spawn(_controller_argv(info), home / "logs" / "controller.log", home)
        _write_cluster(info)
        deadline = time.monotonic() + timeout_s
        _wait_controller(info, deadline)
        token_file = _join_token_file(home)
        for i, cpus in enumerate(cpu_shares(nodes)):
            name = f"node-{i}"
            info.agents[name] = _start_agent(info, name, cpus, token_file)
            _write_cluster(info)
        _wait_nodes(info, list(info.agents), info.started_unix, deadline)
    except BaseException:
        _stop_all(info, STOP_TIMEOUT_S)
        _remove_files(info)
        raise
    return info


def _refuse_if_running(home: Path) -> None:
    info = read_cluster(home)
    if info is None:
        return
    if info.controller.alive() or any(a.alive() for a in info.agents.values()):
        raise ClusterError(
            f"a local cluster is already running in {home} (controller pid "
            f"{info.controller.pid} at {info.url}); stop it first with `ironpod down`"
        )
    _remove_files(info)  # left behind by a crash or a reboot: nothing of it runs


def _wait_controller(info: ClusterInfo, deadline: float) -> None:
    log = Path(info.home) / "logs" / "controller.log"
    with IronpodClient(info.url, None, timeout_s=2.0) as probe:
        while True:
            if not info.controller.alive():
                raise ClusterError(f"the controller exited during start-up: {_log_tail(log)}")
            with contextlib.suppress(IronpodError):
                probe.healthz()
                return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the controller did not answer at {info.url} in time: {_log_tail(log)}"
                )
            time.sleep(0.1)


def _wait_nodes(info: ClusterInfo, names: list[str], since: float, deadline: float) -> None:
    """Until each named node has joined (registered or heartbeated since ``since``)."""
    seen: dict[str, str] = {}
    with info.admin_client() as client:
        while True:
            for name in names:
                agent = info.agents[name]
                if not agent.alive():
                    raise ClusterError(
                        f"the agent of {name} exited during start-up: {_log_tail(Path(agent.log))}"
                    )
            with contextlib.suppress(IronpodError):
                seen = {
                    n["name"]: n["state"]
                    for n in client.nodes()
                    if n["last_heartbeat_unix"] >= since
                }
            missing = [n for n in names if seen.get(n) not in _JOINED_STATES]
            if not missing:
                return
            if time.monotonic() > deadline:
                shown = ", ".join(f"{n} ({seen.get(n, 'not registered')})" for n in missing)
                first = info.agents[missing[0]]
                raise ClusterError(
                    f"nodes not ready in time: {shown}; {first.log}: {_log_tail(Path(first.log))}"
                )
            time.sleep(0.2)


def node_processes(proc: Proc) -> list[psutil.Process]:
    """A process and all its descendants (workers run in sessions of their own, but they are
    still the agent's children: the tree, not the process group, is the node)."""
    root = proc.process()
    if root is None:
        return []
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return [root]


def _signal(procs: list[psutil.Process], sig: signal.Signals) -> list[int]:
    done = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
            done.append(proc.pid)
    return done


def _stop_all(info: ClusterInfo, timeout_s: float) -> None:
    """SIGTERM the agents (they stop their workers), then the controller; SIGKILL leftovers."""
    agent_trees = [node_processes(a) for a in info.agents.values()]
    everything = [p for tree in agent_trees for p in tree]
    _signal([tree[0] for tree in agent_trees if tree], signal.SIGTERM)
    _signal(everything, signal.SIGCONT)  # a node frozen by `chaos cut-network` must hear it
    deadline = time.monotonic() + timeout_s
    _wait_gone(everything, deadline)
    controller = node_processes(info.controller)
    _signal(controller[:1], signal.SIGTERM)
    _wait_gone(controller, max(deadline, time.monotonic() + 3.0))
    _signal([p for p in everything + controller if _running(p)], signal.SIGKILL)
    _wait_gone(everything + controller, time.monotonic() + 5.0)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list[psutil.Process], deadline: float) -> None:
    while any(_running(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)


def _remove_files(info: ClusterInfo) -> None:
    shutil.rmtree(info.shm_root, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        cluster_file(Path(info.home)).unlink()


def down(home: Path, timeout_s: float = STOP_TIMEOUT_S) -> ClusterInfo | None:
    """Stop the cluster in ``home``; None if none was recorded there."""
    home = home.expanduser().resolve()
    info = read_cluster(home)
    if info is None:
        return None
    _stop_all(info, timeout_s)
    _remove_files(info)
    return info


def _agent(info: ClusterInfo, node: str) -> AgentProc:
    if node not in info.agents:
        known = ", ".join(info.agents) or "none"
        raise ClusterError(f"no node {node!r} in the local cluster (nodes: {known})")
    return info.agents[node]


def kill_agent(home: Path, node: str, extra_pids: tuple[int, ...] = ()) -> list[int]:
    """A node loss: SIGKILL the agent, then every worker of it (``extra_pids`` too, if they
    are still ironpod workers); returns the pids killed."""
    agent = _agent(require_cluster(home), node)
    tree = node_processes(agent)
    if not tree:
        raise ClusterError(f"the agent of {node} is not running (pid {agent.pid})")
    known = {p.pid for p in tree}
    tree += [p for pid in extra_pids if pid not in known and (p := _worker(pid)) is not None]
    return _signal(tree, signal.SIGKILL)


def signal_node(home: Path, node: str, sig: signal.Signals) -> list[int]:
    """Send ``sig`` to the agent and all its workers (SIGSTOP/SIGCONT: a network cut, healed)."""
    agent = _agent(require_cluster(home), node)
    tree = node_processes(agent)
    if not tree:
        raise ClusterError(f"the agent of {node} is not running (pid {agent.pid})")
    if sig == signal.SIGCONT:
        tree.reverse()  # workers first: the agent must not wake to a frozen worker and call it hung
    return _signal(tree, sig)


def is_worker_of(home: Path, node: str, pid: int) -> bool:
    """Whether ``pid`` runs under this node's agent (so chaos never hits a stranger)."""
    agent = _agent(require_cluster(home), node)
    return any(p.pid == pid for p in node_processes(agent)[1:])


def _worker(pid: int) -> psutil.Process | None:
    """An orphaned worker is still recognisable by the job id the agent gave it."""
    try:
        proc = psutil.Process(pid)
        return proc if env.JOB_ID in proc.environ() else None
    except psutil.Error:
        return None


def restart_agent(home: Path, node: str, *, timeout_s: float = 30.0) -> AgentProc:
    """Start the node's agent again (stopping it first if it runs) and wait until it joined."""
    home = home.expanduser().resolve()
    info = require_cluster(home)
    old = _agent(info, node)
    tree = node_processes(old)
    if tree:
        _signal(tree[:1], signal.SIGTERM)
        _signal(tree, signal.SIGCONT)
        _wait_gone(tree, time.monotonic() + STOP_TIMEOUT_S)
        _signal([p for p in tree if _running(p)], signal.SIGKILL)
        _wait_gone(tree, time.monotonic() + 5.0)
    since = time.time()
    info.agents[node] = _start_agent(info, node, old.cpus, _join_token_file(home))
    _write_cluster(info)
    _wait_nodes(info, [node], since, time.monotonic() + timeout_s)
    return info.agents[node]
