"""DeepSpeed ZeRO-2 on CPU (DS_ACCELERATOR=cpu, gloo): ``save_checkpoint``/``load_checkpoint``.

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 deepspeed_zero2.py --out /tmp/run
    DS_ACCELERATOR=cpu ironpod launch --nproc-per-node 2 deepspeed_zero2.py --out /tmp/run

``deepspeed.init_distributed`` reads the launcher's RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*;
``save_checkpoint`` every ``--save-every`` steps writes a tag and the ``latest`` file (its last
act, so ``latest`` names only complete checkpoints); a rerun loads it and skips the batches of
the interrupted epoch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from _common import pace, say, started
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    "zero_optimization": {"stage": 2},
    "steps_per_print": 1_000_000,
    "wall_clock_breakdown": False,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=10)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    started(rank)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=CONFIG
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 16, generator=gen)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    sampler = DistributedSampler(data, shuffle=True, seed=0)  # 25 steps an epoch
    loader = DataLoader(data, batch_size=8, sampler=sampler)
    ckpt_dir = args.out / "ckpt"
    step = 0
    if (ckpt_dir / "latest").exists():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        step = int(client["step"])
        say("resumed", rank=rank, step=step)
    per_epoch = len(loader)
    loss = torch.zeros(())
    while step < args.steps:
        epoch, done_in_epoch = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        for i, (xb, yb) in enumerate(loader):
            if i < done_in_epoch:
                continue
            loss = nn.functional.mse_loss(engine(xb), yb)
            engine.backward(loss)
            engine.step()
            step += 1
            say("step", rank=rank, step=step, loss=repr(loss.item()))
            if step % args.save_every == 0:
                engine.save_checkpoint(
                    str(ckpt_dir), tag=f"step{step}", client_state={"step": step}
                )
                if rank == 0:
                    say("saved", rank=rank, step=step)
            if step >= args.steps:
                break
            pace()
    if rank == 0:
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        torch.save(state, args.out / "final.pt")
        say("done", rank=rank, step=step, loss=repr(loss.item()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
