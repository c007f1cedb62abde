"""Stragglers: ranks that compute persistently slower than their peers.

In synchronous training every rank's step lasts as long as the slowest rank's, so step times
cannot tell who is slow. The ranks' own compute seconds per step can (the ``compute_s``
progress metric, e.g. forward and optimizer time, without collective waits): the agents report
each rank's median over its recent steps, and a rank above ``factor`` x the median of the
others' medians is slow. Persistence is counted in the rank's own steps.

A noisy neighbour must not make a straggler; three layers keep it out:

- the agent's median over the rank's recent steps (``RECENT_STEPS``) ignores a spike shorter
  than half of them, and the count of ``steps`` starts only after the median has moved;
- a ratio compares ranks with each other, so a slowdown of every rank (a busy host, a shared
  disk) moves nothing;
- a rank must also be ``MIN_EXCESS_S`` slower in absolute terms: ratios of tiny numbers (a
  sub-millisecond forward, asynchronous GPU launches timed on the host) are scheduler noise.

No hysteresis: simulated ranks with per-step noise (tests/test_stragglers_rule.py) showed
that keeping a counted rank slow down to a lower threshold lets noisy but equal ranks through
(41 in 100 runs of 400 steps at +-40% noise, against 5 without), while a rank 1.6x slower is
found either way.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Seconds a step by which a rank's median must exceed the others' median, whatever the ratio:
#: below a scheduler time slice a lag is noise, and it is not worth a node.
MIN_EXCESS_S = 0.002


def slow_ranks(
    medians: Mapping[int, float],
    factor: float,
    *,
    min_excess_s: float = MIN_EXCESS_S,
) -> dict[int, float]:
    """rank -> its median over the median of the other ranks' medians, for the slow ranks;
    needs two ranks at least (with two, the "others' median" is the other rank).

    Slow is above ``factor`` and at least ``min_excess_s`` seconds above the others.
    """
    out: dict[int, float] = {}
    if len(medians) < 2:
        return out
    for rank, mine in medians.items():
        others = statistics.median(v for r, v in medians.items() if r != rank)
        if others <= 0 or mine - others < min_excess_s:
            continue
        if mine / others > factor:
            out[rank] = mine / others
    return out


@dataclass(kw_only=True, slots=True)
class Check:
    """One straggler check of an attempt: what to store and what to report."""

    #: The attempt's rank statuses with the rule's bookkeeping (``slow_since_step``: the rank's
    #: step when it became slow; ``straggler``: reported, once per attempt).
    ranks: dict[str, dict[str, Any]]
    #: rank -> ratio, for ranks slow for ``steps`` steps now and not reported before.
    found: dict[int, float] = field(default_factory=dict)
    #: rank -> the median compute seconds the rule compared (for the event).
    medians: dict[int, float] = field(default_factory=dict)


def check(
    ranks: Mapping[str, Mapping[str, Any]],
    *,
    factor: float,
    steps: int,
    min_excess_s: float = MIN_EXCESS_S,
) -> Check:
    """The straggler rule over an attempt's rank statuses (as stored: rank as a string ->
    ``last_step``, ``median_compute_s`` and the rule's own keys); pure, the caller stores
    ``ranks`` back and reports ``found``.

    A rank slow at ``slow_since_step`` and still slow ``steps`` of its own steps later is a
    straggler; a check where it is not slow clears the count.
    """
    medians = {
        int(r): float(v["median_compute_s"]) for r, v in ranks.items() if v.get("median_compute_s")
    }
    slow = slow_ranks(medians, factor, min_excess_s=min_excess_s)
    out = Check(ranks={r: dict(v) for r, v in ranks.items()}, medians=medians)
    for key, info in out.ranks.items():
        rank, step = int(key), info.get("last_step")
        if rank not in slow:
            info.pop("slow_since_step", None)
            continue
        since = info.setdefault("slow_since_step", step)
        if info.get("straggler") or step is None or since is None:
            continue
        if step - since >= steps:
            info["straggler"] = True
            out.found[rank] = slow[rank]
    return out
