"""jobs newest first: an index on jobs (created_at, id)

The dashboard's jobs page (polled every 2 s by each open page) shows everyone's newest jobs:
read backwards along this index it stops at the jobs shown, where it sorted every job.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 14:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_created", "jobs", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_created", table_name="jobs")
