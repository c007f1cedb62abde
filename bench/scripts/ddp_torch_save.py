"""A plain DDP training script, as users write them: no ironpod import, its own checkpoints.

    torchrun --standalone --nproc-per-node 2 bench/scripts/ddp_torch_save.py --dir /tmp/ck
    ironpod launch --nproc-per-node 2 bench/scripts/ddp_torch_save.py --dir /tmp/ck

bench/goodput.py runs it under each launcher through the same faults. It stands for the
unmodified workloads ironpod must carry: gloo on CPU with a 60 s collective timeout (what
such scripts often set; gloo's default is 30 minutes), a ``torch.save`` checkpoint of model,
optimizer and step every ``--every`` steps written by rank 0 (to a temporary name, fsynced,
then renamed, so a kill never leaves half a file), and on start a resume from the newest one.

Deterministic: the data of step N is drawn from a generator seeded with N, so a resumed run
computes exactly the steps an uninterrupted one would, and every finished run ends on the
same loss. Rank 0 prints ``[ddp] from scratch`` or ``[ddp] resuming after step N`` once, and
``step=N loss=X`` per step.
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def batch(step: int, rank: int, size: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 1000 + rank)
    x = torch.randn(size, width, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def save(path: Path, state: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=25, help="checkpoint every N steps")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    net = model(args.width, args.depth)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ckpt = args.dir / "latest.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start = int(state["step"])
    if rank == 0:
        print(f"[ddp] resuming after step {start}" if start else "[ddp] from scratch", flush=True)
    ddp = DistributedDataParallel(net)
    for step in range(start + 1, args.steps + 1):
        x, y = batch(step, rank, args.batch, args.width)
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            print(f"step={step} loss={total.item() / dist.get_world_size():.9g}", flush=True)
            if step % args.every == 0:
                args.dir.mkdir(parents=True, exist_ok=True)
                state = {"model": net.state_dict(), "optim": opt.state_dict(), "step": step}
                save(ckpt, state)
        if step % args.every == 0:
            dist.barrier()  # nobody runs ahead of a checkpoint that may be resumed from
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
