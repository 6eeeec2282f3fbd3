"""A category's description: what it holds, in words, for the zero-label scorer.

Loaded by ``shelver taxonomy import`` from a taxonomy CSV's optional ``description`` and
``synonyms`` columns (issue #13): a node named "Wearable Technology" says little, "smart
watches, fitness trackers" says what belongs there. NULL where the taxonomy gives none.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE categories ADD COLUMN description text
            CONSTRAINT categories_description_nonblank CHECK (btrim(description) <> '');
        """
    )


def downgrade() -> None:
    op.execute("ALTER TABLE categories DROP COLUMN description")
