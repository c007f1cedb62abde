"""The REST API under ``/api/v1`` (FastAPI; its OpenAPI schema is at ``/openapi.json``).

Every route needs a bearer token: the admin token for everything, the node join token to
register, a node's own credential for its heartbeats and events (:mod:`ironpod.wire`). Bad
bodies and numbers beyond the database's 64 bits get 422 naming the field; unknown ids 404; a
body over 4 MiB 413 (before it is read, as is any /api/v1 request without a token); a change
the state does not allow 409; a full disk 507. Every error is documented in the schema, and
tests/test_api_fuzz.py fuzzes the schema for 5xx and undocumented answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

import httpx
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.orm import Session, undefer_group
from starlette.concurrency import run_in_threadpool

from ironpod import __version__
from ironpod.controller import certificates
from ironpod.controller.auth import Tokens
from ironpod.controller.certificates import ControllerTls
from ironpod.controller.db import Attempt, Event, Job, Node
from ironpod.controller.ledger import goodput
from ironpod.controller.live import fast_heartbeat
from ironpod.controller.service import (
    Controller,
    NodeAuthError,
    NodeNameTakenError,
    NotFoundError,
)
from ironpod.controller.views import attempt_view, event_view, job_view, node_view
from ironpod.errors import ConfigError
from ironpod.spec import JobSpec, parse_spec
from ironpod.states import IllegalTransitionError
from ironpod.wire import Heartbeat, HeartbeatReply, NodeRegistration, RegistrationReply, WorkerEvent

#: What the database holds: a larger number is no id of anything here.
INT64_MAX = 2**63 - 1
#: The largest request body (a spec's command and env take at most 1 MiB, a heartbeat a few
#: KiB); a larger one is refused before it is read.
MAX_BODY_BYTES = 4 * 1024 * 1024
Id = Annotated[int, Path(ge=0, le=INT64_MAX)]
Offset = Annotated[int, Query(ge=0, le=INT64_MAX)]
_ID_RE = re.compile(r"[0-9]{1,19}")
#: A whole row, its JSON columns too (they load only when read otherwise: db.py).
WHOLE = undefer_group("json")


class ErrorBody(BaseModel):
    """Every error: one message, or (request validation) a list naming each bad field."""

    detail: str | list[dict[str, Any]]


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "malformed request",
        401: "no bearer token",
        403: "the token may not do that",
        404: "no such job, node or log",
        409: "conflicts with the current state",
        413: "request body too large",
        422: "a field is invalid (named in detail)",
        502: "a node did not answer",
        503: "the database is unavailable, or the controller is busy (retry after Retry-After)",
        507: "the controller's disk is full",
    }.items()
}


T = TypeVar("T")
#: Agents' requests that may wait for a decision at once; beyond this the controller is
#: behind and says so at once (503 with Retry-After) instead of queueing work it cannot do.
MAX_WAITING_DECISIONS = 32
#: An agent's request that waited this long for the decision lock is dropped: its agent
#: (ironpod.agent.client, 5 s timeout) has given up and retries.
STALE_AFTER_S = 4.0
#: Seconds an agent is told to wait before it tries again after a 503 (it adds jitter).
RETRY_AFTER_S = 1
#: An event loop late by this much is a controller behind (it holds its lost verdicts).
LOOP_LATE_S = 1.0


class BusyError(Exception):
    """The controller is behind: the request was not taken (503 with Retry-After)."""


class DecisionGate:
    """Agents' requests that take the decision path: bounded in number, dropped once
    their client has given up, and every refusal recorded as the controller being behind
    (so silence it caused is never taken for a lost node; Controller._check_liveness)."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller
        self._waiting = 0
        self._count = threading.Lock()

    async def run(self, request: Request, fn: Callable[..., T], *args: Any) -> T:
        ctl = self._controller
        with self._count:
            full = self._waiting >= MAX_WAITING_DECISIONS
            if not full:
                self._waiting += 1
        if full:
            ctl.live.fell_behind(ctl.clock())
            raise BusyError()
        try:
            if await request.is_disconnected():
                raise BusyError()  # nobody to answer: the agent retries
            arrived = time.monotonic()

            def decide() -> T:
                if not ctl.lock.acquire(
                    timeout=max(0.0, arrived + STALE_AFTER_S - time.monotonic())
                ):
                    ctl.live.fell_behind(ctl.clock())
                    raise BusyError()
                try:
                    return fn(*args)
                finally:
                    ctl.lock.release()

            return await run_in_threadpool(decide)
        finally:
            with self._count:
                self._waiting -= 1


#: Registrations waiting for a batch; beyond this a join storm is told to come back later.
MAX_WAITING_REGISTRATIONS = 20_000
#: The most registrations one transaction takes.
REGISTRATION_BATCH = 500


class RegistrationBatcher:
    """Group commit for join storms: registrations that arrive while a batch is being
    written wait for the next one, and each batch is one transaction (Controller.
    register_many): 10,000 agents joining at once cost tens of commits, not 10,000."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller
        self._pending: list[tuple[NodeRegistration, asyncio.Future[Any], float]] = []
        self._running = False
        self._task: asyncio.Task[None] | None = None

    async def register(self, reg: NodeRegistration) -> RegistrationReply:
        ctl = self._controller
        if len(self._pending) >= MAX_WAITING_REGISTRATIONS:
            ctl.live.fell_behind(ctl.clock())
            raise BusyError()
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((reg, done, time.monotonic()))
        if not self._running:
            self._running = True
            self._task = asyncio.create_task(self._drain())
        reply = await done
        if isinstance(reply, Exception):
            raise reply
        assert isinstance(reply, RegistrationReply)
        return reply

    async def _drain(self) -> None:
        try:
            while self._pending:
                taken = self._pending[:REGISTRATION_BATCH]
                del self._pending[:REGISTRATION_BATCH]
                stale = time.monotonic() - STALE_AFTER_S
                for _, done, arrived in taken:
                    if arrived < stale and not done.done():  # its agent gave up and retries
                        self._controller.live.fell_behind(self._controller.clock())
                        done.set_exception(BusyError())
                batch = [(reg, done) for reg, done, _ in taken if not done.done()]
                if not batch:
                    continue
                # the same agent asking twice (it retried) gets one registration
                last = {reg.name: reg for reg, _ in batch}
                regs = list(last.values())
                try:
                    replies = await run_in_threadpool(self._controller.register_many, regs)
                    by_name: dict[str, Any] = {
                        r.name: a for r, a in zip(regs, replies, strict=True)
                    }
                except Exception as exc:  # the whole batch failed (the database): each says so
                    by_name = {reg.name: exc for reg in regs}
                for reg, done in batch:
                    if done.done():
                        continue
                    answer = by_name[reg.name]
                    if last[reg.name].agent_instance != reg.agent_instance:
                        answer = NodeNameTakenError(
                            f"node name {reg.name!r} is being registered by another agent"
                        )
                    done.set_result(answer)
        finally:
            self._running = False


async def _watch_loop(controller: Controller) -> None:
    """Notice a stalled event loop: heartbeats queued behind it are not nodes' silence."""
    period = 0.25
    while True:
        began = time.monotonic()
        await asyncio.sleep(period)
        if time.monotonic() - began - period > LOOP_LATE_S:
            controller.live.fell_behind(controller.clock())


def _is_id(ref: str) -> bool:
    """Digits only (ASCII: ``str.isdigit`` takes '²') that fit the database's integers."""
    return _ID_RE.fullmatch(ref) is not None and int(ref) <= INT64_MAX


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes gets 413 (by its Content-Length or as it
    streams), and an /api/v1 request without any bearer token gets 401 before its body is
    read (FastAPI reads the body before the token dependencies run)."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        path = str(scope.get("path", ""))
        public = path in _PUBLIC_PATHS or not path.startswith("/api/v1/")
        if not public and not headers.get(b"authorization", b"").lower().startswith(b"bearer "):
            await _send_json(send, 401, "missing bearer token")
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _send_json(send, 413, f"request body over {self.limit} bytes")
            return
        received = 0
        started = False

        async def limited() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLargeError
            return message

        async def tracked(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except _BodyTooLargeError:
            if not started:
                await _send_json(send, 413, f"request body over {self.limit} bytes")


class _BodyTooLargeError(Exception):
    pass


_HEARTBEAT_PATH = re.compile(r"/api/v1/nodes/([0-9]{1,19})/heartbeat")
#: A heartbeat body beyond this goes the whole way through FastAPI (which bounds it too).
_LANE_MAX_BODY = 1 << 20


class HeartbeatLane:
    """The fast lane at the HTTP layer: a heartbeat is parsed and answered here when it
    decides nothing (ironpod.controller.live.fast_heartbeat), before FastAPI's routing,
    dependencies and validation, which cost 25 times the lane's own work (about 200 us
    against 8 us a heartbeat, measured in process). Everything else, and a heartbeat the lane
    cannot answer or parse, goes on to the app with its body intact, so errors and the
    decision path are FastAPI's as before."""

    def __init__(self, app: Any, controller: Controller) -> None:
        self.app = app
        self.controller = controller

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        match = (
            _HEARTBEAT_PATH.fullmatch(str(scope.get("path", "")))
            if scope["type"] == "http" and scope.get("method") == "POST"
            else None
        )
        if match is None or int(match.group(1)) > INT64_MAX:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        length = headers.get(b"content-length", b"")
        if auth[:7].lower() != b"bearer " or not length.isdigit():
            await self.app(scope, receive, send)
            return
        if int(length) > _LANE_MAX_BODY:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        answer = None
        try:
            heartbeat = Heartbeat.model_validate_json(body)
        except ValueError:
            heartbeat = None  # FastAPI says what is wrong with it (422)
        if heartbeat is not None:
            credential = auth[7:].decode("latin-1").strip()
            answer = fast_heartbeat(self.controller, int(match.group(1)), heartbeat, credential)
        if answer is None:
            replayed = False

            async def replay() -> Any:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(answer)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer})


_PUBLIC_PATHS = {"/api/v1/tls/ca"}


async def _send_json(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


log = logging.getLogger("ironpod.controller")
bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _node_credential(credentials: Credentials) -> str:
    """A node's own routes take its credential (from registration), not the join token."""
    if credentials is None:
        raise HTTPException(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
    return credentials.credentials


NodeCredential = Annotated[str, Depends(_node_credential)]


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def create_app(
    controller: Controller, tokens: Tokens, cluster_tls: ControllerTls | None = None
) -> FastAPI:
    """``cluster_tls``: the controller runs TLS; it signs agents' certificates and verifies
    agents against the cluster CA when it calls them."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(_watch_loop(controller))
        try:
            yield
        finally:
            watcher.cancel()

    app = FastAPI(
        title="ironpod controller", version=__version__, responses=_ERRORS, lifespan=lifespan
    )
    app.add_middleware(BodyLimit)
    app.add_middleware(HeartbeatLane, controller=controller)  # outermost: before all else
    gate = DecisionGate(controller)
    registrations = RegistrationBatcher(controller)

    def admin(credentials: Credentials) -> None:
        if credentials is None:
            raise HTTPException(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
        if not _same(credentials.credentials, tokens.admin):
            raise HTTPException(403, "this token may not do that")

    def agent(credentials: Credentials) -> None:
        if credentials is None:
            raise HTTPException(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
        token = credentials.credentials
        if not (_same(token, tokens.join) or _same(token, tokens.admin)):
            raise HTTPException(403, "not a node join token")

    @app.exception_handler(NotFoundError)
    async def _not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(ConfigError)
    async def _bad_input(_: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(NodeAuthError)
    async def _not_this_node(_: Request, exc: NodeAuthError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=403)

    @app.exception_handler(NodeNameTakenError)
    async def _name_taken(_: Request, exc: NodeNameTakenError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(IllegalTransitionError)
    async def _conflict(_: Request, exc: IllegalTransitionError) -> JSONResponse:
        return JSONResponse({"detail": f"not now: {exc}"}, status_code=409)

    @app.exception_handler(BusyError)
    async def _busy(_: Request, exc: BusyError) -> JSONResponse:
        detail = "the controller is busy: retry after the Retry-After seconds"
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return JSONResponse({"detail": detail}, status_code=503, headers=headers)

    @app.exception_handler(OverflowError)
    @app.exception_handler(DataError)
    async def _out_of_range(_: Request, exc: Exception) -> JSONResponse:
        detail = f"a number in the request is out of range (the database holds up to {INT64_MAX})"
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(OperationalError)
    @app.exception_handler(OSError)
    async def _storage(_: Request, exc: Exception) -> JSONResponse:
        text = str(getattr(exc, "orig", exc))
        if "full" in text or getattr(exc, "errno", None) == errno.ENOSPC:
            where = controller.state_dir
            detail = f"the controller's disk is full ({where}): free space there"
            return JSONResponse({"detail": detail}, status_code=507)
        log.error("storage error: %s", text)
        return JSONResponse({"detail": "the controller's database is unavailable"}, 503)

    nodes_api = APIRouter(prefix="/api/v1/nodes")

    @nodes_api.post("/register", dependencies=[Depends(agent)])
    async def register(body: NodeRegistration) -> RegistrationReply:
        return await registrations.register(body)

    @nodes_api.post("/{node_id}/heartbeat", response_model=HeartbeatReply)
    async def heartbeat(
        request: Request, node_id: Id, body: Heartbeat, credential: NodeCredential
    ) -> Any:
        """Answered by HeartbeatLane when it decides nothing (ironpod.controller.live), else
        here, on the decision path (the lane's check again, for a body it did not take)."""
        fast = fast_heartbeat(controller, node_id, body, credential)
        if fast is not None:
            return Response(fast, media_type="application/json")
        return await gate.run(request, controller.heartbeat, node_id, body, credential)

    @nodes_api.post("/{node_id}/events")
    async def worker_event(
        request: Request, node_id: Id, body: WorkerEvent, credential: NodeCredential
    ) -> dict[str, bool]:
        await gate.run(request, controller.worker_event, node_id, body, credential)
        return {"ok": True}

    api = APIRouter(prefix="/api/v1", dependencies=[Depends(admin)])

    def session() -> Session:
        controller.sync()  # what fast heartbeats left in memory, for the read
        opened: Session = controller.sessions()
        return opened

    def find_job(s: Session, ref: str) -> Job:
        job = (
            s.get(Job, int(ref))
            if _is_id(ref)
            else s.scalar(select(Job).where(Job.name == ref).order_by(Job.id.desc()))
        )
        if job is None:
            raise NotFoundError(f"no job {ref!r}")
        return job

    def find_node(s: Session, ref: str) -> Node:
        node = (
            s.get(Node, int(ref)) if _is_id(ref) else s.scalar(select(Node).where(Node.name == ref))
        )
        if node is None:
            raise NotFoundError(f"no node {ref!r}")
        return node

    @api.get("/nodes")
    def list_nodes() -> list[dict[str, Any]]:
        with session() as s:
            return [node_view(n) for n in s.scalars(select(Node).options(WHOLE).order_by(Node.id))]

    def set_drain(ref: str, drain: bool) -> dict[str, Any]:
        with session() as s:
            node_id = find_node(s, ref).id
        controller.drain(node_id, drain)
        with session() as s:
            return node_view(find_node(s, ref))

    @api.post("/nodes/{ref}/drain")
    def drain(ref: str) -> dict[str, Any]:
        return set_drain(ref, True)

    @api.post("/nodes/{ref}/undrain")
    def undrain(ref: str) -> dict[str, Any]:
        return set_drain(ref, False)

    @api.post("/jobs", status_code=201)
    def submit(body: dict[str, Any]) -> dict[str, Any]:
        spec: JobSpec = parse_spec(body, source="spec")
        job_id = controller.submit(spec)
        with session() as s:
            return job_view(find_job(s, str(job_id)), [])

    @api.get("/jobs")
    def list_jobs(state: str | None = None) -> list[dict[str, Any]]:
        with session() as s:
            query = select(Job).order_by(Job.id)
            if state:
                query = query.where(Job.state == state)
            out = []
            for job in s.scalars(query):
                attempts = list(
                    s.scalars(select(Attempt).options(WHOLE).where(Attempt.job_id == job.id))
                )
                view = job_view(job, attempts)
                view["goodput"] = goodput(job, attempts, controller.clock())
                view.pop("attempts")
                out.append(view)
            return out

    @api.get("/jobs/{ref}")
    def get_job(ref: str) -> dict[str, Any]:
        with session() as s:
            job = find_job(s, ref)
            attempts = list(
                s.scalars(select(Attempt).options(WHOLE).where(Attempt.job_id == job.id))
            )
            view = job_view(job, attempts)
            view["goodput"] = goodput(job, attempts, controller.clock())
            return view

    @api.post("/jobs/{ref}/cancel")
    def cancel(ref: str) -> dict[str, Any]:
        with session() as s:
            job_id = find_job(s, ref).id
        controller.cancel(job_id)
        return get_job(str(job_id))

    @api.get("/jobs/{ref}/attempts")
    def attempts(ref: str) -> list[dict[str, Any]]:
        with session() as s:
            job = find_job(s, ref)
            rows = s.scalars(
                select(Attempt)
                .options(WHOLE)
                .where(Attempt.job_id == job.id)
                .order_by(Attempt.number)
            )
            return [attempt_view(a) for a in rows]

    @api.get("/events")
    def events(
        job: str | None = None,
        node: str | None = None,
        after: Offset = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
    ) -> list[dict[str, Any]]:
        with session() as s:
            query = select(Event).where(Event.id > after).order_by(Event.id).limit(limit)
            if job is not None:
                query = query.where(Event.job_id == find_job(s, job).id)
            if node is not None:
                query = query.where(Event.node_id == find_node(s, node).id)
            return [event_view(e) for e in s.scalars(query)]

    @api.get(
        "/jobs/{ref}/logs",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "the log's bytes"}},
    )
    def logs(
        ref: str,
        rank: Annotated[int, Query(ge=0, le=1 << 20)] = 0,
        attempt: Annotated[int | None, Query(ge=0, le=INT64_MAX)] = None,
        offset: Offset = 0,
    ) -> Any:
        with session() as s:
            job = find_job(s, ref)
            query = select(Attempt).where(Attempt.job_id == job.id)
            if attempt is not None:
                query = query.where(Attempt.number == attempt)
            row = s.scalar(query.order_by(Attempt.number.desc()))
            if row is None:
                raise NotFoundError(f"job {ref!r} has no attempt {attempt}")
            spec = JobSpec.model_validate(job.spec)
            if not 0 <= rank < spec.world_size:
                raise HTTPException(422, f"rank {rank} is not within world size {spec.world_size}")
            node = s.get(Node, row.node_ids[rank // spec.nproc_per_node])
            assert node is not None
            url = f"{node.agent_url}/logs/{row.id}/{rank}"
            log_token = controller.log_token(node)
        try:
            reply = httpx.get(
                url,
                params={"offset": offset},
                headers={"Authorization": f"Bearer {log_token}"},
                timeout=10,
                verify=cluster_tls.agents if cluster_tls is not None else True,
            )
        except httpx.HTTPError as exc:
            raise HTTPException(502, f"node {node.name} unreachable for logs: {exc}") from None
        if reply.status_code == 404:
            raise NotFoundError(f"no log yet for rank {rank} of attempt {row.number}")
        return PlainTextResponse(
            reply.content,
            headers={
                "X-Log-Size": reply.headers.get("X-Log-Size", ""),
                "X-Attempt": str(row.number),
            },
        )

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    if cluster_tls is not None:
        app.include_router(certificates.router(cluster_tls, agent, tokens.join))
    app.include_router(nodes_api)
    app.include_router(api)
    return app
