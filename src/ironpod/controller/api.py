"""The REST API under ``/api/v1`` (FastAPI; its OpenAPI schema is at ``/openapi.json``).

Every route needs a bearer token: the admin token for everything, the node join token for the
agent routes of :mod:`ironpod.wire`. Bad bodies get 422 naming the field; unknown ids 404.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from ironpod import __version__
from ironpod.controller import certificates
from ironpod.controller.auth import Tokens
from ironpod.controller.certificates import ControllerTls
from ironpod.controller.db import Attempt, Event, Job, Node
from ironpod.controller.ledger import goodput
from ironpod.controller.service import (
    Controller,
    NodeAuthError,
    NodeNameTakenError,
    NotFoundError,
)
from ironpod.controller.views import attempt_view, event_view, job_view, node_view
from ironpod.errors import ConfigError
from ironpod.spec import JobSpec, parse_spec
from ironpod.wire import Heartbeat, HeartbeatReply, NodeRegistration, RegistrationReply, WorkerEvent

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
    app = FastAPI(title="ironpod controller", version=__version__)

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

    nodes_api = APIRouter(prefix="/api/v1/nodes")

    @nodes_api.post("/register", dependencies=[Depends(agent)])
    def register(body: NodeRegistration) -> RegistrationReply:
        return controller.register(body)

    @nodes_api.post("/{node_id}/heartbeat")
    def heartbeat(node_id: int, body: Heartbeat, credential: NodeCredential) -> HeartbeatReply:
        return controller.heartbeat(node_id, body, credential)

    @nodes_api.post("/{node_id}/events")
    def worker_event(
        node_id: int, body: WorkerEvent, credential: NodeCredential
    ) -> dict[str, bool]:
        controller.worker_event(node_id, body, credential)
        return {"ok": True}

    api = APIRouter(prefix="/api/v1", dependencies=[Depends(admin)])

    def session() -> Session:
        opened: Session = controller.sessions()
        return opened

    def find_job(s: Session, ref: str) -> Job:
        job = (
            s.get(Job, int(ref))
            if ref.isdigit()
            else s.scalar(select(Job).where(Job.name == ref).order_by(Job.id.desc()))
        )
        if job is None:
            raise NotFoundError(f"no job {ref!r}")
        return job

    def find_node(s: Session, ref: str) -> Node:
        node = (
            s.get(Node, int(ref))
            if ref.isdigit()
            else s.scalar(select(Node).where(Node.name == ref))
        )
        if node is None:
            raise NotFoundError(f"no node {ref!r}")
        return node

    @api.get("/nodes")
    def list_nodes() -> list[dict[str, Any]]:
        with session() as s:
            return [node_view(n) for n in s.scalars(select(Node).order_by(Node.id))]

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
                attempts = list(s.scalars(select(Attempt).where(Attempt.job_id == job.id)))
                view = job_view(job, attempts)
                view["goodput"] = goodput(job, attempts, controller.clock())
                view.pop("attempts")
                out.append(view)
            return out

    @api.get("/jobs/{ref}")
    def get_job(ref: str) -> dict[str, Any]:
        with session() as s:
            job = find_job(s, ref)
            attempts = list(s.scalars(select(Attempt).where(Attempt.job_id == job.id)))
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
                select(Attempt).where(Attempt.job_id == job.id).order_by(Attempt.number)
            )
            return [attempt_view(a) for a in rows]

    @api.get("/events")
    def events(
        job: str | None = None, node: str | None = None, after: int = 0, limit: int = 500
    ) -> list[dict[str, Any]]:
        with session() as s:
            query = select(Event).where(Event.id > after).order_by(Event.id).limit(limit)
            if job is not None:
                query = query.where(Event.job_id == find_job(s, job).id)
            if node is not None:
                query = query.where(Event.node_id == find_node(s, node).id)
            return [event_view(e) for e in s.scalars(query)]

    @api.get("/jobs/{ref}/logs", response_class=PlainTextResponse)
    def logs(ref: str, rank: int = 0, attempt: int | None = None, offset: int = 0) -> Any:
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
        app.include_router(certificates.router(cluster_tls, agent))
    app.include_router(nodes_api)
    app.include_router(api)
    return app
