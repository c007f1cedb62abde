"""The controller's state in SQL: nodes, jobs, attempts, events (SQLAlchemy 2).

SQLite (a file) by default, PostgreSQL by URL. The schema is created and upgraded only by the
alembic migrations in ``migrations/``, so an existing database moves forward with the code.
Times are unix seconds (floats): they cross the wire as numbers and compare without timezones.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from ironpod.errors import ConfigError


class Base(DeclarativeBase):
    pass


def now() -> float:
    return time.time()


class Node(Base):
    """A node. Its JSON columns load only when read (``undefer_group("json")`` for a whole
    row): the decisions that scan nodes need their states and times, not their inventories."""

    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    hostname: Mapped[str] = mapped_column(String(255))
    address: Mapped[str] = mapped_column(String(255))
    agent_url: Mapped[str] = mapped_column(String(512))
    agent_instance: Mapped[str] = mapped_column(String(64))
    #: SHA-256 (hex) of the node's credential: its agent's bearer token for heartbeats and
    #: events, new at each registration ("" for a node from before credentials).
    credential_sha256: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(32), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    cpus: Mapped[int] = mapped_column(Integer)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    gpus: Mapped[list[dict[str, Any]]] = mapped_column(
        JSON, default=list, deferred=True, deferred_group="json"
    )
    labels: Mapped[dict[str, str]] = mapped_column(
        JSON, default=dict, deferred=True, deferred_group="json"
    )
    registered_unix: Mapped[float] = mapped_column(Float, default=now)
    last_heartbeat_unix: Mapped[float] = mapped_column(Float, default=now)
    clock_skew_s: Mapped[float] = mapped_column(Float, default=0.0)
    failures: Mapped[list[float]] = mapped_column(JSON, default=list)
    attempt_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: In-memory snapshots held (wire.SnapshotHolding dicts), from the last heartbeat.
    snapshots: Mapped[list[dict[str, Any]]] = mapped_column(
        JSON, default=list, deferred=True, deferred_group="json"
    )
    #: The agent's snapshot memory: {"budget_bytes": ..., "used_bytes": ...}.
    memory: Mapped[dict[str, Any]] = mapped_column(
        JSON, default=dict, deferred=True, deferred_group="json"
    )
    #: Latest health check results by check name.
    health: Mapped[dict[str, Any]] = mapped_column(
        JSON, default=dict, deferred=True, deferred_group="json"
    )
    #: When the controller asked for the deep recheck that decides a node blamed too often
    #: (state ``suspect``, or ``quarantined`` with a spare in its place); None: none pending.
    recheck_unix: Mapped[float | None] = mapped_column(Float, nullable=True)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    team: Mapped[str] = mapped_column(String(128))
    priority: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(32), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_unix: Mapped[float] = mapped_column(Float, default=now)
    started_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    restarts: Mapped[list[float]] = mapped_column(JSON, default=list)
    #: The durable-checkpoint interval chosen for this job and its inputs (Young/Daly).
    checkpointing: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Which budget ended the job (ironpod.states.EndKind); "" while it is live.
    end_kind: Mapped[str] = mapped_column(String(32), default="")
    #: The exit code of the rank whose exit ended the job, if one did (splits ``no_restart``).
    end_exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Attempt(Base):
    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(32), index=True)
    node_ids: Mapped[list[int]] = mapped_column(JSON)
    master_addr: Mapped[str] = mapped_column(String(255))
    master_port: Mapped[int] = mapped_column(Integer)
    created_unix: Mapped[float] = mapped_column(Float, default=now)
    running_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    first_step_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_progress_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_unix: Mapped[float | None] = mapped_column(Float, nullable=True)
    first_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    median_step_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    end_cause: Mapped[str] = mapped_column(Text, default="")
    #: Per-rank state: one entry per rank, so deferred (a heartbeat loads the attempt, not
    #: a 1,000-rank record); ``undefer_group("json")`` where a whole row is read.
    ranks: Mapped[dict[str, Any]] = mapped_column(
        JSON, default=dict, deferred=True, deferred_group="json"
    )
    metrics: Mapped[dict[str, Any]] = mapped_column(
        JSON, default=dict, deferred=True, deferred_group="json"
    )
    #: The restore plan the attempt started with (wire.RestorePlan), None: durable tier.
    restore: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: How the attempt failed (ironpod.controller.policy.signature); "" unless a fault of the
    #: job's own processes ended it. Identical ones before any progress end the job.
    signature: Mapped[str] = mapped_column(Text, default="")


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time_unix: Mapped[float] = mapped_column(Float, default=now, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    cause: Mapped[str] = mapped_column(Text, default="")
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    node_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    attempt_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


def _private_sqlite(url: str) -> None:
    """A SQLite database holds every job's env (secrets among them): mode 0600, created so
    before SQLite opens it (its WAL and shared-memory files take the database file's mode)."""
    path = Path(url.removeprefix("sqlite:///"))
    if not url.startswith("sqlite:///") or str(path) in ("", ":memory:"):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for each in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if each.exists() and each.stat().st_mode & 0o077:
            each.chmod(0o600)  # a database from before this rule


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL and a busy timeout for concurrent readers."""
    _private_sqlite(url)
    try:
        engine = create_engine(url, pool_pre_ping=True)
    except Exception as exc:
        raise ConfigError(f"database URL {url!r}: {exc}") from None
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn: Any, _record: Any) -> None:
            cursor = conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.close()

    return engine


def session_factory(engine: Engine) -> sessionmaker[Any]:
    return sessionmaker(engine, expire_on_commit=False)


def migrate(url: str) -> None:
    """Bring the database at ``url`` to the newest schema (alembic ``upgrade head``)."""
    from alembic import command
    from alembic.config import Config

    _private_sqlite(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")
