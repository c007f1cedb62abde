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
"""

from ironpod.train.beacon import parse_progress_line, progress
from ironpod.train.checkpoint import Checkpointer, SaveRecord, Stateful, TrainState
from ironpod.train.context import EXIT_PREEMPTED, TrainContext, init, shutdown

__all__ = [
    "EXIT_PREEMPTED",
    "Checkpointer",
    "SaveRecord",
    "Stateful",
    "TrainContext",
    "TrainState",
    "init",
    "parse_progress_line",
    "progress",
    "shutdown",
]
