"""The node agent against a fake controller: real worker processes, sockets, HTTP and signals.

The fake controller (stdlib HTTP server) implements the three routes of ironpod.wire with the
wire models, records what it receives with the time it arrived, and replies with whatever
assignment the test sets. The workers are small scripts; one uses ironpod.train.progress.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import pytest

from ironpod.agent.beacons import beacon_socket_path
from ironpod.agent.main import join_token, parse_cpus, parse_labels, run_agent
from ironpod.agent.progress import LineMatcher, ProgressUpdate, RankProgress
from ironpod.agent.resources import detect_capacity, detect_gpus
from ironpod.agent.stacks import NO_PY_SPY, find_py_spy
from ironpod.errors import ConfigError
from ironpod.wire import (
    Assignment,
    Heartbeat,
    HeartbeatReply,
    NodeRegistration,
    RegistrationReply,
    WorkerEvent,
)
from tests.conftest import clean_env

TOKEN = "s3cret"
NODE_ID = 7
T = TypeVar("T")

WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time

    mode = sys.argv[1]
    rank = int(os.environ["RANK"])

    def line(step):
        print(f"[ironpod] progress rank={rank} step={step} loss={1.0 / step}", flush=True)

    def wait_forever():
        while True:
            time.sleep(3600)

    if mode == "env":
        import ironpod.train as it

        keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "IRONPOD_BEACON_SOCKET", "IRONPOD_ATTEMPT_ID",
                "IRONPOD_JOB_ID", "PYTHONUNBUFFERED", "JOB_VAR"]
        env = {k: os.environ.get(k) for k in keys}
        env["affinity"] = sorted(os.sched_getaffinity(0))
        env["cwd"] = os.getcwd()
        print("ENV " + json.dumps(env), flush=True)
        for step in range(1, 6):
            time.sleep(0.05)
            it.progress(step, loss=2.0 / step, tok_s=1000 + step)
        wait_forever()
    elif mode == "exit3":
        line(1)
        time.sleep(0.5)
        print(f"EXIT_AT {time.time()!r}", flush=True)
        os._exit(3)
    elif mode == "hang":
        if rank in (10, 12):  # straight into wait_forever after step 3: the test stops it there
            for step in range(1, 4):
                time.sleep(0.1)
                line(step)
        wait_forever()
    elif mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
        wait_forever()
    elif mode == "exit_later":
        line(1)
        time.sleep(float(sys.argv[2]))
        sys.exit(4)
    else:
        line(1)
        wait_forever()
    """
)


# -- the fake controller


class FakeController:
    """Records registrations, heartbeats and events (with arrival times); serves ``assignment``."""

    def __init__(self, port: int = 0, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.registrations: list[NodeRegistration] = []
        self.credential = ""  # the node's, from its last registration
        self.heartbeats: list[Heartbeat] = []
        self.heartbeat_times: list[float] = []
        self.events: list[tuple[float, WorkerEvent]] = []
        self.assignment: Assignment | None = None
        self.stop_grace_s = 1.0
        self.reregister_next = False
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                # the join token registers; the node's credential is for everything else
                register = self.path == "/api/v1/nodes/register"
                bearer = TOKEN if register else fake.credential
                if self.headers.get("Authorization") != f"Bearer {bearer}":
                    self._send(401, {"detail": "bad token"})
                    return
                code, reply = fake.handle(self.path, body)
                self._send(code, reply)

            def _send(self, code: int, reply: dict[str, Any]) -> None:
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def handle(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        now = time.time()
        with self.lock:
            if path == "/api/v1/nodes/register":
                self.registrations.append(NodeRegistration.model_validate_json(body))
                self.credential = f"node-credential-{len(self.registrations)}"
                reply = RegistrationReply(
                    node_id=NODE_ID,
                    heartbeat_interval_s=self.interval_s,
                    credential=self.credential,
                    log_token=TOKEN,
                )
                return 200, reply.model_dump()
            if path == f"/api/v1/nodes/{NODE_ID}/heartbeat":
                self.heartbeats.append(Heartbeat.model_validate_json(body))
                self.heartbeat_times.append(now)
                if self.reregister_next:
                    self.reregister_next = False
                    return 200, HeartbeatReply(reregister=True).model_dump()
                return 200, HeartbeatReply(
                    assignment=self.assignment, stop_grace_s=self.stop_grace_s
                ).model_dump()
            if path == f"/api/v1/nodes/{NODE_ID}/events":
                self.events.append((now, WorkerEvent.model_validate_json(body)))
                return 200, {"ok": True}
        return 404, {"detail": "unknown route"}

    def events_of(
        self, kind: str, attempt_id: int | None = None
    ) -> list[tuple[float, WorkerEvent]]:
        with self.lock:
            return [
                (t, e)
                for t, e in self.events
                if e.kind == kind and (attempt_id is None or e.attempt_id == attempt_id)
            ]

    def last_workers(self) -> dict[int, Any]:
        with self.lock:
            return {w.rank: w for w in self.heartbeats[-1].workers} if self.heartbeats else {}


def wait_for(check: Callable[[], T | None], timeout: float = 10.0, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or check}")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- fixtures


@pytest.fixture(autouse=True)
def no_worker_left_behind(tmp_path: Path) -> Iterator[None]:
    """Whatever a failing test leaves running from its directory is killed."""
    yield
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(tmp_path) in arg for arg in proc.info["cmdline"] or ()):
            with contextlib.suppress(psutil.Error):
                proc.kill()


@pytest.fixture
def controller() -> Iterator[FakeController]:
    fake = FakeController()
    yield fake
    fake.close()


class AgentThread:
    """``run_agent`` on a thread of the test process, stopped through its stop event."""

    def __init__(self, url: str, workdir: Path, **kwargs: Any) -> None:
        self.workdir = workdir
        self.stop = threading.Event()
        self.error: BaseException | None = None
        kwargs.setdefault("heartbeat_interval_s", 0.2)
        self._thread = threading.Thread(target=self._run, args=(url, kwargs), daemon=True)
        self._thread.start()

    def _run(self, url: str, kwargs: dict[str, Any]) -> None:
        try:
            run_agent(
                url, TOKEN, name="node0", workdir=str(self.workdir), stop_event=self.stop, **kwargs
            )
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=20)
        assert not self._thread.is_alive(), "agent did not stop"
        assert self.error is None, self.error


@pytest.fixture
def start_agent(tmp_path: Path, controller: FakeController) -> Iterator[Callable[..., AgentThread]]:
    agents: list[AgentThread] = []

    def start(**kwargs: Any) -> AgentThread:
        agent = AgentThread(controller.url, tmp_path / "agent", **kwargs)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.close()


def make_assignment(
    tmp_path: Path,
    mode: str,
    *,
    attempt_id: int = 1,
    ranks: int = 2,
    args: tuple[str, ...] = (),
    **kw: Any,
) -> Assignment:
    """Ranks 10, 11, ... of a job whose world is ``ranks + 10``: this is node rank 1."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {"PYTHONPATH": clean_env()["PYTHONPATH"], "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    return Assignment(
        attempt_id=attempt_id,
        job_id=42,
        job_name="test-job",
        command=[sys.executable, str(script), mode, *args],
        env=env,
        ranks=list(range(10, 10 + ranks)),
        world_size=ranks + 10,
        node_rank=1,
        nnodes=2,
        master_addr="127.0.0.1",
        master_port=29100 + attempt_id,
        **kw,
    )


def get_log(agent_url: str, attempt_id: int, rank: int, offset: int = 0) -> httpx.Response:
    return httpx.get(
        f"{agent_url}/logs/{attempt_id}/{rank}",
        params={"offset": offset},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )


# -- tests


def test_registers_starts_workers_with_env_beacons_and_serves_logs(
    tmp_path: Path, controller: FakeController, start_agent: Callable[..., AgentThread]
) -> None:
    cpus = sorted(os.sched_getaffinity(0))[:1]
    agent = start_agent(cpus=cpus, labels={"zone": "a"})
    reg = wait_for(lambda: controller.registrations, what="registration")[0]
    assert (reg.name, reg.cpus, reg.labels, reg.gpus) == ("node0", 1, {"zone": "a"}, [])
    assert reg.memory_bytes > 0 and len(reg.agent_instance) == 32
    wait_for(lambda: len(controller.heartbeats) >= 2, what="heartbeats")
    assert controller.heartbeats[-1].workers == []

    # IRONPOD_PROGRESS_LOG=0: progress reaches the agent through beacons only.
    controller.assignment = make_assignment(
        tmp_path,
        "env",
        env={"JOB_VAR": "x", "IRONPOD_PROGRESS_LOG": "0", "IRONPOD_ATTEMPT_ID": "0"},
    )
    workers = wait_for(
        lambda: (
            (w := controller.last_workers()) and all(x.last_step == 5 for x in w.values()) and w
        ),
        timeout=30,
        what="last_step 5 from beacons",
    )
    assert sorted(workers) == [10, 11]
    for rank, status in workers.items():
        assert (status.state, status.local_rank, status.attempt_id) == ("running", rank - 10, 1)
        assert status.metrics == {"loss": 2.0 / 5, "tok_s": 1005}
        assert status.first_progress_unix is not None and status.median_step_s is not None
        assert 0.03 < status.median_step_s < 1.0

    first = wait_for(lambda: len(e := controller.events_of("first_progress")) == 2 and e)
    assert sorted((e.rank, e.detail) for _, e in first) == [(10, "step=1"), (11, "step=1")]

    sock = beacon_socket_path(agent.workdir)
    for rank in (10, 11):
        log = (agent.workdir / "logs" / "attempt-1" / f"rank-{rank}.log").read_text()
        env = json.loads(log.split("ENV ", 1)[1].splitlines()[0])
        assert env == {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank - 10),
            "WORLD_SIZE": "12",
            "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": "1",
            "NODE_RANK": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29101",
            "IRONPOD_BEACON_SOCKET": sock,
            "IRONPOD_ATTEMPT_ID": "0",  # the controller's attempt number wins
            "IRONPOD_JOB_ID": "42",
            "PYTHONUNBUFFERED": "1",
            "JOB_VAR": "x",
            "affinity": cpus,
            "cwd": str(agent.workdir.resolve()),
        }

    # The log over HTTP: whole, from an offset, and the guards.
    url = reg.agent_url
    whole = get_log(url, 1, 10)
    assert whole.status_code == 200 and whole.text.startswith("ENV ")
    assert int(whole.headers["X-Log-Size"]) == len(whole.content)
    tail = get_log(url, 1, 10, offset=4)
    assert tail.content == whole.content[4:]
    assert get_log(url, 1, 99).status_code == 404
    assert httpx.get(f"{url}/logs/1/10").status_code == 401
    health = httpx.get(f"{url}/healthz").json()
    assert health["ok"] is True and "instance" not in health  # the instance id is no secret
    # the agent keeps its node credential (for a restart to prove it is this node) privately
    credential = agent.workdir / "credential"
    assert credential.read_text() == controller.credential
    assert credential.stat().st_mode & 0o077 == 0


def test_exit_code_and_kill_signal_reported_at_once(
    tmp_path: Path, controller: FakeController, start_agent: Callable[..., AgentThread]
) -> None:
    agent = start_agent()
    controller.assignment = make_assignment(tmp_path, "exit3", ranks=1)
    _, event = wait_for(lambda: controller.events_of("exited"), what="exit event")[0]
    received = controller.events_of("exited")[0][0]
    assert (event.rank, event.exit_code, event.signal, event.detail) == (10, 3, None, "")
    log = (agent.workdir / "logs" / "attempt-1" / "rank-10.log").read_text()
    exited_at = float(log.split("EXIT_AT ", 1)[1].split()[0])
    latency = received - exited_at
    print(f"exit -> event received: {latency * 1000:.0f} ms")
    assert latency < 1.0
    # The exited worker stays in the heartbeats of its attempt.
    wait_for(
        lambda: (
            (w := controller.last_workers()) and w[10].state == "exited" and w[10].exit_code == 3
        ),
        what="exited worker in a heartbeat",
    )

    controller.assignment = make_assignment(tmp_path, "steady", attempt_id=2, ranks=1)
    status = wait_for(
        lambda: (
            (w := controller.last_workers()) and w[10].attempt_id == 2 and w[10].last_step and w[10]
        ),
        what="attempt 2 running",
    )
    killed_at = time.time()
    os.kill(status.pid, signal.SIGKILL)
    received, event = wait_for(lambda: controller.events_of("exited", 2), what="kill event")[0]
    print(f"SIGKILL -> event received: {(received - killed_at) * 1000:.0f} ms")
    assert (event.exit_code, event.signal) == (None, 9)
    assert received - killed_at < 1.0


def test_a_failure_brings_the_next_heartbeat_forward(tmp_path: Path) -> None:
    """The controller decides at once on an exit; the agent asks for the decision at once."""
    slow = FakeController(interval_s=3.0)
    slow.assignment = make_assignment(tmp_path, "exit3", ranks=1)
    agent = AgentThread(slow.url, tmp_path / "agent")
    try:
        received, _ = wait_for(lambda: slow.events_of("exited"), what="exit event")[0]
        heartbeat = wait_for(lambda: [t for t in slow.heartbeat_times if t > received])[0]
        print(f"exit event -> next heartbeat: {(heartbeat - received) * 1000:.0f} ms")
        assert heartbeat - received < 0.5
    finally:
        agent.close()
        slow.close()


def test_hangs_reported_once_with_stacks(
    tmp_path: Path, controller: FakeController, start_agent: Callable[..., AgentThread]
) -> None:
    """Ranks 10 and 12 make 3 steps then sleep (12 is also SIGSTOPped); rank 11 never makes
    progress (startup timeout)."""
    agent = start_agent()
    controller.stop_grace_s = 0.3
    controller.assignment = make_assignment(
        tmp_path, "hang", ranks=3, hang_timeout_s=2.0, startup_timeout_s=3.0
    )
    stopped = wait_for(lambda: (w := controller.last_workers()) and w[12].last_step == 3 and w[12])
    os.kill(stopped.pid, signal.SIGSTOP)
    hung = wait_for(lambda: len(e := controller.events_of("hung")) == 3 and e, timeout=15)
    by_rank = {e.rank: (t, e) for t, e in hung}
    status = controller.last_workers()
    assert all(w.state == "running" for w in status.values())  # the agent only reports
    for rank in (10, 12):
        received, event = by_rank[rank]
        assert event.detail.startswith("no progress for 2.") and event.detail.endswith(
            ", timeout 2.0 s = hang_timeout_s, last step 3"
        )
        late = received - status[rank].last_progress_unix - 2.0
        print(f"rank {rank}: hang event received {late * 1000:.0f} ms after the 2 s timeout")
        assert late < 2.0
    assert by_rank[11][1].detail.endswith(
        "timeout 3.0 s = startup_timeout_s, no progress yet, last step None"
    )

    # The stacks follow the report (the controller need not wait for them): wait for them.
    stacks = "wait_forever (worker.py" if find_py_spy() else NO_PY_SPY
    for rank in (10, 11, 12):
        path = agent.workdir / "logs" / "attempt-1" / f"rank-{rank}.log"
        log = wait_for(lambda p=path: stacks in (text := p.read_text()) and text, what="stacks")
        assert "[ironpod agent] hang detected: no progress for" in log
    time.sleep(0.5)
    assert len(controller.events_of("hung")) == 3  # once per rank per attempt

    # Ranks reported hung, and the stopped one, cannot use a grace period: SIGKILL at once.
    controller.stop_grace_s = 60.0  # sent with the cleared assignment, in the same reply
    cleared = time.monotonic()
    controller.assignment = None
    exits = wait_for(lambda: len(e := controller.events_of("exited", 1)) == 3 and e, timeout=30)
    assert time.monotonic() - cleared < 30  # far below the grace
    assert sorted(e.signal for _, e in exits) == [9, 9, 9]
    assert all(e.detail == "stopped by the agent" for _, e in exits)


def test_changing_and_clearing_the_assignment_stops_old_workers(
    tmp_path: Path, controller: FakeController, start_agent: Callable[..., AgentThread]
) -> None:
    agent = start_agent()
    controller.stop_grace_s = 0.5
    controller.assignment = make_assignment(tmp_path, "stubborn")  # ignores SIGTERM
    old = wait_for(lambda: (w := controller.last_workers()) and len(w) == 2 and w, what="attempt 1")
    wait_for(lambda: "ignoring" in (agent.workdir / "logs/attempt-1/rank-11.log").read_text())
    old_pids = [w.pid for w in old.values()]
    stale = json.loads((agent.workdir / "workers.json").read_text())
    assert sorted(w["pid"] for w in stale["workers"]) == sorted(old_pids)

    controller.assignment = make_assignment(tmp_path, "steady", attempt_id=2)
    new = wait_for(
        lambda: (
            (w := controller.last_workers())
            and all(x.attempt_id == 2 and x.last_step for x in w.values())
            and w
        ),
        what="attempt 2",
    )
    assert all(gone(pid) for pid in old_pids)
    stopped = controller.events_of("exited", 1)
    assert sorted(e.signal for _, e in stopped) == [9, 9]  # SIGTERM ignored: SIGKILL after grace
    assert all(e.detail == "stopped by the agent" for _, e in stopped)

    controller.assignment = None
    wait_for(
        lambda: controller.last_workers() == {} and len(controller.events_of("exited", 2)) == 2
    )
    assert all(gone(w.pid) for w in new.values())
    assert sorted(e.signal for _, e in controller.events_of("exited", 2)) == [15, 15]
    assert not (agent.workdir / "workers.json").exists()


def test_controller_outage_and_reregistration_keep_workers(
    tmp_path: Path, start_agent: Callable[..., AgentThread]
) -> None:
    first = FakeController()
    first.assignment = make_assignment(tmp_path, "exit_later", ranks=1, args=("2.0",))
    agent = AgentThread(first.url, tmp_path / "agent")
    try:
        status = wait_for(lambda: (w := first.last_workers()) and w[10].last_step and w[10])
        first.close()  # the controller goes away; the worker exits (4) while it is away
        wait_for(lambda: gone(status.pid), timeout=60, what="the worker's exit during the outage")
        second = FakeController(port=first.port)
        second.assignment = first.assignment
        second.credential = first.credential  # the same controller state, back again
        try:
            _, event = wait_for(lambda: second.events_of("exited"), what="event after outage")[0]
            assert event.exit_code == 4
            assert second.registrations == []  # it kept its state (SQL): heartbeats go on
            second.reregister_next = True  # now it has lost us
            reg = wait_for(lambda: second.registrations, what="re-registration")[0]
            assert reg.agent_instance == first.registrations[0].agent_instance
            assert reg.credential == first.credential  # it proves it is that node
            count = len(second.heartbeats)
            wait_for(lambda: len(second.heartbeats) > count + 1, what="heartbeats after it")
            workers = wait_for(second.last_workers)
            assert workers[10].pid == status.pid and workers[10].state == "exited"
        finally:
            agent.close()
            second.close()
    finally:
        agent.stop.set()


def test_restarted_agent_kills_stale_workers(
    tmp_path: Path, controller: FakeController, start_agent: Callable[..., AgentThread]
) -> None:
    workdir = tmp_path / "agent"
    controller.assignment = make_assignment(tmp_path, "steady")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ironpod.agent",
            "--join",
            controller.url,
            "--token",
            TOKEN,
            "--name",
            "node0",
            "--workdir",
            str(workdir),
            "--label",
            "k=v",
            "--log-level",
            "WARNING",
        ],
        env=clean_env(),
    )
    try:
        old = wait_for(lambda: (w := controller.last_workers()) and len(w) == 2 and w, timeout=20)
        proc.kill()  # the agent dies; its workers (own sessions) live on
        proc.wait()
        pids = [w.pid for w in old.values()]
        assert not any(gone(pid) for pid in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
    instance = controller.registrations[-1].agent_instance
    controller.assignment = None
    start_agent()
    wait_for(lambda: controller.registrations[-1].agent_instance != instance, what="new agent")
    wait_for(lambda: all(gone(pid) for pid in pids), timeout=5, what="stale workers killed")
    assert controller.registrations[0].labels == {"k": "v"}


@pytest.mark.parametrize(
    ("update", "code", "says"),
    [
        ({"command": ["/no/such/program"]}, 127, "/no/such/program"),
        # the OS refuses these before exec: an agent once wedged (running, no process) on one
        ({"command": ["echo", "a\x00b"]}, 126, "null byte"),
        ({"env": {"BAD": "a\x00b"}}, 126, "null byte"),
    ],
    ids=["not-found", "nul-in-argv", "nul-in-env"],
)
def test_command_that_cannot_start_is_an_exit(
    tmp_path: Path,
    controller: FakeController,
    start_agent: Callable[..., AgentThread],
    update: dict[str, object],
    code: int,
    says: str,
) -> None:
    agent = start_agent()
    a = make_assignment(tmp_path, "steady", ranks=1)
    controller.assignment = a.model_copy(update=update)
    _, event = wait_for(lambda: controller.events_of("exited"))[0]
    assert event.exit_code == code and says in event.detail
    assert "cannot start" in (agent.workdir / "logs/attempt-1/rank-10.log").read_text()
    # the agent is not wedged: the next attempt runs
    controller.assignment = make_assignment(tmp_path, "steady", ranks=1, attempt_id=2)
    wait_for(
        lambda: any(w.attempt_id == 2 and w.pid > 0 for w in controller.last_workers().values()),
        what="the next attempt's worker",
    )


def test_refuses_a_busy_workdir_or_port(
    tmp_path: Path, controller: FakeController, start_agent: Callable[..., AgentThread]
) -> None:
    start_agent()
    wait_for(lambda: controller.registrations)
    with pytest.raises(ConfigError, match="another agent is running"):
        run_agent(controller.url, TOKEN, name="twin", workdir=str(tmp_path / "agent"))
    port = int(controller.registrations[0].agent_url.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match="cannot serve logs"):
        run_agent(controller.url, TOKEN, name="n1", workdir=str(tmp_path / "n1"), http_port=port)
    assert not list((tmp_path / "n1").glob("*.sock"))  # what it had opened, it closed


# -- the pieces, without processes


def test_hang_rule() -> None:
    """More rule cases (the longest recent gap, the step hook) are in test_step_hook.py."""
    a = make_assignment(Path("/tmp"), "x").model_copy(
        update={"hang_floor_s": 5.0, "hang_factor": 10.0, "startup_timeout_s": 60.0}
    )
    p = RankProgress()
    assert p.overdue(a, started_unix=0.0, now=59.0) is None
    assert p.overdue(a, started_unix=0.0, now=61.0) == (
        61.0,
        60.0,
        "startup_timeout_s, no progress yet",
    )
    assert p.record(ProgressUpdate(t=100.0, step=1, metrics={})) is True
    assert p.overdue(a, 0.0, now=150.0) is None  # one step: no median yet, startup timeout
    for step, t in ((2, 101.0), (2, 101.2), (4, 103.0)):  # a repeat only refreshes the time
        assert p.record(ProgressUpdate(t=t, step=step, metrics={"loss": 1.0})) is False
    assert p.median_step_s() == 1.0 and p.last_step == 4
    # The hang rule takes the gaps between reports (1.0 s, 1.8 s), not the time per step: a
    # script that reports every other step is silent for two steps between reports.
    assert p.median_gap_s() == pytest.approx(1.4)
    assert p.overdue(a, 0.0, now=116.0) is None
    late = p.overdue(a, 0.0, now=118.0)
    assert late is not None and late[:2] == (15.0, pytest.approx(14.0))
    assert late.rule == "10 x median step 1.40 s"
    assert p.overdue(a.model_copy(update={"hang_floor_s": 20.0}), 0.0, now=118.0) is None
    fixed = a.model_copy(update={"hang_timeout_s": 2.0})
    assert p.overdue(fixed, 0.0, now=105.5) == (2.5, 2.0, "hang_timeout_s")


def test_line_matcher() -> None:
    plain = LineMatcher(None)
    update = plain.match("x [ironpod] progress rank=0 step=12 loss=0.5 phase=warm", 1.0)
    assert update is not None and (update.step, update.metrics) == (12, {"loss": 0.5})
    assert plain.match("Epoch 3 iter 4", 1.0) is None
    regex = LineMatcher(r"iter (?P<step>\d+)")
    assert (m := regex.match("Epoch 3 iter 4", 1.0)) is not None and m.step == 4
    assert (m := LineMatcher(r"loss:").match("loss: 3", 1.0)) is not None and m.step is None


def test_cli_parsing() -> None:
    assert parse_cpus("0,1,4-6") == [0, 1, 4, 5, 6]
    assert parse_labels(["zone=a", "gpu=h100=x"]) == {"zone": "a", "gpu": "h100=x"}
    with pytest.raises(ConfigError):
        parse_cpus("a-b")
    with pytest.raises(ConfigError):
        parse_labels(["novalue"])
    with pytest.raises(ConfigError, match="not available"):
        detect_capacity([0, 4096])


def test_long_workdir_gets_a_short_socket_path(tmp_path: Path) -> None:
    assert beacon_socket_path(tmp_path) == str(tmp_path.resolve() / "beacon.sock")
    deep = tmp_path / ("d" * 100)
    path = beacon_socket_path(deep)
    assert len(path) < 108 and path == beacon_socket_path(deep)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
    os.unlink(path)


def test_a_deep_temp_dir_puts_the_socket_in_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep_tmp = tmp_path / ("t" * 100)
    deep_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep_tmp))
    path = beacon_socket_path(tmp_path / ("d" * 100))
    assert path.startswith("/tmp/ironpod-") and len(path) < 108


def _fake_nvml() -> types.SimpleNamespace:
    """NVML's Python surface (nvidia-ml-py), for what a GPU-less test can check: the mapping."""
    return types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetName=lambda handle: b"NVIDIA H100 80GB HBM3",  # bytes in old releases
        nvmlDeviceGetUUID=lambda handle: f"GPU-{handle}abc",
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(total=80 * 2**30),
    )


def test_gpus_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    assert detect_gpus() == [] or "pynvml" in sys.modules  # no nvidia-ml-py here: no GPUs
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus = detect_gpus()
    assert [(g.index, g.name, g.uuid) for g in gpus] == [
        (0, "NVIDIA H100 80GB HBM3", "GPU-0abc"),
        (1, "NVIDIA H100 80GB HBM3", "GPU-1abc"),
    ]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1")
    assert [g.index for g in detect_gpus()] == [1]


def test_the_join_token_comes_from_a_file_or_the_environment_never_to_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "join-token"
    path.write_text("s3cret\n")
    path.chmod(0o600)
    monkeypatch.setenv("IRONPOD_JOIN_TOKEN", "from-env")
    assert join_token(None, str(path)) == "s3cret"
    assert "IRONPOD_JOIN_TOKEN" not in os.environ  # gone before any worker starts
    monkeypatch.setenv("IRONPOD_JOIN_TOKEN", "from-env")
    assert join_token("from-argv", None) == "from-env"
    with caplog.at_level(logging.WARNING, logger="ironpod.agent"):
        assert join_token("from-argv", None) == "from-argv"
    assert "/proc/PID/cmdline" in caplog.text
    with pytest.raises(ConfigError, match="no join token: give --token-file FILE"):
        join_token(None, None)
    with pytest.raises(ConfigError, match=r"--token-file .*missing: No such file"):
        join_token(None, str(tmp_path / "missing"))
    path.write_text("two words\n")
    with pytest.raises(ConfigError, match="expected one token on one line"):
        join_token(None, str(path))
