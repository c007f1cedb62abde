"""The recipe killed with SIGKILL mid-run and resumed equals an uninterrupted run, bit for bit.

Both the loss of every step (progress lines carry floats exactly) and the final weights must
match, in one process and with 2 ranks under FSDP2. The kill lands wherever it lands, possibly
during an asynchronous checkpoint write: the torn write must then be skipped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ironpod.train.beacon import parse_progress_line
from tests.conftest import clean_env, free_port

pytestmark = pytest.mark.slow

STEPS = 24
KILL_AFTER = 15
# Small enough for two cores, big enough to exercise every part of the recipe.
OVERRIDES = [
    f"train.steps={STEPS}",
    "train.global_batch=8",
    "train.warmup=4",
    "train.eval_every=8",
    "train.eval_batches=2",
    "data.seq_len=64",
    "data.max_bytes=1000000",
    "model.n_layers=2",
    "checkpoint.every=4",
    "checkpoint.keep_last=2",
]


def command(nproc: int, ckpt: Path, weights: Path, extra: list[str]) -> list[str]:
    sets = [*OVERRIDES, f"checkpoint.dir={ckpt}", *extra]
    args = ["-m", "recipes.gpt.train", "--config", "tiny", "--final-weights", str(weights)]
    for item in sets:
        args += ["--set", item]
    if nproc == 1:
        return [sys.executable, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        *args,
    ]


def run(
    cmd: list[str], env: dict[str, str], kill_after: int | None
) -> tuple[int, dict[int, float]]:
    """Run to the end, or SIGKILL the whole process group once step ``kill_after`` is reported."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    losses: dict[int, float] = {}
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = [*tail[-40:], line]
        fields = parse_progress_line(line)
        if fields is None or fields.get("rank") != 0:
            continue
        step = int(fields["step"])
        losses[step] = float(fields["loss"])
        if kill_after is not None and step >= kill_after:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    code = proc.wait(timeout=300)
    if kill_after is None:
        assert code == 0, "".join(tail)
    return code, losses


@pytest.mark.parametrize(("nproc", "parallel"), [(1, "none"), (2, "fsdp2")])
def test_sigkill_and_resume_is_bitwise_identical(tmp_path: Path, nproc: int, parallel: str) -> None:
    env = clean_env(IRONPOD_CACHE_DIR=str(tmp_path / "cache"))
    extra = [f"train.parallel={parallel}"]

    ref_weights = tmp_path / "reference.pt"
    _, reference = run(command(nproc, tmp_path / "ref-ckpt", ref_weights, extra), env, None)
    assert sorted(reference) == list(range(1, STEPS + 1))

    weights = tmp_path / "resumed.pt"
    cmd = command(nproc, tmp_path / "ckpt", weights, extra)
    code, first = run(cmd, env, KILL_AFTER)
    assert code == -signal.SIGKILL or code != 0
    assert not weights.exists()
    _, second = run(cmd, env, None)

    # Output reaches us through pipes, so the workers may run a step or two past KILL_AFTER
    # before the kill lands: any checkpoint step before the end is a genuine resume.
    resumed_from = min(second) - 1
    assert 4 <= resumed_from < STEPS
    assert resumed_from % 4 == 0  # a checkpoint step
    for step, loss in first.items():  # what ran before the kill
        assert loss == reference[step], f"step {step} before the kill"
    for step, loss in second.items():  # recomputed and new steps
        assert loss == reference[step], f"step {step} after resuming from {resumed_from}"
    assert sorted(first) == list(range(1, max(first) + 1))
    assert sorted(second) == list(range(resumed_from + 1, STEPS + 1))

    expected = torch.load(ref_weights, weights_only=True)
    actual = torch.load(weights, weights_only=True)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
