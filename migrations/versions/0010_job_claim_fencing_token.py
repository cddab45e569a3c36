"""the fencing token of jobs: jobs.claim

- `claim`: counts every claim of the job, never reset (a retry resets `attempts`, not this).
  A worker's writes name the claim it works under and are refused once the job was claimed
  again. Existing jobs start at their attempts (a claim is only compared with later values
  of itself: the next claim of each job counts on from there).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claim", sa.Integer(), server_default="0", nullable=False))
    op.execute("UPDATE jobs SET claim = attempts")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("claim")
