"""Plain DDP (gloo, CPU) with its own ``torch.save`` checkpoints and resume-from-latest.

    torchrun --nproc-per-node 2 ddp_plain.py --out /tmp/run
    ironpod launch --nproc-per-node 2 ddp_plain.py --out /tmp/run

Rank 0 writes ``step-N.pt`` every ``--save-every`` steps (to a temporary name, then renamed,
so a kill mid-write leaves no torn file); every rank resumes from the newest one and skips
the batches of the interrupted epoch that were already trained on.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from _common import pace, say, started
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def latest(ckpt_dir: Path) -> Path | None:
    found = sorted(ckpt_dir.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return found[-1] if found else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=10)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    started(rank)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 16, generator=gen)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    sampler = DistributedSampler(data, shuffle=True, seed=0)  # 200 a rank: 25 steps an epoch
    loader = DataLoader(data, batch_size=8, sampler=sampler)

    ckpt_dir = args.out / "ckpt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    step = 0
    found = latest(ckpt_dir)
    if found is not None:
        state = torch.load(found, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        say("resumed", rank=rank, step=step)
    per_epoch = len(loader)
    loss = torch.zeros(())
    while step < args.steps:
        epoch, done_in_epoch = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        for i, (xb, yb) in enumerate(loader):
            if i < done_in_epoch:
                continue  # trained on before the restart
            loss = nn.functional.mse_loss(ddp(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            say("step", rank=rank, step=step, loss=repr(loss.item()))
            if step % args.save_every == 0 and rank == 0:
                tmp = ckpt_dir / f".step-{step}.pt.tmp"
                state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
                torch.save(state, tmp)
                os.replace(tmp, ckpt_dir / f"step-{step}.pt")
                say("saved", rank=rank, step=step)
            if step >= args.steps:
                break
            pace()
    if rank == 0:
        torch.save(model.state_dict(), args.out / "final.pt")
        say("done", rank=rank, step=step, loss=repr(loss.item()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
