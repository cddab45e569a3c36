"""acceptance that knows the class, bg_lambda per class, held-out evaluation

samples.rejected_by and samples.prototype_similarity; classes.bg_lambda, bg_lambda_auto,
tuning and acceptance; trainings.fold_results; trainings.eval_set "shots" becomes
"training_shots" (the shots were trained on: an optimistic measure).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 04:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rejected_by", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("prototype_similarity", sa.Float(), nullable=True))
    with op.batch_alter_table("classes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("bg_lambda", sa.Float(), nullable=True))
        batch_op.add_column(
            sa.Column("bg_lambda_auto", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("tuning", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("acceptance", sa.JSON(), nullable=True))
    with op.batch_alter_table("trainings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fold_results", sa.JSON(), nullable=True))
    op.execute("UPDATE trainings SET eval_set = 'training_shots' WHERE eval_set = 'shots'")
    # Classes stored before per-class bg_lambda were all inverted at the then fixed 0.6.
    op.execute("UPDATE classes SET bg_lambda = 0.6 WHERE embedding_key IS NOT NULL")


def downgrade() -> None:
    op.execute("UPDATE trainings SET eval_set = 'shots' WHERE eval_set <> 'validation'")
    with op.batch_alter_table("trainings", schema=None) as batch_op:
        batch_op.drop_column("fold_results")
    with op.batch_alter_table("classes", schema=None) as batch_op:
        batch_op.drop_column("acceptance")
        batch_op.drop_column("tuning")
        batch_op.drop_column("bg_lambda_auto")
        batch_op.drop_column("bg_lambda")
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.drop_column("prototype_similarity")
        batch_op.drop_column("rejected_by")
