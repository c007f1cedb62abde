"""The checkpointer across real processes: DDP and FSDP2 on gloo, damage, another world size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import SCRIPTS, python, torchrun

SCRIPT = str(SCRIPTS / "dist_checkpoint.py")
pytestmark = pytest.mark.slow


def run(nproc: int, mode: str, action: str, ckpt: Path, out: Path, steps: int = 3) -> dict:  # type: ignore[type-arg]
    args = [SCRIPT, mode, action, str(ckpt), str(out), str(steps)]
    proc = torchrun(nproc, args) if nproc > 1 else python(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict = torch.load(out, weights_only=False)  # type: ignore[type-arg]
    result["stderr"] = proc.stderr
    return result


def assert_same(a: dict, b: dict) -> None:  # type: ignore[type-arg]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_rank_round_trip(tmp_path: Path, mode: str) -> None:
    saved = run(2, mode, "save", tmp_path / "ckpt", tmp_path / "saved.pt")
    loaded = run(2, mode, "load", tmp_path / "ckpt", tmp_path / "loaded.pt")
    assert loaded["loaded"] == 3
    assert_same(saved, loaded)
    for key, state in saved["optim_state"].items():
        assert torch.equal(state["exp_avg_sq"], loaded["optim_state"][key]["exp_avg_sq"])
    assert loaded["position"] == saved["position"] == 24
    assert loaded["tag"] == "step3"
    assert loaded["draws"] == saved["draws"]
    files = sorted(p.name for p in (tmp_path / "ckpt" / "step-00000003").iterdir())
    assert "rank-00001.extra.pt" in files and "manifest.json" in files


def test_fsdp2_checkpoint_loads_in_one_process(tmp_path: Path) -> None:
    saved = run(2, "fsdp2", "save", tmp_path / "ckpt", tmp_path / "saved.pt")
    loaded = run(1, "none", "load", tmp_path / "ckpt", tmp_path / "loaded.pt")
    assert loaded["loaded"] == 3
    assert_same(saved, loaded)
    assert loaded["position"] == 24


def test_missing_shard_of_one_rank_falls_back_on_every_rank(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    run(2, "fsdp2", "save", ckpt, tmp_path / "saved.pt")
    (ckpt / "step-00000003" / "__1_0.distcp").unlink()
    loaded = run(2, "fsdp2", "load", ckpt, tmp_path / "loaded.pt")
    assert loaded["loaded"] == 2
    assert loaded["position"] == 16
    assert "skipping step-00000003" in loaded["stderr"]
