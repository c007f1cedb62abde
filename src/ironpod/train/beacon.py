"""Progress beacons: how a training script tells its supervisor that it is making progress.

A beacon is one small datagram on a Unix socket owned by the node's agent (path in
``IRONPOD_BEACON_SOCKET``). Sending never blocks the training step: the socket is non-blocking
and a beacon that cannot be delivered at once (no agent, full buffer) is dropped and counted.
The agent uses beacons for hang and straggler detection, which tolerate a lost beacon.

Every beacon is also printed as one log line, ``[ironpod] progress rank=0 step=12 loss=3.2``,
so a reader of plain logs (a person, the agent's log-regex rule, a test) can follow progress
without the socket. :func:`parse_progress_line` reads such a line back.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from ironpod import env

#: Every progress log line starts with this; the rest is ``key=value`` pairs.
LOG_PREFIX = "[ironpod] progress"

Metric = int | float | str
_FIELD_RE = re.compile(r'([A-Za-z_][\w.]*)=("(?:[^"\\]|\\.)*"|\S+)')


#: Beacon field saying "SIGUSR1 dumps my Python stacks" (set by ironpod.train.init()).
STACKS_FIELD = "stacks_sigusr1"
_announce: dict[str, int] = {}


def announce_stack_signal() -> None:
    """From now on every beacon tells the agent that SIGUSR1 is safe and dumps stacks."""
    _announce[STACKS_FIELD] = 1


@dataclass(slots=True)
class BeaconSender:
    """Sends beacons for one process. Cheap to create; connects lazily."""

    socket_path: str | None
    rank: int
    log: bool = True
    stream: TextIO | None = None
    sent: int = 0
    dropped: int = 0
    _sock: socket.socket | None = field(default=None, repr=False)

    def send(self, step: int, metrics: dict[str, Metric]) -> None:
        clean = {k: _plain(v) for k, v in metrics.items()}
        if self.socket_path:
            self._send_datagram(step, clean)
        if self.log:
            out = self.stream or sys.stdout
            out.write(format_progress_line(self.rank, step, clean) + "\n")
            out.flush()

    def _send_datagram(self, step: int, metrics: dict[str, Metric]) -> None:
        payload = json.dumps(
            {
                "rank": self.rank,
                "step": step,
                "t": time.time(),
                "pid": os.getpid(),
                **_announce,
                **metrics,
            },
            separators=(",", ":"),
        ).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(payload, self.socket_path)  # type: ignore[arg-type]
            self.sent += 1
        except OSError:
            # No agent listening, buffer full or socket gone: drop, never wait (module docstring).
            self.dropped += 1

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _plain(value: object) -> Metric:
    """Metrics go on the wire as plain numbers or short strings.

    A torch tensor is converted with ``.item()``, which waits for the GPU: pass Python numbers
    from the hot loop (``loss.item()`` that you compute anyway) to keep the beacon free.
    """
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float | str):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        result = item()
        if isinstance(result, int | float):
            return result
    return str(value)


def _format_value(value: Metric) -> str:
    if isinstance(value, float):
        return repr(
            value
        )  # shortest text that reads back as the same float: losses compare exactly
    text = str(value)
    return text if text and " " not in text and "=" not in text else json.dumps(text)


def format_progress_line(rank: int, step: int, metrics: dict[str, Metric]) -> str:
    parts = [f"rank={rank}", f"step={step}"]
    parts += [f"{key}={_format_value(value)}" for key, value in metrics.items()]
    return f"{LOG_PREFIX} " + " ".join(parts)


def parse_progress_line(line: str) -> dict[str, Metric] | None:
    """The fields of a progress log line, or None if the line is not one.

    Integers come back as int, other numbers as float, anything else as str.
    """
    start = line.find(LOG_PREFIX)
    if start < 0:
        return None
    fields: dict[str, Metric] = {}
    for key, raw in _FIELD_RE.findall(line[start + len(LOG_PREFIX) :]):
        value: Metric
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = json.loads(raw) if raw.startswith('"') else raw
        fields[key] = value
    return fields if "step" in fields else None


@functools.cache
def _default_sender() -> BeaconSender:
    """One sender per process, configured from the environment on first use."""
    return BeaconSender(
        socket_path=os.environ.get(env.BEACON_SOCKET) or None,
        rank=int(os.environ.get(env.RANK, "0") or 0),
        log=os.environ.get(env.PROGRESS_LOG, "1") != "0",
    )


def progress(step: int, **metrics: Metric) -> None:
    """Report that ``step`` finished, with any metrics (loss, tokens_per_s, ...).

    Never blocks on the supervisor: see the module docstring. Call it once per step.
    """
    _default_sender().send(step, metrics)


def reset_sender() -> None:
    """Forget the cached sender so the next :func:`progress` re-reads the environment."""
    _default_sender().close()
    _default_sender.cache_clear()
