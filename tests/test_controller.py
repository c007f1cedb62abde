"""The controller's decisions through its real API and SQL (SQLite), agents played by the test.

End-to-end tests with real agents and workers live in test_cluster.py; here each decision is
driven step by step, so every branch of the recovery policy is checked deterministically.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from ironpod.controller.api import create_app
from ironpod.controller.auth import load_or_create_tokens
from ironpod.controller.service import Controller, ControllerConfig
from ironpod.states import JOB_TRANSITIONS, IllegalTransitionError, JobState, check_transition

POSTGRES_ENV = "IRONPOD_TEST_POSTGRES_URL"
SPEC = {"apiVersion": "ironpod/v1", "name": "train", "nodes": 1, "command": ["python", "x.py"]}


PASS = {"check": "system.disk_free", "status": "pass", "target": "/", "value": 10.0}
FAIL = {
    "check": "compute.matmul",
    "status": "fail",
    "target": "gpu0",
    "value": 1.0,
    "threshold": 5.0,
    "unit": "TFLOP/s",
}


def fresh_postgres_database() -> str:
    """A new empty database on the test server, dropped at exit."""
    import atexit
    import uuid

    import sqlalchemy

    admin_url = os.environ[POSTGRES_ENV]
    name = f"ironpod_t_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"create database {name}"))

    def drop() -> None:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f"drop database if exists {name} with (force)"))
        engine.dispose()

    atexit.register(drop)
    return admin_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ironpod.db'}"
    if not os.environ.get(POSTGRES_ENV):
        pytest.skip(f"no PostgreSQL server: {POSTGRES_ENV} is not set (scripts/services.sh)")
    return fresh_postgres_database()


class Clock:
    """The controller's clock, moved by the test: decisions are checked without sleeping."""

    def __init__(self, start: float | None = None) -> None:
        self.t = time.time() if start is None else start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Cluster:
    """A controller and the HTTP client of a person (admin) and of agents (join token)."""

    #: Every controller a test made: their connection pools are closed after the test (a
    #: PostgreSQL server has 100 connection slots, and two test workers share them).
    made: ClassVar[list[Controller]] = []

    def __init__(
        self, state_dir: Path, db_url: str, clock: Clock | None = None, **config: Any
    ) -> None:
        self.state_dir = state_dir
        self.url = db_url
        self.clock = clock or Clock()
        self.tokens = load_or_create_tokens(state_dir)
        self.controller = Controller(
            db_url, state_dir, ControllerConfig(**config), clock=self.clock
        )
        Cluster.made.append(self.controller)
        client = TestClient(create_app(self.controller, self.tokens))
        self.http = client
        self.admin = {"Authorization": f"Bearer {self.tokens.admin}"}
        self.agent = {"Authorization": f"Bearer {self.tokens.join}"}
        self.instances: dict[str, str] = {}
        #: Each node's credential, by name (as its agent keeps it in its work directory).
        self.credentials: dict[str, str] = {}
        self.node_ids: dict[int, str] = {}

    def as_node(self, node_id: int) -> dict[str, str]:
        """The headers of node ``node_id``'s own calls (heartbeats, events)."""
        return {"Authorization": f"Bearer {self.credentials[self.node_ids[node_id]]}"}

    def register(
        self, name: str, instance: str = "i1", health: list[dict[str, Any]] | None = None
    ) -> int:
        self.instances[name] = instance
        body = {
            "name": name,
            "hostname": name,
            "address": "127.0.0.1",
            "agent_url": "http://127.0.0.1:1",
            "agent_instance": instance,
            "cpus": 2,
            "memory_bytes": 1 << 30,
            "agent_version": "test",
            "time_unix": self.clock(),
            **({"health": health} if health is not None else {}),
            **({"credential": self.credentials[name]} if name in self.credentials else {}),
        }
        reply = self.http.post("/api/v1/nodes/register", json=body, headers=self.agent)
        assert reply.status_code == 200, reply.text
        self.credentials[name] = reply.json()["credential"]
        self.node_ids[int(reply.json()["node_id"])] = name
        return int(reply.json()["node_id"])

    def heartbeat(
        self,
        node_id: int,
        name: str,
        workers: list[dict[str, Any]] | None = None,
        health: list[dict[str, Any]] | None = None,
        snapshots: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "agent_instance": self.instances[name],
            "time_unix": self.clock(),
            "workers": workers or [],
            "snapshots": snapshots or [],
        }
        if health is not None:
            body["health"] = health
        reply = self.http.post(
            f"/api/v1/nodes/{node_id}/heartbeat", json=body, headers=self.as_node(node_id)
        )
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def event(self, node_id: int, attempt_id: int, rank: int, kind: str, **fields: Any) -> None:
        body = {
            "attempt_id": attempt_id,
            "rank": rank,
            "kind": kind,
            "time_unix": self.clock(),
            **fields,
        }
        reply = self.http.post(
            f"/api/v1/nodes/{node_id}/events", json=body, headers=self.as_node(node_id)
        )
        assert reply.status_code == 200, reply.text

    def submit(self, **overrides: Any) -> int:
        reply = self.http.post("/api/v1/jobs", json={**SPEC, **overrides}, headers=self.admin)
        assert reply.status_code == 201, reply.text
        return int(reply.json()["id"])

    def job(self, ref: int | str) -> dict[str, Any]:
        reply = self.http.get(f"/api/v1/jobs/{ref}", headers=self.admin)
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def nodes(self) -> dict[str, dict[str, Any]]:
        reply = self.http.get("/api/v1/nodes", headers=self.admin)
        return {n["name"]: n for n in reply.json()}

    def events(self, job_id: int) -> list[dict[str, Any]]:
        reply = self.http.get("/api/v1/events", params={"job": job_id}, headers=self.admin)
        return list(reply.json())


def running(attempt_id: int, rank: int = 0, step: int | None = None) -> dict[str, Any]:
    return {
        "attempt_id": attempt_id,
        "rank": rank,
        "local_rank": rank,
        "pid": 1000 + rank,
        "state": "running",
        "started_unix": time.time(),
        "last_step": step,
        "last_progress_unix": time.time() if step else None,
        "median_step_s": 0.1 if step else None,
    }


@pytest.fixture(autouse=True)
def _close_pools() -> Iterator[None]:
    yield
    while Cluster.made:
        Cluster.made.pop().engine.dispose()


@pytest.fixture
def cluster(tmp_path: Path, db_url: str) -> Cluster:
    return Cluster(tmp_path / "controller", db_url, reserve_spares=0)


def test_tokens_are_private_and_required(cluster: Cluster) -> None:
    assert (cluster.state_dir / "tokens.json").stat().st_mode & 0o777 == 0o600
    assert cluster.http.get("/api/v1/jobs").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert cluster.http.get("/api/v1/jobs", headers=wrong).status_code == 403
    assert cluster.http.get("/api/v1/jobs", headers=cluster.agent).status_code == 403
    assert cluster.http.get("/api/v1/jobs", headers=cluster.admin).status_code == 200
    register = cluster.http.post("/api/v1/nodes/register", json={}, headers=wrong)
    assert register.status_code == 403
    assert "/api/v1/jobs" in cluster.http.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**SPEC, "nodez": 2}, "nodez"),
        ({**SPEC, "nodes": "two"}, "nodes"),
        ({**SPEC, "restart": {"max_restarts": -1}}, "restart.max_restarts"),
        ({**SPEC, "command": []}, "command"),
        ({**SPEC, "name": "Bad_Name"}, "name"),
        ({"name": "x"}, "command"),
        ({**SPEC, "command": ["echo", "a\u0000b"]}, "command[1] holds a NUL byte"),
        ({**SPEC, "command": ["", "x"]}, "the program (command[0]) is empty"),
        ({**SPEC, "env": {"A": "a\u0000"}}, "the value of A holds a NUL byte"),
        ({**SPEC, "env": {f"V{i}": "x" * 100_000 for i in range(11)}}, "command and env take"),
        ({**SPEC, "restart": {"window_s": "Infinity"}}, "restart.window_s"),
    ],
)
def test_bad_specs_get_422_naming_the_field(
    cluster: Cluster, body: dict[str, Any], field: str
) -> None:
    reply = cluster.http.post("/api/v1/jobs", json=body, headers=cluster.admin)
    assert reply.status_code == 422
    assert field in reply.json()["detail"]


def test_bad_agent_bodies_get_4xx_not_500(cluster: Cluster) -> None:
    reply = cluster.http.post("/api/v1/nodes/register", json={"name": ""}, headers=cluster.agent)
    assert reply.status_code == 422
    node = cluster.register("n1")
    bad = {"attempt_id": 999, "rank": 0, "kind": "exited", "time_unix": 0}
    reply = cluster.http.post(
        f"/api/v1/nodes/{node}/events", json=bad, headers=cluster.as_node(node)
    )
    assert reply.status_code == 404
    reply = cluster.http.post(
        f"/api/v1/nodes/{node}/events", json={"kind": "nope"}, headers=cluster.as_node(node)
    )
    assert reply.status_code == 422
    assert cluster.http.get("/api/v1/jobs/nope", headers=cluster.admin).status_code == 404


def test_what_crashed_the_api_is_a_4xx_or_507(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 500s of the probe (issue 10, item 7), each now a status naming what is wrong."""
    get = functools.partial(cluster.http.get, headers=cluster.admin)
    huge = "99999999999999999999"  # over SQLite's 64-bit integers
    assert get(f"/api/v1/jobs/{huge}").status_code == 404
    assert get("/api/v1/jobs/%C2%B2").status_code == 404  # '²' is a digit to str.isdigit
    assert get("/api/v1/events", params={"after": huge}).status_code == 422
    assert get("/api/v1/events", params={"limit": -1}).status_code == 422
    job = cluster.submit()
    assert get(f"/api/v1/jobs/{job}/logs", params={"attempt": huge}).status_code == 422
    node = cluster.register("n1")
    event = {"attempt_id": int(huge), "rank": 0, "kind": "exited", "time_unix": 0}
    reply = cluster.http.post(
        f"/api/v1/nodes/{node}/events", json=event, headers=cluster.as_node(node)
    )
    assert reply.status_code == 422 and "out of range" in reply.json()["detail"]
    for _ in range(2):  # `ironpod drain node-0` twice
        reply = cluster.http.post("/api/v1/nodes/n1/drain", headers=cluster.admin)
        assert reply.status_code == 200 and reply.json()["state"] == "drained", reply.text
    # bodies: too large (refused before it is read), and none read without a token
    big = {**SPEC, "env": {"BIG": "x" * (5 << 20)}}
    reply = cluster.http.post("/api/v1/jobs", json=big, headers=cluster.admin)
    assert reply.status_code == 413
    assert cluster.http.post("/api/v1/jobs", json=SPEC).status_code == 401

    def disk_full(*_: Any, **__: Any) -> None:
        raise OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(cluster.controller, "submit", disk_full)
    reply = cluster.http.post("/api/v1/jobs", json=SPEC, headers=cluster.admin)
    assert reply.status_code == 507, reply.text
    assert "disk is full" in reply.json()["detail"]
    assert str(cluster.state_dir) in reply.json()["detail"]


def test_a_newer_agent_with_unknown_fields_is_still_heard(cluster: Cluster) -> None:
    """Rolling upgrades: an agent one version ahead sends fields this controller does not
    know; they are ignored, the heartbeat counts (a refusal would cut the node off)."""
    node = cluster.register("n1")
    body = {
        "agent_instance": cluster.instances["n1"],
        "time_unix": time.time(),
        "workers": [],
        "from_the_future": {"x": 1},
    }
    reply = cluster.http.post(
        f"/api/v1/nodes/{node}/heartbeat", json=body, headers=cluster.as_node(node)
    )
    assert reply.status_code == 200, reply.text
    body["time_unix"] = "yesterday"  # a known field with a wrong value is still refused
    reply = cluster.http.post(
        f"/api/v1/nodes/{node}/heartbeat", json=body, headers=cluster.as_node(node)
    )
    assert reply.status_code == 422 and "time_unix" in reply.text


def test_the_join_token_only_registers_a_node_has_its_own_credential(cluster: Cluster) -> None:
    """Issue 10, item 3 of what was seen: with the join token alone, a forged event failed
    any job, a heartbeat with a node's instance id (from the agent's /healthz) returned its
    assignment with the job's env, and re-registering a live node's name spent a restart."""
    a, b = cluster.register("a"), cluster.register("b")
    job = cluster.submit(env={"DB_PASSWORD": "hunter2"})
    cluster.controller.reconcile()
    reply = cluster.heartbeat(a, "a")
    attempt = reply["assignment"]["attempt_id"]
    # peers of a job get its peer token (their snapshot routes); a node with no part in it not
    assert list(reply["peer_tokens"]) == [str(job)]
    assert cluster.heartbeat(b, "b")["peer_tokens"] == {}
    assert cluster.tokens.join not in reply["peer_tokens"].values()
    hb = {"agent_instance": cluster.instances["a"], "time_unix": cluster.clock(), "workers": []}
    with_join = cluster.http.post(f"/api/v1/nodes/{a}/heartbeat", json=hb, headers=cluster.agent)
    assert with_join.status_code == 200 and with_join.json()["reregister"] is True
    assert "hunter2" not in with_join.text
    event = {"attempt_id": attempt, "rank": 0, "kind": "exited", "time_unix": 0, "exit_code": 1}
    for headers in (cluster.agent, cluster.as_node(b)):  # the join token; another node's
        reply = cluster.http.post(f"/api/v1/nodes/{a}/events", json=event, headers=headers)
        assert reply.status_code == 403, reply.text
    reply = cluster.http.post(f"/api/v1/nodes/{b}/events", json=event, headers=cluster.as_node(b))
    assert reply.status_code == 403 and "does not run rank 0" in reply.text  # not b's rank
    assert cluster.job(job)["state"] in ("starting", "running")
    # a live node's name is not taken over without its credential
    stolen = dict(cluster.credentials)
    del cluster.credentials["a"]
    body = {
        "name": "a",
        "hostname": "evil",
        "address": "10.6.6.6",
        "agent_url": "http://10.6.6.6:1",
        "agent_instance": "evil",
        "cpus": 2,
        "memory_bytes": 1,
        "agent_version": "x",
        "time_unix": cluster.clock(),
    }
    reply = cluster.http.post("/api/v1/nodes/register", json=body, headers=cluster.agent)
    assert reply.status_code == 409 and "held by a live agent" in reply.text
    assert cluster.job(job)["restarts"] == 0
    # its own agent, restarted, proves it with the credential and gets a new one
    cluster.credentials = stolen
    old = cluster.credentials["a"]
    assert cluster.register("a", instance="i2") == a and cluster.credentials["a"] != old
    hb["agent_instance"] = "i2"
    stale = {"Authorization": f"Bearer {old}"}
    reply = cluster.http.post(f"/api/v1/nodes/{a}/heartbeat", json=hb, headers=stale)
    assert reply.json()["reregister"] is True
    # and a node lost for good may be joined again from scratch
    cluster.clock.advance(60)
    del cluster.credentials["a"]
    assert cluster.register("a", instance="i3") == a


def test_job_runs_to_success(cluster: Cluster) -> None:
    node = cluster.register("n1")
    job = cluster.submit()
    cluster.controller.reconcile()
    assignment = cluster.heartbeat(node, "n1")["assignment"]
    assert assignment["ranks"] == [0] and assignment["world_size"] == 1
    assert assignment["env"]["IRONPOD_JOB_ID"] == str(job)
    attempt = assignment["attempt_id"]
    cluster.heartbeat(node, "n1", [running(attempt, step=5)])
    assert cluster.job(job)["state"] == "running"
    cluster.event(node, attempt, 0, "exited", exit_code=0)
    view = cluster.job(job)
    assert view["state"] == "succeeded"
    assert cluster.nodes()["n1"]["state"] == "ready"
    assert cluster.heartbeat(node, "n1")["assignment"] is None


def test_signals_restart_in_place_never_quarantine_and_run_until_max_restarts(
    cluster: Cluster,
) -> None:
    """Issue 9: a DDP job on one node, ranks SIGKILLed at steps 79 and 135. A process killed by
    a signal is evidence about the process: the only node stays in service and the job uses
    every restart it asked for, then ends with end_kind restart_limit."""
    node = cluster.register("vm-0")
    job = cluster.submit(nproc_per_node=2, restart={"max_restarts": 3})
    cluster.controller.reconcile()
    for step in (79, 135, 20, 40):
        attempt = cluster.job(job)["attempts"][-1]
        assert attempt["node_ids"] == [node]
        cluster.heartbeat(node, "vm-0", [running(attempt["id"], r, step) for r in (0, 1)])
        cluster.clock.advance(1)
        cluster.event(node, attempt["id"], 1, "exited", signal=9, exit_code=-9)
        assert cluster.nodes()["vm-0"]["state"] == "ready"
        cluster.heartbeat(node, "vm-0")
        cluster.controller.reconcile()
    view = cluster.job(job)
    assert len(view["attempts"]) == 4  # the first run and its 3 restarts, all in place
    assert view["state"] == "failed" and view["end_kind"] == "restart_limit"
    assert view["reason"].startswith("restart limit: 3 restarts within 3600 s; last: crash: ")
    assert cluster.nodes()["vm-0"]["recent_failures"] == 0
    faults = [e for e in cluster.events(job) if e["kind"] == "fault_detected"]
    assert faults[0]["cause"] == "crash: rank 1 on vm-0 killed by signal 9"
    assert all(e["data"]["nodes"] == [] for e in faults)


def restart_agent(cluster: Cluster, name: str) -> None:
    """The node's agent comes back with a new instance: evidence about the node."""
    cluster.register(name, instance=cluster.instances[name] + "+")


def test_a_node_blamed_twice_with_a_spare_is_quarantined_and_the_job_moves(
    tmp_path: Path, db_url: str
) -> None:
    cluster = Cluster(tmp_path / "c", db_url, reserve_spares=1)
    a, b = cluster.register("a", health=[PASS]), cluster.register("b")
    job = cluster.submit(restart={"node_failures_to_quarantine": 2})
    cluster.controller.reconcile()
    first = cluster.job(job)["attempts"][0]
    assert first["node_ids"] == [a]  # b is held back as the spare
    restart_agent(cluster, "a")
    assert cluster.job(job)["state"] == "recovering"
    cluster.heartbeat(a, "a")  # a proves it is alive after the failure
    cluster.heartbeat(b, "b")
    cluster.controller.reconcile()
    second = cluster.job(job)["attempts"][1]
    assert second["node_ids"] == [a]  # in place: one failure is not enough to move
    cluster.clock.advance(5)
    restart_agent(cluster, "a")
    node = cluster.nodes()["a"]
    assert node["state"] == "quarantined" and node["recheck_unix"] == cluster.clock()
    assert node["reason"].endswith("b takes its place, deep recheck pending")
    assert cluster.heartbeat(a, "a")["health_recheck"] is True
    cluster.heartbeat(b, "b")
    cluster.controller.reconcile()
    third = cluster.job(job)["attempts"][2]
    assert third["node_ids"] == [b]
    causes = [e["cause"] for e in cluster.events(job) if e["kind"] == "fault_detected"]
    assert causes == ["agent restarted on node a", "agent restarted on node a"]
    # The deep recheck passes: a is back (as the spare now), its failures still on its record.
    cluster.clock.advance(30)
    cluster.heartbeat(a, "a", health=[PASS])
    node = cluster.nodes()["a"]
    assert node["state"] == "ready" and node["recheck_unix"] is None
    assert node["recent_failures"] == 2


def blame_twice_without_a_spare(cluster: Cluster, **register: Any) -> tuple[int, int]:
    """A one-node job whose node's agent restarts twice: the node turns suspect."""
    node = cluster.register("n1", **register)
    job = cluster.submit(restart={"node_failures_to_quarantine": 2})
    cluster.controller.reconcile()
    for _ in range(2):
        cluster.clock.advance(1)
        restart_agent(cluster, "n1")
        cluster.heartbeat(node, "n1")
        cluster.controller.reconcile()
    return node, job


def test_blamed_twice_without_a_spare_restarts_in_place_when_the_deep_recheck_passes(
    cluster: Cluster,
) -> None:
    node, job = blame_twice_without_a_spare(cluster, health=[PASS])
    n1 = cluster.nodes()["n1"]
    assert n1["state"] == "suspect" and n1["reason"].endswith("no spare: deep recheck pending")
    view = cluster.job(job)
    assert len(view["attempts"]) == 2 and view["state"] == "recovering"
    assert view["reason"] == "waiting for the deep health recheck of n1"
    assert cluster.heartbeat(node, "n1")["health_recheck"] is True
    cluster.clock.advance(20)
    cluster.heartbeat(node, "n1", health=[PASS])
    assert cluster.nodes()["n1"]["state"] == "ready"
    cluster.controller.reconcile()
    view = cluster.job(job)
    assert len(view["attempts"]) == 3 and view["attempts"][-1]["node_ids"] == [node]
    kinds = [e["kind"] for e in cluster.events(job)]
    assert "node_recheck_requested" in kinds


def test_blamed_twice_without_a_spare_is_quarantined_when_the_deep_recheck_fails(
    cluster: Cluster,
) -> None:
    node, job = blame_twice_without_a_spare(cluster, health=[PASS])
    cluster.clock.advance(20)
    cluster.heartbeat(node, "n1", health=[FAIL])
    n1 = cluster.nodes()["n1"]
    assert n1["state"] == "quarantined"
    assert n1["reason"].startswith("unhealthy: compute.matmul gpu0: 1 TFLOP/s (threshold 5")
    cluster.controller.reconcile()
    view = cluster.job(job)
    assert view["state"] == "recovering" and view["end_kind"] == ""
    assert view["reason"] == "waiting for 1 healthy node(s)"  # its node is not usable
    # The health policy's own recheck returns the node; the job restarts on it.
    cluster.clock.advance(30)
    cluster.heartbeat(node, "n1", health=[PASS])
    cluster.controller.reconcile()
    assert cluster.job(job)["attempts"][-1]["node_ids"] == [node]
    cluster.http.post(f"/api/v1/jobs/{job}/cancel", headers=cluster.admin)
    assert cluster.job(job)["end_kind"] == "cancelled"
    events = cluster.http.get("/api/v1/events", params={"node": "n1"}, headers=cluster.admin)
    assert [e["kind"] for e in events.json()].count("node_unhealthy") == 1


def test_a_failed_check_on_a_node_at_its_failure_limit_stays_a_health_quarantine(
    cluster: Cluster,
) -> None:
    """The health policy took the node out already: escalation leaves it to that policy."""
    node = cluster.register("n1", health=[PASS])
    job = cluster.submit(restart={"node_failures_to_quarantine": 1})
    cluster.controller.reconcile()
    cluster.heartbeat(node, "n1", health=[FAIL])
    n1 = cluster.nodes()["n1"]
    assert n1["state"] == "quarantined" and n1["recheck_unix"] is None
    cluster.controller.reconcile()
    assert cluster.job(job)["reason"] == "waiting for 1 healthy node(s)"
    cluster.clock.advance(30)
    cluster.heartbeat(node, "n1", health=[PASS])
    cluster.controller.reconcile()
    assert len(cluster.job(job)["attempts"]) == 2


def test_a_suspect_node_without_health_checks_is_trusted_at_once(cluster: Cluster) -> None:
    """A node whose agent runs no checks (launch, local clusters) can give no verdict: the job
    restarts in place on it rather than wait for one that cannot come."""
    node, job = blame_twice_without_a_spare(cluster)
    view = cluster.job(job)
    assert len(view["attempts"]) == 3 and view["attempts"][-1]["node_ids"] == [node]
    assert cluster.nodes()["n1"]["state"] == "busy"
    verdicts = [e for e in cluster.events(job) if e["kind"] == "node_recheck"]
    assert verdicts == []  # node events carry no job id
    events = cluster.http.get("/api/v1/events", params={"node": "n1"}, headers=cluster.admin)
    recheck = [e for e in events.json() if e["kind"] == "node_recheck"]
    assert recheck[0]["data"]["verdict"] == "none"


def test_a_suspect_node_whose_recheck_never_comes_is_trusted_after_the_timeout(
    tmp_path: Path, db_url: str
) -> None:
    cluster = Cluster(tmp_path / "c", db_url, deep_recheck_timeout_s=60)
    node, job = blame_twice_without_a_spare(cluster, health=[PASS])
    for _ in range(5):  # heartbeats keep coming, health runs do not
        cluster.clock.advance(11)
        cluster.heartbeat(node, "n1")
        cluster.controller.reconcile()
    assert cluster.nodes()["n1"]["state"] == "suspect"
    cluster.clock.advance(11)
    cluster.heartbeat(node, "n1")
    cluster.controller.reconcile()
    assert cluster.job(job)["attempts"][-1]["node_ids"] == [node]
    assert cluster.nodes()["n1"]["state"] == "busy"


def test_suspect_state_survives_a_controller_restart(tmp_path: Path, db_url: str) -> None:
    cluster = Cluster(tmp_path / "c", db_url)
    node, job = blame_twice_without_a_spare(cluster, health=[PASS])
    cluster.controller.engine.dispose()
    again = Cluster(tmp_path / "c", db_url, clock=cluster.clock)
    again.instances = cluster.instances
    again.credentials, again.node_ids = cluster.credentials, cluster.node_ids
    assert again.heartbeat(node, "n1")["health_recheck"] is True
    again.controller.reconcile()
    assert again.nodes()["n1"]["state"] == "suspect"
    again.clock.advance(5)
    again.heartbeat(node, "n1", health=[PASS])
    again.controller.reconcile()
    assert again.job(job)["attempts"][-1]["node_ids"] == [node]


def test_a_command_that_cannot_start_fails_at_once(cluster: Cluster) -> None:
    node = cluster.register("n1")
    job = cluster.submit(command=["pytho", "x.py"], workdir="/x/y")
    cluster.controller.reconcile()
    attempt = cluster.job(job)["attempts"][0]["id"]
    detail = "cannot start 'pytho' in /x/y: No such file or directory"
    cluster.event(node, attempt, 0, "exited", exit_code=127, detail=detail)
    view = cluster.job(job)
    assert view["state"] == "failed" and view["end_kind"] == "no_restart"
    assert view["end_exit_code"] == 127
    assert view["reason"] == ("cannot start: 'pytho' in /x/y: No such file or directory (exit 127)")
    cluster.controller.reconcile()
    assert len(cluster.job(job)["attempts"]) == 1
    # A shell command that exits 127 (the shell's "not found") counts the same.
    shell = cluster.submit(name="shell", command=["pytho x.py"], shell=True)
    cluster.controller.reconcile()
    attempt = cluster.job(shell)["attempts"][0]["id"]
    cluster.event(node, attempt, 0, "exited", exit_code=127)
    view = cluster.job(shell)
    assert view["end_kind"] == "no_restart"
    assert (
        view["reason"] == "cannot start: 'pytho x.py' not found (exit 127) in the agent's workdir"
    )


def test_three_identical_failures_before_progress_end_the_job(cluster: Cluster) -> None:
    node = cluster.register("n1")
    job = cluster.submit()
    for _ in range(3):
        cluster.heartbeat(node, "n1")
        cluster.controller.reconcile()
        attempt = cluster.job(job)["attempts"][-1]["id"]
        cluster.event(
            node,
            attempt,
            0,
            "exited",
            exit_code=1,
            error="ModuleNotFoundError: No module named 'x'",
        )
    cluster.controller.reconcile()
    view = cluster.job(job)
    assert len(view["attempts"]) == 3
    assert view["state"] == "failed" and view["end_kind"] == "no_progress"
    assert view["reason"].startswith("no progress: 3 attempts in a row failed the same way")
    assert view["attempts"][0]["end_cause"] == (
        "crash: rank 0 on n1 exited with code 1: ModuleNotFoundError: No module named 'x'"
    )


def test_a_failure_after_progress_resets_the_count(cluster: Cluster) -> None:
    node = cluster.register("n1")
    job = cluster.submit(restart={"max_failures_without_progress": 2})
    for progress in (False, True, False):
        cluster.heartbeat(node, "n1")
        cluster.controller.reconcile()
        attempt = cluster.job(job)["attempts"][-1]["id"]
        if progress:
            cluster.heartbeat(node, "n1", [running(attempt, step=3)])
        cluster.event(node, attempt, 0, "exited", exit_code=1, error="ValueError: bad shape")
    cluster.heartbeat(node, "n1")
    cluster.controller.reconcile()
    view = cluster.job(job)
    assert view["state"] == "starting" and len(view["attempts"]) == 4  # streak of 1 < 2
    attempt = view["attempts"][-1]["id"]
    cluster.event(node, attempt, 0, "exited", exit_code=1, error="ValueError: bad shape")
    cluster.controller.reconcile()
    assert cluster.job(job)["end_kind"] == "no_progress"


def test_a_python_error_restarts_without_blaming_the_node(cluster: Cluster) -> None:
    node = cluster.register("n1")
    job = cluster.submit(restart={"node_failures_to_quarantine": 1})
    cluster.controller.reconcile()
    attempt = cluster.job(job)["attempts"][0]["id"]
    cluster.event(node, attempt, 0, "exited", exit_code=1)
    assert cluster.nodes()["n1"]["state"] == "ready"
    assert cluster.nodes()["n1"]["recent_failures"] == 0
    cluster.heartbeat(node, "n1")
    cluster.controller.reconcile()
    assert len(cluster.job(job)["attempts"]) == 2


def test_a_hang_blames_the_rank_that_fell_behind(tmp_path: Path, db_url: str) -> None:
    cluster = Cluster(tmp_path / "c", db_url)
    a, b = cluster.register("a"), cluster.register("b")
    job = cluster.submit(nodes=2, restart={"node_failures_to_quarantine": 1})
    cluster.controller.reconcile()
    attempt = cluster.job(job)["attempts"][0]
    first, second = attempt["node_ids"]
    names = {a: "a", b: "b"}
    cluster.heartbeat(first, names[first], [running(attempt["id"], rank=0, step=40)])
    cluster.heartbeat(second, names[second], [running(attempt["id"], rank=1, step=41)])
    cluster.event(second, attempt["id"], 1, "hung", detail="no progress for 5 s")
    nodes = cluster.nodes()
    # Rank 0 stopped at step 40: its node is blamed; with no spare it awaits a deep recheck.
    assert nodes[names[first]]["state"] == "suspect"
    assert nodes[names[second]]["state"] == "ready"
    fault = next(e for e in cluster.events(job) if e["kind"] == "fault_detected")
    assert fault["data"]["nodes"] == [names[first]]


def test_hang_report_fails_the_attempt(cluster: Cluster) -> None:
    node = cluster.register("n1")
    job = cluster.submit()
    cluster.controller.reconcile()
    attempt = cluster.job(job)["attempts"][0]["id"]
    cluster.event(node, attempt, 0, "hung", detail="no progress for 31 s")
    view = cluster.job(job)
    assert view["state"] == "recovering"
    assert view["attempts"][0]["end_cause"].startswith("hang: rank 0 on n1")


def test_lost_node_is_replaced_and_a_job_without_nodes_waits(tmp_path: Path, db_url: str) -> None:
    cluster = Cluster(tmp_path / "c", db_url, node_lost_after_s=0.2)
    a, b = cluster.register("a"), cluster.register("b")
    job = cluster.submit(nodes=2)
    cluster.controller.reconcile()
    attempt = cluster.job(job)["attempts"][0]
    cluster.clock.advance(0.3)
    cluster.heartbeat(b, "b")  # only b stays alive
    cluster.controller.reconcile()
    assert cluster.nodes()["a"]["state"] == "lost"
    view = cluster.job(job)
    assert view["state"] == "recovering" and view["attempts"][0]["end_cause"].startswith(
        "node lost: a"
    )
    assert attempt["state"] == "starting"
    cluster.clock.advance(0.3)
    cluster.heartbeat(b, "b")
    cluster.controller.reconcile()
    assert cluster.job(job)["reason"] == "waiting for 1 healthy node(s)"
    cluster.register("c")
    cluster.controller.reconcile()
    nodes = cluster.job(job)["attempts"][1]["node_ids"]
    assert a not in nodes and b in nodes and len(nodes) == 2


def test_a_node_silent_since_the_failure_is_no_restore_source(tmp_path: Path, db_url: str) -> None:
    """A crash that is the first sign of a dead node: the plan must not send a rank to it."""
    cluster = Cluster(
        tmp_path / "c", db_url, node_lost_after_s=30, heartbeat_interval_s=1, reserve_spares=0
    )
    a, b = cluster.register("a"), cluster.register("b")
    job = cluster.submit(nodes=2)
    cluster.controller.reconcile()
    attempt = cluster.job(job)["attempts"][0]["id"]

    def held(rank: int, step: int, kind: str = "slot") -> dict[str, Any]:
        return {"job_id": job, "rank": rank, "step": step, "kind": kind, "nbytes": 8}

    # Step 6 is replicated nowhere yet; step 4 is on both nodes for both ranks.
    cluster.heartbeat(
        a, "a", [running(attempt, 0, 6)], snapshots=[held(0, 4), held(0, 6), held(1, 4, "replica")]
    )
    cluster.heartbeat(
        b, "b", [running(attempt, 1, 6)], snapshots=[held(1, 4), held(1, 6), held(0, 4, "replica")]
    )
    cluster.clock.advance(0.5)
    cluster.event(a, attempt, 0, "exited", exit_code=1)  # b's agent died with its rank
    c = cluster.register("c")
    cluster.clock.advance(3)  # past the wait for b's heartbeat, well before b is lost
    cluster.heartbeat(a, "a", snapshots=[held(0, 4), held(0, 6), held(1, 4, "replica")])
    cluster.heartbeat(c, "c")
    cluster.controller.reconcile()
    again = cluster.job(job)["attempts"][1]
    assert b not in again["node_ids"]
    assert again["restore"]["step"] == 4, again["restore"]  # not 6, whose rank 1 only b had


def test_agent_restart_fails_its_attempt(cluster: Cluster) -> None:
    node = cluster.register("n1", instance="first")
    job = cluster.submit()
    cluster.controller.reconcile()
    cluster.register("n1", instance="second")
    view = cluster.job(job)
    assert view["attempts"][0]["end_cause"] == "agent restarted on node n1"
    stale = {"agent_instance": "first", "time_unix": time.time(), "workers": []}
    reply = cluster.http.post(
        f"/api/v1/nodes/{node}/heartbeat", json=stale, headers=cluster.as_node(node)
    )
    assert reply.json()["reregister"] is True


def test_restart_limit_and_no_restart_exit_codes(cluster: Cluster) -> None:
    node = cluster.register("n1")
    job = cluster.submit(restart={"max_restarts": 1, "node_failures_to_quarantine": 5})
    for _ in range(2):
        cluster.heartbeat(node, "n1")
        cluster.controller.reconcile()
        attempt = cluster.job(job)["attempts"][-1]["id"]
        cluster.event(node, attempt, 0, "exited", exit_code=1)
    cluster.heartbeat(node, "n1")
    cluster.controller.reconcile()
    view = cluster.job(job)
    assert view["state"] == "failed" and view["end_kind"] == "restart_limit"

    other = cluster.submit(name="other")
    cluster.controller.reconcile()
    attempt = cluster.job(other)["attempts"][-1]["id"]
    cluster.event(node, attempt, 0, "exited", exit_code=2)
    view = cluster.job(other)
    assert view["state"] == "failed" and view["end_kind"] == "no_restart"
    assert view["end_exit_code"] == 2


def test_controller_restart_keeps_every_record(tmp_path: Path, db_url: str) -> None:
    cluster = Cluster(tmp_path / "c", db_url)
    node = cluster.register("n1")
    job = cluster.submit()
    cluster.controller.reconcile()
    attempt = cluster.job(job)["attempts"][0]["id"]
    cluster.heartbeat(node, "n1", [running(attempt, step=3)])
    before = cluster.job(job)
    cluster.controller.engine.dispose()

    again = Cluster(tmp_path / "c", db_url)
    again.instances = cluster.instances
    again.credentials, again.node_ids = cluster.credentials, cluster.node_ids
    assert again.tokens == cluster.tokens
    after = again.job(job)
    assert after["state"] == before["state"] == "running"
    assert after["attempts"][0]["last_step"] == 3
    assert again.heartbeat(node, "n1")["assignment"]["attempt_id"] == attempt


def test_cancel_stops_the_attempt(cluster: Cluster) -> None:
    node = cluster.register("n1")
    job = cluster.submit()
    cluster.controller.reconcile()
    reply = cluster.http.post(f"/api/v1/jobs/{job}/cancel", headers=cluster.admin)
    assert reply.json()["state"] == "cancelled"
    assert cluster.heartbeat(node, "n1")["assignment"] is None
    assert cluster.nodes()["n1"]["state"] == "ready"


def test_illegal_transition_is_an_error() -> None:
    with pytest.raises(IllegalTransitionError, match="succeeded -> running"):
        check_transition(JOB_TRANSITIONS, JobState.SUCCEEDED, JobState.RUNNING)


def test_a_hang_then_the_same_nodes_loss_moves_the_job_to_the_spare(
    tmp_path: Path, db_url: str
) -> None:
    """bench/goodput.py's recipe schedule on a local cluster with one spare: a hang blames
    a node (its first failure: restart in place), then that node is lost (its second: the
    spare takes its place). The job must run on the spare, not wait for a healthy node."""
    cluster = Cluster(tmp_path / "c", db_url, reserve_spares=1, node_lost_after_s=3)
    ids = {name: cluster.register(name) for name in ("a", "b", "c")}
    job = cluster.submit(nodes=2)
    cluster.controller.reconcile()
    first = cluster.job(job)["attempts"][0]
    on = {i: name for name, i in ids.items()}
    one, two = (on[i] for i in first["node_ids"])
    spare = next(n for n in ids if n not in (one, two))
    cluster.heartbeat(ids[one], one, [running(first["id"], rank=0, step=41)])
    cluster.heartbeat(ids[two], two, [running(first["id"], rank=1, step=40)])
    cluster.event(ids[one], first["id"], 0, "hung", detail="no progress for 2 s")
    assert cluster.job(job)["state"] == "recovering"
    cluster.clock.advance(0.5)
    for name, node_id in ids.items():
        cluster.heartbeat(node_id, name)
    cluster.controller.reconcile()
    second = cluster.job(job)["attempts"][1]
    assert second["node_ids"] == first["node_ids"]  # one failure: in place
    # two stops heartbeating: lost
    for _ in range(4):
        cluster.clock.advance(1)
        for name in (one, spare):
            cluster.heartbeat(ids[name], name)
        cluster.controller.reconcile()
    view = cluster.job(job)
    assert view["attempts"][1]["end_cause"].startswith(f"node lost: {two}"), view
    assert len(view["attempts"]) == 3, (view["state"], view["reason"], cluster.nodes())
    assert sorted(on[i] for i in view["attempts"][2]["node_ids"]) == sorted([one, spare])


def test_the_sqlite_database_and_its_wal_are_private(tmp_path: Path) -> None:
    """It holds every job's env, secrets among them (issue 10): 0600 from its first byte, and
    a database made world-readable by an older ironpod is closed up on the next start."""
    import stat

    db = tmp_path / "state" / "ironpod.db"
    cluster = Cluster(tmp_path / "state", f"sqlite:///{db}")
    cluster.register("n0")
    cluster.controller.engine.dispose()
    made = [p for p in db.parent.iterdir() if p.name.startswith("ironpod.db")]
    assert db in made
    for path in made:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    db.chmod(0o644)
    Cluster(tmp_path / "state", f"sqlite:///{db}").controller.engine.dispose()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
