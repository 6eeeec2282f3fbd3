"""Model versions of status ``zero_label``: the category vectors of one taxonomy.

The zero-label scorer (worker/zero_label.py) classifies against a taxonomy before any
product is labeled. Its predictions, like every prediction, name the model version that
made them, and its category vectors are computed once per taxonomy and text encoder and
shared by every worker: both are a ``model_versions`` row. Its own status keeps it out
of the gate, promotion and rollback, which only ever consider the other four.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE model_versions
            DROP CONSTRAINT model_versions_status_check,
            ADD CONSTRAINT model_versions_status_check
                CHECK (status IN ('candidate', 'champion', 'retired', 'rejected', 'zero_label'))
        """
    )


def downgrade() -> None:
    # Predictions reference these rows; they go with them (their products keep no model).
    op.execute(
        """
        UPDATE products SET model_version_id = NULL
        WHERE model_version_id IN (SELECT id FROM model_versions WHERE status = 'zero_label');
        DELETE FROM predictions
        WHERE model_version_id IN (SELECT id FROM model_versions WHERE status = 'zero_label');
        DELETE FROM model_versions WHERE status = 'zero_label';
        ALTER TABLE model_versions
            DROP CONSTRAINT model_versions_status_check,
            ADD CONSTRAINT model_versions_status_check
                CHECK (status IN ('candidate', 'champion', 'retired', 'rejected'));
        """
    )
