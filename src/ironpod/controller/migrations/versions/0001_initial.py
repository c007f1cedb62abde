"""Initial schema: nodes, jobs, attempts, events.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("agent_url", sa.String(512), nullable=False),
        sa.Column("agent_instance", sa.String(64), nullable=False),
        sa.Column("state", sa.String(32), nullable=False, index=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("cpus", sa.Integer, nullable=False),
        sa.Column("memory_bytes", sa.BigInteger, nullable=False),
        sa.Column("gpus", sa.JSON, nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("registered_unix", sa.Float, nullable=False),
        sa.Column("last_heartbeat_unix", sa.Float, nullable=False),
        sa.Column("clock_skew_s", sa.Float, nullable=False),
        sa.Column("failures", sa.JSON, nullable=False),
        sa.Column("attempt_id", sa.Integer, nullable=True),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, index=True),
        sa.Column("team", sa.String(128), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("state", sa.String(32), nullable=False, index=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_unix", sa.Float, nullable=False),
        sa.Column("started_unix", sa.Float, nullable=True),
        sa.Column("ended_unix", sa.Float, nullable=True),
        sa.Column("restarts", sa.JSON, nullable=False),
    )
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False, index=True),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("state", sa.String(32), nullable=False, index=True),
        sa.Column("node_ids", sa.JSON, nullable=False),
        sa.Column("master_addr", sa.String(255), nullable=False),
        sa.Column("master_port", sa.Integer, nullable=False),
        sa.Column("created_unix", sa.Float, nullable=False),
        sa.Column("running_unix", sa.Float, nullable=True),
        sa.Column("first_step_unix", sa.Float, nullable=True),
        sa.Column("last_progress_unix", sa.Float, nullable=True),
        sa.Column("ended_unix", sa.Float, nullable=True),
        sa.Column("first_step", sa.Integer, nullable=True),
        sa.Column("last_step", sa.Integer, nullable=True),
        sa.Column("median_step_s", sa.Float, nullable=True),
        sa.Column("end_cause", sa.Text, nullable=False),
        sa.Column("ranks", sa.JSON, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("time_unix", sa.Float, nullable=False, index=True),
        sa.Column("kind", sa.String(64), nullable=False, index=True),
        sa.Column("cause", sa.Text, nullable=False),
        sa.Column("job_id", sa.Integer, nullable=True, index=True),
        sa.Column("node_id", sa.Integer, nullable=True, index=True),
        sa.Column("attempt_id", sa.Integer, nullable=True),
        sa.Column("data", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    for table in ("events", "attempts", "jobs", "nodes"):
        op.drop_table(table)
