"""Stragglers: the controller's policy in process, and a real slow node.

The rule itself, against noisy neighbours, is tests/test_stragglers_rule.py. The end-to-end
test (slow) runs a 2-node DDP job on a 3-node local cluster, then holds the workers of rank
1's node to 5% of one CPU with a cgroup CPU limit: that rank's own compute time per step
grows while the other's does not, the controller reports the straggler within a bounded
number of steps and, with ``action: replace``, moves the job to the spare node, where it
finishes.

Why a cgroup limit and not CPU hogs beside the node: hogs slow a rank only as much as the
scheduler lets them, and on a small machine with other work running (CI, a laptop) that work
slows the other rank as well, so the ratio between them wandered about the factor and the
test failed in 2 of 3 runs. A CFS quota holds the slow rank to its share whatever else runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ironpod.client import IronpodClient
from ironpod.cluster import local
from tests import cgroups
from tests import recovery_util as ru
from tests.test_controller import Cluster, running


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

#: The slow node's workers get this much of one CPU: 20x slower than alone, and still 3x
#: slower than a peer that shares its own CPU with five other busy processes.
SLOW_CPU = 0.05
#: The limit starts once rank 1 has logged this step (the first checkpoint is at step 5).
LIMIT_AT_STEP = 5


@pytest.fixture(scope="module")
def hierarchy() -> cgroups.Hierarchy:
    found = cgroups.find_hierarchy()
    if isinstance(found, str):
        pytest.skip(f"a slow node is made with a cgroup CPU limit: {found}")
    return found


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, hierarchy: cgroups.Hierarchy) -> Iterator[Path]:
    with ru.local_cluster(tmp_path_factory.mktemp("home"), 3) as where:
        yield where


def compute_medians(api: IronpodClient, job: str) -> dict[str, Any]:
    """rank -> (its last step, its median compute seconds) in the job's latest attempt."""
    found = ru.attempts(api, job)
    ranks = found[-1]["ranks"] if found else {}
    return {r: (v.get("last_step"), v.get("median_compute_s")) for r, v in ranks.items()}


@pytest.mark.slow
@pytest.mark.timeout(600)  # its own deadlines (240 + 180 + 300 s) name what it waited for
def test_a_cpu_limited_node_is_a_straggler_and_the_job_moves_to_the_spare(
    home: Path, hierarchy: cgroups.Hierarchy, tmp_path: Path
) -> None:
    cache = ru.prepare_cache(tmp_path / "cache")
    api: IronpodClient
    with local.require_cluster(home).admin_client() as api:
        # A slow rank holds its peer in the all-reduce for seconds a step, and a loaded machine
        # stretches the last step's teardown: neither is the hang this job is not about.
        spec = ru.job_spec("slow", tmp_path / "ckpt", cache, hang_timeout_s=60.0)
        spec["stragglers"] = {"factor": 1.5, "steps": 8, "action": "replace"}
        api.submit(spec)
        first = ru.wait_for_step(home, api, "slow", rank=1, step=LIMIT_AT_STEP, timeout=240)
        slow_node = ru.attempt_nodes(api, first)[1]
        agent = local.require_cluster(home).agents[slow_node]
        with cgroups.cpu_limit(hierarchy, SLOW_CPU) as limit:
            workers = [p.pid for p in local.node_processes(agent)[1:]]
            moved = [pid for pid in workers if limit.add(pid)]
            assert moved, f"no worker of {slow_node} to slow down (agent pid {agent.pid})"
            started = time.time()
            try:
                found: list[Any] = ru.poll(
                    lambda: [
                        e for e in api.events(job="slow") if e["kind"] == "straggler_detected"
                    ],
                    180,
                    "a straggler event",
                    every=0.2,
                )
            except AssertionError as exc:
                shown = compute_medians(api, "slow")
                raise AssertionError(f"{exc}; ranks' (step, median compute s): {shown}") from exc
        detected = found[0]
        view = ru.wait_terminal(api, "slow", 300)
        print(
            f"\n[straggler] detected {detected['time_unix'] - started:.1f} s after the CPU "
            f"limit ({SLOW_CPU:.0%} of a CPU) started: {detected['cause']}"
        )
        assert detected["data"]["rank"] == 1, detected
        assert slow_node in detected["cause"]
        assert view["state"] == "succeeded", view["reason"]
        attempts = view.get("attempts") or []
        causes = [a["end_cause"] for a in attempts]
        assert len(attempts) == 2 and causes[0].startswith("straggler"), causes
        assert slow_node not in ru.attempt_nodes(api, attempts[1])
        api.undrain(slow_node)
