"""An unmodified training script: plain torch, no ironpod import (the step hook's tests).

    python tests/scripts/plain_train.py --steps 20                 # one process
    torchrun --nproc-per-node 2 tests/scripts/plain_train.py       # DDP over gloo, CPU

A tiny seeded regression model trained with SGD. Each step prints ``loss STEP REPR`` on rank 0
(the float's repr, so two runs compare byte for byte) and, at the end, a SHA-256 of the final
parameters' bytes. ``--step-sleep`` makes a step last at least that long (a steady median for
the hang rule); ``--workers`` feeds the batches through a DataLoader with forked workers. The
process group waits at most ``--dist-timeout`` seconds in a collective, as a user's script
would set its own.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--dist-timeout", type=float, default=60.0)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model: torch.nn.Module = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
    )
    if world > 1:
        timeout = datetime.timedelta(seconds=args.dist_timeout)
        dist.init_process_group("gloo", timeout=timeout)
        model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1 + rank)
    inputs = torch.randn(args.steps * 8, 16, generator=g)
    targets = inputs[:, :4].sum(dim=1, keepdim=True) + 0.1 * torch.randn(
        len(inputs), 1, generator=g
    )
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=8, num_workers=args.workers)

    for step, (x, y) in enumerate(loader, start=1):
        began = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0:
            print(f"loss {step} {loss.item()!r}", flush=True)
        time.sleep(max(0.0, args.step_sleep - (time.perf_counter() - began)))

    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().numpy().tobytes())
    if rank == 0:
        print(f"params {digest.hexdigest()}", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
