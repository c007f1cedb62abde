"""The goodput ledger's arithmetic on hand-made attempt histories."""

from __future__ import annotations

import pytest

from ironpod.controller.db import Attempt, Job
from ironpod.controller.ledger import goodput


def attempt(
    number: int,
    created: float,
    first: float,
    last: float,
    end: float | None,
    first_step: int,
    last_step: int,
    step_s: float,
) -> Attempt:
    return Attempt(
        number=number,
        created_unix=created,
        first_step_unix=first,
        last_progress_unix=last,
        ended_unix=end,
        first_step=first_step,
        last_step=last_step,
        median_step_s=step_s,
    )


def test_one_clean_attempt() -> None:
    job = Job(created_unix=0.0, ended_unix=110.0)
    # step 1 ran from 10 s to 11 s, steps 2..100 one a second after it
    ledger = goodput(job, [attempt(0, 5.0, 11.0, 110.0, 110.0, 1, 100, 1.0)], now=200.0)
    assert ledger["queued_s"] == 5.0
    assert ledger["startup_restore_s"] == 5.0
    assert ledger["productive_s"] == pytest.approx(100.0)
    assert ledger["recomputed_steps"] == 0
    assert ledger["ettr"] == pytest.approx(100.0 / 110.0)


def test_crash_recomputes_steps_past_the_checkpoint() -> None:
    # Attempt 0 ran steps 1..57 and crashed; attempt 1 resumed from the step-50 checkpoint.
    job = Job(created_unix=0.0, ended_unix=120.0)
    first = attempt(0, 0.0, 3.0, 59.0, 60.0, 1, 57, 1.0)
    second = attempt(1, 62.0, 66.0, 115.0, 120.0, 51, 100, 1.0)
    ledger = goodput(job, [first, second], now=0.0)
    assert ledger["recomputed_steps"] == 7
    assert ledger["productive_s"] == pytest.approx(100.0)
    assert ledger["recovery_gap_s"] == pytest.approx(2.0)
    assert ledger["startup_restore_s"] == pytest.approx(5.0)
    assert ledger["restarts"] == 1
    parts = sum(
        ledger[k]
        for k in (
            "queued_s",
            "startup_restore_s",
            "productive_s",
            "recomputed_s",
            "recovery_gap_s",
            "other_s",
        )
    )
    assert parts == pytest.approx(ledger["wall_s"])


PARTS = ("queued_s", "startup_restore_s", "productive_s", "recomputed_s", "recovery_gap_s")


def test_goodput_never_exceeds_the_wall_time() -> None:
    """The probe's 113.7%: no restarts, a median step time above the mean (steps x median
    claimed 41.2 s in 36.3 s). Steps are timed by the span they took, the first step once."""
    job = Job(created_unix=0.0, ended_unix=36.3)
    ledger = goodput(job, [attempt(0, 0.5, 1.0, 36.0, 36.3, 1, 83, 0.5)], now=0.0)
    assert ledger["ettr"] <= 1.0
    assert ledger["productive_s"] == pytest.approx(35.0 * 83 / 82)
    assert sum(ledger[k] for k in PARTS) <= ledger["wall_s"] + 1e-9
    # one step, its median longer than the whole attempt before it was seen
    job = Job(created_unix=0.0, ended_unix=2.0)
    ledger = goodput(job, [attempt(0, 0.0, 1.0, 1.0, 2.0, 1, 1, 30.0)], now=0.0)
    assert ledger["productive_s"] == pytest.approx(1.0) and ledger["startup_restore_s"] == 0.0
