"""The goodput ledger: where a job's wall time went.

Computed from the attempt rows (when each started, reached its first step, made its last
progress and ended, and which steps it covered), never from guesses:

- queued: submission to the first attempt's creation;
- startup and restore: attempt creation to the start of its first step (process start,
  rendezvous, restore);
- productive: steps kept in the end, at each attempt's mean time per step over the span its
  progress took (so the parts never add up to more than the wall time);
- recomputed: steps run again after a restore from an older checkpoint;
- checkpoint stall: the seconds steps were blocked by checkpoint saves (within productive);
- lost: progress that happened after the last kept step of a failed attempt until its failure
  was detected, and the gap from failure to the next attempt (detect, decide, restart);
- ETTR = productive / wall.
"""

from __future__ import annotations

from typing import Any

from ironpod.controller.db import Attempt, Job


def _step_time(attempt: Attempt) -> float | None:
    """Seconds per step: the mean over the attempt's measured progress span, which adds up to
    the wall time it covers (a median can be far above the mean, and steps x median then
    claimed more time than passed: 41.2 s "productive" in 36.3 s); the median only when there
    is no span (a single step)."""
    if (
        attempt.first_step_unix is not None
        and attempt.last_progress_unix is not None
        and attempt.first_step is not None
        and attempt.last_step is not None
        and attempt.last_step > attempt.first_step
    ):
        span = attempt.last_progress_unix - attempt.first_step_unix
        return max(0.0, span) / (attempt.last_step - attempt.first_step)
    return attempt.median_step_s or None


def goodput(job: Job, attempts: list[Attempt], now: float) -> dict[str, Any]:
    end = job.ended_unix or now
    wall = max(end - job.created_unix, 1e-9)
    ordered = sorted(attempts, key=lambda a: a.number)
    queued = (ordered[0].created_unix - job.created_unix) if ordered else wall
    startup = 0.0
    productive = 0.0
    recomputed_s = 0.0
    recomputed_steps = 0
    gaps = 0.0
    for i, attempt in enumerate(ordered):
        if i > 0 and ordered[i - 1].ended_unix is not None:
            gaps += max(0.0, attempt.created_unix - (ordered[i - 1].ended_unix or 0.0))
        step_s = _step_time(attempt)
        if attempt.first_step_unix is None:
            continue
        # The first step ends at first_step_unix: its time is a step's, not startup's, and it
        # cannot have begun before the attempt did.
        to_first = max(0.0, attempt.first_step_unix - attempt.created_unix)
        first_step_s = min(step_s or 0.0, to_first)
        startup += to_first - first_step_s
        if step_s is None or attempt.first_step is None or attempt.last_step is None:
            continue
        begin = attempt.first_step - 1
        # Steps of this attempt re-run by a later one: those past the later one's resume point.
        kept_until = attempt.last_step
        for later in ordered[i + 1 :]:
            if later.first_step is not None:
                kept_until = min(kept_until, later.first_step - 1)
        kept = max(0, kept_until - begin)
        redone = max(0, attempt.last_step - max(kept_until, begin))
        productive += kept * step_s - (step_s - first_step_s if kept else 0.0)
        recomputed_s += redone * step_s - (step_s - first_step_s if redone and not kept else 0.0)
        recomputed_steps += redone
    # Checkpoint stalls happen inside steps, so they are part of productive time: shown
    # on their own (from the agents' running totals of ckpt_block_s), not subtracted again.
    stall = sum(float((a.metrics or {}).get("ckpt_block_total_s", 0.0)) for a in ordered)
    other = max(0.0, wall - queued - startup - productive - recomputed_s - gaps)
    return {
        "wall_s": wall,
        "queued_s": queued,
        "startup_restore_s": startup,
        "productive_s": productive,
        "recomputed_s": recomputed_s,
        "recomputed_steps": recomputed_steps,
        "recovery_gap_s": gaps,
        "checkpoint_stall_s": stall,
        "other_s": other,
        "restarts": max(0, len(ordered) - 1),
        "ettr": productive / wall,
    }
