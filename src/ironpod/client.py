"""The Python client of the controller's REST API (:mod:`ironpod.controller.api`).

The CLI is built on it, and so can scripts and notebooks be: one method per route, typed
replies, and every failure turned into an :class:`~ironpod.errors.IronpodError` whose message
is one line a person can act on (the server's own ``detail`` included), so no caller needs to
know about HTTP status codes or httpx exceptions.

Where the client finds its controller (STYLE.md lesson 6): an explicit ``url``/``token``
argument (the CLI's ``--url``/``--token`` flags) > ``IRONPOD_URL``/``IRONPOD_TOKEN`` > the
local cluster's files under ``IRONPOD_HOME`` (default ``~/.ironpod``): ``cluster.json``
written by ``ironpod up`` and the admin token in ``controller/tokens.json`` written by the
controller at its first start > ``http://127.0.0.1:8700`` (the default of ``ironpod
controller``). The local admin token is only ever sent to a loopback URL: pointing the CLI at
another host must not hand that host the keys of this machine's cluster.
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

import httpx

from ironpod import env
from ironpod.errors import ConfigError, IronpodError

API = "/api/v1"
DEFAULT_URL = "http://127.0.0.1:8700"
TIMEOUT_S = 15.0
#: Most events the controller returns per request; :meth:`IronpodClient.all_events` pages.
EVENTS_PAGE = 500
TERMINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})


# -- errors: the exit code travels with the error, so every entry point maps them the same way


class ApiError(IronpodError):
    """The controller answered with an error status."""

    exit_code = 1

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class BadRequestError(ApiError):
    """4xx: the request named something wrong (a bad spec field, an out-of-range rank)."""

    exit_code = 2


class AuthError(BadRequestError):
    """401/403: no token, or a token that may not do this."""


class NotFoundError(BadRequestError):
    """404: no such job, node, attempt or log."""


class ServerError(ApiError):
    """5xx: the controller (or a node it asked, for logs) failed; trying again may help."""


class UnreachableError(IronpodError):
    """No HTTP answer at all: the controller is down, or the URL is wrong."""

    exit_code = 1


# -- replies: the shapes of controller/views.py and controller/ledger.py


class NodeView(TypedDict):
    id: int
    name: str
    state: str
    reason: str
    address: str
    cpus: int
    memory_bytes: int
    gpus: list[dict[str, Any]]
    labels: dict[str, str]
    attempt_id: int | None
    last_heartbeat_unix: float
    clock_skew_s: float
    recent_failures: int
    #: In-memory snapshots held (job_id, rank, step, kind, nbytes), the snapshot memory
    #: ({"budget_bytes", "used_bytes"}) and the latest health results by check.
    snapshots: list[dict[str, Any]]
    memory: dict[str, Any]
    health: dict[str, Any]


class Goodput(TypedDict):
    wall_s: float
    queued_s: float
    startup_restore_s: float
    productive_s: float
    recomputed_s: float
    recomputed_steps: int
    recovery_gap_s: float
    checkpoint_stall_s: float
    other_s: float
    restarts: int
    ettr: float


class AttemptView(TypedDict):
    id: int
    number: int
    state: str
    node_ids: list[int]
    master: str
    created_unix: float
    running_unix: float | None
    first_step_unix: float | None
    ended_unix: float | None
    first_step: int | None
    last_step: int | None
    median_step_s: float | None
    end_cause: str
    metrics: dict[str, Any]
    #: str(rank) -> the agent's last WorkerStatus of that rank (pid, state, ...) + "event".
    ranks: dict[str, dict[str, Any]]
    #: The restore plan the attempt started with ({"step", "sources"}), None: durable tier.
    restore: dict[str, Any] | None


class _JobBase(TypedDict):
    id: int
    name: str
    team: str
    priority: int
    state: str
    reason: str
    created_unix: float
    started_unix: float | None
    ended_unix: float | None
    restarts: int
    spec: dict[str, Any]
    #: The durable-checkpoint interval chosen (Young/Daly) and its inputs: interval_s,
    #: cost_s, mtbf_s, failures, runtime_s, prior_mtbf_s, durable_step.
    checkpointing: dict[str, Any]


class JobView(_JobBase, total=False):
    """``attempts`` only from :meth:`IronpodClient.job`; the list route leaves it out."""

    attempts: list[AttemptView]
    last_step: int | None
    metrics: dict[str, Any]
    goodput: Goodput
    #: Which budget ended the job (ironpod.states.EndKind): "" while live; controllers before
    #: it leave it out. ``end_exit_code``: the exit code of the rank that ended it, if any.
    end_kind: str
    end_exit_code: int | None


class EventView(TypedDict):
    id: int
    time_unix: float
    kind: str
    cause: str
    job_id: int | None
    node_id: int | None
    attempt_id: int | None
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LogChunk:
    """Bytes of one rank's log from some offset; ``size`` is the whole file's size now."""

    data: bytes
    size: int
    attempt: int | None

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")


def is_terminal(job: JobView) -> bool:
    return job["state"] in TERMINAL_JOB_STATES


class IronpodClient:
    """One controller, one token. Thread-compatible, not thread-safe (one httpx.Client)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout_s: float = TIMEOUT_S,
        ca_file: Path | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"controller URL {url!r}: expected http://HOST:PORT")
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify: ssl.SSLContext | bool = True  # https without a CA file: the system's store
        if ca_file is not None:
            if not ca_file.is_file():
                raise ConfigError(f"CA file {ca_file}: no such file (set {env.CA_FILE})")
            verify = ssl.create_default_context(cafile=str(ca_file))
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout_s, verify=verify
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> IronpodClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- transport

    def _request(
        self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None
    ) -> httpx.Response:
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            reply = self._http.request(method, path, json=json_body, params=clean)
        except httpx.TimeoutException as exc:
            raise UnreachableError(
                f"the controller at {self.url} did not answer {method} {path} in time "
                f"({type(exc).__name__})"
            ) from None
        except httpx.HTTPError as exc:
            raise UnreachableError(
                f"cannot reach the controller at {self.url}: {exc or type(exc).__name__} "
                "(is the cluster up? `ironpod up`)"
            ) from None
        if reply.status_code >= 400:
            raise _error_for(reply, method, path)
        return reply

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        reply = self._request(method, path, **kwargs)
        try:
            return reply.json()
        except ValueError:
            raise ServerError(
                f"{method} {path}: the controller sent a reply that is not JSON", reply.status_code
            ) from None

    # -- routes

    def healthz(self) -> dict[str, str]:
        return cast(dict[str, str], self._json("GET", "/healthz"))

    def nodes(self) -> list[NodeView]:
        return cast(list[NodeView], self._json("GET", f"{API}/nodes"))

    def drain(self, node: str) -> NodeView:
        return cast(NodeView, self._json("POST", f"{API}/nodes/{_ref(node)}/drain"))

    def undrain(self, node: str) -> NodeView:
        return cast(NodeView, self._json("POST", f"{API}/nodes/{_ref(node)}/undrain"))

    def submit(self, spec: dict[str, Any]) -> JobView:
        return cast(JobView, self._json("POST", f"{API}/jobs", json_body=spec))

    def jobs(self, state: str | None = None) -> list[JobView]:
        return cast(list[JobView], self._json("GET", f"{API}/jobs", params={"state": state}))

    def job(self, ref: str | int) -> JobView:
        return cast(JobView, self._json("GET", f"{API}/jobs/{_ref(ref)}"))

    def cancel(self, ref: str | int) -> JobView:
        return cast(JobView, self._json("POST", f"{API}/jobs/{_ref(ref)}/cancel"))

    def attempts(self, ref: str | int) -> list[AttemptView]:
        return cast(list[AttemptView], self._json("GET", f"{API}/jobs/{_ref(ref)}/attempts"))

    def events(
        self,
        *,
        job: str | int | None = None,
        node: str | None = None,
        after: int = 0,
        limit: int = EVENTS_PAGE,
    ) -> list[EventView]:
        params = {"job": job, "node": node, "after": after, "limit": limit}
        return cast(list[EventView], self._json("GET", f"{API}/events", params=params))

    def all_events(
        self, *, job: str | int | None = None, node: str | None = None, after: int = 0
    ) -> list[EventView]:
        """Every event after ``after``, paging past the controller's per-request limit."""
        out: list[EventView] = []
        while True:
            page = self.events(job=job, node=node, after=after, limit=EVENTS_PAGE)
            out += page
            if len(page) < EVENTS_PAGE:
                return out
            after = page[-1]["id"]

    def log_chunk(
        self, ref: str | int, *, rank: int = 0, attempt: int | None = None, offset: int = 0
    ) -> LogChunk:
        """Raw bytes from ``offset``: a reader tails a log by asking again from the end."""
        reply = self._request(
            "GET",
            f"{API}/jobs/{_ref(ref)}/logs",
            params={"rank": rank, "attempt": attempt, "offset": offset},
        )
        size_header = reply.headers.get("X-Log-Size", "")
        size = int(size_header) if size_header.isdigit() else offset + len(reply.content)
        number = reply.headers.get("X-Attempt", "")
        return LogChunk(reply.content, size, int(number) if number.isdigit() else None)

    def logs(
        self, ref: str | int, rank: int = 0, attempt: int | None = None, offset: int = 0
    ) -> tuple[str, int]:
        """(text from ``offset``, the log's whole size in bytes)."""
        chunk = self.log_chunk(ref, rank=rank, attempt=attempt, offset=offset)
        return chunk.text, chunk.size


def _ref(ref: str | int) -> str:
    """A job or node reference as one path segment (names are DNS-like; ids are digits)."""
    text = str(ref)
    if not text or "/" in text or text in {".", ".."}:
        raise ConfigError(f"{text!r} is not a job or node name or id")
    return text


def _detail(reply: httpx.Response) -> str:
    """The server's ``detail`` on one line: FastAPI gives a string, or a list for 422s."""
    try:
        body = reply.json()
    except ValueError:
        return " ".join(reply.text.split())[:300] or reply.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", []) if p not in ("body", "query"))
                parts.append(f"{where}: {item.get('msg', '')}" if where else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return " ".join(str(detail).split())


def _error_for(reply: httpx.Response, method: str, path: str) -> ApiError:
    status = reply.status_code
    detail = _detail(reply)
    if status == 401:
        return AuthError(
            f"the controller refused the request (401 {detail}): pass --token or set "
            f"{env.TOKEN} (a local cluster's admin token is found by itself)",
            status,
        )
    if status == 403:
        return AuthError(f"the controller refused the token (403 {detail})", status)
    if status == 404:
        if detail.lower() in {"not found", ""}:  # no such route: not our controller (or version)
            where = f"{reply.url.host}:{reply.url.port}"
            detail = f"{method} {path}: not found at {where} (is it an ironpod controller?)"
        return NotFoundError(detail, status)
    if status < 500:
        return BadRequestError(detail, status)
    return ServerError(f"the controller failed on {method} {path} ({status} {detail})", status)


# -- discovery


def ironpod_home() -> Path:
    """``$IRONPOD_HOME`` or ``~/.ironpod``: the local cluster and the CLI's defaults."""
    raw = os.environ.get(env.HOME)
    return Path(raw).expanduser() if raw else Path.home() / ".ironpod"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    return data if isinstance(data, dict) else None


def discover(url: str | None = None, token: str | None = None) -> tuple[str, str | None]:
    """(url, token) by the precedence in the module docstring."""
    home = ironpod_home()
    url = url or os.environ.get(env.URL) or None
    token = token or os.environ.get(env.TOKEN) or None
    if url is None:
        cluster = _read_json(home / "cluster.json")
        url = str(cluster["url"]) if cluster and cluster.get("url") else DEFAULT_URL
    if token is None and _is_loopback(url):
        tokens = _read_json(home / "controller" / "tokens.json")
        token = str(tokens["admin"]) if tokens and tokens.get("admin") else None
    return url, token


def _is_loopback(url: str) -> bool:
    try:
        host = httpx.URL(url).host
    except httpx.InvalidURL:
        return False
    return host in {"localhost", "::1"} or host.startswith("127.")


def client_from_env(url: str | None = None, token: str | None = None) -> IronpodClient:
    found_url, found_token = discover(url, token)
    return IronpodClient(found_url, found_token, ca_file=discover_ca(found_url))


def discover_ca(url: str) -> Path | None:
    """The CA an https:// controller is verified with: ``IRONPOD_CA_FILE``, else the local
    cluster's (for a loopback URL), else None (the system's trust store)."""
    if not url.startswith("https://"):
        return None
    given = os.environ.get(env.CA_FILE)
    if given:
        return Path(given)
    local = ironpod_home() / "controller" / "tls" / "ca.pem"
    return local if _is_loopback(url) and local.is_file() else None
