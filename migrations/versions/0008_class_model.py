"""the deployment model of a class and of a worker: classes.model, worker_heartbeats.model

Both nullable. A class stored before keeps NULL, read as "the deployment's default model" (the
first of ALIGNDIFF_MODELS, or "default"): the migration cannot know the deployment's settings,
and those classes were synthesized by the one model the deployment had, which stays its default
when more models are added after it. New classes store their model's name.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-12 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("classes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model", sa.String(length=64), nullable=True))
    with op.batch_alter_table("worker_heartbeats", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("worker_heartbeats", schema=None) as batch_op:
        batch_op.drop_column("model")
    with op.batch_alter_table("classes", schema=None) as batch_op:
        batch_op.drop_column("model")
