"""What every command shares: the consoles, the global options, the client, the error rule.

The error rule (errors.py): whatever goes wrong reaches the person as one line, ``error: ...``,
and an exit code a script can branch on: 2 when the input must change (a bad flag, spec, name
or token), 1 when something failed (the controller is unreachable, a job failed), never a
traceback. Errors carry their code (``exit_code``); :func:`exit_code_for` reads it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from ironpod.client import IronpodClient, client_from_env, ironpod_home
from ironpod.errors import EXIT_USAGE, ConfigError, IronpodError, errors_to_exit

#: Piped output (scripts, logs, CI) gets wide lines instead of Rich's 80-column default,
#: which would cut table cells short with an ellipsis.
_PIPED_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200
console = Console(highlight=False, width=_PIPED_WIDTH)
err_console = Console(stderr=True, highlight=False)

#: ``wait --timeout`` ran out: the same code as coreutils' ``timeout``.
EXIT_TIMEOUT = 124
EXIT_FAILED = 1


@dataclass(slots=True)
class Globals:
    """The options given before the command (``ironpod --url U --token T nodes``)."""

    url: str | None = None
    token: str | None = None


def exit_code_for(exc: IronpodError) -> int:
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):
        return code
    return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED


@contextmanager
def cli_errors() -> Iterator[None]:
    """Any :class:`IronpodError` inside becomes the one-line error with its exit code."""
    try:
        yield
    except IronpodError as exc:
        with errors_to_exit(exit_code_for(exc)):
            raise


class CommandError(IronpodError):
    """A command's own verdict (a job that failed, a timeout), with the exit code it means."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """End the command with ``error: message`` (for conditions that are not exceptions)."""
    raise CommandError(message, code)


def client(ctx: typer.Context) -> IronpodClient:
    found = ctx.find_object(Globals) or Globals()
    return client_from_env(found.url, found.token)


def home() -> Path:
    return ironpod_home().resolve()


def print_json(data: Any) -> None:
    """Machine-readable output for scripts (``--json``): exactly the API's JSON."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def parse_pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    """``["K=V", ...]`` from a repeatable flag, each checked."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out
