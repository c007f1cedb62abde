"""The controller's memory-tier decisions: replica placement, restore plans, Young/Daly."""

from __future__ import annotations

import math

from ironpod.controller.memory import NodeInfo, place_replicas, plan_restore, young_daly


def nodes(*domains: str | None) -> list[NodeInfo]:
    return [
        NodeInfo(i, f"http://n{i}", {"rack": d} if d is not None else {})
        for i, d in enumerate(domains)
    ]


def test_replicas_go_around_the_ring_avoiding_the_own_failure_domain() -> None:
    placed = place_replicas(nodes("a", "a", "b", "b"), k=1, label="rack")
    assert placed == {0: [2], 1: [2], 2: [0], 3: [0]}
    assert place_replicas(nodes(None, None, None), k=1, label="rack") == {0: [1], 1: [2], 2: [0]}
    assert place_replicas(nodes("a", "b"), k=3, label="rack") == {0: [1], 1: [0]}
    assert place_replicas(nodes("a", "a", "b"), k=2, label="rack")[0] == [2, 1]


def holding(rank: int, step: int, kind: str = "slot") -> dict[str, object]:
    return {"job_id": 1, "rank": rank, "step": step, "kind": kind, "nbytes": 10}


def test_restore_takes_the_newest_step_every_rank_has_own_node_first() -> None:
    holdings = {
        10: [holding(0, 8), holding(0, 9), holding(1, 8, "replica")],
        11: [holding(1, 8), holding(1, 9), holding(0, 8, "replica")],
    }
    urls = {10: "http://a", 11: "http://b"}
    plan, why = plan_restore(2, 1, [10, 12], holdings, urls, durable_step=6)
    assert plan is not None and plan.step == 9
    assert plan.sources == {"0": ["http://a"], "1": ["http://b"]}
    assert "1 of 2 ranks on their own node" in why
    # Node 11 is gone: rank 1's newest copy is the replica of step 8 on node 10.
    plan, _ = plan_restore(2, 1, [10, 12], {10: holdings[10]}, urls, durable_step=6)
    assert plan is not None and plan.step == 8
    assert plan.sources == {"0": ["http://a"], "1": ["http://a"]}


def test_restore_falls_back_to_durable_when_memory_is_older_or_missing() -> None:
    holdings = {10: [holding(0, 5), holding(1, 5)]}
    plan, why = plan_restore(2, 2, [10], holdings, {10: "http://a"}, durable_step=6)
    assert plan is None and "older than the durable step 6" in why
    plan, why = plan_restore(2, 2, [10], {10: [holding(0, 5)]}, {10: "u"}, durable_step=None)
    assert plan is None and "no step is in memory for all 2 ranks" in why


def test_young_daly_interval_and_its_inputs() -> None:
    choice = young_daly(cost_s=10.0, runtime_s=0.0, failures=0, prior_mtbf_s=7200.0)
    young = math.sqrt(2 * 10 * 7200)
    assert young * 0.95 < choice["interval_s"] < young * 1.05
    assert choice["mtbf_s"] == 7200.0
    worse = young_daly(cost_s=10.0, runtime_s=3600.0, failures=3, prior_mtbf_s=7200.0)
    assert worse["mtbf_s"] == (7200 + 3600) / 4
    assert worse["interval_s"] < choice["interval_s"]
    assert young_daly(None, 0.0, 0, 7200.0)["interval_s"] is None
