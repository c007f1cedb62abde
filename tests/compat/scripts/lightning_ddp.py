"""PyTorch Lightning, strategy ddp on CPU, 2 processes started by a torchrun-style launcher.

    torchrun --nproc-per-node 2 lightning_ddp.py --out /tmp/run
    ironpod launch --nproc-per-node 2 lightning_ddp.py --out /tmp/run [--ironpod-callback]

``ModelCheckpoint(every_n_train_steps=...)`` writes ``step=N.ckpt`` and ``last.ckpt``; every
run calls ``fit(ckpt_path="last")``, which starts fresh when there is none. An epoch is exactly
``--save-every`` steps: Lightning does not fast-forward a plain DataLoader that resumes mid-epoch
(it starts that epoch over), so checkpoints on epoch boundaries keep the resume exact.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from _common import finish, pace, say, started
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Regressor(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Report(Callback):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_step:
            say("resumed", rank=self.rank, step=trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args: Any) -> None:
        loss = float(outputs["loss"].detach())
        say("step", rank=self.rank, step=trainer.global_step, loss=repr(loss))
        pace()

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Any) -> None:
        say("saved", rank=self.rank, step=trainer.global_step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--ironpod-callback", action="store_true")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    started(rank)
    seed_everything(0, workers=True, verbose=False)
    gen = torch.Generator().manual_seed(1)
    batch, world = 8, 2
    x = torch.randn(args.save_every * batch * world, 16, generator=gen)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    loader = DataLoader(data, batch_size=batch, shuffle=True)  # a seeded DistributedSampler
    ckpt_dir = args.out / "ckpt"
    callbacks: list[Any] = [
        ModelCheckpoint(
            dirpath=ckpt_dir, every_n_train_steps=args.save_every, save_top_k=-1, save_last=True
        ),
        Report(rank),
    ]
    if args.ironpod_callback:
        from ironpod.integrations.lightning import IronpodCallback

        callbacks.append(IronpodCallback(ckpt_dir))
    trainer = Trainer(
        accelerator="cpu", devices=world, num_nodes=1, strategy="ddp", max_steps=args.steps,
        callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True,
    )  # fmt: skip
    model = Regressor()
    trainer.fit(model, loader, ckpt_path="last")
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), args.out / "final.pt")
        say("done", rank=rank, step=trainer.global_step)
    finish()


if __name__ == "__main__":
    main()
