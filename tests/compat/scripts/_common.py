"""What the compat scripts share: one progress-line format the tests read, and pacing.

Nothing here is ironpod: the scripts stand for third-party code that knows nothing of it.
A line reads ``compat <event> key=value ...``; the events are ``start`` (rank, pid, the
tracker's run id), ``step``, ``saved`` (a checkpoint is complete), ``resumed`` and ``done``.
"""

from __future__ import annotations

import os
import time

#: Seconds each step sleeps: a faulted run is slow enough for a test to land a signal
#: mid-run; a reference run leaves it at 0.
STEP_SLEEP_ENV = "COMPAT_STEP_SLEEP"


def say(event: str, **fields: object) -> None:
    """One progress line on stdout (the rank's log under ironpod launch), flushed at once."""
    text = " ".join(f"{key}={value}" for key, value in fields.items())
    print(f"compat {event} {text}".rstrip(), flush=True)


def started(rank: int) -> None:
    say("start", rank=rank, pid=os.getpid(), wandb_run_id=os.environ.get("WANDB_RUN_ID", "-"))


def finish() -> None:
    """Tear the process group down as a script's last act, as careful scripts do.

    Hugging Face Trainer and Lightning leave gloo's process group to interpreter exit, where its
    threads may still run while it is destroyed: a reference run under bare torchrun once died
    there with SIGABRT ("terminate called without an active exception") after finishing.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def pace() -> None:
    delay = float(os.environ.get(STEP_SLEEP_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
