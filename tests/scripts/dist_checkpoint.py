"""Worker for the multi-process checkpoint tests: train a few steps, save, or load and dump.

usage: dist_checkpoint.py MODE(none|ddp|fsdp2) ACTION(save|load) CKPT_DIR OUT_FILE [STEPS]

``save`` trains STEPS steps saving after each; ``load`` restores the newest good checkpoint.
Both write the full (gathered) model and optimizer state, the loader position and a draw of
each RNG to OUT_FILE (rank 0), for the test to compare.
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import ironpod.train as it


class Counter:
    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def build(mode: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model: torch.nn.Module = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.Linear(64, 4)
    )
    if mode == "fsdp2":
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    elif mode == "ddp":
        model = DistributedDataParallel(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def main() -> None:
    mode, action, location, out = sys.argv[1:5]
    steps = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    ctx = it.init()
    model, optim = build(mode)
    loader = Counter()
    state = it.TrainState(model=model, optimizer=optim, dataloader=loader, extras={"tag": ""})
    ckpt = it.Checkpointer(location, ctx=ctx, keep_last=10)
    loaded = None
    if action == "save":
        gen = torch.Generator().manual_seed(1 + ctx.rank)
        for step in range(1, steps + 1):
            loss = model(torch.randn(8, 32, generator=gen)).pow(2).mean()
            loss.backward()
            optim.step()
            optim.zero_grad()
            loader.position += 8
            state.extras["tag"] = f"step{step}"
            ckpt.save(step, state)
        ckpt.wait()
    else:
        loaded = ckpt.load_latest(state)
    ckpt.close()
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optim, options=full)
    if ctx.rank == 0:
        torch.save(
            {
                "loaded": loaded,
                "model": model_sd,
                "optim_state": optim_sd["state"],
                "position": loader.position,
                "tag": state.extras.get("tag"),
                "draws": (torch.rand(1).item(), float(np.random.rand()), random.random()),
                "skipped": ckpt.skipped,
            },
            out,
        )
    it.shutdown(ctx)


if __name__ == "__main__":
    main()
