"""The queue's ready index, one per lane (backfill or fresh).

Each dispatcher step claims for both lanes. With ``(not_before, id)`` over both lanes, a claim
for fresh rows walked the whole backfill backlog to learn there was none: 20,000
queued backfill rows made the claims ~13 ms of PostgreSQL time each, the largest
statement of a re-score (BENCHMARKS.md). One partial index per lane, whose predicate
is the claim's own lane condition once its parameter is bound, makes each lane's
claim a range scan of its own rows.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE INDEX classification_queue_fresh_ready
            ON classification_queue (not_before, id) WHERE backfill_id IS NULL;
        CREATE INDEX classification_queue_backfill_ready
            ON classification_queue (not_before, id) WHERE backfill_id IS NOT NULL;
        DROP INDEX classification_queue_ready;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        CREATE INDEX classification_queue_ready ON classification_queue (not_before, id);
        DROP INDEX classification_queue_fresh_ready;
        DROP INDEX classification_queue_backfill_ready;
        """
    )
