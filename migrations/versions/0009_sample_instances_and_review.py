"""human review and instances of samples: samples.instances, accepted_by, reviewed_at

- `instances`: the connected objects in the sample's final mask (aligndiff.instances). NULL for
  samples finalized before: counting them needs their blobs, which a migration does not read.
- `accepted_by`: who decided `accepted`: "filter" (the acceptance filters) or "user" (a
  reviewer). Finalized samples so far were all decided by the filter.
- `reviewed_at`: when a reviewer last changed the sample's verdict or mask (dataset ETags
  change with it).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-13 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.add_column(sa.Column("instances", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("accepted_by", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE samples SET accepted_by = 'filter' WHERE finalized_at IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.drop_column("reviewed_at")
        batch_op.drop_column("accepted_by")
        batch_op.drop_column("instances")
