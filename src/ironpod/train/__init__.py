"""``ironpod.train``: the few calls a training script adds to survive failures.

    import ironpod.train as it
    ctx = it.init()
    state = it.TrainState(model=model, optimizer=opt, dataloader=loader)
    ckpt = it.Checkpointer("/ckpt/run1", ctx=ctx)
    start = ckpt.load_latest(state) or 0
    for step in range(start + 1, steps + 1):
        ...
        it.progress(step, loss=loss.item())
        if step % 100 == 0 or ctx.should_stop():
            ckpt.save(step, state)
        if ctx.should_stop():
            ckpt.wait(); raise SystemExit(it.EXIT_PREEMPTED)

The beacon half imports no torch, so the agent can parse progress lines without paying for
torch; everything else loads on first use (PEP 562 module ``__getattr__``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ironpod.train.beacon import parse_progress_line, progress

if TYPE_CHECKING:
    from ironpod.train.checkpoint import (
        Checkpointer,
        MemorySnapshots,
        SaveRecord,
        Stateful,
        TieredCheckpointer,
        TrainState,
    )
    from ironpod.train.context import EXIT_PREEMPTED, TrainContext, init, shutdown

_LAZY = {
    "Checkpointer": "ironpod.train.checkpoint",
    "MemorySnapshots": "ironpod.train.checkpoint",
    "SaveRecord": "ironpod.train.checkpoint",
    "TieredCheckpointer": "ironpod.train.checkpoint",
    "Stateful": "ironpod.train.checkpoint",
    "TrainState": "ironpod.train.checkpoint",
    "EXIT_PREEMPTED": "ironpod.train.context",
    "TrainContext": "ironpod.train.context",
    "init": "ironpod.train.context",
    "shutdown": "ironpod.train.context",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ironpod.train' has no attribute {name!r}")


__all__ = [
    "EXIT_PREEMPTED",
    "Checkpointer",
    "MemorySnapshots",
    "SaveRecord",
    "Stateful",
    "TieredCheckpointer",
    "TrainContext",
    "TrainState",
    "init",
    "parse_progress_line",
    "progress",
    "shutdown",
]
