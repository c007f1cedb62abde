"""Bad input ends in one clear line naming what is wrong: no traceback, nothing half-written."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import clean_env, python

TINY = ["--set", "data.max_bytes=200000", "--set", "train.steps=2"]


def assert_one_line_error(stderr: str, *needles: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_unwritable_checkpoint_location(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    env = clean_env(IRONPOD_CACHE_DIR=str(tmp_path / "cache"))
    target = blocker / "ckpt"
    proc = python(["-m", "recipes.gpt.train", *TINY, "--set", f"checkpoint.dir={target}"], env=env)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "checkpoint location", str(target), "not writable")
    assert blocker.read_text() == "x"


def test_unknown_key_and_wrong_type_in_a_yaml_file(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("train:\n  steps: 3\n  learning_rate: 0.1\n")
    proc = python(["-m", "recipes.gpt.train", "--config", str(bad_key)])
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "train.learning_rate")

    bad_type = tmp_path / "bad_type.yaml"
    bad_type.write_text("model:\n  dim: wide\n")
    proc = python(["-m", "recipes.gpt.train", "--config", str(bad_type)])
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "model.dim")


def test_demo_rejects_bad_options(tmp_path: Path) -> None:
    proc = python(
        ["-m", "ironpod.cli", "demo", "--workdir", str(tmp_path / "d"), "--set", "train.stepz=3"]
    )
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "train.stepz")
    assert not (tmp_path / "d").exists()
