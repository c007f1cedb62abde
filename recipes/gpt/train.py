"""Pretrain the GPT recipe: one process, or ``torchrun`` with DDP or FSDP2, resumable.

    python -m recipes.gpt.train --config tiny --set train.steps=50
    torchrun --nproc-per-node 2 -m recipes.gpt.train --set train.parallel=fsdp2
    IRONPOD_CHECKPOINT_DIR=/tmp/ckpt python -m recipes.gpt.train   # saves, and resumes if killed
    IRONPOD_SNAPSHOT_DIR=/dev/shm/gpt IRONPOD_CHECKPOINT_DIR=/tmp/ckpt \
        python -m recipes.gpt.train --set checkpoint.memory_every=1   # + a memory snapshot a step

Each step logs one ``[ironpod] progress`` line per rank (loss averaged over all ranks, learning
rate, tokens/s, and MFU on CUDA) and rank 0 prints a readable summary every ``log_every`` steps.
Everything a step depends on is a pure function of the step number (the batch, the learning
rate) or lives in the checkpoint, so a resumed run continues exactly where it stopped.

Determinism: with ``train.deterministic=true`` on CPU, two runs with the same config, world
size, parallel mode and thread count produce bitwise-identical weights, interrupted or not.
Thread count matters because it changes the order of floating-point reductions: pin it with
``train.num_threads`` (torchrun already sets OMP_NUM_THREADS=1 for each of several processes).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import ironpod.train as it
from ironpod.env import SNAPSHOT_DIR
from ironpod.errors import ConfigError, exit_on_error
from recipes.gpt import data
from recipes.gpt.config import RecipeConfig, TrainConfig, builtin_configs, load_config
from recipes.gpt.model import Transformer, cross_entropy

#: Peak dense (no sparsity) BF16 tensor-core FLOP/s of one GPU, matched against
#: ``torch.cuda.get_device_name()`` in order, first match wins. From NVIDIA's datasheets: H100
#: SXM 989.4 TFLOPS, H100 PCIe 756, H100 NVL 835 (H100 datasheet); H200 SXM 989 and GH200 989
#: (H200 and GH200 datasheets); A100 312 (A100 datasheet); L40S 362; L4 121.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def peak_flops(device: torch.device) -> float | None:
    """Peak BF16 FLOP/s of this GPU, or None where MFU would be meaningless (CPU, unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then cosine decay.

    A pure function of the step, so a resumed run needs no scheduler state to stay exact.
    """
    if step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    floor = cfg.lr * cfg.min_lr_ratio
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def configure_runtime(cfg: TrainConfig, device: torch.device) -> None:
    """Threads, seeds and determinism switches, before anything touches the GPU or CPU BLAS."""
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        if device.type == "cuda":  # cuBLAS reads it when its first handle is created
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True


def parallelize(model: Transformer, cfg: TrainConfig, ctx: it.TrainContext) -> nn.Module:
    """Compile each block if asked, then wrap for the parallel mode; returns the module to call.

    FSDP2 shards every block, then the root (embeddings, final norm and head), so a block's
    parameters are gathered only while it runs. It casts parameters to the compute dtype itself
    (``MixedPrecisionPolicy``) and reduces gradients in float32.
    """
    if cfg.compile:
        for layer in model.layers:
            layer.compile()
    if cfg.parallel == "ddp":
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # The RoPE tables are constants every rank computes alike: no broadcast per step. That
        # also keeps the forward free of collectives, so its time is this rank's own compute.
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    if cfg.parallel == "fsdp2":
        policy = MixedPrecisionPolicy(
            param_dtype=getattr(torch, cfg.dtype), reduce_dtype=torch.float32
        )
        for layer in model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, norm gains do not (decaying them only fights the normalisation)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr_at(1, cfg), betas=(0.9, 0.95), eps=1e-8)


def _autocast(cfg: TrainConfig, device: torch.device) -> AbstractContextManager[object]:
    if cfg.dtype == "float32" or cfg.parallel == "fsdp2":  # FSDP2 casts via its policy
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, cfg.dtype))


def _global_mean(values: list[float], ctx: it.TrainContext) -> list[float]:
    """Average each value over all ranks with one small all-reduce."""
    if not ctx.is_distributed:
        return values
    on = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    packed = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(packed)
    means: list[float] = (packed / ctx.world_size).tolist()
    return means


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    cfg: TrainConfig,
    device: torch.device,
) -> tuple[float, float, float]:
    """One optimizer step over this rank's slice, in micro-batches.

    Returns this rank's loss, the global gradient norm (before clipping) and this rank's own
    compute seconds: its forward passes and optimizer step, which wait for no other rank under
    DDP (straggler detection compares them; the backward waits in the gradient all-reduce).
    """
    inputs, targets = (t.to(device, non_blocking=True) for t in batch)
    micro = cfg.micro_batch or len(inputs)
    if len(inputs) % micro:
        raise ConfigError(
            f"config: train.micro_batch {micro} does not divide the per-rank batch {len(inputs)}"
        )
    chunks = range(0, len(inputs), micro)
    total = torch.zeros((), device=device)
    compute = 0.0
    for i, start in enumerate(chunks):
        last = i == len(chunks) - 1
        no_sync: AbstractContextManager[object] = nullcontext()
        if isinstance(model, DistributedDataParallel) and not last:
            no_sync = model.no_sync()
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(last)
        began = time.perf_counter()
        with no_sync, _autocast(cfg, device):
            logits = model(inputs[start : start + micro])
            loss = cross_entropy(logits, targets[start : start + micro]) / len(chunks)
        compute += time.perf_counter() - began
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        total += loss.detach()
    max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if isinstance(norm, DTensor):  # FSDP2: the norm of sharded gradients is itself sharded
        norm = norm.full_tensor()
    began = time.perf_counter()
    optimizer.step()
    compute += time.perf_counter() - began
    optimizer.zero_grad(set_to_none=True)
    return float(total.item()), float(norm.item()), compute


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    ctx: it.TrainContext,
) -> float:
    """Mean held-out loss over the fixed validation batches of every rank."""
    model.eval()
    losses = []
    for inputs, targets in batches:
        with _autocast(cfg, ctx.device):
            logits = model(inputs.to(ctx.device))
        losses.append(cross_entropy(logits, targets.to(ctx.device)).item())
    model.train()
    return _global_mean([sum(losses) / len(losses)], ctx)[0]


def save_final_weights(model: nn.Module, path: str, ctx: it.TrainContext) -> None:
    """Write the full, unsharded model state dict from rank 0 (collective under FSDP2)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if ctx.is_main:
        torch.save(state, path)  # already full, plain CPU tensors (cpu_offload)


def _resolve_parallel(cfg: RecipeConfig, ctx: it.TrainContext) -> RecipeConfig:
    mode = cfg.train.parallel
    if mode == "none" and ctx.world_size > 1:
        raise ConfigError(
            f"config: train.parallel: 'none' cannot train on {ctx.world_size} processes; "
            "use ddp or fsdp2"
        )
    if mode != "none" and not ctx.is_distributed:
        print(f"[gpt] train.parallel={mode} in a single process: running without it", flush=True)
        return cfg.model_copy(update={"train": cfg.train.model_copy(update={"parallel": "none"})})
    if cfg.train.global_batch % ctx.world_size:
        raise ConfigError(
            f"config: train.global_batch {cfg.train.global_batch} is not divisible by "
            f"{ctx.world_size} processes"
        )
    return cfg


@dataclass(kw_only=True)
class Session:
    """Everything one run holds, so the loop reads as the loop (built by :func:`setup`)."""

    cfg: RecipeConfig
    ctx: it.TrainContext
    raw: Transformer  # the unwrapped model, for its shape and FLOP count
    model: nn.Module  # what to call: raw itself, DDP(raw), or raw sharded in place by FSDP2
    optimizer: torch.optim.Optimizer
    loader: data.BatchLoader
    val: list[tuple[torch.Tensor, torch.Tensor]]
    state: it.TrainState
    ckpt: it.Checkpointer | it.TieredCheckpointer | None
    description: str


def setup(cfg: RecipeConfig, ctx: it.TrainContext) -> Session:
    """Data, model, parallelism, optimizer and checkpointer for ``cfg`` on this rank."""
    tc = cfg.train
    configure_runtime(tc, ctx.device)
    tokens = data.prepare(cfg.data)
    where = {"seq_len": cfg.data.seq_len, "global_batch": tc.global_batch}
    ranks = {"rank": ctx.rank, "world_size": ctx.world_size}
    loader = data.BatchLoader(tokens.train, seed=tc.seed, **where, **ranks)
    val = data.eval_batches(tokens.val, n_batches=tc.eval_batches, **where, **ranks)
    raw = Transformer(cfg.model, seed=tc.seed).to(ctx.device)
    model = parallelize(raw, tc, ctx)
    optimizer = build_optimizer(model, tc)
    state = it.TrainState(
        model=model, optimizer=optimizer, dataloader=loader, extras={"tokens_seen": 0}
    )
    ckpt: it.Checkpointer | it.TieredCheckpointer | None = None
    cc = cfg.checkpoint
    memory = cc.memory_every
    if memory == "auto" and not os.environ.get(SNAPSHOT_DIR):
        memory = 0  # no snapshot area (torchrun, a plain python): durable checkpoints only
    if cc.dir and memory != 0:
        ckpt = it.TieredCheckpointer(
            cc.dir,
            ctx=ctx,
            slots=cc.slots,
            memory_every=memory,
            durable_every=cc.every,
            durable_interval_s=cc.durable_interval_s,
            keep_last=cc.keep_last,
            keep_every=cc.keep_every,
            asynchronous=cc.async_save,
        )
    elif cc.dir:
        ckpt = it.Checkpointer(
            cc.dir,
            ctx=ctx,
            keep_last=cc.keep_last,
            keep_every=cc.keep_every,
            asynchronous=cc.async_save,
        )
    description = (
        f"model {raw.num_params() / 1e6:.2f}M params, tokenizer {tokens.tokenizer.name}, "
        f"{len(tokens.train):,} train / {len(tokens.val):,} val tokens, "
        f"world {ctx.world_size} ({tc.parallel}), device {ctx.device}"
    )
    return Session(
        cfg=cfg,
        ctx=ctx,
        raw=raw,
        model=model,
        optimizer=optimizer,
        loader=loader,
        val=val,
        state=state,
        ckpt=ckpt,
        description=description,
    )


def run(cfg: RecipeConfig, ctx: it.TrainContext, final_weights: str | None = None) -> int:
    """Train to ``cfg.train.steps``, resuming from the newest checkpoint; returns an exit code."""
    s = setup(_resolve_parallel(cfg, ctx), ctx)
    try:
        start = (s.ckpt.load_latest(s.state) if s.ckpt else None) or 0
        if ctx.is_main:
            origin = f"resuming after step {start}" if start else "from scratch"
            print(f"[gpt] {s.description}, {origin}", flush=True)
        code = train(s, start)
        if code == 0 and final_weights:
            save_final_weights(s.model, final_weights, ctx)
        return code
    finally:
        if s.ckpt is not None:
            s.ckpt.close()


def train(s: Session, start: int) -> int:
    """Steps ``start + 1 .. steps``: 0 when done, EXIT_PREEMPTED after a requested stop."""
    tc, ctx = s.cfg.train, s.ctx
    tokens_per_step = tc.global_batch * s.cfg.data.seq_len
    flops_per_step = s.raw.flops_per_token(s.cfg.data.seq_len) * tokens_per_step
    peak = peak_flops(ctx.device)
    meter = Throughput(tokens_per_step, flops_per_step, peak, ctx.world_size)
    loss = val_loss = float("nan")
    for step in range(start + 1, tc.steps + 1):
        lr = lr_at(step, tc)
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        local, grad_norm, compute = train_step(s.model, s.optimizer, next(s.loader), tc, ctx.device)
        dt = time.perf_counter() - t0
        # One all-reduce agrees on the loss and on whether any rank was told to stop.
        loss, stop = _global_mean([local, float(ctx.should_stop())], ctx)
        s.state.extras["tokens_seen"] += tokens_per_step
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, **meter.step(dt)}
        metrics["compute_s"] = compute
        if step % tc.eval_every == 0 or step == tc.steps:
            metrics["val_loss"] = val_loss = evaluate(s.model, s.val, tc, ctx)
        every = s.cfg.checkpoint.every
        if isinstance(s.ckpt, it.TieredCheckpointer):  # it decides which steps to keep
            s.ckpt.save(step, s.state, durable=True if stop > 0 else None)
            metrics.update(s.ckpt.metrics())
        elif s.ckpt is not None and ((every and step % every == 0) or stop > 0):
            metrics["ckpt_block_s"] = s.ckpt.save(step, s.state)
        it.progress(step, **metrics)
        if ctx.is_main and (step % tc.log_every == 0 or step == tc.steps):
            val = "-" if math.isnan(val_loss) else f"{val_loss:.4f}"
            print(
                f"[gpt] step {step}/{tc.steps} loss {loss:.4f} val {val} "
                f"lr {lr:.2e} {meter.window()}",
                flush=True,
            )
        if stop > 0:
            if s.ckpt is not None:
                s.ckpt.wait()
            if ctx.is_main:
                saved = "checkpoint saved" if s.ckpt is not None else "no checkpoint location"
                print(f"[gpt] stop requested: exiting after step {step} ({saved})", flush=True)
            return it.EXIT_PREEMPTED
    if s.ckpt is not None:
        s.ckpt.wait()
    if ctx.is_main and start >= tc.steps:
        print(f"[gpt] done already: resumed at step {start} of {tc.steps}", flush=True)
    elif ctx.is_main:
        print(
            f"[gpt] done: steps {start + 1}..{tc.steps} loss {loss:.4f} "
            f"val_loss {val_loss:.4f} tokens_seen {s.state.extras['tokens_seen']:,} "
            f"{meter.total()}",
            flush=True,
        )
    return 0


class Throughput:
    """Tokens/s and MFU per step, over the current log window, and over the whole run."""

    def __init__(self, tokens: int, flops: float, peak: float | None, world: int) -> None:
        self.tokens, self.flops, self.peak, self.world = tokens, flops, peak, world
        self.began = self.window_began = time.perf_counter()
        self.steps = self.window_steps = 0

    def step(self, seconds: float) -> dict[str, float]:
        self.steps += 1
        self.window_steps += 1
        out = {"tok_s": self.tokens / seconds}
        if self.peak is not None:
            out["mfu"] = self.flops / seconds / (self.peak * self.world)
        return out

    def _rates(self, steps: int, seconds: float) -> str:
        text = f"tok/s {steps * self.tokens / seconds:,.0f}"
        if self.peak is not None:
            text += f" mfu {steps * self.flops / seconds / (self.peak * self.world):.1%}"
        return text

    def window(self) -> str:
        """Rates since the previous call (wall clock, so evaluation and saves count too)."""
        now = time.perf_counter()
        text = self._rates(self.window_steps, now - self.window_began)
        self.window_began, self.window_steps = now, 0
        return text

    def total(self) -> str:
        elapsed = time.perf_counter() - self.began
        return f"time {elapsed:.1f}s " + self._rates(self.steps, elapsed)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m recipes.gpt.train", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--config",
        default="tiny",
        help=f"built-in preset ({', '.join(builtin_configs())}) or a YAML file (default: tiny)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set train.steps=50 (repeatable; value parsed as YAML)",
    )
    parser.add_argument(
        "--final-weights",
        metavar="PATH",
        help="at the end, write the full model state dict here (rank 0, torch.save)",
    )
    return parser.parse_args(argv)


@exit_on_error
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: bad configuration becomes ``error: ...`` and exit code 2, no traceback."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    ctx = it.init()
    code = run(cfg, ctx, args.final_weights)
    it.shutdown(ctx)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
