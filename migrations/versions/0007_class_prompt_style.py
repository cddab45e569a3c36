"""how a class's template prompts are worded: classes.prompt_style

"always-a" ("a photo of a {name}" for every name) for the classes stored before, which keep the
prompts their jobs were started with; new classes are created "a-or-an" (`aligndiff.names`).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("classes", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "prompt_style", sa.String(length=16), nullable=False, server_default="always-a"
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("classes", schema=None) as batch_op:
        batch_op.drop_column("prompt_style")
