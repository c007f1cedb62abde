"""The controller's REST API fuzzed against its own OpenAPI schema (schemathesis), and the
agent's HTTP routes fuzzed with hypothesis: no answer is a 5xx, and every answer is one the
schema documents (status, content type, body shape).

The controller holds a registered node and a running job, so ids resolve; each operation gets
schema-conforming (positive) and violating (negative) examples, sent as the admin, with the
join token, with the node's credential, and with no token at all.
"""

from __future__ import annotations

import collections
import http.client
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

from ironpod.agent.logs import LogServer
from ironpod.agent.snapshots import SnapshotStore
from ironpod.controller.api import create_app
from ironpod.controller.auth import load_or_create_tokens
from ironpod.controller.service import Controller, ControllerConfig

EXAMPLES = 12  # per operation, per generation mode, per credential
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    content_type_conformance,
]


class Fuzzed:
    def __init__(self, root: Path) -> None:
        self.tokens = load_or_create_tokens(root)
        controller = Controller(
            f"sqlite:///{root / 'ironpod.db'}", root, ControllerConfig(reserve_spares=0)
        )
        self.app = create_app(controller, self.tokens)
        client = TestClient(self.app)
        join = {"Authorization": f"Bearer {self.tokens.join}"}
        reply = client.post(
            "/api/v1/nodes/register",
            headers=join,
            json={
                "name": "n1", "hostname": "n1", "address": "127.0.0.1",
                "agent_url": "http://127.0.0.1:1", "agent_instance": "i1", "cpus": 2,
                "memory_bytes": 1 << 30, "agent_version": "test", "time_unix": 0.0,
            },
        )  # fmt: skip
        assert reply.status_code == 200, reply.text
        self.credential = reply.json()["credential"]
        admin = {"Authorization": f"Bearer {self.tokens.admin}"}
        spec = {"name": "fuzz", "command": ["python", "-c", "pass"], "env": {"A": "1"}}
        assert client.post("/api/v1/jobs", json=spec, headers=admin).status_code == 201
        controller.reconcile()
        self.schema = schemathesis.openapi.from_asgi("/openapi.json", self.app)

    def headers(self, who: str) -> dict[str, str]:
        token = {
            "admin": self.tokens.admin,
            "join": self.tokens.join,
            "node": self.credential,
            "none": None,
        }[who]
        return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Fuzzed:
    return Fuzzed(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("who", ["admin", "join", "node", "none"])
def test_the_api_never_answers_5xx_and_answers_as_documented(fuzzed: Fuzzed, who: str) -> None:
    statuses: collections.Counter[int] = collections.Counter()
    failures: dict[str, str] = {}
    operations = [result.ok() for result in fuzzed.schema.get_all_operations()]
    assert len(operations) >= 12  # jobs, nodes, events, logs, the agents' routes, healthz
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(operation, mode, fuzzed.headers(who), statuses, failures)
    print(f"{who}: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())
    assert sum(statuses.values()) >= len(operations) * EXAMPLES
    assert not any(code >= 500 for code in statuses)


def _fuzz(
    operation: Any,
    mode: GenerationMode,
    headers: dict[str, str],
    statuses: collections.Counter[int],
    failures: dict[str, str],
) -> None:
    label = f"{operation.label} ({mode.value})"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def probe(case: Any) -> None:
        response = case.call(headers=headers)
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except BaseException as exc:  # schemathesis's FailureGroup
            failures.setdefault(label, f"{response.status_code}: {exc}"[:800])

    try:
        probe()
    except Exception as exc:  # no example at all (GET /healthz has nothing to negate)
        if type(exc).__name__ != "Unsatisfiable":
            raise


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LogServer]:
    root = tmp_path_factory.mktemp("agent")
    store = SnapshotStore(root / "shm", budget_bytes=1 << 20, peer_tokens={7: "peer"})
    server = LogServer("127.0.0.1", 0, root / "logs", "logtoken", {"name": "fuzz"})
    server.serve_snapshots(store)
    server.start()
    yield server
    server.close()


_PATHS = st.one_of(
    st.sampled_from(
        [
            "/healthz",
            "/logs/1/0",
            "/snapshots/7/0/3",
            "/snapshots/7/announce/3",
            "/snapshots/7/reserve",
            "/snapshots/../../etc/passwd",
        ]
    ),
    st.lists(
        st.one_of(st.integers(-(2**70), 2**70).map(str), st.text(min_size=0, max_size=12)),
        min_size=1,
        max_size=5,
    ).map(lambda parts: "/" + "/".join(parts)),
)


@given(
    method=st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH"]),
    path=_PATHS,
    token=st.sampled_from(["", "peer", "logtoken", "x" * 300]),
    length=st.one_of(st.none(), st.integers(-5, 1 << 40).map(str), st.text(max_size=5)),
    body=st.binary(max_size=256),
)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_agents_routes_never_answer_5xx(
    agent_server: LogServer, method: str, path: str, token: str, length: str | None, body: bytes
) -> None:
    host, port = agent_server.url.removeprefix("http://").rsplit(":", 1)
    request = f"{method} {_quote(path)} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    if token:
        request += f"Authorization: Bearer {token}\r\n"
    if length is not None and length.isprintable() and "\r" not in length:
        request += f"Content-Length: {length}\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request.encode() + b"\r\n" + body)
        sock.shutdown(socket.SHUT_WR)  # a body shorter than its length: the server must not wait
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status < 500, (method, path, response.status, response.read()[:200])


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")
