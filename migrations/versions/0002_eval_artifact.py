"""Keep the evaluated artifact beside the served one, for the registry gate.

A model's served artifact may have had its linear part refitted on every labeled
row, test rows included (training.fit.refit_linear). The gate must score models
on rows they did not train on, so it scores ``eval_artifact`` (trained without
the test rows) when there is one, and ``artifact`` otherwise.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE model_versions
            ADD COLUMN eval_artifact bytea,
            ADD COLUMN eval_sha256   text,
            ADD CONSTRAINT eval_artifact_has_sha256
                CHECK ((eval_artifact IS NULL) = (eval_sha256 IS NULL))
        """
    )


def downgrade() -> None:
    op.execute(
        """
        ALTER TABLE model_versions
            DROP CONSTRAINT eval_artifact_has_sha256,
            DROP COLUMN eval_sha256,
            DROP COLUMN eval_artifact
        """
    )
