"""The node agent's run loop: register, heartbeat, converge to the reply's assignment.

The controller may restart or vanish at any time; the agent never exits for that. It keeps
its workers running, retries with a short backoff and registers again when the controller
says it does not know this agent. Only ``stop_event``, SIGTERM or SIGINT end it, and then it
stops its workers (SIGTERM, grace period, SIGKILL) before returning.

    python -m ironpod.agent --join http://ctl:8470 --token-file /etc/ironpod/join-token \
        --name node0 --workdir /var/ironpod

The join token comes from ``--token-file``, else ``$IRONPOD_JOIN_TOKEN`` (removed from the
agent's environment, so no worker inherits it), else ``--token`` with a warning: a command
line is readable by every local user (``/proc/PID/cmdline``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

import psutil

import ironpod
from ironpod import env, tls
from ironpod.agent.beacons import BeaconReceiver, beacon_socket_path
from ironpod.agent.client import (
    Backoff,
    ControllerClient,
    ControllerError,
    ControllerRejectedError,
    ControllerUnavailableError,
    Credential,
    EventSender,
    UnknownNodeError,
)
from ironpod.agent.health import HealthConfig, HealthMonitor, parse_level, parse_thresholds
from ironpod.agent.logs import LogServer
from ironpod.agent.resources import Capacity, detect_capacity
from ironpod.agent.snapshots import SnapshotStore
from ironpod.agent.supervisor import (
    STOPPED_BY_AGENT,
    AttemptNotStartedError,
    Supervisor,
    kill_stale_workers,
)
from ironpod.errors import ConfigError, errors_to_exit
from ironpod.health import CheckResult, Level, Status
from ironpod.private import private_dir, write_private
from ironpod.wire import (
    AgentNotice,
    Assignment,
    CertificateRequest,
    Heartbeat,
    NodeRegistration,
    WorkerEvent,
)

log = logging.getLogger("ironpod.agent")

#: Share of RAM the in-memory snapshots (own slots and peers' copies) may use by default.
DEFAULT_MEMORY_BUDGET = "25%"
#: After joining and after a failure, the agent heartbeats at least this often for
#: FAST_WINDOW_S: an assignment (the first, or a restart) travels on a heartbeat reply, so
#: a short beat starts workers sooner; in between, the controller's interval paces it (each
#: beat costs the controller a request and a commit, CPU the workers feel on a small node).
FAST_INTERVAL_S = 0.2
FAST_WINDOW_S = 10.0

#: Wait after the controller refused us outright (a wrong token, say) before asking again.
_REJECTED_RETRY_S = 5.0
#: On shutdown, time allowed for the last events (the workers' exits) to reach the controller.
_FLUSH_EVENTS_S = 2.0


def run_agent(
    join_url: str,
    token: str,
    *,
    name: str,
    workdir: str,
    address: str = "127.0.0.1",
    cpus: list[int] | None = None,
    labels: dict[str, str] | None = None,
    heartbeat_interval_s: float = 1.0,
    http_port: int = 0,
    shm_dir: str | None = None,
    memory_budget: str = DEFAULT_MEMORY_BUDGET,
    replication_mb_s: float | None = None,
    stop_event: threading.Event | None = None,
    health: HealthConfig | None = None,
    ca_hash: str | None = None,
    ca_file: str | None = None,
) -> None:
    """Run this node's agent until ``stop_event`` is set or SIGTERM/SIGINT arrives.

    ``heartbeat_interval_s`` paces the heartbeats until the controller's registration reply
    names its own interval, which then wins: the controller's lost-node timeout is built on it.
    ``cpus`` pins every worker to these CPUs (a simulated node of a local cluster).
    ``shm_dir`` holds the in-memory snapshots (default ``/dev/shm/ironpod-<name>``), within
    ``memory_budget`` ("25%" of RAM, or bytes like "8GiB"); copies to peers are sent at no more
    than ``replication_mb_s`` MB/s. ``health`` paces the node's health checks
    (:mod:`ironpod.agent.health`; default: none here, the command lines choose deep).
    An https:// ``join_url`` is verified against ``ca_file`` or the CA whose hash is
    ``ca_hash`` (:mod:`ironpod.tls`); the agent then serves https too.
    """
    stop = stop_event or threading.Event()
    with _stop_on_signals(stop):
        agent = Agent(
            join_url,
            token,
            name=name,
            workdir=Path(workdir).resolve(),
            address=address,
            cpus=cpus,
            labels=labels or {},
            heartbeat_interval_s=heartbeat_interval_s,
            http_port=http_port,
            shm_dir=Path(shm_dir or f"/dev/shm/ironpod-{name}"),
            memory_budget_bytes=parse_budget(memory_budget),
            replication_bytes_s=replication_mb_s * 1e6 if replication_mb_s else None,
            health=health or HealthConfig(join_level=None),
            ca_hash=ca_hash,
            ca_file=Path(ca_file) if ca_file else None,
            stop=stop,
        )
        try:
            agent.run(stop)
        finally:
            agent.close()


class Agent:
    """The parts of one agent, wired together; :meth:`run` is the heartbeat loop."""

    def __init__(
        self,
        join_url: str,
        token: str,
        *,
        name: str,
        workdir: Path,
        address: str,
        cpus: list[int] | None,
        labels: dict[str, str],
        heartbeat_interval_s: float,
        http_port: int,
        shm_dir: Path,
        memory_budget_bytes: int,
        replication_bytes_s: float | None,
        health: HealthConfig | None = None,
        ca_hash: str | None = None,
        ca_file: Path | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        private_dir(workdir)  # the workers' logs and files: 0700
        self.name = name
        self.address = address
        self.labels = labels
        self.instance = uuid.uuid4().hex
        self.node_id: int | None = None
        self.interval_s = heartbeat_interval_s
        self._poke = threading.Event()  # heartbeat now, do not wait for the interval
        self._fast_until = 0.0  # monotonic: until then beat every FAST_INTERVAL_S at most
        self._notices: list[AgentNotice] = []
        self._notices_lock = threading.Lock()
        self.capacity: Capacity = detect_capacity(cpus)
        socket_path = beacon_socket_path(workdir)
        # Each part is closed in reverse order by close(), or at once if a later part fails.
        with contextlib.ExitStack() as parts:
            parts.callback(_lock_workdir(workdir).close)
            kill_stale_workers(workdir)
            self.tls = _join_tls(
                stop or threading.Event(),
                lambda: tls.agent_tls(
                    workdir,
                    join_url,
                    address,
                    ca_hash_pin=ca_hash,
                    ca_file=ca_file,
                    request_certificate=lambda ctx, csr, where: _certificate(
                        join_url, token, ctx, csr, where
                    ),
                ),
            )
            server_tls = self.tls.server if self.tls else None
            controller_tls = self.tls.controller if self.tls else None
            # the log route opens with the controller's log token (registration), the
            # snapshot routes with each job's peer token (heartbeats): never the join token
            self.http = _listen(address, http_port, workdir / "logs", "", name, server_tls)
            parts.callback(self.http.close)
            self.snapshots = SnapshotStore(
                shm_dir,
                budget_bytes=memory_budget_bytes,
                bandwidth_bytes_s=replication_bytes_s,
            )
            self.snapshots.tls_client = self.tls.peers if self.tls else None
            parts.callback(self.snapshots.close)
            self.http.serve_snapshots(self.snapshots)
            # A restarted agent proves with its last credential that it is this node's.
            self._credential_file = workdir / "credential"
            self.credential = Credential(_read_secret(self._credential_file))
            self._client = ControllerClient(
                join_url, token, tls=controller_tls, credential=self.credential
            )
            parts.callback(self._client.close)
            self.events = EventSender(
                ControllerClient(join_url, token, tls=controller_tls, credential=self.credential),
                lambda: self.node_id,
                self._after_event,
            )
            parts.callback(self.events.close)
            parts.callback(self.events.flush, _FLUSH_EVENTS_S)
            self.supervisor = Supervisor(
                workdir=workdir,
                beacon_socket=socket_path,
                cpus=cpus,
                report=self.events.send,
                prepare=self._prepare_attempt,
            )
            parts.callback(self.supervisor.close)  # stops the workers, reports their exits
            self.beacons = BeaconReceiver(socket_path, self.supervisor.on_beacon)
            parts.callback(self.beacons.close)
            self.health = HealthMonitor(
                health or HealthConfig(join_level=None),
                work_dir=workdir,
                shm_dir=shm_dir,
                expected_gpus=len(self.capacity.gpus) or None,
                busy=lambda: any(w.state == "running" for w in self.supervisor.statuses()),
            )
            parts.callback(self.health.close)
            self.health.start()
            for part in (self.events, self.supervisor, self.beacons, self.http, self.snapshots):
                part.start()
            self._parts = parts.pop_all()
        log.info(
            "agent %s (instance %s) up: %d CPUs, %d GPUs, logs at %s, beacons at %s",
            name,
            self.instance[:8],
            self.capacity.cpus,
            len(self.capacity.gpus),
            self.http.url,
            socket_path,
        )

    def run(self, stop: threading.Event) -> None:
        threading.Thread(target=self._poke_on, args=(stop,), name="agent-stop", daemon=True).start()
        backoff = Backoff()
        #: Until it has joined, a controller that is not up yet is most often one starting
        #: beside it (``ironpod launch``, ``ironpod up``): look again soon, not ever later.
        joining = Backoff(first_s=0.1, cap_s=0.25)
        outage = False
        rejoins = 0  # re-registrations in a row: only the first goes again without a pause
        while not self.health.first_done.wait(0.1) and not stop.is_set():
            pass  # register only once checked: a node is never ready before its join-time run
        while not stop.is_set():
            began = time.monotonic()
            try:
                rejoin = self._tick()
            except ControllerUnavailableError as exc:
                if not outage:
                    log.warning("controller unreachable (%s); retrying, workers keep running", exc)
                outage = True
                retry = joining if self.node_id is None else backoff
                self._sleep(retry.next(exc.retry_after_s))
                continue
            except UnknownNodeError:
                log.warning("controller does not know node %s: registering again", self.node_id)
                self.node_id = None
                rejoin = True
            except ControllerRejectedError as exc:
                log.error("controller refused the agent: %s", exc)
                self._sleep(_REJECTED_RETRY_S)
                continue
            if outage:
                log.info("controller reachable again")
                outage = False
            backoff.reset()
            rejoins = rejoins + 1 if rejoin else 0
            if rejoins != 1:
                self._sleep(self._interval() - (time.monotonic() - began))

    def _interval(self) -> float:
        if time.monotonic() < self._fast_until:
            return min(self.interval_s, FAST_INTERVAL_S)
        return self.interval_s

    def _hurry(self) -> None:
        """Heartbeat now, then briefly often: the controller is about to assign work."""
        self._fast_until = time.monotonic() + FAST_WINDOW_S
        self._poke.set()

    def _sleep(self, seconds: float) -> None:
        """Until the next heartbeat: ``seconds``, or less if poked (or stopped)."""
        if self._poke.wait(max(0.0, seconds)):
            self._poke.clear()

    def _poke_on(self, stop: threading.Event) -> None:
        stop.wait()
        self._poke.set()

    def _after_event(self, event: WorkerEvent) -> None:
        """A failure just reached the controller, which decides within milliseconds: ask for
        the new desired state now instead of up to a heartbeat interval later."""
        if event.kind == "hung" or (event.kind == "exited" and event.detail != STOPPED_BY_AGENT):
            self._hurry()

    def _tick(self) -> bool:
        """Register if needed, then heartbeat; True to go again at once (re-registration)."""
        if self.node_id is None:
            self._register()
        assert self.node_id is not None
        holdings = self.snapshots.holdings()  # one scan of the snapshot area per heartbeat
        reply = self._client.heartbeat(
            self.node_id,
            Heartbeat(
                agent_instance=self.instance,
                time_unix=time.time(),
                workers=self.supervisor.statuses(),
                snapshots=holdings,
                notices=self._drain_notices(),
                memory_budget_bytes=self.snapshots.budget_bytes,
                memory_used_bytes=self.snapshots.used_bytes(holdings),
                health=self.health.take(),
            ),
        )
        self.health.set_controller_time(reply.time_unix)
        if reply.health_recheck:
            self.health.request(Level.DEEP)
        if reply.reregister:
            log.warning("controller asked node %s to register again", self.node_id)
            self.node_id = None
            return True
        self.snapshots.set_peer_tokens(
            {int(job): token for job, token in reply.peer_tokens.items() if job.isdigit()}
        )
        if reply.keep_jobs is not None:
            self.snapshots.keep_only(reply.keep_jobs)
        self.snapshots.set_assignment(reply.assignment, self.http.url)
        if reply.assignment is not None:
            self._write_control(reply.assignment)
        self.supervisor.set_desired(reply.assignment, reply.stop_grace_s)
        self.events.wake()
        return False

    def _control_file(self, job_id: int) -> Path:
        return self.snapshots.area(job_id) / "control.json"

    def _write_control(self, a: Assignment) -> None:
        """The controller's advice to the workers, and the node's own cost of a memory
        snapshot (replication and all), in a file they re-read when it changes."""
        advice = {"durable_interval_s": a.durable_interval_s, **self.snapshots.cost_advice()}
        body = json.dumps(advice).encode()
        path = self._control_file(a.job_id)
        try:
            if path.exists() and path.read_bytes() == body:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(body)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)

    def _prepare_attempt(self, a: Assignment) -> tuple[dict[str, str], dict[int, list[str]]]:
        """Before an attempt's workers start: fetch the restore plan's copies this node lacks,
        and point the workers at the snapshot area, the agent and the control file."""
        area = self.snapshots.area(a.job_id)
        area.mkdir(parents=True, exist_ok=True)
        self._write_control(a)
        notes: dict[int, list[str]] = {}
        extra = {
            env.SNAPSHOT_DIR: str(area),
            env.AGENT_URL: self.http.url,
            env.AGENT_TOKEN: self.snapshots.worker_token(a.job_id),
            env.CONTROL_FILE: str(self._control_file(a.job_id)),
        }
        if self.tls is not None:  # the workers verify their agent's https URL with it
            extra[env.AGENT_CA_FILE] = str(self.tls.peer_ca)
        if a.restore is not None:
            extra[env.RESTORE_STEP] = str(a.restore.step)
            for rank in a.ranks:
                sources = [u for u in a.restore.sources.get(str(rank), []) if u != self.http.url]
                note = self.snapshots.fetch(a.job_id, rank, a.restore.step, sources)
                notes[rank] = [f"restore plan: {note}"]
                log.info("attempt %d restore plan: %s", a.attempt_id, note)
        if a.preflight is not None:
            self._preflight(a, notes)
        return extra, notes

    def _preflight(self, a: Assignment, notes: dict[int, list[str]]) -> None:
        """The attempt's pre-flight all-reduce, this node's part, in a process of its own.
        Reported as a notice (the controller fails the attempt on ``preflight_failed``);
        raises :class:`AttemptNotStartedError` so no worker starts on a fabric that failed it."""
        plan = a.preflight
        assert plan is not None
        argv = [
            sys.executable, "-m", "ironpod.health.preflight",
            "--rank", str(a.node_rank), "--world", str(a.nnodes),
            "--master-addr", a.master_addr, "--master-port", str(plan.port),
            "--backend", "nccl" if self.capacity.gpus else "gloo",
            "--size-bytes", str(plan.size_bytes), "--timeout", str(plan.timeout_s),
        ]  # fmt: skip
        if plan.min_busbw_gbps is not None:
            argv += ["--min-busbw-gbps", str(plan.min_busbw_gbps)]
        try:
            done = subprocess.run(
                argv,
                env={**os.environ, **a.env},
                capture_output=True,
                text=True,
                timeout=plan.timeout_s + 60,  # + starting Python and importing torch
                check=False,
            )
            row = CheckResult.model_validate_json(done.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
            row = CheckResult(
                check="collective.pair_allreduce", status=Status.FAIL, message=f"{exc}"
            )
        text = f"preflight all-reduce over {a.nnodes} nodes: {self._describe(row)} ({row.status})"
        for rank in a.ranks:
            notes.setdefault(rank, []).append(text)
        failed = row.status == Status.FAIL
        self._notice(
            "preflight_failed" if failed else "preflight_passed",
            self._describe(row),
            a.job_id,
            attempt_id=a.attempt_id,
            node_rank=a.node_rank,
            busbw_gbps=row.value if row.value is not None else -1.0,
        )
        if failed:
            self._hurry()  # tell the controller now, not at the next heartbeat
            raise AttemptNotStartedError(text)

    @staticmethod
    def _describe(row: CheckResult) -> str:
        shown = row.message or str(row.status)
        if row.value is not None:
            limit = f", threshold {row.threshold:.3g}" if row.threshold is not None else ""
            shown = f"{row.value:.3g} {row.unit}{limit}: {shown}"
        return shown

    def _notice(self, kind: str, message: str, job_id: int | None, **data: float | int) -> None:
        with self._notices_lock:
            self._notices.append(
                AgentNotice(
                    kind=kind, message=message, job_id=job_id, time_unix=time.time(), data=data
                )
            )

    def _drain_notices(self) -> list[AgentNotice]:
        with self._notices_lock:
            out, self._notices = self._notices, []
        return [*self.snapshots.drain_notices(), *out]

    def _register(self) -> None:
        reply = self._client.register(
            NodeRegistration(
                name=self.name,
                hostname=socket.gethostname(),
                address=self.address,
                agent_url=self.http.url,
                agent_instance=self.instance,
                cpus=self.capacity.cpus,
                memory_bytes=self.capacity.memory_bytes,
                gpus=self.capacity.gpus,
                labels=self.labels,
                agent_version=ironpod.__version__,
                time_unix=time.time(),
                health=self.health.take(),
                credential=self.credential.value or None,
            )
        )
        self.http.set_log_token(reply.log_token)
        if reply.credential:
            self.credential.value = reply.credential
            try:
                write_private(self._credential_file, reply.credential.encode())
            except OSError as exc:  # a restart then waits until the node counts as lost
                log.warning("cannot keep the node credential in %s: %s", self._credential_file, exc)
        self.node_id = reply.node_id
        self.interval_s = reply.heartbeat_interval_s
        log.info("registered as node %d, heartbeat every %.2f s", reply.node_id, self.interval_s)
        self._fast_until = time.monotonic() + FAST_WINDOW_S
        self.events.wake()

    def close(self) -> None:
        self._parts.close()
        log.info("agent %s stopped", self.name)


def _read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _join_tls(stop: threading.Event, setup: Callable[[], tls.AgentTls | None]) -> Any:
    """``setup()``, tried again while the controller does not answer: an agent may start
    before its controller (a launch's nodes start together) and never exits for that."""
    backoff = Backoff(first_s=0.5, cap_s=5.0)
    warned = False
    while True:
        try:
            return setup()
        except tls.NotReachableError as exc:
            if not warned:
                log.warning("%s; trying again until it answers", exc)
                warned = True
        if stop.wait(backoff.next()):
            raise ConfigError("stopped while waiting for the controller to answer")


def _certificate(
    join_url: str, token: str, ctx: ssl.SSLContext, csr: str, address: str
) -> tuple[str, str]:
    """The controller signs this agent's serving certificate: (certificate, cluster CA)."""
    with ControllerClient(join_url, token, tls=ctx) as client:
        try:
            reply = client.certificate(CertificateRequest(csr_pem=csr, address=address))
        except ControllerUnavailableError as exc:
            raise tls.NotReachableError(f"cannot get this node's TLS certificate: {exc}") from None
        except ControllerError as exc:
            raise ConfigError(f"cannot get this node's TLS certificate: {exc}") from None
    return reply.cert_pem, reply.ca_pem


def _listen(
    address: str,
    port: int,
    logs_root: Path,
    token: str,
    name: str,
    server_tls: ssl.SSLContext | None,
) -> LogServer:
    # /healthz names the node only: its agent instance id once let anyone with the join token
    # heartbeat as this node (issue 10)
    try:
        info = {"name": name}
        return LogServer(address, port, logs_root, token, info, server_tls)
    except OSError as exc:
        raise ConfigError(f"cannot serve logs on {address}:{port}: {exc.strerror}") from None


def _lock_workdir(workdir: Path) -> IO[str]:
    """One agent per workdir: a second one would kill the first one's workers as stale."""
    handle = (workdir / "agent.lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"another agent is running with workdir {workdir}") from None
    return handle


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop`` (only possible from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def parse_cpus(text: str) -> list[int]:
    """``"0,1,4-7"`` -> ``[0, 1, 4, 5, 6, 7]``."""
    cpus: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            first, _, last = part.partition("-")
            cpus.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ConfigError(f"--cpus {text!r}: expected a list like 0,1,4-7") from None
    if not cpus:
        raise ConfigError(f"--cpus {text!r}: no CPUs given")
    return cpus


def parse_budget(text: str) -> int:
    """``"25%"`` of this machine's RAM, or a size: ``"8GiB"``, ``"512MiB"``, ``"1000000"``."""
    units = {"": 1, "k": 1000, "m": 10**6, "g": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    value = text.strip().lower()
    try:
        if value.endswith("%"):
            share = float(value[:-1])
            if not 0 < share <= 100:
                raise ValueError
            return int(psutil.virtual_memory().total * share / 100)
        number = re.match(r"^([0-9.]+)\s*([a-z]*)$", value)
        if number is None or number.group(2) not in units:
            raise ValueError
        return int(float(number.group(1)) * units[number.group(2)])
    except ValueError:
        raise ConfigError(
            f"memory budget {text!r}: expected a share of RAM like 25% or a size like 8GiB"
        ) from None


def join_token(token: str | None = None, token_file: str | None = None) -> str:
    """The node join token: ``token_file``'s content, else ``$IRONPOD_JOIN_TOKEN``, else
    ``token`` (a command-line value, warned about). The variable is removed from this
    process's environment in any case, so workers never inherit it."""
    from_env = os.environ.pop(env.JOIN_TOKEN, None)
    if token_file:
        path = Path(token_file).expanduser()
        try:
            text = path.read_text().strip()
            mode = path.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"--token-file {token_file}: {exc.strerror or exc}") from None
        if not text or any(c.isspace() for c in text):
            raise ConfigError(f"--token-file {token_file}: expected one token on one line")
        if mode & 0o077:
            log.warning("%s can be read by other users: chmod 600 it", token_file)
        return text
    if from_env:
        return from_env.strip()
    if token:
        log.warning(
            "the join token on the command line can be read by every local user "
            "(/proc/PID/cmdline): use --token-file FILE or %s",
            env.JOIN_TOKEN,
        )
        return token
    raise ConfigError(f"no join token: give --token-file FILE or set {env.JOIN_TOKEN}")


def parse_labels(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--label {item!r}: expected key=value")
        labels[key] = value
    return labels


def main(argv: list[str] | None = None) -> int:
    """``python -m ironpod.agent``: run the node agent until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m ironpod.agent", description=__doc__)
    parser.add_argument("--join", required=True, metavar="URL", help="controller base URL")
    parser.add_argument("--token-file", metavar="FILE", help="the node join token's file (0600)")
    parser.add_argument("--token", help=f"the join token itself (visible in ps; {env.JOIN_TOKEN})")
    parser.add_argument("--name", default=socket.gethostname(), help="node name")
    parser.add_argument("--workdir", required=True, help="logs, sockets and worker state")
    parser.add_argument("--address", default="127.0.0.1", help="address other nodes reach")
    parser.add_argument("--cpus", help="pin workers to these CPUs, e.g. 0,1 or 0-3")
    parser.add_argument("--label", action="append", default=[], metavar="K=V")
    parser.add_argument("--http-port", type=int, default=0, help="log server port (0: any)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, metavar="S")
    parser.add_argument("--shm-dir", help="in-memory snapshots [default: /dev/shm/ironpod-NAME]")
    parser.add_argument("--memory-budget", default=DEFAULT_MEMORY_BUDGET, metavar="SIZE|N%%")
    parser.add_argument("--replication-mb-s", type=float, metavar="MB/S", help="copy bandwidth")
    parser.add_argument(
        "--health-level",
        default="deep",
        choices=["none", "light", "deep"],
        help="health suite run at start, before joining (none: no checks at all)",
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds between light health runs",
    )
    parser.add_argument(
        "--health-skip",
        action="append",
        default=[],
        metavar="CHECK",
        help="never run this check, e.g. compute.matmul (repeatable)",
    )
    parser.add_argument(
        "--health-threshold",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a HealthThresholds field, e.g. min_free_disk_gib=1 (repeatable)",
    )
    parser.add_argument("--ca-hash", metavar="sha256:HEX", help="an https controller's CA pin")
    parser.add_argument("--ca-file", metavar="PEM", help="or the CA it is verified with")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    with errors_to_exit():
        run_agent(
            args.join,
            join_token(args.token, args.token_file),
            name=args.name,
            workdir=args.workdir,
            address=args.address,
            cpus=parse_cpus(args.cpus) if args.cpus else None,
            labels=parse_labels(args.label),
            heartbeat_interval_s=args.heartbeat_interval,
            http_port=args.http_port,
            shm_dir=args.shm_dir,
            memory_budget=args.memory_budget,
            replication_mb_s=args.replication_mb_s,
            health=HealthConfig(
                join_level=parse_level(args.health_level),
                interval_s=args.health_interval,
                skip=frozenset(args.health_skip),
                thresholds=parse_thresholds(args.health_threshold),
            ),
            ca_hash=args.ca_hash,
            ca_file=args.ca_file,
        )
    return 0
