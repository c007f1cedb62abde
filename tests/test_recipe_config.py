"""The GPT recipe's configuration: presets, overrides, precedence, one-line errors, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ironpod.errors import ConfigError
from recipes.gpt import train
from recipes.gpt.config import builtin_configs, load_config
from tests.conftest import ROOT, clean_env


@pytest.mark.parametrize("name", ["tiny", "small", "medium", "large"])
def test_presets_load_and_derive_the_model_shape(name: str) -> None:
    cfg = load_config(name, environ={})
    assert cfg.model.max_seq_len == cfg.data.seq_len
    assert cfg.model.vocab_size == cfg.data.effective_vocab
    assert name in builtin_configs()


def test_tiny_is_the_default_and_uses_bytes() -> None:
    cfg = load_config(environ={})
    assert cfg.data.tokenizer == "bytes"
    assert cfg.model.vocab_size == 256
    assert cfg.checkpoint.dir is None
    assert cfg.checkpoint.memory_every == "auto"  # a memory tier where ironpod gives an area


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(
        "tiny",
        [
            "train.steps=7",
            "train.lr=3e-4",  # YAML 1.1 reads this as a string; the float field accepts it
            "train.compile=true",
            "model.n_kv_heads=2",
            "checkpoint.async=false",
            "checkpoint.dir=/tmp/x y",
            "data.max_bytes=null",
        ],
        environ={},
    )
    assert cfg.train.steps == 7
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.compile is True
    assert cfg.model.n_kv_heads == 2
    assert cfg.checkpoint.async_save is False
    assert cfg.checkpoint.dir == "/tmp/x y"
    assert cfg.data.max_bytes is None


def test_switching_tokenizer_resizes_the_model() -> None:
    cfg = load_config("tiny", ["data.tokenizer=bpe", "data.vocab_size=1000"], environ={})
    assert cfg.model.vocab_size == 1000
    cfg = load_config("small", ["data.tokenizer=bytes", "data.seq_len=64"], environ={})
    assert (cfg.model.vocab_size, cfg.model.max_seq_len) == (256, 64)


def test_precedence_file_then_environment_then_flag(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("checkpoint:\n  dir: /from/file\ndata:\n  cache_dir: /cache/file\n")
    env = {"IRONPOD_CHECKPOINT_DIR": "/from/env", "IRONPOD_CACHE_DIR": "/cache/env"}
    assert load_config(str(path), environ={}).checkpoint.dir == "/from/file"
    from_env = load_config(str(path), environ=env)
    assert (from_env.checkpoint.dir, from_env.data.cache_dir) == ("/from/env", "/cache/env")
    flagged = load_config(str(path), ["checkpoint.dir=/from/flag"], environ=env)
    assert flagged.checkpoint.dir == "/from/flag"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stepz=3"], "config: unknown key 'train.stepz'"),
        (["bogus=1"], "config: unknown key 'bogus'"),
        (["model.attention.heads=2"], "config: unknown key 'model.attention'"),
        (["checkpoint.asynch=true"], "config: unknown key 'checkpoint.asynch'"),
        (
            ["train.steps=abc"],
            "config: train.steps: Input should be a valid integer, unable to parse string as "
            "an integer, got 'abc'",
        ),
        (["train.steps=0"], "config: train.steps: Input should be greater than 0, got 0"),
        (
            ["train.parallel=tp"],
            "config: train.parallel: Input should be 'none', 'ddp' or 'fsdp2', got 'tp'",
        ),
        (["train.steps.max=3"], "config: train.steps is a value, not a section"),
        (["train.steps"], "config: override 'train.steps' must look like key.sub=value"),
        (["model.vocab_size=100"], "config: model.vocab_size 100 is smaller than the tokenizer"),
        (["train.micro_batch=5"], "config: train.global_batch must be a multiple of"),
        (
            ["checkpoint.memory_every=often"],
            "config: checkpoint.memory_every: must be a step count (0: no memory tier) or 'auto', "
            "got 'often'",
        ),
    ],
)
def test_errors_are_one_line_naming_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides, environ={})
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text


def test_unknown_key_in_a_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 3\n  optimizer:\n    name: sgd\n")
    with pytest.raises(ConfigError, match=r"^config: unknown key 'train.optimizer'$"):
        load_config(str(path), environ={})


@pytest.mark.parametrize("text", ["train: [1, 2", "- just\n- a list\n"])
def test_unreadable_file_is_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    assert "\n" not in str(info.value)


def test_unknown_config_name_lists_the_presets() -> None:
    with pytest.raises(ConfigError, match="tiny"):
        load_config("huge", environ={})


def test_cli_bad_key_exits_2_with_one_line_and_no_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.gpt.train", "--set", "train.stepz=3"],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config: unknown key 'train.stepz'"
    assert "Traceback" not in proc.stdout + proc.stderr


def test_main_trains_a_few_steps_and_writes_full_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "IRONPOD_CHECKPOINT_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("IRONPOD_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "final.pt"
    overrides = [
        "data.max_bytes=100000",
        "data.seq_len=32",
        "train.global_batch=4",
        "train.steps=3",
        "train.eval_every=2",
        "train.eval_batches=1",
        "train.num_threads=1",
    ]
    argv = [arg for item in overrides for arg in ("--set", item)]
    threads = torch.get_num_threads()
    try:
        assert train.main([*argv, "--final-weights", str(weights)]) == 0
    finally:
        torch.set_num_threads(threads)  # train.num_threads is process-wide
    out = capsys.readouterr().out
    assert "step=3" in out and "val_loss=" in out and "[gpt] done" in out
    state = torch.load(weights)
    assert state["tok_embeddings.weight"].shape == (256, 128)


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    cfg = load_config("tiny", ["train.steps=100", "train.warmup=10"], environ={}).train
    assert train.lr_at(5, cfg) == pytest.approx(cfg.lr / 2)
    assert train.lr_at(10, cfg) == pytest.approx(cfg.lr)
    assert train.lr_at(100, cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    rates = [train.lr_at(s, cfg) for s in range(10, 101)]
    assert rates == sorted(rates, reverse=True)
