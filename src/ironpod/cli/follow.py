"""Following a job while it runs: tailing a rank's log across attempts, and the live view.

A job's log is per attempt (each restart writes new files), so a tail that follows "the job"
moves to the next attempt once the current one has no more to give, and says so. Both the tail
and the live view poll the REST API: no streaming endpoint is needed, and a controller restart
in the middle only shows up as a short pause.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from rich.live import Live
from rich.text import Text

from ironpod.cli import render
from ironpod.cli.common import console, err_console
from ironpod.client import (
    IronpodClient,
    JobView,
    NotFoundError,
    ServerError,
    UnreachableError,
    is_terminal,
)

POLL_S = 0.5


def latest_attempt(job: JobView) -> int | None:
    attempts = job.get("attempts") or []
    return attempts[-1]["number"] if attempts else None


class LogTail:
    """Reads one rank's log from where it left off; ``attempt=None`` follows the newest one."""

    def __init__(self, api: IronpodClient, ref: str, rank: int, attempt: int | None) -> None:
        self.api = api
        self.ref = ref
        self.rank = rank
        self.fixed = attempt is not None
        self.attempt = attempt
        self.offset = 0
        self._warned = False

    def poll(self, latest: int | None, on_switch: Callable[[int], None]) -> bytes:
        """New bytes; moves to attempt ``latest`` once the current one is read out."""
        if self.attempt is None:
            if latest is None:
                return b""
            self.attempt = latest
            on_switch(latest)
        data, failed = self._read()
        moved_on = not self.fixed and latest is not None and latest > self.attempt
        if moved_on and latest is not None and (failed or not data):
            self.attempt, self.offset = latest, 0
            on_switch(latest)
            more, _ = self._read()
            data += more
        return data

    def _read(self) -> tuple[bytes, bool]:
        out = b""
        while True:
            try:
                chunk = self.api.log_chunk(
                    self.ref, rank=self.rank, attempt=self.attempt, offset=self.offset
                )
            except NotFoundError:
                return out, False  # no log written yet
            except (ServerError, UnreachableError) as exc:
                if not self._warned:
                    err_console.print(f"[yellow]warning:[/] logs unavailable for now: {exc}")
                    self._warned = True
                return out, True
            self._warned = False
            out += chunk.data
            self.offset += len(chunk.data)
            if not chunk.data or self.offset >= chunk.size:
                return out, False


def read_all(api: IronpodClient, ref: str, rank: int, attempt: int | None) -> None:
    """Write the whole log (of the newest attempt unless one is named) to stdout."""
    offset = 0
    while True:
        chunk = api.log_chunk(ref, rank=rank, attempt=attempt, offset=offset)
        attempt = chunk.attempt if attempt is None else attempt  # pin it across chunks
        sys.stdout.buffer.write(chunk.data)
        offset += len(chunk.data)
        if not chunk.data or offset >= chunk.size:
            sys.stdout.buffer.flush()
            return


def tail_logs(api: IronpodClient, ref: str, rank: int, attempt: int | None) -> JobView:
    """``logs -f``: print new output until the job ends; the job's final view."""
    tail = LogTail(api, ref, rank, attempt)

    def switched(number: int) -> None:
        err_console.print(f"[dim]--- rank {rank}, attempt {number} ---[/]")

    while True:
        job = api.job(ref)
        data = tail.poll(latest_attempt(job), switched)
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        if is_terminal(job):
            sys.stdout.buffer.write(tail.poll(latest_attempt(job), switched))
            sys.stdout.buffer.flush()
            return job
        time.sleep(POLL_S)


def watch(api: IronpodClient, ref: str, *, rank: int | None = 0) -> JobView:
    """The live view until the job ends, with rank ``rank``'s log lines printed above it."""
    tail = LogTail(api, ref, rank, None) if rank is not None else None
    pending = b""

    def switched(number: int) -> None:
        live.console.print(Text(f"--- attempt {number} ---", style="dim"))

    def show(data: bytes, final: bool = False) -> None:
        nonlocal pending
        pending += data
        *lines, pending = pending.split(b"\n")
        if final and pending:
            lines, pending = [*lines, pending], b""
        for line in lines:
            live.console.print(Text(line.decode(errors="replace")), soft_wrap=True)

    job = api.job(ref)
    with Live(render.live_view(job), console=console, refresh_per_second=4) as live:
        while True:
            if tail is not None:
                show(tail.poll(latest_attempt(job), switched))
            live.update(render.live_view(job))
            if is_terminal(job):
                if tail is not None:
                    show(tail.poll(latest_attempt(job), switched), final=True)
                break
            time.sleep(POLL_S)
            job = api.job(ref)
    if not console.is_terminal:
        console.line()  # Live ends its last render with a newline only on a terminal
    return job
