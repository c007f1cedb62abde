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
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ironpod.env import CHECKPOINT_DIR
from ironpod.errors import ConfigError
from recipes.gpt.model import ModelConfig, Positive, PositiveFloat

#: Where tokenizers and token streams are cached (default ``~/.cache/ironpod/gpt``).
CACHE_DIR_ENV = "IRONPOD_CACHE_DIR"

#: Environment variables that set a config field: they beat the YAML file, ``--set`` beats them.
ENV_OVERRIDES: dict[str, str] = {
    CACHE_DIR_ENV: "data.cache_dir",
    CHECKPOINT_DIR: "checkpoint.dir",
}

CONFIGS_DIR = Path(__file__).parent / "configs"
BYTE_VOCAB = 256

NonNegative = Annotated[int, Field(ge=0)]


def _memory_every(value: Any) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError("must be a step count (0: no memory tier) or 'auto'")


MemoryEvery = Annotated[int | str, BeforeValidator(_memory_every)]


class _Section(BaseModel):
    # Strings are accepted from YAML numbers too ("--set checkpoint.dir=2024" is a path).
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class DataConfig(_Section):
    """What the model reads: the corpus cap, the tokenizer and the sequence length."""

    tokenizer: Literal["bytes", "bpe"] = "bytes"
    vocab_size: Annotated[int, Field(ge=BYTE_VOCAB, le=1 << 16)] = BYTE_VOCAB  # BPE only
    seq_len: Positive = 128
    max_bytes: Positive | None = None  # cap the corpus at this many UTF-8 bytes
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.01  # tail of the stream held out
    cache_dir: str | None = None  # tokenizers and token streams; see tokenizer.cache_root

    @property
    def effective_vocab(self) -> int:
        return BYTE_VOCAB if self.tokenizer == "bytes" else self.vocab_size


class TrainConfig(_Section):
    """The optimisation loop and how it is spread over processes."""

    steps: Positive = 200
    global_batch: Positive = 16  # sequences per optimizer step, over all ranks
    micro_batch: Positive | None = None  # sequences per forward on one rank; None: no accumulation
    lr: PositiveFloat = 3e-3
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1  # cosine floor, as a fraction of lr
    warmup: NonNegative = 20
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    grad_clip: PositiveFloat | None = 1.0
    seed: NonNegative = 0
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; parameters stay float32
    compile: bool = False  # torch.compile each block
    parallel: Literal["none", "ddp", "fsdp2"] = "none"
    num_threads: Positive | None = None  # torch CPU threads per process; None: torch's choice
    deterministic: bool = False  # torch.use_deterministic_algorithms, for bitwise resumes
    log_every: Positive = 10
    eval_every: Positive = 50
    eval_batches: Positive = 4


class CheckpointConfig(_Section):
    """Where and how often checkpoints are taken; ``dir: null`` disables them.

    ``every`` (alias ``durable_every``) is the durable tier's step rule. With ``memory_every``
    above 0, or ``"auto"`` (the default) under a launcher that gives a snapshot area, the recipe
    uses :class:`ironpod.train.TieredCheckpointer`: a snapshot into the node's memory
    (``IRONPOD_SNAPSHOT_DIR``) every ``memory_every`` steps (``"auto"``: as often as 1% of the
    step time allows, measured while it runs), durable checkpoints
    every ``every`` steps and/or every ``durable_interval_s`` seconds (the agent's control file
    overrides the latter).
    """

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, populate_by_name=True)

    dir: str | None = None  # local path or fsspec URL
    every: Annotated[Positive | None, Field(alias="durable_every")] = 50  # null: no step rule
    keep_last: Positive = 2
    keep_every: Positive | None = None  # also keep every N-th step for good
    async_save: Annotated[bool, Field(alias="async")] = True  # false: wait for each save
    # N: a memory snapshot every N steps; 0: none (durable checkpoints only); "auto": as often
    # as 1% of the step time allows, where the launcher gives a snapshot area (ironpod does).
    memory_every: MemoryEvery = "auto"
    durable_interval_s: PositiveFloat | None = None  # tiered only
    slots: Annotated[int, Field(ge=2)] = 3  # memory snapshots kept per rank


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
