"""Worker for the launch test: an all-reduce, progress beacons, and a crash on attempt 0."""

import os
import sys

import torch
import torch.distributed as dist

import ironpod.train as it

ctx = it.init()
total = torch.ones(1) * (ctx.rank + 1)
dist.all_reduce(total)
for step in range(1, 4):
    it.progress(step, total=float(total.item()))
if ctx.attempt_id == 0 and ctx.rank == ctx.world_size - 1:
    print("crashing on purpose", flush=True)
    os._exit(13)
print(f"world {ctx.world_size} sum {total.item()} attempt {ctx.attempt_id}", flush=True)
it.shutdown(ctx)
sys.exit(0)
