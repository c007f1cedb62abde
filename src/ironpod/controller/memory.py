"""The controller's decisions for the memory tiers: where copies go, where a restore reads from,
and how often the durable tier is written.

Pure functions over plain data, so each decision is unit-tested on its own and the service only
gathers inputs and records outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ironpod.wire import RestorePlan


@dataclass(frozen=True, slots=True)
class NodeInfo:
    id: int
    url: str
    labels: dict[str, str]


def place_replicas(nodes: Sequence[NodeInfo], k: int, label: str) -> dict[int, list[int]]:
    """For each node of an attempt, the ``k`` other nodes that keep copies of its snapshots.

    Peers are taken in ring order after the node (so load spreads evenly), those in another
    failure domain (a different value of ``label``) first; a node without the label shares a
    domain with nobody. With fewer than ``k`` other nodes, every other node holds a copy.
    """
    out: dict[int, list[int]] = {}
    n = len(nodes)
    for i, node in enumerate(nodes):
        ring = [nodes[(i + j) % n] for j in range(1, n)]
        mine = node.labels.get(label)

        def shares_domain(other: NodeInfo, mine: str | None = mine) -> bool:
            return mine is not None and other.labels.get(label) == mine

        ordered = [p for p in ring if not shares_domain(p)] + [p for p in ring if shares_domain(p)]
        out[node.id] = [p.id for p in ordered[:k]]
    return out


def plan_restore(
    world_size: int,
    nproc_per_node: int,
    chosen: Sequence[int],
    holdings: dict[int, list[dict[str, Any]]],
    urls: dict[int, str],
    durable_step: int | None,
) -> tuple[RestorePlan | None, str]:
    """The newest step that every rank has in some live node's memory, if it is at least as new
    as the newest durable checkpoint; with each rank's sources, its own new node first.

    ``chosen`` are the node ids of the new attempt in node-rank order, ``holdings`` what each
    live node reported holding for this job (``SnapshotHolding`` dicts). Returns the plan (None:
    load from the durable tier) and one line saying why.
    """
    held: dict[int, dict[int, list[int]]] = {}  # rank -> step -> node ids
    for node_id, snaps in holdings.items():
        for snap in snaps:
            held.setdefault(int(snap["rank"]), {}).setdefault(int(snap["step"]), []).append(node_id)
    common: set[int] | None = None
    for rank in range(world_size):
        steps = set(held.get(rank, {}))
        common = steps if common is None else common & steps
    best = max(common) if common else None
    durable = "none" if durable_step is None else f"step {durable_step}"
    if best is None:
        return None, f"no step is in memory for all {world_size} ranks; durable: {durable}"
    if durable_step is not None and best < durable_step:
        return None, f"memory has step {best}, older than the durable step {durable_step}"
    sources: dict[str, list[str]] = {}
    local = 0
    for rank in range(world_size):
        home = chosen[rank // nproc_per_node]
        nodes = sorted(set(held[rank][best]), key=lambda n: (n != home, n))
        local += nodes[0] == home
        sources[str(rank)] = [urls[n] for n in nodes if n in urls]
    why = (
        f"step {best} from memory: {local} of {world_size} ranks on their own node, "
        f"{world_size - local} from a peer (durable: {durable})"
    )
    return RestorePlan(step=best, sources=sources), why


def young_daly(
    cost_s: float | None, runtime_s: float, failures: int, prior_mtbf_s: float
) -> dict[str, Any]:
    """The durable-checkpoint interval sqrt(2 x cost x MTBF) and its inputs.

    Young (1974) gives the first-order optimum interval between checkpoints as sqrt(2 C M) for
    a checkpoint cost C and mean time between failures M; Daly (2006) refines it for large C/M.
    M is estimated from the prior as if it were one failure-free period already observed:
    (prior + runtime) / (1 + failures), so early failures pull the estimate down quickly and a
    long quiet run pushes it up. Without a measured cost there is no choice yet.
    """
    mtbf = (prior_mtbf_s + runtime_s) / (1 + failures)
    chosen = math.sqrt(2 * cost_s * mtbf) if cost_s and cost_s > 0 else None
    if chosen is not None and cost_s is not None and cost_s < 2 * mtbf:
        # Daly's higher-order correction (valid for C < 2M).
        ratio = math.sqrt(cost_s / (2 * mtbf))
        chosen = chosen * (1 + ratio / 3 + ratio * ratio / 9) - cost_s
    return {
        "interval_s": chosen,
        "cost_s": cost_s,
        "mtbf_s": mtbf,
        "failures": failures,
        "runtime_s": runtime_s,
        "prior_mtbf_s": prior_mtbf_s,
        "rule": "young/daly",
    }
