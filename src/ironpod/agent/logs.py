"""Per-rank log files, and the agent's small HTTP server that serves them.

Layout: ``{workdir}/logs/attempt-{attempt_id}/rank-{rank}.log``: the worker's stdout and stderr
line by line, plus the agent's own notes about that rank (a stack dump on a hang, a failed
start), each such line prefixed ``[ironpod agent]``.

``GET /logs/{attempt_id}/{rank}?offset=N`` returns the bytes from ``offset`` with the file's
current size in ``X-Log-Size``, so a reader tails a log by asking again from
``offset + len(body)``. It needs the log token the controller gave this node at registration;
``GET /healthz`` does not.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast
from urllib.parse import parse_qs, urlsplit

from ironpod.agent.snapshots import BodyError, SnapshotStore
from ironpod.agent.snapshots import handle as handle_snapshots
from ironpod.private import open_private_append, private_dir

log = logging.getLogger(__name__)

#: Most bytes one GET returns; a reader asks again for the rest.
MAX_CHUNK = 4 * 1024 * 1024
NOTE_PREFIX = "[ironpod agent]"
_LOG_ROUTE = re.compile(r"^/logs/([0-9]{1,18})/([0-9]{1,18})$")  # ASCII digits, int64
#: A connection that sends nothing for this long is closed (a stalled or idle client would
#: otherwise hold one of the server's threads for ever).
SOCKET_TIMEOUT_S = 60.0


def log_path(logs_root: Path, attempt_id: int, rank: int) -> Path:
    return logs_root / f"attempt-{attempt_id}" / f"rank-{rank}.log"


class RankLog:
    """One rank's log file, appended to by the worker's output pump and by the agent."""

    def __init__(self, path: Path) -> None:
        private_dir(path.parent)
        self.path = path
        self._lock = threading.Lock()
        # unbuffered: every line is on disk at once; 0600: a job's output is its owner's
        self._file = open(open_private_append(path), "ab", buffering=0)  # noqa: SIM115

    def write(self, data: bytes) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.write(data)

    def note(self, text: str) -> None:
        """Append the agent's own lines, each marked so a reader tells them from the worker's."""
        lines = text.rstrip("\n").split("\n")
        self.write("".join(f"{NOTE_PREFIX} {line}\n" for line in lines).encode())

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], logs_root: Path, token: str, info: dict[str, str]):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.logs_root = logs_root
        self.token = token
        self.info = info
        self.snapshots: SnapshotStore | None = None

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that fails the TLS handshake, hangs up or goes silent is its own problem:
        # a debug line, not a traceback on stderr per probe of the port; anything else is ours.
        if isinstance(sys.exc_info()[1], ssl.SSLError | ConnectionError | TimeoutError):
            log.debug("http: request from %s failed", client_address, exc_info=True)
        else:
            log.exception("http: request from %s failed", client_address)


class _Handler(BaseHTTPRequestHandler):
    server_version = "ironpod-agent"
    timeout = SOCKET_TIMEOUT_S

    def do_POST(self) -> None:
        self._snapshots("POST")

    def do_PUT(self) -> None:
        self._snapshots("PUT")

    def _not_allowed(self) -> None:
        self.close_connection = True  # a body it may have sent is never read
        self._reply(405, b"method not allowed\n", "text/plain", {"Allow": "GET, POST, PUT"})

    def do_DELETE(self) -> None:
        self._not_allowed()

    def do_PATCH(self) -> None:
        self._not_allowed()

    def _snapshots(self, method: str) -> None:
        """``/snapshots/...``: the in-memory checkpoint tiers (agent/snapshots.py)."""
        server = cast(_Server, self.server)
        parts = urlsplit(self.path).path.strip("/").split("/")
        if server.snapshots is None or parts[0] != "snapshots":
            self._reply(404, b"not found\n")
            return

        def body(limit: int) -> bytes:
            given = self.headers.get("Content-Length")
            if given is None:
                raise BodyError(411, "a Content-Length is required")
            if not given.isascii() or not given.isdigit():
                raise BodyError(400, f"Content-Length {given[:40]!r} is not a byte count")
            if int(given) > limit:
                raise BodyError(413, f"a body of {int(given)} bytes is over this route's {limit}")
            return self.rfile.read(int(given))

        code, data, content_type = handle_snapshots(
            server.snapshots,
            method,
            parts[1:],
            body,
            self._authorized,
            self.headers.get("X-Ironpod-From", ""),
        )
        self._reply(code, data, content_type)

    def do_GET(self) -> None:
        server = cast(_Server, self.server)
        url = urlsplit(self.path)
        if url.path.startswith("/snapshots/"):
            self._snapshots("GET")
            return
        if url.path == "/healthz":
            self._reply(200, json.dumps({"ok": True, **server.info}).encode(), "application/json")
            return
        route = _LOG_ROUTE.match(url.path)
        if route is None:
            self._reply(404, b"not found\n")
            return
        if not self._authorized(server.token):
            self._reply(401, b"missing or wrong bearer token\n")
            return
        try:
            offset = max(0, int(parse_qs(url.query).get("offset", ["0"])[0]))
        except ValueError:
            self._reply(400, b"offset must be an integer\n")
            return
        path = log_path(server.logs_root, int(route.group(1)), int(route.group(2)))
        try:
            with path.open("rb") as f:
                size = f.seek(0, 2)
                f.seek(min(offset, size))
                body = f.read(MAX_CHUNK)
        except FileNotFoundError:
            self._reply(404, b"no such log\n")
            return
        self._reply(200, body, "text/plain; charset=utf-8", {"X-Log-Size": str(size)})

    def _authorized(self, token: str) -> bool:
        if not token:  # no token yet (before registration): nobody
            return False
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def _reply(
        self,
        code: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http: " + format, *args)


class LogServer:
    """The agent's HTTP server, on its own thread."""

    def __init__(
        self,
        address: str,
        port: int,
        logs_root: Path,
        token: str,
        info: dict[str, str],
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._server = _Server((address, port), logs_root, token, info)
        if tls is not None:  # the handshake runs on the request's thread, not the accept loop
            self._server.socket = tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="agent-http", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"{self.scheme}://{f'[{host}]' if ':' in host else host}:{port}"

    def set_log_token(self, token: str) -> None:
        """The bearer token of the log route (the controller's, from registration)."""
        self._server.token = token

    def serve_snapshots(self, store: SnapshotStore) -> None:
        self._server.snapshots = store

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
