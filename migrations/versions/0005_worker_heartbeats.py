"""Worker heartbeats, claims tied to a worker, and status views for people without Prometheus.

A worker process keeps a row in ``workers`` fresh (``heartbeat_at``) and marks
the queue rows of the batch it starts with its id (``classification_queue.worker_id``).
A dispatcher that sees a worker's heartbeat go stale gives that worker's rows back
at once, instead of after the lease (``SHELVER_LEASE_SECONDS``, 5 minutes): a killed
worker's products are classified again in seconds. No foreign key on ``worker_id``:
a worker row is deleted when it stops, and a queue row naming a worker that is gone is
exactly one to give back.

``queue_status`` (one row per lane) and ``recent_errors`` (failures grouped by reason)
show what the Prometheus metrics show, to anyone with ``psql``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE workers (
            id text PRIMARY KEY,
            hostname text NOT NULL,
            pid integer NOT NULL,
            started_at timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now()
        );

        ALTER TABLE classification_queue ADD COLUMN worker_id text;
        -- Only claimed rows being worked on carry a worker: the dispatcher's check for
        -- rows of dead workers reads this small index, not the whole queue.
        CREATE INDEX classification_queue_worker
            ON classification_queue (worker_id) WHERE worker_id IS NOT NULL;

        -- Both lanes always appear, with zeros when empty. "ready" rows wait for a
        -- dispatcher; "claimed" ones are with a worker (or on their way to one);
        -- "retrying" ones wait out a backoff after an error.
        CREATE VIEW queue_status AS
        SELECT lane.name AS lane,
               count(q.id) AS depth,
               count(q.id) FILTER (WHERE q.claimed_at IS NULL AND q.not_before <= now()) AS ready,
               count(q.claimed_at) AS claimed,
               count(q.id) FILTER (WHERE q.claimed_at IS NULL AND q.attempts > 0
                                     AND q.last_error IS NOT NULL) AS retrying,
               min(q.enqueued_at) AS oldest_enqueued_at,
               CAST(extract(epoch FROM now() - min(q.enqueued_at)) AS double precision)
                   AS oldest_age_s
        FROM (VALUES ('classify', false), ('backfill', true)) AS lane(name, bulk)
        LEFT JOIN classification_queue q ON (q.backfill_id IS NOT NULL) = lane.bulk
        GROUP BY lane.name;

        -- What went wrong, grouped: the reason is the message up to its first ':' or '('
        -- ("gave up after 5 attempts", "OperationalError", "no usable text and no usable
        -- image"), so one cause is one row however many products it hit. Products that
        -- ended failed in the last day, and queue rows waiting to retry after an error.
        CREATE VIEW recent_errors AS
        WITH errors AS (
            SELECT 'failed' AS kind, p.sku, p.error AS message, p.classified_at AS at
            FROM products p
            WHERE p.status = 'failed' AND p.error IS NOT NULL
              AND p.classified_at > now() - interval '1 day'
            UNION ALL
            SELECT 'retrying', p.sku, q.last_error, q.not_before
            FROM classification_queue q JOIN products p ON p.id = q.product_id
            WHERE q.claimed_at IS NULL AND q.attempts > 0 AND q.last_error IS NOT NULL
        )
        SELECT kind,
               btrim(regexp_replace(message, '[:(].*$', '')) AS reason,
               count(*) AS products,
               max(at) AS last_seen,
               min(sku) AS example_sku,
               min(message) AS example_error
        FROM errors
        GROUP BY kind, btrim(regexp_replace(message, '[:(].*$', ''))
        ORDER BY count(*) DESC;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP VIEW recent_errors;
        DROP VIEW queue_status;
        DROP INDEX classification_queue_worker;
        ALTER TABLE classification_queue DROP COLUMN worker_id;
        DROP TABLE workers;
        """
    )
