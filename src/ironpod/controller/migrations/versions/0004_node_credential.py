"""A credential per node: the SHA-256 of the secret its agent proves itself with.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # "" for nodes registered before: their next registration gives them one
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(
            sa.Column("credential_sha256", sa.String(64), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("credential_sha256")
