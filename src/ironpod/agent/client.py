"""The agent's side of the wire protocol (:mod:`ironpod.wire`): three POST routes over httpx.

Every failure is sorted into what the agent does about it: :class:`ControllerUnavailableError`
(connection refused, timeout, 5xx: the controller may be restarting, so retry and keep the
workers running), :class:`UnknownNodeError` (404 for our node id: register again) and
:class:`ControllerRejectedError` (any other 4xx: a bug or a wrong token; logged, retried slowly).
"""

from __future__ import annotations

import collections
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from ironpod.wire import (
    CertificateReply,
    CertificateRequest,
    Heartbeat,
    HeartbeatReply,
    NodeRegistration,
    RegistrationReply,
    WorkerEvent,
)

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

API = "/api/v1"
TIMEOUT_S = 5.0
#: Events kept while the controller is away; the oldest go first (heartbeats carry the state).
MAX_PENDING_EVENTS = 1000


class ControllerError(Exception):
    pass


class ControllerUnavailableError(ControllerError):
    """``retry_after_s``: the controller said when to try again (a 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnknownNodeError(ControllerError):
    pass


class ControllerRejectedError(ControllerError):
    pass


class Credential:
    """The node's credential, shared by the agent's clients: given at each registration,
    sent as the bearer token of its heartbeats and events (the join token only registers)."""

    def __init__(self, value: str = "") -> None:
        self.value = value


class ControllerClient:
    """One httpx client per calling thread's purpose (httpx clients are not shared across
    the heartbeat and event threads, so a slow heartbeat never queues an event behind it)."""

    def __init__(
        self,
        join_url: str,
        token: str,
        *,
        timeout_s: float = TIMEOUT_S,
        tls: ssl.SSLContext | None = None,
        credential: Credential | None = None,
    ) -> None:
        self.credential = credential or Credential()
        self._http = httpx.Client(
            base_url=join_url.rstrip("/") + API,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
            verify=tls if tls is not None else True,
        )

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def certificate(self, request: CertificateRequest) -> CertificateReply:
        """This node's serving certificate, signed by the cluster CA (TLS clusters)."""
        return _parse(CertificateReply, self._post("/nodes/certificate", request))

    def register(self, registration: NodeRegistration) -> RegistrationReply:
        return _parse(RegistrationReply, self._post("/nodes/register", registration))

    def heartbeat(self, node_id: int, heartbeat: Heartbeat) -> HeartbeatReply:
        path = f"/nodes/{node_id}/heartbeat"
        return _parse(HeartbeatReply, self._post(path, heartbeat, self.credential.value))

    def event(self, node_id: int, event: WorkerEvent) -> None:
        self._post(f"/nodes/{node_id}/events", event, self.credential.value)

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: BaseModel, bearer: str | None = None) -> bytes:
        """POST ``body``; as the node (``bearer``: its credential) or with the join token."""
        headers = {"Content-Type": "application/json"}
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        try:
            response = self._http.post(path, content=body.model_dump_json(), headers=headers)
        except httpx.HTTPError as exc:
            if _not_verified(exc):  # someone answers, but not with the cluster's certificate
                raise ControllerRejectedError(f"{path}: TLS: {exc}") from None
            raise ControllerUnavailableError(f"{path}: {type(exc).__name__}: {exc}") from None
        status = response.status_code
        if status >= 500:
            raise ControllerUnavailableError(
                f"{path}: HTTP {status}", _retry_after(response.headers.get("Retry-After"))
            )
        if status == 404:
            raise UnknownNodeError(f"{path}: HTTP 404: {response.text[:200]}")
        if status >= 400:
            raise ControllerRejectedError(f"{path}: HTTP {status}: {response.text[:200]}")
        return response.content


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the controller sends seconds, never an HTTP date)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds <= 300 else None


def _parse(model: type[M], content: bytes) -> M:
    try:
        return model.model_validate_json(content)
    except ValidationError as exc:
        raise ControllerRejectedError(f"unexpected reply: {exc}") from None


class EventSender:
    """Posts worker events the moment they happen, on a thread of its own, in order.

    While the controller is unreachable (or does not know this node yet) events wait and are
    retried; the heartbeat carries the same facts in the meantime. An event the controller
    rejects, or answers 404 to (an attempt it does not know), is dropped.
    """

    def __init__(
        self,
        client: ControllerClient,
        node_id: Callable[[], int | None],
        delivered: Callable[[WorkerEvent], None] = lambda event: None,
    ) -> None:
        self._client = client
        self._node_id = node_id
        self._delivered = delivered
        self._pending: collections.deque[WorkerEvent] = collections.deque(maxlen=MAX_PENDING_EVENTS)
        self._wake = threading.Condition()
        self._closed = False
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="agent-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send(self, event: WorkerEvent) -> None:
        with self._wake:
            self._pending.append(event)
            self._wake.notify()

    def wake(self) -> None:
        """Retry now (the controller answered a heartbeat, or we registered again)."""
        with self._wake:
            self._wake.notify()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every pending event went out (or ``timeout_s`` passed)."""
        deadline = time.monotonic() + timeout_s
        with self._wake:
            while self._pending and time.monotonic() < deadline:
                self._wake.wait(min(0.05, deadline - time.monotonic()))
            return not self._pending

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=TIMEOUT_S + 1)
        self._client.close()

    def _run(self) -> None:
        backoff = Backoff()
        while True:
            with self._wake:
                while not self._closed and not self._pending:
                    self._wake.wait()
                if self._closed:
                    return
                event = self._pending[0]
            node_id = self._node_id()
            try:
                if node_id is None:
                    raise ControllerUnavailableError("not registered yet")
                self._client.event(node_id, event)
                self.sent += 1
                self._delivered(event)
            except UnknownNodeError as exc:
                # An attempt (or node) the controller no longer knows: nobody will want it,
                # and retrying it would hold up the events behind it.
                log.warning(
                    "controller does not know %s event of rank %d: %s", event.kind, event.rank, exc
                )
            except ControllerRejectedError as exc:
                log.error(
                    "controller rejected %s event of rank %d: %s", event.kind, event.rank, exc
                )
            except ControllerError as exc:
                with self._wake:
                    if not self._closed:
                        self._wake.wait(backoff.next())
                log.debug("event not delivered yet: %s", exc)
                continue
            backoff.reset()
            with self._wake:
                if self._pending and self._pending[0] is event:
                    self._pending.popleft()


def _not_verified(exc: BaseException) -> bool:
    """Whether ``exc`` came from a certificate that did not verify (not a network failure)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Backoff:
    """Exponential retry delays, capped low: the controller is usually back within seconds.

    Each delay is jittered (between half and all of it): thousands of agents that lost the
    controller at the same moment must not come back at the same moment."""

    def __init__(self, first_s: float = 0.2, cap_s: float = 2.0) -> None:
        self._first = first_s
        self._cap = cap_s
        self._next = first_s

    def next(self, at_least_s: float | None = None) -> float:
        """The next delay; ``at_least_s``: what the controller asked for (Retry-After),
        then jittered upwards, to at most twice that."""
        delay, self._next = self._next, min(self._next * 2, self._cap)
        if at_least_s is not None and at_least_s > 0:
            return at_least_s * random.uniform(1.0, 2.0)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self._next = self._first
