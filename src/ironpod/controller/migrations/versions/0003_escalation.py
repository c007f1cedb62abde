"""The escalation policy's facts: a node's pending deep recheck, the budget that ended a job,
an attempt's failure signature.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("recheck_unix", sa.Float, nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("end_kind", sa.String(32), nullable=False, server_default=""))
        batch.add_column(sa.Column("end_exit_code", sa.Integer, nullable=True))
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("signature", sa.Text, nullable=False, server_default=""))
    # Ended jobs whose end is plain from their state; an old failure's budget is not known.
    op.execute("UPDATE jobs SET end_kind = state WHERE state IN ('succeeded', 'cancelled')")


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("signature")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("end_exit_code")
        batch.drop_column("end_kind")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("recheck_unix")
