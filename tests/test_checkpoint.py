"""The checkpointer in one process: round trip, retention, every kind of damage, bad locations."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import ironpod.train as it
from ironpod.errors import CheckpointError, CheckpointLocationError, ConfigError
from ironpod.train.checkpoint.manifest import MANIFEST_NAME, TMP_PREFIX, step_dir_name


class Loader:
    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def make_state(seed: int = 0) -> it.TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return it.TrainState(model=model, optimizer=optim, dataloader=Loader(), extras={"note": "x"})


def train_step(state: it.TrainState) -> None:
    assert state.optimizer is not None
    state.model(torch.randn(4, 16)).pow(2).mean().backward()
    state.optimizer.step()
    state.optimizer.zero_grad()
    assert state.dataloader is not None
    state.dataloader.position += 4  # type: ignore[attr-defined]


def train_and_save(location: str, steps: int, **kwargs: object) -> it.Checkpointer:
    state = make_state()
    ckpt = it.Checkpointer(location, **kwargs)  # type: ignore[arg-type]
    for step in range(1, steps + 1):
        train_step(state)
        ckpt.save(step, state)
    ckpt.close()
    return ckpt


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_round_trip_restores_model_optimizer_loader_rng_and_extras(ckpt_dir: Path) -> None:
    state = make_state()
    ckpt = it.Checkpointer(str(ckpt_dir))
    for step in (1, 2):
        train_step(state)
        ckpt.save(step, state)
    state.extras["note"] = "saved at 2"
    ckpt.save(3, state)
    ckpt.wait()
    expected_draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    ckpt.close()

    fresh = make_state(seed=123)
    fresh.extras.clear()
    loader = it.Checkpointer(str(ckpt_dir))
    assert loader.load_latest(fresh) == 3
    assert_same_model(state.model, fresh.model)
    assert fresh.dataloader is not None and fresh.dataloader.position == 8  # type: ignore[attr-defined]
    assert fresh.extras == {"note": "saved at 2"}
    assert fresh.optimizer is not None and state.optimizer is not None
    for p_old, p_new in zip(
        state.optimizer.state.values(), fresh.optimizer.state.values(), strict=True
    ):
        assert torch.equal(p_old["exp_avg"], p_new["exp_avg"])
        assert torch.equal(torch.as_tensor(p_old["step"]), torch.as_tensor(p_new["step"]))
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert np.array_equal(np.random.rand(3), expected_draws[1])
    assert [random.random() for _ in range(3)] == expected_draws[2]
    loader.close()


def test_save_is_asynchronous_and_reports_the_stall(ckpt_dir: Path) -> None:
    state = make_state()
    ckpt = it.Checkpointer(str(ckpt_dir))
    train_step(state)
    blocked = ckpt.save(1, state)
    assert blocked >= 0.0
    record = ckpt.history[-1]
    assert record.blocked_s == blocked
    ckpt.wait()
    assert record.committed is True and record.write_s is not None and record.write_s > 0
    summary = ckpt.summary()
    assert summary["saves"] == 1 and summary["failed"] == 0
    with pytest.raises(CheckpointError, match="steps must increase"):
        ckpt.save(1, state)
    ckpt.close()


def test_no_checkpoint_means_none_and_leaves_optimizer_untouched(ckpt_dir: Path) -> None:
    state = make_state()
    ckpt = it.Checkpointer(str(ckpt_dir))
    assert ckpt.load_latest(state) is None
    assert state.optimizer is not None and not state.optimizer.state
    ckpt.close()


def test_retention_keeps_last_k_and_every_nth(ckpt_dir: Path) -> None:
    ckpt = train_and_save(str(ckpt_dir), 10, keep_last=2, keep_every=4)
    assert ckpt.committed_steps() == [4, 8, 9, 10]
    assert not [n for n in os.listdir(ckpt_dir) if n.startswith(TMP_PREFIX)]


def test_synchronous_mode(ckpt_dir: Path) -> None:
    ckpt = train_and_save(str(ckpt_dir), 2, asynchronous=False)
    assert ckpt.committed_steps() == [1, 2]


def _damage_truncate(d: Path) -> None:
    shard = d / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])


def _damage_missing_shard(d: Path) -> None:
    (d / "__0_0.distcp").unlink()


def _damage_bit_flip(d: Path) -> None:
    shard = d / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def _damage_missing_manifest(d: Path) -> None:
    (d / MANIFEST_NAME).unlink()


def _damage_garbled_manifest(d: Path) -> None:
    (d / MANIFEST_NAME).write_text("{not json")


def _damage_missing_extra(d: Path) -> None:
    (d / "rank-00000.extra.pt").unlink()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_damage_truncate, "manifest says"),
        (_damage_missing_shard, "is missing"),
        (_damage_bit_flip, "checksum"),
        (_damage_missing_manifest, "no manifest.json"),
        (_damage_garbled_manifest, "unreadable manifest"),
        (_damage_missing_extra, "is missing"),
    ],
)
def test_damaged_checkpoint_is_skipped_for_the_previous_good_one(
    ckpt_dir: Path, damage: object, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    train_and_save(str(ckpt_dir), 3)
    damage(ckpt_dir / step_dir_name(3))  # type: ignore[operator]
    reference = make_state()
    ckpt = it.Checkpointer(str(ckpt_dir))
    state = make_state(seed=7)
    assert ckpt.load_latest(state) == 2
    assert ckpt.skipped and ckpt.skipped[0][0] == 3 and reason in ckpt.skipped[0][1]
    assert "skipping step-00000003" in capsys.readouterr().err
    ckpt.close()
    # The step-2 weights are what a reload of step 2 alone gives.
    only_two = it.Checkpointer(str(ckpt_dir))
    (ckpt_dir / step_dir_name(3)).rename(ckpt_dir / "aside")
    assert only_two.load_latest(reference) == 2
    assert_same_model(reference.model, state.model)
    only_two.close()


def test_every_checkpoint_damaged_loads_nothing(ckpt_dir: Path) -> None:
    train_and_save(str(ckpt_dir), 2)
    for step in (1, 2):
        _damage_bit_flip(ckpt_dir / step_dir_name(step))
    state = make_state()
    ckpt = it.Checkpointer(str(ckpt_dir))
    assert ckpt.load_latest(state) is None
    assert [s for s, _ in ckpt.skipped] == [2, 1]
    ckpt.close()


def test_unfinished_save_is_invisible_and_cleaned_on_next_start(ckpt_dir: Path) -> None:
    train_and_save(str(ckpt_dir), 1)
    torn = ckpt_dir / f"{TMP_PREFIX}{step_dir_name(2)}-deadbeef"
    torn.mkdir()
    (torn / "__0_0.distcp").write_bytes(b"half")
    ckpt = it.Checkpointer(str(ckpt_dir))
    assert not torn.exists()
    assert ckpt.load_latest(make_state()) == 1
    ckpt.close()


def test_failed_write_keeps_previous_checkpoint_and_leaves_nothing_behind(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = make_state()
    ckpt = it.Checkpointer(str(ckpt_dir))
    train_step(state)
    ckpt.save(1, state)
    ckpt.wait()

    def disk_full(path: str, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt._storage, "write_bytes", disk_full)
    train_step(state)
    ckpt.save(2, state)
    with pytest.raises(CheckpointError, match="No space left on device"):
        ckpt.wait()
    assert sorted(os.listdir(ckpt_dir)) == [step_dir_name(1)]
    ckpt.close()


def test_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointLocationError, match="is not writable"):
        it.Checkpointer(str(blocker / "ckpt"))
    with pytest.raises(CheckpointLocationError, match="no checkpoint location"):
        it.Checkpointer(None)
    with pytest.raises(ConfigError, match="keep_last"):
        it.Checkpointer(str(tmp_path / "c"), keep_last=0)


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_locations(tmp_path: Path, scheme: str) -> None:
    url = "memory://ironpod-test/run" if scheme == "memory" else f"file://{tmp_path}/run"
    source = make_state()
    ckpt = it.Checkpointer(url, keep_last=2)
    for step in (1, 2, 3):
        train_step(source)
        ckpt.save(step, source)
    ckpt.close()
    assert ckpt.committed_steps() == [2, 3]
    target = make_state(seed=5)
    reader = it.Checkpointer(url)
    assert reader.load_latest(target) == 3
    assert_same_model(source.model, target.model)
    reader.close()
