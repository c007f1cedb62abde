"""The straggler rule against noisy neighbours, table-driven and without processes or clocks.

Each case is per-step compute seconds for every rank. They go through the agent's own
per-rank progress (its median over the recent steps, as heartbeats report it) and then the
controller's rule after every step, as a heartbeat per step would: a noisy neighbour that
slows every rank, or one rank briefly, makes no straggler; a rank persistently slower does,
within a bounded number of steps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from ironpod.agent.progress import COMPUTE_METRIC, RECENT_STEPS, ProgressUpdate, RankProgress
from ironpod.controller.stragglers import MIN_EXCESS_S, check, slow_ranks

BASE = 0.050  # seconds of compute a step
STEPS = 8  # the policy's persistence, as tests/test_stragglers.py's end-to-end job uses
TOTAL = 200


def flat(value: float = BASE, n: int = TOTAL) -> list[float]:
    return [value] * n


def slowed(factor: float, start: int, length: int, base: list[float] | None = None) -> list[float]:
    """``base`` (flat by default) with steps ``start .. start + length - 1`` ``factor`` x slower."""
    out = list(base if base is not None else flat())
    for i in range(start, min(start + length, len(out))):
        out[i] *= factor
    return out


def noisy(seed: int, sigma: float, value: float = BASE) -> list[float]:
    """Every step jittered by a log-normal factor: a busy host, each rank on its own luck."""
    rng = random.Random(seed)
    return [value * rng.lognormvariate(0.0, sigma) for _ in range(TOTAL)]


def simulate(series: dict[int, list[float]], steps: int = STEPS) -> list[tuple[int, int]]:
    """(step, rank) of every straggler the rule reports, one check after every step."""
    progress = {rank: RankProgress() for rank in series}
    stored: dict[str, dict[str, Any]] = {}
    found: list[tuple[int, int]] = []
    for step in range(1, len(next(iter(series.values()))) + 1):
        for rank, p in progress.items():
            update = {COMPUTE_METRIC: series[rank][step - 1]}
            p.record(ProgressUpdate(t=float(step), step=step, metrics=update))
            status = {"last_step": step, "median_compute_s": p.median_compute_s()}
            stored[str(rank)] = {**stored.get(str(rank), {}), **status}
        result = check(stored, factor=1.5, steps=steps)
        stored = result.ranks
        found += [(step, rank) for rank in result.found]
    return found


@dataclass(frozen=True)
class Case:
    name: str
    series: dict[int, list[float]]
    #: The rank reported, or None for no straggler.
    straggler: int | None
    #: The latest step by which it must be reported (from its slowdown's start).
    by_step: int = 0


HALF = RECENT_STEPS // 2
CASES = [
    Case("quiet, 4 ranks", {r: flat() for r in range(4)}, None),
    Case("every rank 3x slower for 60 steps", {r: slowed(3.0, 50, 60) for r in range(4)}, None),
    Case(
        "a neighbour slows both ranks, one 3 steps before the other",
        {0: slowed(3.0, 50, 60), 1: slowed(3.0, 53, 60)},
        None,
    ),
    Case(
        f"one rank 5x slower for {HALF - 1} steps (under half the median's window)",
        {0: flat(), 1: flat(), 2: slowed(5.0, 50, HALF - 1), 3: flat()},
        None,
    ),
    Case(
        f"one rank 5x slower for {STEPS - 1} steps, twice, 40 steps apart",
        {0: flat(), 1: slowed(5.0, 40, STEPS - 1, slowed(5.0, 80, STEPS - 1)), 2: flat()},
        None,
    ),
    Case(
        "noisy but equal ranks (each step +-30%)",
        {r: noisy(seed=r, sigma=0.3) for r in range(4)},
        None,
    ),
    Case(
        "noisy but equal, 2 ranks (each step +-30%)",
        {r: noisy(seed=10 + r, sigma=0.3) for r in range(2)},
        None,
    ),
    Case(
        "3x ratio of sub-millisecond computes (scheduler noise)",
        {0: flat(0.0003), 1: flat(0.0003 * 3), 2: flat(0.0003)},
        None,
    ),
    Case(
        "one rank of 4 persistently 2x slower",
        {0: flat(), 1: flat(), 2: flat(), 3: slowed(2.0, 30, TOTAL)},
        3,
        by_step=30 + HALF + 1 + STEPS,
    ),
    Case(
        "2 ranks only, one persistently 2x slower (the others' median is one rank)",
        {0: flat(), 1: slowed(2.0, 30, TOTAL)},
        1,
        by_step=30 + HALF + 1 + STEPS,
    ),
    Case(
        "2x slower rank among noisy ranks (each step +-30%)",
        {0: noisy(1, 0.3), 1: [v * 2 for v in noisy(2, 0.3)], 2: noisy(3, 0.3)},
        1,
        by_step=HALF + 1 + 2 * STEPS,
    ),
    Case(
        "a rank hovering about the factor (1.6x, each step +-30%)",
        {0: flat(), 1: [v * 1.6 for v in noisy(4, 0.3)], 2: flat()},
        1,
        by_step=HALF + 1 + 3 * STEPS,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_straggler_rule_over_recent_medians(case: Case) -> None:
    found = simulate(case.series)
    if case.straggler is None:
        assert found == []
        return
    assert [rank for _, rank in found] == [case.straggler], found  # reported once
    assert found[0][0] <= case.by_step, found


def test_the_ratio_is_against_the_median_of_the_others() -> None:
    assert slow_ranks({0: 0.010, 1: 0.011}, factor=1.5) == {}
    assert slow_ranks({0: 0.010, 1: 0.030}, factor=1.5) == {1: pytest.approx(3.0)}
    assert set(slow_ranks({0: 0.010, 1: 0.011, 2: 0.012, 3: 0.040}, factor=1.5)) == {3}
    assert slow_ranks({0: 0.010}, factor=1.5) == {}
    assert slow_ranks({0: 0.0, 1: 0.010}, factor=1.5) == {}


def test_a_slow_rank_must_also_be_slower_by_an_absolute_margin() -> None:
    tiny = {0: 0.001, 1: 0.001 + MIN_EXCESS_S * 0.9}
    assert slow_ranks(tiny, factor=1.5) == {}
    assert set(slow_ranks(tiny, factor=1.5, min_excess_s=0.0)) == {1}


def test_persistence_counts_the_slow_ranks_own_steps_and_a_normal_step_resets_it() -> None:
    def ranks(step: int, slow: float, **kept: Any) -> dict[str, dict[str, Any]]:
        return {
            "0": {"last_step": step, "median_compute_s": 0.010},
            "1": {"last_step": step, "median_compute_s": slow, **kept},
        }

    first = check(ranks(3, 0.030), factor=1.5, steps=5)
    assert first.found == {} and first.ranks["1"]["slow_since_step"] == 3
    assert "slow_since_step" not in first.ranks["0"]
    later = check(ranks(8, 0.030, slow_since_step=3), factor=1.5, steps=5)
    assert later.found == {1: pytest.approx(3.0)} and later.ranks["1"]["straggler"] is True
    assert later.medians == {0: 0.010, 1: 0.030}
    again = check(later.ranks, factor=1.5, steps=5)
    assert again.found == {}  # once per attempt
    reset = check(ranks(8, 0.010, slow_since_step=3), factor=1.5, steps=5)
    assert reset.found == {} and "slow_since_step" not in reset.ranks["1"]
    unknown = check({"0": {"last_step": None, "median_compute_s": None}}, factor=1.5, steps=5)
    assert unknown.found == {} and unknown.medians == {}
