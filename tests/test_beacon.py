"""Progress beacons: the log line, the datagram to a real socket, and never blocking."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest

import ironpod.train as it
from ironpod import env
from ironpod.train.beacon import BeaconSender, format_progress_line, parse_progress_line


def test_log_line_round_trips() -> None:
    line = format_progress_line(1, 42, {"loss": 2.5, "tokens_per_s": 1234, "phase": "warm up"})
    assert line.startswith("[ironpod] progress rank=1 step=42")
    assert parse_progress_line("2026-01-01 worker: " + line) == {
        "rank": 1,
        "step": 42,
        "loss": 2.5,
        "tokens_per_s": 1234,
        "phase": "warm up",
    }
    assert parse_progress_line("an ordinary log line") is None


def test_beacon_reaches_a_listening_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "beacon.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    out = io.StringIO()
    sender = BeaconSender(socket_path=path, rank=3, stream=out)
    sender.send(7, {"loss": 1.25})
    message = json.loads(server.recv(4096))
    assert (message["rank"], message["step"], message["loss"]) == (3, 7, 1.25)
    assert parse_progress_line(out.getvalue()) == {"rank": 3, "step": 7, "loss": 1.25}
    server.close()
    sender.close()


def test_no_agent_and_full_buffer_drop_instead_of_blocking(tmp_path: Path) -> None:
    lonely = BeaconSender(socket_path=str(tmp_path / "nobody.sock"), rank=0, log=False)
    lonely.send(1, {})
    assert (lonely.sent, lonely.dropped) == (0, 1)

    path = str(tmp_path / "slow.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)  # bound but never read: its buffer fills up
    sender = BeaconSender(socket_path=path, rank=0, log=False)
    for step in range(20_000):
        sender.send(step, {"loss": 1.0})
    assert sender.dropped > 0 and sender.sent > 0
    server.close()
    sender.close()


def test_progress_reads_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "agent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    monkeypatch.setenv(env.BEACON_SOCKET, path)
    monkeypatch.setenv(env.RANK, "0")
    it.beacon.reset_sender()
    try:
        it.progress(5, loss=0.5)
        assert json.loads(server.recv(4096))["step"] == 5
        assert "[ironpod] progress rank=0 step=5 loss=0.5" in capsys.readouterr().out
    finally:
        it.beacon.reset_sender()
        server.close()
