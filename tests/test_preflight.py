"""The optional pre-flight all-reduce across an attempt's nodes before its workers start."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ironpod.client import IronpodClient
from ironpod.cluster import local
from ironpod.controller.db import Attempt
from ironpod.controller.service import Controller
from ironpod.spec import parse_spec
from tests import recovery_util as ru
from tests.test_controller import Cluster


def test_assignment_carries_the_plan_and_a_failed_preflight_ends_the_attempt(
    tmp_path: Path,
) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'db'}")
    a, b = c.register("a"), c.register("b")
    job = c.submit(nodes=2, preflight={"enabled": True, "size_mb": 4, "min_busbw_gbps": 2.5})
    c.controller.reconcile()
    attempt = c.job(job)["attempts"][0]
    plan = c.heartbeat(a, "a")["assignment"]["preflight"]
    port = int(attempt["master"].rsplit(":", 1)[1])
    assert plan == {
        "port": port + 1,
        "size_bytes": 4 * 2**20,
        "min_busbw_gbps": 2.5,
        "timeout_s": 60.0,
    }
    notice = {
        "kind": "preflight_failed",
        "message": "0.8 GB/s, threshold 2.5: below the floor",
        "job_id": job,
        "time_unix": time.time(),
        "data": {"attempt_id": attempt["id"], "node_rank": 1, "busbw_gbps": 0.8},
    }
    body = {
        "agent_instance": c.instances["b"],
        "time_unix": time.time(),
        "workers": [],
        "notices": [notice],
    }
    reply = c.http.post(f"/api/v1/nodes/{b}/heartbeat", json=body, headers=c.as_node(b))
    assert reply.status_code == 200, reply.text
    failed = c.job(job)["attempts"][0]
    assert failed["state"] == "failed"
    assert failed["end_cause"] == "preflight: b: 0.8 GB/s, threshold 2.5: below the floor"
    assert c.nodes()["b"]["state"] == "ready"  # an all-reduce cannot say whose fault it was
    one_node = parse_spec({"name": "one", "command": ["x"], "preflight": {"enabled": True}})
    with c.controller.sessions() as session:
        row = session.get(Attempt, attempt["id"])
        assert row is not None
        assert Controller._preflight(one_node, row) is None  # one node: nothing to check


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with ru.local_cluster(tmp_path_factory.mktemp("home"), 2) as where:
        yield where


def short_job(name: str, root: Path, cache: Path, **preflight: Any) -> dict[str, Any]:
    spec = ru.job_spec(name, root / name, cache, max_restarts=0)
    spec["command"] = [*spec["command"], "--set", "train.steps=6", "--set", "train.eval_every=100"]
    spec["preflight"] = {"enabled": True, "size_mb": 2, "timeout_s": 30, **preflight}
    return spec


@pytest.mark.slow
def test_preflight_measures_the_fabric_and_stops_a_job_below_the_floor(
    home: Path, tmp_path: Path
) -> None:
    cache = ru.prepare_cache(tmp_path / "cache")
    api: IronpodClient
    with local.require_cluster(home).admin_client() as api:
        api.submit(short_job("fabric-ok", tmp_path, cache))
        view = ru.wait_terminal(api, "fabric-ok", 180)
        assert view["state"] == "succeeded", view["reason"]
        passed = [e for e in api.events(job="fabric-ok") if e["kind"] == "preflight_passed"]
        assert len(passed) == 2 and all(e["data"]["busbw_gbps"] > 0 for e in passed), passed
        print(f"\n[preflight] gloo all-reduce, 2 nodes: {passed[0]['cause']}")

        api.submit(short_job("fabric-slow", tmp_path, cache, min_busbw_gbps=1e6))
        view = ru.wait_terminal(api, "fabric-slow", 180)
        assert view["state"] == "failed", view["reason"]
        attempt = (view.get("attempts") or [])[0]
        assert attempt["end_cause"].startswith("preflight: "), attempt["end_cause"]
        # The agent notes it in the rank's log after telling the controller: wait for the line.
        path = ru.rank_log(home, api, attempt, 0)
        why = "not started: preflight all-reduce over 2 nodes"

        def noted() -> str | None:
            text = path.read_text(errors="replace")
            return text if why in text else None

        log = ru.poll(noted, 30, f"{why!r} in {path}")
        assert "[ironpod] progress" not in log  # no training step was spent on it
