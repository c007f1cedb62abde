"""The job spec: what a valid one looks like, and one clear line naming each kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from ironpod.errors import ConfigError
from ironpod.spec import JobSpec, load_spec, parse_spec

GOOD = """\
apiVersion: ironpod/v1
name: gpt-small
team: research
priority: 5
nodes: 2
nproc_per_node: 4
command: [python, -m, recipes.gpt.train, --config, tiny]
env:
  OMP_NUM_THREADS: "1"
checkpoint_dir: s3://bucket/runs/gpt-small
restart:
  max_restarts: 3
  hang_timeout_s: 120
  progress_regex: 'step (\\d+)'
  no_restart_exit_codes: [2, 3]
spares: 1
"""

MINIMAL = {"name": "job", "command": ["true"]}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def error_of(data: object) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_spec(data)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_a_valid_yaml_file_loads_with_every_field(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    assert isinstance(spec, JobSpec)
    assert (spec.name, spec.team, spec.priority) == ("gpt-small", "research", 5)
    assert spec.world_size == 8
    assert spec.command[:3] == ["python", "-m", "recipes.gpt.train"]
    assert spec.env == {"OMP_NUM_THREADS": "1"}
    assert spec.restart.max_restarts == 3
    assert spec.restart.hang_timeout_s == 120
    assert spec.restart.no_restart_exit_codes == [2, 3]
    assert spec.spares == 1
    # What the CLI sends is what the controller parses back: the round trip is exact.
    assert parse_spec(spec.model_dump(mode="json", by_alias=True)) == spec


def test_defaults_fill_a_minimal_spec() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.api_version == "ironpod/v1"
    assert (spec.nodes, spec.nproc_per_node, spec.team, spec.priority) == (1, 1, "default", 0)
    assert spec.restart.hang_timeout_s is None
    assert spec.restart.no_restart_exit_codes == [2]


def test_an_unknown_field_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown field 'nodez'"):
        load_spec(write(tmp_path, "name: a\ncommand: [x]\nnodez: 2\n"))
    assert "unknown field 'restart.max_restart'" in error_of(
        {**MINIMAL, "restart": {"max_restart": 1}}
    )


def test_a_wrong_type_is_named_with_the_value() -> None:
    message = error_of({**MINIMAL, "restart": {"max_restarts": "many"}})
    assert message.startswith("spec: restart.max_restarts:"), message
    assert "'many'" in message
    assert "nodes" in error_of({**MINIMAL, "nodes": 0})
    assert "command" in error_of({**MINIMAL, "command": "python train.py"})


def test_a_missing_field_is_named() -> None:
    assert error_of({"name": "a"}) == "spec: missing required field 'command'"


@pytest.mark.parametrize("name", ["Train", "my_job", "-lead", "trail-", "a" * 64, ""])
def test_a_bad_name_is_refused(name: str) -> None:
    message = error_of({**MINIMAL, "name": name})
    assert message.startswith("spec: name:"), message


def test_a_bad_progress_regex_is_refused() -> None:
    message = error_of({**MINIMAL, "restart": {"progress_regex": "step ("}})
    assert "restart.progress_regex" in message
    assert "not a valid regular expression" in message


@pytest.mark.parametrize("key", ["1ABC", "A-B", "A B", ""])
def test_a_bad_env_name_is_refused(key: str) -> None:
    message = error_of({**MINIMAL, "env": {key: "x"}})
    assert "env" in message
    assert "not a valid environment variable name" in message


def test_a_wrong_api_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="apiVersion"):
        load_spec(write(tmp_path, "apiVersion: ironpod/v2\nname: a\ncommand: [x]\n"))


def test_files_that_are_not_specs_say_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_spec(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
