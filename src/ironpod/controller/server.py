"""``ironpod controller``: the API server and the reconciler loop in one process."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import uvicorn

from ironpod import env
from ironpod.controller.api import create_app
from ironpod.controller.auth import load_or_create_tokens
from ironpod.controller.service import Controller, ControllerConfig

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


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8700,
    state_dir: Path,
    db_url: str | None = None,
    config: ControllerConfig | None = None,
    reconcile_period_s: float = 1.0,
) -> None:
    """Run until interrupted. State lives in ``db_url`` (default: SQLite in ``state_dir``)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    url = db_url or f"sqlite:///{state_dir / 'ironpod.db'}"
    tokens = load_or_create_tokens(state_dir, os.environ.get(env.PRESET_TOKEN) or None)
    controller = Controller(url, state_dir, config or ControllerConfig())
    app = create_app(controller, tokens)
    stop = threading.Event()
    loop = threading.Thread(
        target=reconcile_forever, args=(controller, stop, reconcile_period_s), daemon=True
    )
    loop.start()
    log.info("controller on http://%s:%d, state in %s", host, port, url)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        stop.set()
        controller.wake.set()
        loop.join(timeout=5)
        controller.engine.dispose()
        time.sleep(0)
