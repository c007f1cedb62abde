"""In-memory snapshots held per node, restore plans, the durable-interval choice, node health.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("snapshots", sa.JSON, nullable=False, server_default="[]"))
        batch.add_column(sa.Column("memory", sa.JSON, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("health", sa.JSON, nullable=False, server_default="{}"))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("checkpointing", sa.JSON, nullable=False, server_default="{}"))
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("restore", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("restore")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("checkpointing")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("health")
        batch.drop_column("memory")
        batch.drop_column("snapshots")
