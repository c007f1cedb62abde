"""The recipe's configuration: typed sections, YAML presets, ``--set key.sub=value`` overrides.

Precedence, lowest to highest (STYLE.md lesson 6): field defaults < the YAML file (a built-in
preset from ``configs/`` or a path) < environment variables (:data:`ENV_OVERRIDES`) < ``--set``
overrides. Every section forbids unknown keys, so a typo is an error rather than a silently
ignored setting, and every error is one line naming the field path (:class:`ConfigError`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ironpod import env
from ironpod.errors import ConfigError
from recipes.gpt.model import ModelConfig

#: Where tokenizers and token streams are cached (default ``~/.cache/ironpod/gpt``).
CACHE_DIR_ENV = "IRONPOD_CACHE_DIR"

#: Environment variables that set a config field: they beat the YAML file, ``--set`` beats them.
ENV_OVERRIDES: dict[str, str] = {
    CACHE_DIR_ENV: "data.cache_dir",
    env.CHECKPOINT_DIR: "checkpoint.dir",
}

CONFIGS_DIR = Path(__file__).parent / "configs"
BYTE_VOCAB = 256


class _Section(BaseModel):
    # Strings are accepted from YAML numbers too ("--set checkpoint.dir=2024" is a path).
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class DataConfig(_Section):
    """What the model reads: the corpus cap, the tokenizer and the sequence length."""

    tokenizer: Literal["bytes", "bpe"] = "bytes"
    vocab_size: int = Field(BYTE_VOCAB, gt=BYTE_VOCAB - 1, le=65536, description="BPE only")
    seq_len: int = Field(128, gt=0)
    max_bytes: int | None = Field(None, gt=0, description="cap the corpus (UTF-8 bytes)")
    val_fraction: float = Field(0.01, gt=0, lt=1)
    cache_dir: str | None = Field(None, description="default ~/.cache/ironpod/gpt")

    @property
    def effective_vocab(self) -> int:
        return BYTE_VOCAB if self.tokenizer == "bytes" else self.vocab_size


class TrainConfig(_Section):
    """The optimisation loop and how it is spread over processes."""

    steps: int = Field(200, gt=0)
    global_batch: int = Field(16, gt=0, description="sequences per step over all ranks")
    micro_batch: int | None = Field(
        None, gt=0, description="sequences per forward on one rank; None: no accumulation"
    )
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor, fraction of lr")
    warmup: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="compute dtype")
    compile: bool = False
    parallel: Literal["none", "ddp", "fsdp2"] = "none"
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads per process")
    deterministic: bool = False
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(50, gt=0)
    eval_batches: int = Field(4, gt=0)


class CheckpointConfig(_Section):
    """Where and how often :class:`ironpod.train.Checkpointer` saves; ``dir: null`` disables it."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, populate_by_name=True)

    dir: str | None = None
    every: int = Field(50, gt=0)
    keep_last: int = Field(2, gt=0)
    keep_every: int | None = Field(None, gt=0)
    async_save: bool = Field(True, alias="async", description="false: wait for each save")


class RecipeConfig(_Section):
    """The whole recipe. ``model.vocab_size`` and ``model.max_seq_len`` follow ``data``."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="before")
    @classmethod
    def _derive_model_shape(cls, raw: Any) -> Any:
        """Fill the model's vocabulary and context from ``data`` unless given explicitly."""
        if not isinstance(raw, Mapping):
            return raw
        data, model = raw.get("data") or {}, raw.get("model") or {}
        if not isinstance(data, Mapping) or not isinstance(model, Mapping):
            return raw
        fields = DataConfig.model_fields
        tokenizer = data.get("tokenizer", fields["tokenizer"].default)
        vocab = BYTE_VOCAB if tokenizer == "bytes" else data.get("vocab_size", BYTE_VOCAB)
        derived = {
            "vocab_size": vocab,
            "max_seq_len": data.get("seq_len", fields["seq_len"].default),
        }
        # Only well-typed values are copied: a bad one is reported once, under data.*.
        usable = {k: v for k, v in derived.items() if type(v) is int}
        return {**raw, "model": {**usable, **model}}

    @model_validator(mode="after")
    def _check_consistency(self) -> RecipeConfig:
        if self.model.vocab_size < self.data.effective_vocab:
            raise ValueError(
                f"model.vocab_size {self.model.vocab_size} is smaller than the tokenizer's "
                f"{self.data.effective_vocab}"
            )
        if self.model.max_seq_len < self.data.seq_len:
            raise ValueError(f"model.max_seq_len is smaller than data.seq_len {self.data.seq_len}")
        micro = self.train.micro_batch
        if micro is not None and self.train.global_batch % micro:
            raise ValueError("train.global_batch must be a multiple of train.micro_batch")
        return self


def builtin_configs() -> list[str]:
    """Names accepted by ``--config`` besides a path: the presets in ``configs/``."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def load_config(
    name_or_path: str = "tiny",
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> RecipeConfig:
    """Build the config from a preset name or YAML path, the environment and ``key=value``s."""
    raw = _read_yaml(_resolve(name_or_path))
    environ = os.environ if environ is None else environ
    for var, key in ENV_OVERRIDES.items():
        if environ.get(var):
            _set_path(raw, key, environ[var], source=f"environment variable {var}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"config: override {item!r} must look like key.sub=value")
        try:
            parsed = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            parsed = value
        _set_path(raw, key.strip(), parsed, source=f"override {item!r}")
    return validate(raw)


def validate(raw: Mapping[str, Any]) -> RecipeConfig:
    """Validate a nested dict, turning pydantic's report into one :class:`ConfigError` line."""
    try:
        return RecipeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    path = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        line = f"config: unknown key '{path}'"
    else:
        message = first["msg"].removeprefix("Value error, ")
        line = f"config: {path}: {message}" if path else f"config: {message}"
        if "input" in first and not isinstance(first["input"], dict | list) and path:
            line += f", got {first['input']!r}"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more)"
    return line


def _resolve(name_or_path: str) -> Path:
    builtin = CONFIGS_DIR / f"{name_or_path}.yaml"
    if "/" not in name_or_path and builtin.is_file():
        return builtin
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    known = ", ".join(builtin_configs())
    raise ConfigError(f"config: no built-in config or file named {name_or_path!r} ({known})")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"config: cannot read {path}: {reason}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config: {path} must hold a mapping of sections, not {type(loaded)}")
    return loaded


def _set_path(raw: dict[str, Any], key: str, value: Any, *, source: str) -> None:
    """Set ``raw[a][b][c] = value`` for ``key == "a.b.c"``, creating sections as needed."""
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            parent = ".".join(parts[: depth + 1])
            raise ConfigError(f"config: {parent} is a value, not a section ({source})")
        node = child
    node[parts[-1]] = value
