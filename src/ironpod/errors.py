"""Errors a user can act on.

Every error that reaches a person is one line that names what is wrong. Library code raises
these; entry points (the CLI, recipe mains) turn them into that line and a non-zero exit code
with :func:`exit_on_error`, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

#: Exit code for bad input (configuration, arguments, locations): the user must change something.
EXIT_USAGE = 2
#: Exit code of a worker that stopped because it was asked to (SIGTERM: preemption, drain,
#: cancel) after saving its state, and of ``ironpod launch`` asking to be requeued. Distinct
#: from a crash so the controller restarts rather than counts a failure. 75 is EX_TEMPFAIL in
#: sysexits.h: "try again later".
EXIT_PREEMPTED = 75
#: Exit code of ``ironpod launch`` for a job that cannot succeed by running again: its command
#: cannot start, or its attempts failed the same way before any progress several times in a
#: row. A Slurm wrapper must not requeue it. 93 is the code NVIDIA's ft_launcher uses for the
#: same case (nvidia-resiliency-ext), so wrappers written for one work with the other.
EXIT_DO_NOT_REQUEUE = 93


class IronpodError(Exception):
    """Base class: the message is shown to the user as it is, on one line."""


class ConfigError(IronpodError):
    """A configuration key is unknown or a value has the wrong type or range."""


class CheckpointError(IronpodError):
    """A checkpoint could not be written or read."""


class CheckpointLocationError(CheckpointError):
    """The checkpoint location cannot be created or written."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint on storage is torn or damaged (and must never be loaded)."""


@contextmanager
def errors_to_exit(code: int = EXIT_USAGE) -> Iterator[None]:
    """Turn an :class:`IronpodError` into ``error: <message>`` on stderr and ``SystemExit``."""
    try:
        yield
    except IronpodError as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None


def exit_on_error(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator form of :func:`errors_to_exit` for ``main`` functions."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with errors_to_exit():
            return fn(*args, **kwargs)

    return wrapper
