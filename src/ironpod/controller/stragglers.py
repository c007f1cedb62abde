"""Stragglers: ranks that compute persistently slower than their peers.

In synchronous training every rank's step lasts as long as the slowest rank's, so step times
cannot tell who is slow. The ranks' own compute seconds per step can (the ``compute_s``
progress metric, e.g. forward and optimizer time, without collective waits): the agents report
each rank's median over its recent steps, and a rank above ``factor`` x the median of the
others' medians is slow. Persistence is counted in the rank's own steps, by the service.
"""

from __future__ import annotations

import statistics


def slow_ranks(medians: dict[int, float], factor: float) -> dict[int, float]:
    """rank -> its median over the median of the other ranks' medians, for ranks above
    ``factor``; needs two ranks at least."""
    out: dict[int, float] = {}
    if len(medians) < 2:
        return out
    for rank, mine in medians.items():
        others = statistics.median(v for r, v in medians.items() if r != rank)
        if others > 0 and mine / others > factor:
            out[rank] = mine / others
    return out
