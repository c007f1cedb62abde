"""Hugging Face Trainer: a 2-layer GPT-2 built from a config (no download), synthetic tokens.

    torchrun --nproc-per-node 2 hf_trainer.py --out /tmp/run
    ironpod launch --nproc-per-node 2 hf_trainer.py --out /tmp/run [--ironpod-callback]

Checkpoints every ``--save-every`` steps (``save_steps``); a rerun passes
``resume_from_checkpoint=True`` when ``<out>/checkpoint-*`` exists. ``--ironpod-callback``
adds ironpod.integrations.hf.IronpodCallback (SIGTERM: save now, then stop).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from _common import finish, pace, say, started
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint


class Report(TrainerCallback):  # type: ignore[misc]
    """Prints the steps, losses and saves the test reads; paces the steps."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            say("step", rank=self.rank, step=state.global_step, loss=repr(float(logs["loss"])))

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        pace()

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        say("saved", rank=self.rank, step=state.global_step)


def dataset(n: int = 64, seq: int = 16, vocab: int = 64) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, vocab, (n, seq), generator=gen)
    return [{"input_ids": row, "labels": row} for row in base]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--ironpod-callback", action="store_true")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    started(rank)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    training = TrainingArguments(
        output_dir=str(args.out),
        max_steps=args.steps,
        per_device_train_batch_size=4,  # 64 samples, 2 ranks: 8 steps an epoch
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=args.save_every,
        logging_steps=1,
        report_to="none",
        seed=0,
        data_seed=0,
        use_cpu=True,
        ddp_backend="gloo",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    callbacks: list[Any] = [Report(rank)]
    if args.ironpod_callback:
        from ironpod.integrations.hf import IronpodCallback

        callbacks.append(IronpodCallback())
    trainer = Trainer(model=model, args=training, train_dataset=dataset(), callbacks=callbacks)
    last = get_last_checkpoint(str(args.out)) if args.out.exists() else None
    if last is not None:
        say("resumed", rank=rank, step=int(last.rsplit("-", 1)[1]))
    trainer.train(resume_from_checkpoint=True if last else None)
    if rank == 0:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(state, args.out / "final.pt")
        say("done", rank=rank, step=trainer.state.global_step)
    finish()


if __name__ == "__main__":
    main()
