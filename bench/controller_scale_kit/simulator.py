"""The simulated nodes: one generator process drives thousands over one asyncio loop.

A node speaks the wire protocol as ``ironpod agent`` does (ironpod.agent.main.Agent.run and
ironpod.agent.client): it registers with the join token, then heartbeats with its credential,
the next beat the controller's interval after the last one began, one outstanding at a time. A
timeout, a refused connection or a 5xx is retried after the agent's own Backoff (a 503's
Retry-After honoured where the agent honours it), ``reregister`` or a 404 registers again at
once, another 4xx waits 5 s. Bodies are the agent's pydantic models.

The requests go over a small HTTP/1.1 client on asyncio streams: httpx.AsyncClient took
2.5 ms of CPU a request against a canned server where this one takes 30 us, more than the
controller spends on a heartbeat. Its pool keeps ``--connections`` per generator, where real
agents hold one each (10,000 sockets at 10,000 nodes): the controller here pays for fewer
connections than it would in production.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import ironpod
from ironpod.agent.client import (
    Backoff,
    ControllerRejectedError,
    ControllerUnavailableError,
    UnknownNodeError,
)
from ironpod.agent.main import FAST_INTERVAL_S
from ironpod.wire import GpuInfo, Heartbeat, HeartbeatReply, NodeRegistration, WorkerStatus

API = "/api/v1"
GIB = 1 << 30
#: uvicorn closes a connection idle for 5 s (its default keep-alive); the pool drops one idle
#: longer than this rather than race that close.
IDLE_DROP_S = 4.0
STATUS_EVERY_S = 0.5
#: What the agent waits after a refusal (ironpod.agent.main._REJECTED_RETRY_S), and its
#: retry delays before it has joined (Agent.run's ``joining``).
REJECTED_RETRY_S = 5.0
JOINING_FIRST_S, JOINING_CAP_S = 0.1, 0.25
STEP_S = 1.0  # a simulated rank's step time


@dataclass(kw_only=True, slots=True)
class Point:
    nodes: int
    jobs: list[int]
    db: str
    interval_s: float
    lost_after_s: float
    join_window_s: float
    duration_s: float
    job_timeout_s: float
    timeout_s: float
    jitter: float
    generators: int
    connections: int
    fast_window_s: float
    max_requests: int
    seed: int
    log_level: str
    controller_src: str | None = None  # run the controller from this source tree instead


# --- a small HTTP/1.1 client: keep-alive connections shared by a generator's nodes ----------


class HttpConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    async def exchange(self, request: bytes) -> tuple[int, bytes, bool, float | None]:
        """Send one request, read its whole reply: (status, body, may the connection stay,
        Retry-After seconds)."""
        self.writer.write(request)
        await self.writer.drain()
        head = (await self.reader.readuntil(b"\r\n\r\n")).lower()
        status = int(head[9:12])
        headers = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
        if headers.get(b"transfer-encoding", b"").strip() == b"chunked":
            body = bytearray()
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                body += await self.reader.readexactly(size + 2)
                del body[-2:]
            await self.reader.readuntil(b"\r\n")
        else:
            body = bytearray(await self.reader.readexactly(int(headers[b"content-length"])))
        keep = headers.get(b"connection", b"").strip() != b"close"
        retry = headers.get(b"retry-after")
        return status, bytes(body), keep, float(retry) if retry is not None else None

    def close(self) -> None:
        self.writer.close()


class HttpPool:
    """At most ``size`` connections, the most recently used first (as httpx keeps them). A
    reused connection that the server had closed gets the request once more on a new one."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port = host, port
        self._slots = asyncio.Semaphore(size)
        self._idle: list[HttpConnection] = []
        self.opened = 0

    async def post(self, path: str, body: bytes, bearer: str) -> tuple[int, bytes, float | None]:
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {bearer}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        async with self._slots:
            conn, reused = self._take()
            try:
                if conn is None:
                    conn = await self._open()
                try:
                    status, data, keep, retry = await conn.exchange(request)
                except (ConnectionError, asyncio.IncompleteReadError):
                    if not reused:
                        raise
                    conn.close()
                    conn = await self._open()
                    status, data, keep, retry = await conn.exchange(request)
            except BaseException:  # a timeout mid-reply too: that connection is out of step
                if conn is not None:
                    conn.close()
                raise
            if keep:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            else:
                conn.close()
            return status, data, retry

    def _take(self) -> tuple[HttpConnection | None, bool]:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < IDLE_DROP_S and not conn.reader.at_eof():
                return conn, True
            conn.close()
        return None, False

    async def _open(self) -> HttpConnection:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self.opened += 1
        return HttpConnection(reader, writer)

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


# --- the simulated nodes: one generator process, one asyncio loop -------------------------


@dataclass(kw_only=True, slots=True)
class GeneratorConfig:
    index: int
    nodes: list[int]  # indices of this generator's nodes (names sim-NNNNN)
    port: int
    join_token: str
    point: Point
    request_cap: int
    deadline: float  # monotonic: the process ends by then whatever the main process does


# The shared control block, written by the main process: when the schedule starts (t0), the
# measured window, and stop. Plain doubles; one writer, and a reader that sees a value a
# moment late only records one request more or less.
T0, WINDOW_START, WINDOW_END, STOP = range(4)


class Stats:
    """What one generator counts; latencies only of requests started in the window."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.register_latencies: list[float] = []
        self.lags: list[float] = []
        self.first_registered: float | None = None
        self.last_registered: float | None = None
        self.assigned: dict[int, list[float]] = {}  # attempt id -> [nodes, first, last] (unix)
        self.max_gap_s = 0.0
        #: Nodes whose answered beats came further apart than lost-after, whatever the cause
        #: (slow replies, retries, a late generator): the controller could rightly lose them.
        self.silent_nodes: set[str] = set()
        self.capped = False


class SimNode:
    def __init__(self, name: str, index: int, sim: Generator) -> None:
        self.name = name
        self.sim = sim
        rng = sim.rng
        self.offset_s = rng.uniform(0.0, sim.point.join_window_s)
        self.instance = uuid.uuid4().hex
        self.pid = 100_000 + index
        self.node_id: int | None = None
        self.credential: str | None = None
        self.assignment: dict[str, Any] | None = None
        self.started_unix = 0.0
        self.last_ok: float | None = None
        self.interval_s = sim.point.interval_s  # until the registration reply names its own
        gpus = [
            GpuInfo(
                index=i,
                name="NVIDIA H100 80GB HBM3",
                uuid=f"GPU-{uuid.uuid4()}",
                memory_bytes=80 * GIB,
            )
            for i in range(8)
        ]
        self.registration = NodeRegistration(
            name=name,
            hostname=name,
            address="127.0.0.1",
            agent_url=f"http://127.0.0.1:{10_000 + index % 50_000}",  # never called here
            agent_instance=self.instance,
            cpus=64,
            memory_bytes=512 * GIB,
            gpus=gpus,
            labels={"failure_domain": f"rack-{index // 32}"},
            agent_version=ironpod.__version__,
            time_unix=0.0,
        )

    def workers(self) -> list[WorkerStatus]:
        if self.assignment is None:
            return []
        now = time.time()
        step = int((now - self.started_unix) / STEP_S)
        return [
            WorkerStatus(
                attempt_id=self.assignment["attempt_id"],
                rank=rank,
                local_rank=local,
                pid=self.pid + local,
                state="running",
                started_unix=self.started_unix,
                last_step=step,
                last_progress_unix=self.started_unix + step * STEP_S,
                median_step_s=STEP_S,
            )
            for local, rank in enumerate(self.assignment["ranks"])
        ]

    async def run(self) -> None:
        """The agent's loop (ironpod.agent.main.Agent.run), as far as the controller sees it."""
        sim, point = self.sim, self.sim.point
        await sim.sleep_until(sim.t0 + self.offset_s)
        backoff, joining = Backoff(), Backoff(first_s=JOINING_FIRST_S, cap_s=JOINING_CAP_S)
        fast_until = -1.0
        rejoins = 0
        due = time.monotonic()
        while not sim.stopping():
            began = await sim.sleep_until(due)
            if sim.stopping():
                return
            try:
                if self.node_id is None:
                    await self.register()
                    fast_until = time.monotonic() + point.fast_window_s
                rejoin = await self.heartbeat(began - due)
            except ControllerUnavailableError as exc:
                retry = joining if self.node_id is None else backoff
                due = time.monotonic() + next_delay(retry, getattr(exc, "retry_after_s", None))
                continue
            except UnknownNodeError:
                self.node_id, rejoin = None, True
            except ControllerRejectedError:
                due = time.monotonic() + REJECTED_RETRY_S
                continue
            backoff.reset()
            rejoins = rejoins + 1 if rejoin else 0
            interval = self.interval_s
            if time.monotonic() < fast_until:
                interval = min(interval, FAST_INTERVAL_S)
            interval *= sim.rng.uniform(1 - point.jitter, 1 + point.jitter)
            due = time.monotonic() if rejoins == 1 else max(began + interval, time.monotonic())

    async def register(self) -> None:
        reg = self.registration.model_copy(
            update={"time_unix": time.time(), "credential": self.credential}
        )
        body = await self.sim.send(
            "register", f"{API}/nodes/register", reg.model_dump_json(), self.sim.join_token
        )
        reply = json.loads(body)
        self.node_id, self.credential = reply["node_id"], reply["credential"]
        self.interval_s = reply["heartbeat_interval_s"]  # the controller's wins, as in the agent
        self.sim.registered(self)

    async def heartbeat(self, lag_s: float) -> bool:
        assert self.node_id is not None and self.credential is not None
        beat = Heartbeat(
            agent_instance=self.instance,
            time_unix=time.time(),
            workers=self.workers(),
            memory_budget_bytes=128 * GIB,
            memory_used_bytes=0,
        )
        path = f"{API}/nodes/{self.node_id}/heartbeat"
        body = await self.sim.send("heartbeat", path, beat.model_dump_json(), self.credential)
        self.sim.answered(self, lag_s)
        reply = json.loads(body)
        self.sim.check_wire(reply, (reply.get("assignment") or {}).get("attempt_id"))
        if reply.get("reregister"):
            self.sim.stats.counts["reregister"] += 1
            self.node_id = None
            return True
        self.converge(reply)
        return False

    def converge(self, reply: dict[str, Any]) -> None:
        got = reply.get("assignment")
        if got is None:
            self.assignment = None
            return
        if self.assignment is None or self.assignment["attempt_id"] != got["attempt_id"]:
            self.assignment = {"attempt_id": got["attempt_id"], "ranks": got["ranks"]}
            self.started_unix = time.time()
            entry = self.sim.stats.assigned.setdefault(got["attempt_id"], [0, time.time(), 0.0])
            entry[0] += 1
            entry[2] = time.time()


def next_delay(backoff: Backoff, at_least_s: float | None) -> float:
    """The agent's next retry delay; at least a 503's Retry-After where its Backoff takes one
    (issue 11's agent; a controller that sends no Retry-After needs none)."""
    return backoff.next() if at_least_s is None else backoff.next(at_least_s)


class Generator:
    def __init__(self, config: GeneratorConfig, control: Any) -> None:
        self.config = config
        self.point = config.point
        self.control = control
        self.rng = random.Random(f"{config.point.seed}-{config.index}")
        self.join_token = config.join_token
        self.stats = Stats()
        self.pool = HttpPool("127.0.0.1", config.port, max(1, config.point.connections))
        self.nodes = [SimNode(f"sim-{i:05d}", i, self) for i in config.nodes]
        self.sent = 0
        self.t0 = 0.0
        self._checked: set[int | None] = set()
        self._parent = os.getppid()

    def stopping(self) -> bool:
        return (
            self.control[STOP] > 0
            or time.monotonic() > self.config.deadline
            or os.getppid() != self._parent  # the bench died: nobody will read the results
        )

    def in_window(self, at: float) -> bool:
        start = self.control[WINDOW_START]
        return 0 < start <= at < self.control[WINDOW_END]

    async def sleep_until(self, at: float) -> float:
        """Sleep until ``at`` (monotonic); returns when it woke. One timer a beat: at stop
        :meth:`run` cancels the sleepers."""
        if (left := at - time.monotonic()) > 0:
            await asyncio.sleep(left)
        return time.monotonic()

    async def send(self, kind: str, path: str, body: str, bearer: str) -> bytes:
        """One request as the agent's client makes it, counted; raises what the agent sorts
        its failures into (ironpod.agent.client)."""
        stats = self.stats
        if self.sent >= self.config.request_cap:
            stats.capped = True
            raise ControllerUnavailableError("request cap")
        self.sent += 1
        began = time.monotonic()
        counted = self.in_window(began)
        stats.counts[f"{kind}_sent"] += 1
        if counted:
            stats.counts[f"{kind}_sent_window"] += 1
        error: str | None = None
        status, retry_after = 0, None
        try:
            async with asyncio.timeout(self.point.timeout_s):
                status, data, retry_after = await self.pool.post(path, body.encode(), bearer)
        except TimeoutError:
            error = "timeout"
        except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as exc:
            error = f"connection ({type(exc).__name__})"
        else:
            if status >= 300:  # a 503 with Retry-After is the controller shedding load
                error = f"http {status}" + (" busy" if retry_after is not None else "")
        ended = time.monotonic()
        took = ended - began
        done_in_window = self.in_window(ended)  # throughput: what the window got done
        if error is not None:
            stats.errors[f"{kind}: {error}"] += 1
            if done_in_window:
                stats.counts[f"{kind}_errors_window"] += 1
            if counted:
                stats.counts[f"{kind}_failed_of_window"] += 1
            if error.startswith("http 4"):
                raise UnknownNodeError(error) if status == 404 else ControllerRejectedError(error)
            raise ControllerUnavailableError(error, retry_after)
        stats.counts[f"{kind}_ok"] += 1
        if done_in_window:
            stats.counts[f"{kind}_ok_window"] += 1
        if kind == "register":
            stats.register_latencies.append(took)
        elif counted:  # latency: of the beats the window sent, whenever they were answered
            stats.latencies.append(took)
            stats.counts["heartbeat_answered_of_window"] += 1
        return data

    def registered(self, node: SimNode) -> None:
        now = time.time()
        if self.stats.first_registered is None:
            self.stats.first_registered = now
        self.stats.last_registered = now

    def answered(self, node: SimNode, lag_s: float) -> None:
        now = time.monotonic()
        if node.last_ok is not None:
            gap = now - node.last_ok
            self.stats.max_gap_s = max(self.stats.max_gap_s, gap)
            if gap > self.point.lost_after_s:
                self.stats.silent_nodes.add(node.name)
        node.last_ok = now
        if self.in_window(now):
            self.stats.lags.append(lag_s)

    def check_wire(self, reply: dict[str, Any], key: int | None) -> None:
        """Hold the first reply of each kind to the wire model (the rest are read as JSON:
        validating a 1,000-node job's peer list on every beat would cost the generator more
        than the controller's reply did)."""
        if key not in self._checked:
            self._checked.add(key)
            HeartbeatReply.model_validate(reply)

    async def run(self, status: Any) -> None:
        while self.control[T0] == 0 and not self.stopping():
            await asyncio.sleep(0.01)
        self.t0 = self.control[T0]
        tasks = [asyncio.create_task(node.run()) for node in self.nodes]
        # The nodes' models are hundreds of thousands of long-lived objects: a full collection
        # over them stalled the loop for 200-300 ms at 5,000 nodes (late beats, as a paused
        # agent's). Frozen, the collector looks only at what each request makes, and less
        # often: most of it is freed by reference counting anyway.
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        while not self.stopping() and not all(t.done() for t in tasks):
            status.put(("status", self.config.index, self.snapshot()))
            await asyncio.sleep(STATUS_EVERY_S)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        crashed = [repr(r) for r in results if isinstance(r, Exception)]
        self.pool.close()
        status.put(("result", self.config.index, self.result(crashed)))

    def snapshot(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "registered": sum(n.node_id is not None for n in self.nodes),
            "heartbeat_ok": stats.counts["heartbeat_ok"],
            "errors": sum(stats.errors.values()),
            "running": sum(n.assignment is not None for n in self.nodes),
        }

    def result(self, crashed: list[str]) -> dict[str, Any]:
        stats = self.stats
        return {
            **self.snapshot(),
            "counts": dict(stats.counts),
            "errors_by_kind": dict(stats.errors),
            "latencies": stats.latencies,
            "register_latencies": stats.register_latencies,
            "lags": stats.lags,
            "first_registered": stats.first_registered,
            "last_registered": stats.last_registered,
            "assigned": stats.assigned,
            "max_gap_s": stats.max_gap_s,
            "silent_nodes": sorted(stats.silent_nodes),
            "capped": stats.capped,
            "connections_opened": self.pool.opened,
            "crashed": crashed,
        }


def generator_main(config: GeneratorConfig, control: Any, status: Any) -> None:
    """A generator process: the main process orchestrates, so Ctrl-C is its to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sim = Generator(config, control)
    status.put(("ready", config.index, None))
    asyncio.run(sim.run(status))
