"""add worker heartbeats, upload byte counts for quotas and failed jobs' tracebacks

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 00:03:07.970824
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "worker_heartbeats",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("current_job_id", sa.Uuid(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_worker_heartbeats")),
    )
    with op.batch_alter_table("classes", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("upload_bytes", sa.BigInteger(), server_default="0", nullable=False)
        )

    with op.batch_alter_table("trainings", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("upload_bytes", sa.BigInteger(), server_default="0", nullable=False)
        )

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("traceback", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("traceback")

    with op.batch_alter_table("trainings", schema=None) as batch_op:
        batch_op.drop_column("upload_bytes")

    with op.batch_alter_table("classes", schema=None) as batch_op:
        batch_op.drop_column("upload_bytes")

    op.drop_table("worker_heartbeats")
