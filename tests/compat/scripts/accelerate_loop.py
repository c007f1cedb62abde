"""Hugging Face Accelerate: ``save_state``/``load_state`` and ``skip_first_batches``.

    torchrun --nproc-per-node 2 accelerate_loop.py --out /tmp/run
    ironpod launch --nproc-per-node 2 accelerate_loop.py --out /tmp/run

Every ``--save-every`` steps ``save_state`` writes ``ckpt/step-N`` (model, optimizer, RNG
states); a ``STEP`` file written after it marks it complete. A rerun loads the newest complete
one and skips the batches of its epoch already trained on with ``skip_first_batches``. An epoch
is 12 steps, so the checkpoints at 10, 20, ... fall mid-epoch and the skip is exercised.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import pace, say, started
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def latest(ckpt_dir: Path) -> Path | None:
    done = [p for p in ckpt_dir.glob("step-*") if (p / "STEP").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=10)
    args = parser.parse_args()
    acc = Accelerator(cpu=True)
    rank = acc.process_index
    started(rank)
    set_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(192, 16, generator=gen)  # 2 ranks x 8 a batch: 12 steps an epoch
    data = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    model, opt, loader = acc.prepare(model, opt, DataLoader(data, batch_size=8))
    ckpt_dir = args.out / "ckpt"
    step = 0
    found = latest(ckpt_dir)
    if found is not None:
        acc.load_state(str(found))
        step = int((found / "STEP").read_text())
        say("resumed", rank=rank, step=step)
    per_epoch = len(loader)
    loss = torch.zeros(())
    while step < args.steps:
        skip = step % per_epoch
        batches = acc.skip_first_batches(loader, skip) if skip else loader
        for xb, yb in batches:
            loss = nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            acc.backward(loss)
            opt.step()
            step += 1
            say("step", rank=rank, step=step, loss=repr(loss.item()))
            if step % args.save_every == 0:
                where = ckpt_dir / f"step-{step}"
                acc.save_state(str(where))
                acc.wait_for_everyone()
                if acc.is_main_process:
                    (where / "STEP").write_text(str(step))
                    say("saved", rank=rank, step=step)
            if step >= args.steps:
                break
            pace()
    if acc.is_main_process:
        state = acc.unwrap_model(model).state_dict()
        torch.save(state, args.out / "final.pt")
        say("done", rank=rank, step=step, loss=repr(loss.item()))
    acc.end_training()


if __name__ == "__main__":
    main()
