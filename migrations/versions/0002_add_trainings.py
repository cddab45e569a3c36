"""add trainings: segmenters trained on classes' shots and samples

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 23:32:08.417414
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "trainings",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("owner_id", sa.Uuid(), nullable=False),
        sa.Column("class_ids", sa.JSON(), nullable=False),
        sa.Column("architecture", sa.String(length=32), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("use_synthetic", sa.Boolean(), nullable=False),
        sa.Column("copy_paste", sa.Boolean(), nullable=False),
        sa.Column("compare_baseline", sa.Boolean(), nullable=False),
        sa.Column("eval_set", sa.String(length=16), nullable=False),
        sa.Column("validation_keys", sa.JSON(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("weights_key", sa.String(length=512), nullable=True),
        sa.Column("baseline_weights_key", sa.String(length=512), nullable=True),
        sa.Column("checkpoint_key", sa.String(length=512), nullable=True),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_id"],
            ["owners.id"],
            name=op.f("fk_trainings_owner_id_owners"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trainings")),
    )
    op.create_index("ix_trainings_owner_created", "trainings", ["owner_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_trainings_owner_created", table_name="trainings")
    op.drop_table("trainings")
