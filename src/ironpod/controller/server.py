"""``ironpod controller``: the API server and the reconciler loop in one process."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from ironpod import env, tls
from ironpod.controller.api import create_app
from ironpod.controller.auth import load_or_create_tokens
from ironpod.controller.certificates import ControllerTls
from ironpod.controller.service import Controller, ControllerConfig
from ironpod.errors import ConfigError

log = logging.getLogger(__name__)


def reconcile_forever(controller: Controller, stop: threading.Event, period_s: float) -> None:
    """A pass whenever something changed (``controller.wake``), else once every ``period_s``
    (what only time decides: lost nodes, recheck deadlines, restart windows). An idle cluster
    costs one pass a period instead of a pass every quarter second."""
    while not stop.is_set():
        controller.wake.wait(period_s)
        controller.wake.clear()  # before the pass: a change during it wakes the next one
        if stop.is_set():
            return
        try:
            controller.reconcile()
        except Exception:  # the loop must outlive any one bad decision; it is logged
            log.exception("reconcile failed")


def keep_alive_s(config: ControllerConfig) -> int:
    """Idle seconds before the server closes an agent's connection: beyond the heartbeat
    interval with room to spare (uvicorn's 5 s default equals a 5 s interval, and about 5% of
    heartbeats then met a connection being closed)."""
    return math.ceil(2 * config.heartbeat_interval_s) + 5


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_liveness_timing(config: ControllerConfig) -> None:
    """A node is lost after ``node_lost_after_s`` of silence: fewer than two heartbeat
    intervals and one late heartbeat (a busy agent, a retried request) loses a live node."""
    interval, lost = config.heartbeat_interval_s, config.node_lost_after_s
    if lost < 2 * interval:
        raise ConfigError(
            f"--node-lost-after {lost:g} s is less than two heartbeat intervals "
            f"(--heartbeat-interval {interval:g} s): one late heartbeat would declare a live "
            f"node lost; use at least {2 * interval:g} s ({3 * interval:g} s or more is safer)"
        )


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8700,
    state_dir: Path,
    db_url: str | None = None,
    config: ControllerConfig | None = None,
    reconcile_period_s: float = 1.0,
    tls: TlsOptions | None = None,
) -> None:
    """Run until interrupted. State lives in ``db_url`` (default: SQLite in ``state_dir``).
    With ``tls`` the API is HTTPS only (see :mod:`ironpod.tls`)."""
    config = config or ControllerConfig()
    check_liveness_timing(config)
    state_dir.mkdir(parents=True, exist_ok=True)
    url = db_url or f"sqlite:///{state_dir / 'ironpod.db'}"
    tokens = load_or_create_tokens(state_dir, os.environ.get(env.PRESET_TOKEN) or None)
    controller = Controller(url, state_dir, config)
    cluster_tls, files = _tls(state_dir, host, tls) if tls is not None else (None, None)
    app = create_app(controller, tokens, cluster_tls)
    stop = threading.Event()
    loop = threading.Thread(
        target=reconcile_forever, args=(controller, stop, reconcile_period_s), daemon=True
    )
    loop.start()
    scheme = "https" if files is not None else "http"
    log.info("controller on %s://%s:%d, state in %s", scheme, host, port, url)
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level="warning",
            # the C parser and event loop where installed (the default install has them)
            http="httptools" if _has("httptools") else "h11",
            loop="uvloop" if _has("uvloop") else "asyncio",
            # an agent's connection outlives the pause between its heartbeats: no heartbeat
            # meets a connection the server is closing
            timeout_keep_alive=keep_alive_s(config),
            backlog=4096,  # a join storm of thousands of agents
            ssl_certfile=str(files.cert) if files else None,
            ssl_keyfile=str(files.key) if files else None,
        )
    finally:
        stop.set()
        controller.wake.set()
        loop.join(timeout=5)
        controller.engine.dispose()
        time.sleep(0)


@dataclass(frozen=True)
class TlsOptions:
    """The controller's TLS: its own certificate and key (PEM; else one the cluster CA signs
    at first start), and extra names for a generated one (a load balancer's, say)."""

    cert: Path | None = None
    key: Path | None = None
    names: tuple[str, ...] = ()


def _tls(state_dir: Path, host: str, options: TlsOptions) -> tuple[ControllerTls, tls.TlsFiles]:
    authority = tls.Authority.load_or_create(state_dir / "tls")
    ca_file = state_dir / "tls" / "ca.pem"
    if options.cert is not None and options.key is not None:
        for path in (options.cert, options.key):
            if not path.is_file():
                raise ConfigError(f"--tls-cert/--tls-key: {path} is not a file")
        files = tls.TlsFiles(cert=options.cert, key=options.key, ca=options.cert)
        log.info("TLS with %s; agents verify it with --ca-file (your CA)", options.cert)
    elif options.cert is not None or options.key is not None:
        raise ConfigError("--tls-cert and --tls-key go together")
    else:
        files = tls.controller_files(state_dir, host, list(options.names))
        log.info(
            "TLS; agents join with --ca-hash %s (the cluster CA, %s)",
            tls.ca_hash(authority.pem),
            ca_file,
        )
    return ControllerTls(authority, tls.client_context(ca_file)), files
