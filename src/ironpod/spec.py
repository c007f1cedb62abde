"""The job spec: what a user submits, as YAML or CLI flags, validated field by field.

One spec runs unchanged on a laptop cluster (`ironpod up`), bare metal, Slurm and Kubernetes.
Field names follow torchrun and HyperPod where they have one (nodes, nproc_per_node, spares,
max restarts in a window, exit codes that mean "do not restart").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ironpod.errors import ConfigError

API_VERSION = "ironpod/v1"
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


#: The kernel's bound on one argument or environment string (MAX_ARG_STRLEN, 32 pages), and
#: what ironpod allows for a job's argv and env together (ARG_MAX is 2 MiB on Linux, shared
#: with the agent's own environment and torch.distributed's variables).
MAX_ARG_BYTES = 128 * 1024
MAX_ARGV_ENV_BYTES = 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _no_nul(value: str, what: str) -> str:
    if "\0" in value:
        raise ValueError(f"{what} holds a NUL byte: no process can be given one")
    if len(value.encode(errors="surrogateescape")) > MAX_ARG_BYTES:
        raise ValueError(f"{what} is longer than the kernel's {MAX_ARG_BYTES} bytes")
    return value


class RestartPolicy(_Strict):
    """When and how a failed attempt is restarted (HyperPod's restartPolicy, torchrun's flags)."""

    max_restarts: int = Field(10, ge=0, description="restarts allowed within `window_s`")
    window_s: float = Field(3600.0, gt=0, description="sliding window for max_restarts")
    in_place_first: bool = Field(
        True, description="restart on the same nodes while they are healthy, else replace"
    )
    node_failures_to_quarantine: int = Field(
        2, ge=1, description="failures of one node within the window that quarantine it"
    )
    hang_timeout_s: float | None = Field(
        None,
        gt=0,
        description="no progress for this long is a hang; None: derived from step times",
    )
    hang_floor_s: float = Field(1.0, gt=0, description="smallest derived hang timeout")
    hang_factor: float = Field(
        3.0,
        gt=1,
        description="derived timeout = max(factor x median step, 2 x longest recent step, floor)",
    )
    startup_timeout_s: float = Field(
        600.0, gt=0, description="time allowed from start to the first progress"
    )
    progress_regex: str | None = Field(
        None, description="a log line matching this counts as progress (unmodified scripts)"
    )
    no_restart_exit_codes: list[int] = Field(
        default_factory=lambda: [2], description="exit codes that fail the job at once"
    )
    max_failures_without_progress: int = Field(
        3,
        ge=1,
        description="attempts in a row that fail the same way before any step end the job "
        "(end_kind no_progress): restarting a job that cannot get going does not help",
    )

    @field_validator("progress_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class MemoryTier(_Strict):
    """In-memory snapshots (tier 1 on the node, tier 2 on peers) and the durable interval.

    The snapshots themselves are taken by ``ironpod.train`` (``TieredCheckpointer``); this says
    how the cluster keeps them: how many peers hold a copy, which node label names a failure
    domain (copies avoid sharing one), and how often the durable tier is written.
    """

    replicas: int = Field(1, ge=0, le=8, description="peer nodes holding a copy of a snapshot")
    failure_domain_label: str = Field(
        "failure_domain", description="node label naming a failure domain (rack, switch, zone)"
    )
    durable_interval: Literal["auto"] | float | None = Field(
        "auto",
        description="seconds between durable checkpoints; 'auto': Young/Daly from measured "
        "costs and failures; None: the script decides",
    )
    mtbf_prior_s: float = Field(
        24 * 3600.0, gt=0, description="prior mean time between failures of this job, seconds"
    )

    @field_validator("durable_interval")
    @classmethod
    def _positive(cls, value: str | float | None) -> str | float | None:
        if isinstance(value, float | int) and value <= 0:
            raise ValueError("must be positive seconds, 'auto' or null")
        return value


class StragglerPolicy(_Strict):
    """A rank whose own compute time per step (the ``compute_s`` progress metric) stays above
    ``factor`` x the median of the other ranks' for ``steps`` steps is a straggler: an event,
    and with ``action: replace`` its node is taken out and the job restarts on a spare."""

    factor: float = Field(1.5, gt=1, description="slower than the others' median by this")
    steps: int = Field(10, ge=1, description="for this many steps in a row")
    action: Literal["event", "replace"] = "event"


class Preflight(_Strict):
    """An all-reduce across an attempt's nodes before its workers start (off by default):
    a node that cannot reach the others, or a fabric below ``min_busbw_gbps``, fails the
    attempt before any training time is spent on it."""

    enabled: bool = False
    size_mb: float = Field(16.0, gt=0, le=4096, description="all-reduce message size, MiB")
    min_busbw_gbps: float | None = Field(
        None, gt=0, description="bus bandwidth floor, GB/s (default: the health threshold)"
    )
    timeout_s: float = Field(60.0, gt=0, description="for every node to join the check")


class JobSpec(_Strict):
    """A training job."""

    api_version: Literal["ironpod/v1"] = Field("ironpod/v1", alias="apiVersion")
    name: str
    team: str = Field("default", min_length=1, max_length=63)
    priority: int = Field(0, ge=-1000, le=1000)
    nodes: int = Field(1, ge=1, le=4096)
    nproc_per_node: int = Field(1, ge=1, le=256)
    command: list[str] = Field(min_length=1, description="argv; run through a shell only if asked")
    shell: bool = Field(False, description="run `command` as one string through /bin/sh -c")
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = None
    checkpoint_dir: str | None = None
    memory: MemoryTier = Field(default_factory=MemoryTier)
    stragglers: StragglerPolicy = Field(default_factory=StragglerPolicy)
    preflight: Preflight = Field(default_factory=Preflight)
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    spares: int = Field(0, ge=0, description="extra nodes held ready for this job's recovery")

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @field_validator("name")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError("must be lowercase letters, digits and '-', at most 63 characters")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
            _no_nul(item, f"the value of {key}")
        return value

    @field_validator("command")
    @classmethod
    def _runnable(cls, value: list[str]) -> list[str]:
        if not value[0].strip():
            raise ValueError("the program (command[0]) is empty")
        for i, arg in enumerate(value):
            _no_nul(arg, f"command[{i}]")
        return value

    @field_validator("team", "workdir", "checkpoint_dir")
    @classmethod
    def _no_nul_text(cls, value: str | None) -> str | None:
        return None if value is None else _no_nul(value, "the value")

    @model_validator(mode="after")
    def _fits_exec(self) -> JobSpec:
        size = sum(len(a.encode(errors="surrogateescape")) + 1 for a in self.command)
        size += sum(
            len(f"{k}={v}".encode(errors="surrogateescape")) + 1 for k, v in self.env.items()
        )
        if size > MAX_ARGV_ENV_BYTES:
            raise ValueError(
                f"command and env take {size} bytes; at most {MAX_ARGV_ENV_BYTES} can be "
                "passed to a process (put large data in a file)"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


def describe_validation_error(exc: ValidationError, prefix: str = "spec") -> str:
    """One line naming the first bad field: ``spec: restart.max_restarts: ...``."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{prefix}: unknown field '{where}'"
    if first["type"] == "missing":
        return f"{prefix}: missing required field '{where}'"
    given = first.get("input")
    shown = f" (got {given!r})" if isinstance(given, str | int | float | bool) else ""
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{prefix}: {where}: {message}{shown}"


def parse_spec(data: Any, *, source: str = "spec") -> JobSpec:
    """Validate a mapping (from YAML or JSON) into a :class:`JobSpec` or raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from None


def load_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    return parse_spec(data, source=str(path))
