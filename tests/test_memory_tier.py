"""The memory checkpoint tier: exact round trips, crash safety, damage detection, budgets.

Fast tests run one process on a small model; the slow ones run the GPT recipe with 2 ranks
under torchrun (DDP, FSDP2), SIGKILL it mid-run and check that the restart resumes from memory
with the same losses and final weights, bit for bit, as a run that never failed.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from ironpod import env, snapshot
from ironpod.errors import ConfigError
from ironpod.train.beacon import parse_progress_line
from ironpod.train.checkpoint import (
    Checkpointer,
    MemorySnapshots,
    TieredCheckpointer,
    TrainState,
)
from ironpod.train.checkpoint.tiered import (
    AUTO_MAX_EVERY,
    AUTO_PROBE_STEPS,
    AUTO_RECHECK_STEPS,
    AutoInterval,
)
from tests.conftest import clean_env, free_port, python
from tests.test_resume_bitwise import command, run


class Counter:
    """A stand-in data loader whose position lives in the checkpoint."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position = int(state_dict["position"])


def make_state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.GELU(), torch.nn.Linear(32, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return TrainState(model=model, optimizer=optimizer, dataloader=Counter(), extras={"seen": 0})


def train_step(state: TrainState) -> float:
    """A step that depends on every part of the state: weights, Adam moments, RNGs, position."""
    assert state.optimizer is not None and isinstance(state.dataloader, Counter)
    state.dataloader.position += 1
    noise = random.random() + float(np.random.rand())
    x = torch.randn(4, 8) * state.dataloader.position + noise
    loss = state.model(x).pow(2).mean()
    loss.backward()
    state.optimizer.step()
    state.optimizer.zero_grad()
    state.extras["seen"] += 4
    return float(loss.item())


def weights(state: TrainState) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.model.state_dict().items()}


@pytest.fixture
def area(tmp_path: Path) -> Path:
    return tmp_path / "shm" / "job-1"


@pytest.fixture(autouse=True)
def _no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (env.AGENT_URL, env.AGENT_TOKEN, env.CONTROL_FILE, env.SNAPSHOT_DIR):
        monkeypatch.delenv(name, raising=False)


# -- one conformance test for every tier: save, train on, restore, train on again: identical


def _tier(kind: str, tmp_path: Path, area: Path) -> Checkpointer | TieredCheckpointer:
    if kind == "durable":
        return Checkpointer(str(tmp_path / "ckpt"), asynchronous=True)
    # Durable only at step 1: the restore must come from memory (step 3 is newer).
    return TieredCheckpointer(str(tmp_path / "ckpt"), area=area, memory_every=1, durable_every=1)


@pytest.mark.parametrize("kind", ["durable", "tiered"])
def test_round_trip_is_bitwise(tmp_path: Path, area: Path, kind: str) -> None:
    random.seed(1)
    np.random.seed(1)
    state = make_state()
    ckpt = _tier(kind, tmp_path, area)
    for step in range(1, 4):
        train_step(state)
        if isinstance(ckpt, TieredCheckpointer):
            ckpt.save(step, state, durable=step == 1)
        elif step == 3:
            ckpt.save(step, state)
    ckpt.wait()
    expected = [train_step(state) for _ in range(3)]
    final = weights(state)
    ckpt.close()

    fresh = make_state(seed=99)  # other weights and RNG: everything must come from the tier
    random.seed(5)
    again = _tier(kind, tmp_path, area)
    assert again.load_latest(fresh) == 3
    assert isinstance(fresh.dataloader, Counter) and fresh.dataloader.position == 3
    assert fresh.extras == {"seen": 12}
    assert [train_step(fresh) for _ in range(3)] == expected
    for key, value in weights(fresh).items():
        assert torch.equal(value, final[key]), key
    if isinstance(again, TieredCheckpointer):
        assert again.last_restore is not None and again.last_restore["tier"] == "memory"
        assert again.summary()["last_restore"]["step"] == 3
    again.close()


def test_snapshot_format_is_readable_without_ironpod_code(area: Path) -> None:
    state = make_state()
    train_step(state)
    mem = MemorySnapshots(area, slots=3)
    mem.snapshot(1, state)
    mem.close()
    (ref,) = snapshot.list_snapshots(area, 0)
    assert ref.kind == "slot" and ref.step == 1 and snapshot.verify(ref.path, ref.commit) is None
    meta = torch.load(ref.path / snapshot.META, weights_only=True)
    data = (ref.path / snapshot.DATA).read_bytes()
    tree = json.loads(meta["tree_json"])  # plain JSON: tuples and odd keys tagged
    first = tree["model"]["0.weight"]
    assert first["offset"] % 64 == 0 and first["dtype"] == "float32" and not first["dtensor"]
    raw = data[first["offset"] : first["offset"] + first["nbytes"]]
    loaded = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(first["shape"])
    assert torch.equal(loaded, state.model.state_dict()["0.weight"])


# -- crash safety


def test_uncommitted_slot_never_loses_the_previous_snapshot(area: Path) -> None:
    state = make_state()
    mem = MemorySnapshots(area, slots=3)
    for step in (1, 2):
        train_step(state)
        mem.snapshot(step, state)
    mem.wait()
    expected = weights(state)
    train_step(state)
    mem.snapshot(3, state)
    mem.close()
    # A crash half-way through step 3: its commit never landed and its data is torn.
    (ref3,) = [r for r in snapshot.list_snapshots(area, 0) if r.step == 3]
    snapshot.uncommit(ref3.path)
    with (ref3.path / snapshot.DATA).open("r+b") as f:
        f.truncate(100)

    again = MemorySnapshots(area, slots=3)
    assert again.local_steps() == [2, 1]
    # The restarted rank writes on, round robin, and never over its newest committed slot.
    for step in (3, 4):
        newest = again._newest
        assert newest is not None
        fresh = make_state(seed=step)
        train_step(fresh)
        again.snapshot(step, fresh)
        again.wait()
        assert again.history[-1].committed
        assert again._newest is not None and again._newest[0] != newest[0]
    assert again.local_steps() == [4, 3, 2]
    restored = make_state(seed=7)
    assert again.load(2, restored)
    for key, value in weights(restored).items():
        assert torch.equal(value, expected[key]), key
    again.close()


def test_damaged_snapshot_falls_back_to_older_step_then_durable(
    tmp_path: Path, area: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    state = make_state()
    ckpt = TieredCheckpointer(str(tmp_path / "ckpt"), area=area, memory_every=1, durable_every=2)
    for step in range(1, 5):
        train_step(state)
        ckpt.save(step, state)
    ckpt.close()  # memory: 4, 3, 2; durable: 2, 4

    def flip(step: int) -> None:
        (ref,) = [r for r in snapshot.list_snapshots(area, 0) if r.step == step]
        with (ref.path / snapshot.DATA).open("r+b") as f:
            f.seek(70)
            byte = f.read(1)
            f.seek(70)
            f.write(bytes([byte[0] ^ 0xFF]))

    flip(4)
    again = TieredCheckpointer(str(tmp_path / "ckpt"), area=area, memory_every=1)
    assert again.load_latest(make_state(seed=3)) == 4  # durable 4 is as new as any good copy
    assert again.last_restore is not None and again.last_restore["tier"] == "durable"
    err = capfd.readouterr().err
    assert "skipping snapshot" in err and "digest" in err
    again.close()

    # Without durable step 4, memory step 3 (older than the damaged 4, newer than durable 2).
    (tmp_path / "ckpt" / "step-00000004" / "manifest.json").unlink()
    again = TieredCheckpointer(str(tmp_path / "ckpt"), area=area, memory_every=1)
    assert again.load_latest(make_state(seed=3)) == 3
    assert again.last_restore is not None and again.last_restore["tier"] == "memory"
    assert "restored step 3 from memory (local)" in capfd.readouterr().err
    again.close()


# -- the automatic interval (memory_every="auto")


@pytest.mark.parametrize(
    ("step_ms", "copy_ms", "background_ms", "on_cpu", "every"),
    [
        (100, 5, 3, True, 8),  # CPU: copy and commit both take the training's cores
        (100, 5, 3, False, 5),  # GPU: only the copy blocks
        (100, 0.1, 250, False, 3),  # a commit longer than a step: one in flight at a time
        (100, 0.1, 0.1, True, 1),  # cheap: every step
        (0.01, 5, 5, True, 500),  # no real step: capped at AUTO_MAX_EVERY
    ],
)
def test_auto_interval_keeps_snapshots_within_the_budget(
    step_ms: float, copy_ms: float, background_ms: float, on_cpu: bool, every: int
) -> None:
    auto = AutoInterval(0.01, max_every=AUTO_MAX_EVERY)
    assert auto.propose(on_cpu=on_cpu) is None  # nothing measured yet
    for _ in range(3):
        auto.observe_step(step_ms / 1000)
        auto.observe_snapshot(copy_ms / 1000, background_ms / 1000)
    assert auto.propose(on_cpu=on_cpu) == every


def test_the_agents_cost_of_a_snapshot_counts_where_it_shares_the_training_cores() -> None:
    auto = AutoInterval(0.01, max_every=AUTO_MAX_EVERY)
    for _ in range(3):
        auto.observe_step(0.100)
        auto.observe_snapshot(0.005, 0.003)
    assert auto.propose(on_cpu=True) == 8
    auto.observe_agent(0.032)  # sending to the peer, receiving its copy, pinning: 32 ms
    assert auto.propose(on_cpu=True) == 40  # (5 + 3 + 32) ms / 1 ms a step
    assert auto.propose(on_cpu=False) == 5  # on a GPU the agent runs on host cores


@pytest.mark.parametrize("budget", [0, 1, -0.5])
def test_auto_interval_rejects_a_budget_outside_0_1(budget: float) -> None:
    with pytest.raises(ConfigError, match="between 0 and 1"):
        AutoInterval(budget)


def test_auto_probes_every_step_then_snapshots_on_the_agreed_interval(
    tmp_path: Path, area: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[list[float], int]] = []

    def propose(self: AutoInterval, *, on_cpu: bool) -> int:
        seen.append((list(self.step_s), len(self.costs)))
        return 4

    monkeypatch.setattr(AutoInterval, "propose", propose)
    state = make_state()
    ckpt = TieredCheckpointer(str(tmp_path / "ckpt"), area=area, memory_every="auto")
    for step in range(1, 23):
        train_step(state)
        ckpt.save(step, state)
    ckpt.wait()
    assert ckpt.memory is not None and ckpt.memory_every == 4
    taken = [r.step for r in ckpt.memory.history]
    assert taken == [*range(1, AUTO_PROBE_STEPS + 1), 8, 12, 16, 20]
    # Decided once, at the end of the probe, from a time per step and the probe's snapshots.
    ((steps, costs),) = seen
    assert len(steps) == AUTO_PROBE_STEPS and all(t > 0 for t in steps)
    assert 1 <= costs <= AUTO_PROBE_STEPS
    assert "memory snapshots every 4 step(s) (was 1)" in capfd.readouterr().err
    assert ckpt.load_latest(make_state(seed=5)) == 20
    ckpt.close()


def test_auto_agrees_again_once_the_agent_measured_its_replication(
    tmp_path: Path, area: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    control = tmp_path / "control.json"
    control.write_text(json.dumps({"durable_interval_s": 3600.0, "snapshot_agent_cpu_s": 0.04}))
    monkeypatch.setenv(env.CONTROL_FILE, str(control))
    seen: list[tuple[int, float]] = []

    def propose(self: AutoInterval, *, on_cpu: bool) -> int:
        seen.append((len(self.step_s), self.agent_s))
        return 4 if len(seen) == 1 else 8

    monkeypatch.setattr(AutoInterval, "propose", propose)
    state = make_state()
    ckpt = TieredCheckpointer(str(tmp_path / "ckpt"), area=area, memory_every="auto")
    last = 1 + AUTO_PROBE_STEPS + AUTO_RECHECK_STEPS
    for step in range(1, last + 9):
        train_step(state)
        ckpt.save(step, state)
    ckpt.wait()
    # The probe's agreement, then the recheck with the agent's figure from the control file.
    assert [agent for _, agent in seen] == [0.04, 0.04]
    assert ckpt.memory is not None and ckpt.memory_every == 8
    taken = [r.step for r in ckpt.memory.history if r.step > last - 4]
    # Every 4th step up to the recheck at step `last`, every 8th after it.
    assert taken == [s for s in range(last - 3, last + 1) if s % 4 == 0] + [
        s for s in range(last + 1, last + 9) if s % 8 == 0
    ]


def test_memory_every_must_be_a_count_or_auto(tmp_path: Path, area: Path) -> None:
    with pytest.raises(ConfigError, match="memory_every must be 0 or more, or 'auto'"):
        TieredCheckpointer(str(tmp_path / "ckpt"), area=area, memory_every="often")


# -- budgets


class _Agent(BaseHTTPRequestHandler):
    status = 200
    seen: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Agent.seen.append((self.headers["Authorization"], body))
        reply = b"{}" if self.status == 200 else b'{"reason": "node memory budget exhausted"}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        return


@pytest.fixture
def agent() -> Iterator[tuple[str, type[_Agent]]]:
    _Agent.seen = []
    server = HTTPServer(("127.0.0.1", 0), _Agent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Agent
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status", [200, 507])
def test_agent_reservation(
    area: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    agent: tuple[str, type[_Agent]],
    status: int,
) -> None:
    url, handler = agent
    monkeypatch.setattr(handler, "status", status)
    monkeypatch.setenv(env.AGENT_URL, url)
    monkeypatch.setenv(env.AGENT_TOKEN, "s3cret")
    monkeypatch.setenv(env.JOB_ID, "job-7")
    state = make_state()
    train_step(state)
    mem = MemorySnapshots(area, slots=2)
    mem.snapshot(1, state)
    mem.snapshot(2, state)
    mem.close()
    ((auth, body),) = handler.seen  # asked once, before the first slot file
    assert auth == "Bearer s3cret"
    assert body["job_id"] == "job-7" and body["rank"] == 0 and body["slots"] == 2
    assert mem._layout is not None and body["slot_bytes"] >= mem._layout.nbytes
    if status == 200:
        assert mem.enabled and mem.local_steps() == [2, 1]
    else:
        assert not mem.enabled and mem.local_steps() == []
        err = capfd.readouterr().err
        assert "[ironpod] memory tier off for rank 0:" in err
        assert "node memory budget exhausted" in err


def test_unreachable_agent_disables_the_tier(
    tmp_path: Path, area: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(env.AGENT_URL, f"http://127.0.0.1:{free_port()}")
    state = make_state()
    ckpt = TieredCheckpointer(str(tmp_path / "ckpt"), area=area, memory_every=1, durable_every=2)
    for step in range(1, 5):
        train_step(state)
        ckpt.save(step, state)
    ckpt.close()
    err = capfd.readouterr().err
    assert err.count("[ironpod] memory tier off for rank 0: agent at http://127.0.0.1") == 1
    assert ckpt.durable.committed_steps() == [2, 4]
    assert ckpt.summary()["memory_tier"] == "off"
    assert not area.exists() or not any(area.rglob(snapshot.DATA))


def test_control_file_sets_the_durable_interval(tmp_path: Path, area: Path) -> None:
    control = tmp_path / "control.json"
    os.environ[env.CONTROL_FILE] = str(control)
    try:
        ckpt = TieredCheckpointer(str(tmp_path / "ckpt"), area=area, memory_every=1)
    finally:
        del os.environ[env.CONTROL_FILE]
    state = make_state()
    train_step(state)
    ckpt.save(1, state)  # no file yet, no interval: no durable save
    control.write_text(json.dumps({"durable_interval_s": 1e-6}))
    ckpt.save(2, state)
    ckpt.wait()
    control.write_text(json.dumps({"durable_interval_s": 3600.0}))
    os.utime(control, ns=(1, 1))  # a new mtime whatever the clock's resolution
    ckpt.save(3, state)
    ckpt.close()
    assert ckpt.durable.committed_steps() == [2]
    metrics = ckpt.metrics()
    assert metrics["ckpt_durable_step"] == 2 and metrics["ckpt_snapshot_bytes"] > 0
    assert {"ckpt_block_s", "ckpt_mem_block_s", "ckpt_durable_write_s"} <= set(metrics)


# -- the recipe, 2 ranks, SIGKILL, restart from memory


RECIPE_STEPS = 16


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_recipe_sigkill_resumes_from_memory_bitwise(tmp_path: Path, parallel: str) -> None:
    env_vars = clean_env(
        IRONPOD_CACHE_DIR=str(tmp_path / "cache"), IRONPOD_SNAPSHOT_DIR=str(tmp_path / "shm")
    )
    extra = [
        f"train.parallel={parallel}",
        f"train.steps={RECIPE_STEPS}",
        "checkpoint.memory_every=1",
        "checkpoint.every=8",
    ]
    ref_weights = tmp_path / "reference.pt"
    _, reference = run(command(2, tmp_path / "ref-ckpt", ref_weights, extra), env_vars, None)
    assert sorted(reference) == list(range(1, RECIPE_STEPS + 1))

    env_vars["IRONPOD_SNAPSHOT_DIR"] = str(tmp_path / "shm2")
    final = tmp_path / "resumed.pt"
    cmd = command(2, tmp_path / "ckpt", final, extra)
    code, first = run(cmd, env_vars, 10)
    assert code != 0 and not final.exists()
    _, second, log = _run_logged(cmd, env_vars)
    resumed_from = min(second) - 1
    assert 9 <= resumed_from < RECIPE_STEPS, log  # newer than durable step 8: from memory
    assert f"restored step {resumed_from} from memory (local)" in log
    for step, loss in {**first, **second}.items():
        assert loss == reference[step], f"step {step}"
    expected = torch.load(ref_weights, weights_only=True)
    actual = torch.load(final, weights_only=True)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def _run_logged(cmd: list[str], env_vars: dict[str, str]) -> tuple[int, dict[int, float], str]:
    out = subprocess.run(
        cmd, env=env_vars, capture_output=True, text=True, timeout=300, check=False
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    losses = {}
    for line in log.splitlines():
        fields = parse_progress_line(line)
        if fields is not None and fields.get("rank") == 0:
            losses[int(fields["step"])] = float(fields["loss"])
    return out.returncode, losses, log


@pytest.mark.slow
def test_recipe_runs_durable_only_when_the_agent_is_unreachable(tmp_path: Path) -> None:
    env_vars = clean_env(
        IRONPOD_CACHE_DIR=str(tmp_path / "cache"),
        IRONPOD_SNAPSHOT_DIR=str(tmp_path / "shm"),
        IRONPOD_AGENT_URL=f"http://127.0.0.1:{free_port()}",
    )
    sets = [
        "train.steps=6",
        "train.global_batch=4",
        "data.seq_len=32",
        "data.max_bytes=200000",
        "model.n_layers=1",
        "checkpoint.memory_every=1",
        "checkpoint.every=3",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
    ]
    args = ["-m", "recipes.gpt.train", "--config", "tiny"]
    for item in sets:
        args += ["--set", item]
    out = python(args, env=env_vars)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[ironpod] memory tier off for rank 0: agent at" in out.stderr
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == [
        "step-00000003",
        "step-00000006",
    ]
