"""The heartbeat path at scale (issue 11): heartbeats that decide nothing are answered from
memory with no SQL and no decision lock, with the same reply the decision path gives; what
they carry reaches the database before any read or decision; overload is answered at once."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from ironpod.controller import api
from ironpod.controller.server import check_liveness_timing, keep_alive_s
from ironpod.controller.service import Controller, ControllerConfig
from ironpod.errors import ConfigError
from tests.test_controller import Clock, Cluster, _close_pools, db_url, running

# fixtures: every test here runs on SQLite and PostgreSQL, and closes its connection pools
__all__ = ["_close_pools", "db_url"]


def _same_but_time(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert {**a, "time_unix": 0} == {**b, "time_unix": 0}


class Statements:
    """SQL statements the controller's engine runs (counted by a cursor hook)."""

    def __init__(self, controller: Controller) -> None:
        self.count = 0
        event.listen(controller.engine, "before_cursor_execute", self._seen)

    def _seen(self, *_: Any) -> None:
        self.count += 1


@pytest.fixture
def cluster(tmp_path: Path, db_url: str) -> Cluster:
    return Cluster(tmp_path / "controller", db_url)


def _deciding(cluster: Cluster, name: str) -> dict[str, Any]:
    """A heartbeat that takes the decision path: it carries a notice (an event to record)."""
    notice = {"kind": "snapshot_evicted", "message": "m", "time_unix": cluster.clock()}
    return {
        "agent_instance": cluster.instances[name],
        "time_unix": cluster.clock(),
        "notices": [notice],
    }


def _busy_cluster(cluster: Cluster, nodes: int) -> tuple[int, list[int], int]:
    """``nodes`` registered nodes running one job across all of them: (job, node ids, attempt)."""
    ids = [cluster.register(f"n{i}") for i in range(nodes)]
    job = cluster.submit(nodes=nodes)
    cluster.controller.reconcile()
    attempt = cluster.heartbeat(ids[0], "n0")["assignment"]["attempt_id"]
    return job, ids, attempt


def test_a_heartbeat_that_decides_nothing_costs_no_sql_and_gets_the_same_reply(
    cluster: Cluster,
) -> None:
    """A node of a 32-node job and an idle node: after one heartbeat on the decision path,
    the next ones are answered from memory (no statement at all), whatever the job's size,
    with the reply the decision path gives (peer tokens of held copies included)."""
    job, ids, attempt = _busy_cluster(cluster, 32)
    idle = cluster.register("idle")
    live = cluster.controller.live
    held = [{"job_id": job, "rank": 0, "step": 3, "kind": "replica", "nbytes": 10}]
    workers = [running(attempt, rank=5, step=None)]
    slow_busy = cluster.heartbeat(ids[5], "n5", workers=workers)
    slow_idle = cluster.heartbeat(idle, "idle", snapshots=held)
    statements, fast_before = Statements(cluster.controller), live.fast
    fast_busy = cluster.heartbeat(ids[5], "n5", workers=[running(attempt, rank=5, step=7)])
    fast_idle = cluster.heartbeat(idle, "idle", snapshots=held)
    assert live.fast == fast_before + 2
    assert statements.count == 0
    _same_but_time(slow_busy, fast_busy)
    _same_but_time(slow_idle, fast_idle)
    assert fast_idle["peer_tokens"] == {str(job): cluster.controller.peer_token(job)}
    assert fast_busy["assignment"]["ranks"] == [5] and len(fast_busy["assignment"]["peers"]) == 31


def test_what_fast_heartbeats_carry_reaches_reads_and_decisions(cluster: Cluster) -> None:
    job, ids, attempt = _busy_cluster(cluster, 2)
    cluster.heartbeat(ids[1], "n1", workers=[running(attempt, rank=1)])  # the decision path
    cluster.clock.advance(1.0)
    live = cluster.controller.live
    fast = live.fast
    held = [{"job_id": job, "rank": 1, "step": 9, "kind": "slot", "nbytes": 10}]
    cluster.heartbeat(ids[1], "n1", workers=[running(attempt, rank=1, step=9)], snapshots=held)
    assert live.fast == fast + 1
    node = cluster.nodes()["n1"]  # a read persists first
    assert node["last_heartbeat_unix"] == cluster.clock()
    assert node["snapshots"][0]["step"] == 9
    ranks = cluster.http.get(f"/api/v1/jobs/{job}/attempts", headers=cluster.admin).json()
    assert ranks[-1]["ranks"]["1"]["last_step"] == 9


def test_a_decision_drops_the_cached_reply(cluster: Cluster) -> None:
    job, ids, attempt = _busy_cluster(cluster, 1)
    cluster.heartbeat(ids[0], "n0", workers=[running(attempt)])
    assert cluster.heartbeat(ids[0], "n0", workers=[running(attempt)])["assignment"] is not None
    slow = cluster.controller.live.slow
    cluster.http.post(f"/api/v1/jobs/{job}/cancel", headers=cluster.admin)
    reply = cluster.heartbeat(ids[0], "n0", workers=[running(attempt)])
    assert cluster.controller.live.slow == slow + 1  # the change took the decision path
    assert reply["assignment"] is None and job not in reply["keep_jobs"]


def test_a_worker_that_changed_state_takes_the_decision_path(cluster: Cluster) -> None:
    job, ids, attempt = _busy_cluster(cluster, 1)
    cluster.heartbeat(ids[0], "n0")  # cached: the assignment, no workers yet
    assert cluster.job(job)["state"] == "starting"
    slow = cluster.controller.live.slow
    cluster.heartbeat(ids[0], "n0", workers=[running(attempt)])  # its worker started
    assert cluster.controller.live.slow == slow + 1
    assert cluster.job(job)["state"] == "running"
    exited = {**running(attempt), "state": "exited", "exit_code": 1}
    cluster.heartbeat(ids[0], "n0", workers=[exited])
    assert cluster.controller.live.slow == slow + 2


def test_a_restarted_controller_answers_idle_nodes_from_memory_and_lost_nothing(
    tmp_path: Path, cluster: Cluster
) -> None:
    job, ids, attempt = _busy_cluster(cluster, 1)
    idle = cluster.register("idle")
    cluster.heartbeat(ids[0], "n0", workers=[running(attempt, step=4)])
    cluster.heartbeat(ids[0], "n0", workers=[running(attempt, step=5)])
    cluster.controller.sync()
    again = Controller(cluster.url, cluster.state_dir, ControllerConfig(), clock=cluster.clock)
    Cluster.made.append(again)
    assert again.live.nodes[idle].part is not None  # warm from the database
    assert again.live.nodes[ids[0]].part is None  # a busy node's first heartbeat decides
    cluster.controller = again
    cluster.http = type(cluster.http)(api.create_app(again, cluster.tokens))
    assert cluster.heartbeat(idle, "idle")["assignment"] is None and again.live.fast == 1
    reply = cluster.heartbeat(ids[0], "n0", workers=[running(attempt, step=6)])
    assert reply["assignment"]["attempt_id"] == attempt and again.live.slow == 1
    assert cluster.job(job)["state"] == "running"


def test_silence_while_the_controller_was_behind_is_not_a_lost_node(cluster: Cluster) -> None:
    """The controller shed load at t: a node silent since before t is lost only once it has
    been silent for node_lost_after_s counted from t."""
    cluster.controller.config.node_lost_after_s = 10.0
    node = cluster.register("n1")
    cluster.heartbeat(node, "n1")
    cluster.clock.advance(8.0)
    cluster.controller.live.fell_behind(cluster.clock())
    cluster.clock.advance(8.0)  # 16 s silent, 8 s since the controller caught up
    cluster.controller.reconcile()
    assert cluster.nodes()["n1"]["state"] == "ready"
    cluster.clock.advance(3.0)
    cluster.controller.reconcile()
    assert cluster.nodes()["n1"]["state"] == "lost"


def test_overload_is_answered_at_once_with_retry_after(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the bound of waiting decisions an agent's request gets 503 with Retry-After at
    once, and the controller counts itself behind (it holds its lost verdicts)."""
    node = cluster.register("n1")
    monkeypatch.setattr(api, "MAX_WAITING_DECISIONS", 0)
    body = _deciding(cluster, "n1")
    reply = cluster.http.post(
        f"/api/v1/nodes/{node}/heartbeat", json=body, headers=cluster.as_node(node)
    )
    assert reply.status_code == 503 and reply.headers["Retry-After"] == "1"
    assert cluster.controller.live.behind_unix == cluster.clock()


def test_a_request_that_waited_past_its_agents_timeout_is_dropped(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decision lock held longer than an agent waits: the request is not processed late
    (its agent gave up and retries); it gets 503 and the controller counts itself behind."""
    node = cluster.register("n1")
    monkeypatch.setattr(api, "STALE_AFTER_S", 0.5)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cluster.controller.lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        body = _deciding(cluster, "n1")
        reply = cluster.http.post(
            f"/api/v1/nodes/{node}/heartbeat", json=body, headers=cluster.as_node(node)
        )
    finally:
        release.set()
        holder.join()
    assert reply.status_code == 503
    assert cluster.controller.live.behind_unix == cluster.clock()


def test_node_lost_after_is_checked_against_the_heartbeat_interval() -> None:
    check_liveness_timing(ControllerConfig(heartbeat_interval_s=5, node_lost_after_s=15))
    with pytest.raises(ConfigError, match="less than two heartbeat intervals"):
        check_liveness_timing(ControllerConfig(heartbeat_interval_s=5, node_lost_after_s=6))
    assert keep_alive_s(ControllerConfig(heartbeat_interval_s=5)) > 5


def test_clock_is_the_injected_one(tmp_path: Path) -> None:
    """The fast lane stamps heartbeats with the controller's clock, not the wall clock."""
    clock = Clock(1000.0)
    cluster = Cluster(tmp_path / "c", f"sqlite:///{tmp_path / 'db.sqlite'}", clock=clock)
    node = cluster.register("n1")
    cluster.heartbeat(node, "n1")
    clock.advance(5.0)
    cluster.heartbeat(node, "n1")
    assert cluster.controller.live.fast == 2  # a new node's reply is known: no decision
    assert cluster.nodes()["n1"]["last_heartbeat_unix"] == 1005.0


def test_a_join_storm_is_written_in_batches(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 agents registering at once: every one gets its own node and credential, in far
    fewer transactions than registrations (group commit); an agent that asks twice (its first
    reply was lost) gets a registration, not a 409."""
    import asyncio

    import httpx

    batches: list[int] = []
    many = cluster.controller.register_many

    def counted(regs: list[Any]) -> list[Any]:
        batches.append(len(regs))
        return many(regs)

    monkeypatch.setattr(cluster.controller, "register_many", counted)

    def body(i: int) -> dict[str, Any]:
        return {
            "name": f"storm{i}",
            "hostname": f"storm{i}",
            "address": "127.0.0.1",
            "agent_url": "http://127.0.0.1:1",
            "agent_instance": f"i{i}",
            "cpus": 2,
            "memory_bytes": 1 << 30,
            "agent_version": "test",
            "time_unix": cluster.clock(),
        }

    async def storm() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=cluster.http.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://c") as client:
            calls = [
                client.post("/api/v1/nodes/register", json=body(i), headers=cluster.agent)
                for i in [*range(200), 7]  # storm7 asks twice
            ]
            return list(await asyncio.gather(*calls))

    replies = asyncio.run(storm())
    assert [r.status_code for r in replies] == [200] * 201, replies[0].text
    ids = {r.json()["node_id"] for r in replies}
    assert len(ids) == 200 and sum(batches) <= 201 and len(batches) < 50
    assert len(cluster.nodes()) == 200


def test_a_heartbeat_that_waited_in_the_controller_marks_it_behind(cluster: Cluster) -> None:
    """Each node's quickest delivery is its baseline; a heartbeat 3 s slower than that waited
    in the controller's queues (nobody shed it, it just sat): the controller is behind."""
    node = cluster.register("n1")
    cluster.heartbeat(node, "n1")
    assert cluster.controller.live.behind_unix < cluster.clock()
    body = {"agent_instance": cluster.instances["n1"], "time_unix": cluster.clock() - 3.0}
    reply = cluster.http.post(
        f"/api/v1/nodes/{node}/heartbeat", json=body, headers=cluster.as_node(node)
    )
    assert reply.status_code == 200
    assert cluster.controller.live.behind_unix == cluster.clock()


def test_the_http_lane_leaves_what_it_cannot_answer_to_the_api(cluster: Cluster) -> None:
    """api.HeartbeatLane answers plain heartbeats before FastAPI; a bad body, a wrong
    credential or no token still get the API's own answers."""
    node = cluster.register("n1")
    url = f"/api/v1/nodes/{node}/heartbeat"
    bad = cluster.http.post(url, json={"time_unix": 1}, headers=cluster.as_node(node))
    assert bad.status_code == 422 and "agent_instance" in bad.text
    body = {"agent_instance": cluster.instances["n1"], "time_unix": cluster.clock()}
    wrong = cluster.http.post(url, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 200 and wrong.json()["reregister"] is True
    assert cluster.http.post(url, json=body).status_code == 401
    huge = cluster.http.post(
        "/api/v1/nodes/99999999999999999999/heartbeat", json=body, headers=cluster.as_node(node)
    )
    assert huge.status_code == 422
    fast = cluster.controller.live.fast
    ok = cluster.http.post(url, json=body, headers=cluster.as_node(node))
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
    assert cluster.controller.live.fast == fast + 1


def test_one_node_whose_clock_was_stepped_back_does_not_hold_every_lost_verdict(
    cluster: Cluster,
) -> None:
    node = cluster.register("n1")
    cluster.heartbeat(node, "n1")
    live = cluster.controller.live
    marks = []
    for _ in range(5):  # every beat 10 s "late": its clock went back 10 s
        cluster.clock.advance(1.0)
        body = {"agent_instance": cluster.instances["n1"], "time_unix": cluster.clock() - 10}
        reply = cluster.http.post(
            f"/api/v1/nodes/{node}/heartbeat", json=body, headers=cluster.as_node(node)
        )
        assert reply.status_code == 200
        marks.append(live.behind_unix == cluster.clock())
    assert marks == [True, True, False, False, False]
