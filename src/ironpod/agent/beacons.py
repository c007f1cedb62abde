"""The agent's end of the progress beacons: a Unix datagram socket read on its own thread.

Senders never wait (see :mod:`ironpod.train.beacon`): when the socket's queue is full, beacons
are dropped. Linux queues only ``net.unix.max_dgram_qlen`` (often 10) unread datagrams per
socket, so this thread does nothing but receive, decode and hand over, in a tight loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ironpod.errors import ConfigError

log = logging.getLogger(__name__)

#: sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_MAX_DATAGRAM = 64 * 1024
_POLL_S = 0.2

Beacon = dict[str, Any]


def beacon_socket_path(workdir: Path) -> str:
    """``{workdir}/beacon.sock``, or when that is too long for a socket a short name (a digest
    of it) in the temp dir, or in ``/tmp`` when the temp dir's own path is that long too."""
    path = str(workdir.resolve() / "beacon.sock")
    if len(path.encode()) <= _MAX_SOCKET_PATH:
        return path
    name = f"ironpod-{hashlib.sha256(path.encode()).hexdigest()[:16]}.sock"
    for folder in (tempfile.gettempdir(), "/tmp"):
        short = os.path.join(folder, name)
        if len(short.encode()) <= _MAX_SOCKET_PATH and os.access(folder, os.W_OK):
            return short
    raise ConfigError(
        f"no place for the agent's beacon socket: {path} is longer than a socket path "
        f"may be ({_MAX_SOCKET_PATH} bytes), and so is the temp dir's {name}; "
        "give the agent a shorter --workdir or TMPDIR"
    )


class BeaconReceiver:
    """Receives beacons and passes each decoded one (a dict with ``rank`` and ``step``) on."""

    def __init__(self, path: str, on_beacon: Callable[[Beacon], None]) -> None:
        self.path = path
        self.received = 0
        self.malformed = 0
        self._on_beacon = on_beacon
        self._closed = threading.Event()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of an agent that died
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        self._sock.settimeout(_POLL_S)
        self._thread = threading.Thread(target=self._run, name="agent-beacons", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(_MAX_DATAGRAM)
            except TimeoutError:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                raise
            beacon = _decode(data)
            if beacon is None:
                self.malformed += 1
                continue
            self.received += 1
            try:
                self._on_beacon(beacon)
            except Exception:  # one bad beacon must not stop the receiver
                log.exception("beacon handler failed on %r", beacon)

    def close(self) -> None:
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * _POLL_S + 1)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _decode(data: bytes) -> Beacon | None:
    try:
        beacon = json.loads(data)
    except ValueError:
        return None
    if not isinstance(beacon, dict):
        return None
    if not all(isinstance(beacon.get(key), int) for key in ("rank", "step")):
        return None
    return beacon
