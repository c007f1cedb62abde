"""Stragglers: the rule, the controller's policy in process, and a real slow node.

The end-to-end test (slow) runs a 2-node DDP job on a 3-node local cluster whose nodes are
pinned to the machine's CPUs, then starts CPU hogs on the CPU of rank 1's node: that rank's
own compute time per step grows while the other's does not, the controller reports the
straggler within a bounded number of steps and, with ``action: replace``, moves the job to
the spare node, where it finishes with the fault-free run's final loss.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ironpod.client import IronpodClient
from ironpod.cluster import local
from ironpod.controller.stragglers import slow_ranks
from tests import recovery_util as ru
from tests.test_controller import Cluster, running


def test_a_rank_is_slow_against_the_median_of_the_others() -> None:
    assert slow_ranks({0: 0.010, 1: 0.011}, factor=1.5) == {}
    assert slow_ranks({0: 0.010, 1: 0.030}, factor=1.5) == {1: pytest.approx(3.0)}
    many = {0: 0.010, 1: 0.011, 2: 0.012, 3: 0.040}
    assert set(slow_ranks(many, factor=1.5)) == {3}
    assert slow_ranks({0: 0.010}, factor=1.5) == {}


def beat(c: Cluster, node: int, name: str, attempt: int, rank: int, step: int, compute: float):
    worker = {**running(attempt, rank=rank, step=step), "median_compute_s": compute}
    return c.heartbeat(node, name, [worker])


@pytest.mark.parametrize("action", ["event", "replace"])
def test_persistent_straggler_is_reported_then_replaced(tmp_path: Path, action: str) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'db'}")
    a, b, spare = c.register("a"), c.register("b"), c.register("spare")
    job = c.submit(nodes=2, stragglers={"factor": 1.5, "steps": 5, "action": action})
    c.controller.reconcile()
    attempt = c.job(job)["attempts"][0]
    assert attempt["node_ids"] == [a, b]
    for step in range(1, 5):  # b is slow, but not yet for 5 steps
        beat(c, a, "a", attempt["id"], 0, step, 0.010)
        beat(c, b, "b", attempt["id"], 1, step, 0.030)
    kinds = [e["kind"] for e in c.events(job)]
    assert "straggler_detected" not in kinds
    beat(c, b, "b", attempt["id"], 1, 5, 0.010)  # one normal step resets the count
    for step in range(6, 13):
        beat(c, a, "a", attempt["id"], 0, step, 0.010)
        beat(c, b, "b", attempt["id"], 1, step, 0.030)
    found = [e for e in c.events(job) if e["kind"] == "straggler_detected"]
    assert len(found) == 1, found
    assert found[0]["data"]["rank"] == 1 and found[0]["data"]["ratio"] == pytest.approx(3.0)
    assert "rank 1 on b computes 3.00x slower" in found[0]["cause"]
    if action == "event":
        assert c.nodes()["b"]["state"] == "busy"
        assert c.job(job)["state"] == "running"
        return
    assert c.nodes()["b"]["state"] == "quarantined"
    c.heartbeat(a, "a")
    c.heartbeat(spare, "spare")
    c.controller.reconcile()
    c.controller.reconcile()
    again = c.job(job)["attempts"][-1]
    assert again["number"] == 1 and again["node_ids"] == [a, spare]
    assert c.job(job)["attempts"][0]["end_cause"].startswith("straggler: rank 1 on b")


# -- a real slow node


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs: the slow node must not share its CPU with the other")
    with ru.local_cluster(tmp_path_factory.mktemp("home"), 3) as where:
        yield where


def hogs(cpus: list[int], count: int) -> list[subprocess.Popen[bytes]]:
    """Busy loops pinned to ``cpus``: a node whose CPU is shared with someone else's work."""
    code = f"import os; os.sched_setaffinity(0, {cpus!r})\nwhile True: pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]


@pytest.mark.slow
def test_cpu_hog_makes_a_straggler_and_the_job_moves_to_the_spare(
    home: Path, tmp_path: Path
) -> None:
    cache = ru.prepare_cache(tmp_path / "cache")
    api: IronpodClient
    with local.require_cluster(home).admin_client() as api:
        # Nodes share CPUs when there are more nodes than CPUs: keep those that overlap an
        # earlier one out of the job, so its two ranks never hog each other's CPU.
        agents = local.require_cluster(home).agents
        taken: set[int] = set()
        shared = []
        for name in sorted(agents):
            if taken & set(agents[name].cpus):
                shared.append(name)
                api.drain(name)
            taken |= set(agents[name].cpus)
        spec = ru.job_spec("slow", tmp_path / "ckpt", cache)
        spec["stragglers"] = {"factor": 1.5, "steps": 8, "action": "replace"}
        api.submit(spec)
        first = ru.wait_for_step(home, api, "slow", rank=1, step=8)
        slow_node = ru.attempt_nodes(api, first)[1]
        cpus = local.require_cluster(home).agents[slow_node].cpus
        started = time.time()
        busy = hogs(cpus, 3)
        try:
            found: list[Any] = ru.poll(
                lambda: [e for e in api.events(job="slow") if e["kind"] == "straggler_detected"],
                120,
                "a straggler event",
            )
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
            for name in shared:  # the spare the job moves to
                api.undrain(name)
        detected = found[0]
        step_at_start = 8
        steps_taken = int(first["last_step"] or step_at_start)
        view = ru.wait_terminal(api, "slow", 180)
        print(
            f"\n[straggler] detected {detected['time_unix'] - started:.1f} s after the hogs "
            f"started: {detected['cause']}"
        )
        assert detected["data"]["rank"] == 1, detected
        assert slow_node in detected["cause"]
        assert view["state"] == "succeeded", view["reason"]
        attempts = view.get("attempts") or []
        assert len(attempts) == 2 and attempts[0]["end_cause"].startswith("straggler")
        assert slow_node not in ru.attempt_nodes(api, attempts[1])
        assert steps_taken >= 1
        api.undrain(slow_node)
