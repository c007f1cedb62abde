"""The least a PyTorch training loop adds to survive failures with ironpod.

    python examples/train_min.py                       # `kill` it (SIGTERM), rerun it: it resumes
    python examples/train_min.py --checkpoint-dir /tmp/ckpt --steps 500
    torchrun --nproc-per-node 2 examples/train_min.py  # DDP: gloo on CPU, NCCL on GPUs
    IRONPOD_CHECKPOINT_DIR=/tmp/ckpt torchrun --nproc-per-node 2 examples/train_min.py

Five additions to an ordinary loop, marked (1) to (5) below:

(1) ``it.init()`` reads who this process is, joins torch.distributed when there are several,
    and turns SIGTERM (preemption, drain, cancel) into a flag instead of a kill.
(2) ``it.TrainState`` names what a checkpoint holds: model, optimizer, data loader position
    (anything with ``state_dict``/``load_state_dict``) and a few extras; RNGs come for free.
(3) ``it.Checkpointer`` saves in the background and ``load_latest`` resumes from the newest
    checkpoint that was completely written, or returns None on a fresh start.
(4) ``it.progress`` tells the supervisor (and the log) that the job is alive and how it does.
(5) ``ctx.should_stop()``: save, wait until the save is durable, exit with EXIT_PREEMPTED so
    the controller requeues the job rather than counting a failure.

The model learns a fixed random linear map from synthetic, deterministic data, so the script is
self-contained; replace ``Teacher``, the model and the loss with your own.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ironpod.train as it

DIM = 32


class Teacher:
    """Batch ``i`` is a pure function of ``i``, so the loader's whole state is one integer.

    Each rank takes its own slice of every global batch: the data a run sees does not depend
    on where it was interrupted, nor on how many processes share the work.
    """

    def __init__(self, global_batch: int, rank: int, world_size: int) -> None:
        self.weight = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(0))
        self.per_rank, self.rank = global_batch // world_size, rank
        self.global_batch = global_batch
        self.next_index = 0

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.next_index)
        x = torch.randn(self.global_batch, DIM, generator=gen)
        x = x[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        self.next_index += 1
        return x, x @ self.weight

    def state_dict(self) -> dict[str, Any]:
        return {"next_index": self.next_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_index = state["next_index"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--checkpoint-dir", help="default: $IRONPOD_CHECKPOINT_DIR, else /tmp")
    parser.add_argument("--save-every", type=int, default=50)
    args = parser.parse_args()

    ctx = it.init()  # (1)
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(nn.Linear(DIM, 128), nn.GELU(), nn.Linear(128, DIM))
    model = model.to(ctx.device)
    if ctx.is_distributed:
        on_gpu = ctx.device.type == "cuda"
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if on_gpu else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = Teacher(global_batch=64, rank=ctx.rank, world_size=ctx.world_size)

    state = it.TrainState(  # (2)
        model=model, optimizer=optimizer, dataloader=data, extras={"best_loss": float("inf")}
    )
    location = args.checkpoint_dir or ctx.checkpoint_dir or "/tmp/ironpod/train_min"
    ckpt = it.Checkpointer(location, ctx=ctx, keep_last=2)  # (3)
    start = ckpt.load_latest(state) or 0
    if ctx.is_main:
        print(f"checkpoints in {location}; starting after step {start} of {args.steps}")

    try:
        for step in range(start + 1, args.steps + 1):
            x, y = (t.to(ctx.device) for t in next(data))
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            value = loss.item()
            state.extras["best_loss"] = min(state.extras["best_loss"], value)
            it.progress(step, loss=value)  # (4)

            stop = ctx.should_stop_all()  # (5) every rank agrees, so all save the same step
            if step % args.save_every == 0 or stop:
                ckpt.save(step, state)  # returns once the state is staged; writes in background
            if stop:
                ckpt.wait()
                if ctx.is_main:
                    print(f"stopping after step {step}: checkpoint saved, rerun to resume")
                return it.EXIT_PREEMPTED
        ckpt.wait()
        if ctx.is_main:
            print(f"done: best loss {state.extras['best_loss']:.4f}")
        return 0
    finally:
        ckpt.close()
        it.shutdown(ctx)


if __name__ == "__main__":
    raise SystemExit(main())
