"""The durable classification queue: enqueue, claim under a lease, complete, retry, fail.

The table is filled by the trigger on ``products`` (see migrations/); this
module is everything else that touches it. Each statement is written out in
SQL with what it locks and why, because the queue's correctness is exactly
those locks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

Executor = Connection | Session

NOTIFY_CHANNEL = "shelver_queue"


@dataclass(frozen=True)
class Claim:
    queue_id: int
    product_id: int
    attempts: int
    backfill_id: int | None


CLAIM_SQL = text(
    """
    WITH ready AS (
        SELECT id
        FROM classification_queue
        WHERE not_before <= now()
          AND (claimed_at IS NULL OR claimed_at < now() - make_interval(secs => :lease))
          AND attempts < :max_attempts
          AND (backfill_id IS NOT NULL) = :bulk
        ORDER BY not_before, id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE classification_queue q
    SET claimed_at = now(), attempts = q.attempts + 1
    FROM ready
    WHERE q.id = ready.id
    RETURNING q.id, q.product_id, q.attempts, q.backfill_id
    """
)


def claim_batch(
    db: Executor, *, limit: int, lease_seconds: int, max_attempts: int, bulk: bool = False
) -> list[Claim]:
    """Claim up to ``limit`` ready rows for one task.

    Locks: ``FOR UPDATE SKIP LOCKED`` row locks on the picked queue rows, held
    only until the caller commits. Concurrent claimers skip each other's rows
    instead of waiting, so no two claimers get the same row; after the commit
    the lease (``claimed_at``) keeps the row out of other claims until it
    expires, which is how work lost with a crashed worker or a flushed broker
    comes back. Counting the attempt here, not in the worker, means a row that
    kills every worker that touches it still runs out of attempts.

    ``bulk`` picks backfill rows instead of fresh inserts and updates, so bulk
    work never sits in front of a new product.
    """
    rows = db.execute(
        CLAIM_SQL,
        {"limit": limit, "lease": lease_seconds, "max_attempts": max_attempts, "bulk": bulk},
    )
    return [Claim(*row) for row in rows]


def enqueue(
    db: Executor, product_ids: Iterable[int], *, reason: str, backfill_id: int | None = None
) -> int:
    """Queue products explicitly (backfill, retries by hand). Already-queued rows stay as they are.

    Locks: inserts only; a concurrent enqueue of the same product waits on the
    unique index and then does nothing.
    """
    ids = list(product_ids)
    if not ids:
        return 0
    result = db.execute(
        text(
            """
            INSERT INTO classification_queue (product_id, reason, backfill_id)
            SELECT unnest(CAST(:ids AS bigint[])), :reason, :backfill_id
            ON CONFLICT (product_id) DO NOTHING
            """
        ),
        {"ids": ids, "reason": reason, "backfill_id": backfill_id},
    )
    db.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})
    return result.rowcount


def complete(db: Executor, processed: Mapping[int, str]) -> set[int]:
    """Delete the queue rows of products finished at the content hash they were processed at.

    ``processed`` maps product id to the content hash the worker read. A
    product whose content changed since then keeps its queue row (the update
    trigger has already made it ready again), so the new content is classified
    too. Must run in the transaction that writes the results, after locking the
    product rows, so the hash comparison and the delete see the same state.
    Returns the product ids whose rows were deleted.
    """
    if not processed:
        return set()
    rows = db.execute(
        text(
            """
            DELETE FROM classification_queue q
            USING products p,
                  unnest(CAST(:ids AS bigint[]), CAST(:hashes AS text[])) AS done(id, hash)
            WHERE q.product_id = done.id AND p.id = done.id AND p.content_hash = done.hash
            RETURNING q.product_id
            """
        ),
        {"ids": list(processed), "hashes": list(processed.values())},
    )
    return {r[0] for r in rows}


def retry_later(
    db: Executor, product_ids: Iterable[int], *, error: str, backoff_seconds: float
) -> None:
    """Release claimed rows after a transient error, to be claimed again after a backoff.

    The delay doubles with each attempt already made (2 s, 4 s, 8 s, ... for a
    base of 2 s), capped at an hour.
    """
    db.execute(
        text(
            """
            UPDATE classification_queue
            SET claimed_at = NULL,
                last_error = :error,
                not_before = now() + make_interval(
                    secs => least(3600, :base * power(2, greatest(attempts - 1, 0))))
            WHERE product_id = ANY(CAST(:ids AS bigint[]))
            """
        ),
        {"ids": list(product_ids), "error": error[:2000], "base": backoff_seconds},
    )


def release(db: Executor, product_ids: Iterable[int], *, delay_seconds: float, note: str) -> None:
    """Give claimed rows back without spending an attempt (e.g. no champion model yet)."""
    db.execute(
        text(
            """
            UPDATE classification_queue
            SET claimed_at = NULL,
                attempts = greatest(attempts - 1, 0),
                last_error = :note,
                not_before = now() + make_interval(secs => :delay)
            WHERE product_id = ANY(CAST(:ids AS bigint[]))
            """
        ),
        {"ids": list(product_ids), "delay": delay_seconds, "note": note},
    )


def fail(db: Executor, failures: Mapping[int, str]) -> None:
    """End products as ``failed`` with their reason and drop their queue rows."""
    if not failures:
        return
    params = {"ids": list(failures), "reasons": [r[:2000] for r in failures.values()]}
    db.execute(
        text(
            """
            UPDATE products p
            SET status = 'failed', error = f.reason, classified_at = now()
            FROM unnest(CAST(:ids AS bigint[]), CAST(:reasons AS text[])) AS f(id, reason)
            WHERE p.id = f.id
            """
        ),
        params,
    )
    db.execute(
        text("DELETE FROM classification_queue WHERE product_id = ANY(CAST(:ids AS bigint[]))"),
        params,
    )


def fail_exhausted(db: Executor, *, max_attempts: int, lease_seconds: int) -> int:
    """Fail rows that used up their attempts and whose last lease has run out.

    Locks: ``SKIP LOCKED`` so a sweep never waits on a row a claimer holds;
    such a row is swept next time. Returns how many products failed.
    """
    rows = db.execute(
        text(
            """
            WITH dead AS (
                DELETE FROM classification_queue
                WHERE id IN (
                    SELECT id FROM classification_queue
                    WHERE attempts >= :max_attempts
                      AND (claimed_at IS NULL
                           OR claimed_at < now() - make_interval(secs => :lease))
                    FOR UPDATE SKIP LOCKED)
                RETURNING product_id, attempts, last_error
            )
            UPDATE products p
            SET status = 'failed', classified_at = now(),
                error = 'gave up after ' || dead.attempts || ' attempts: '
                        || coalesce(dead.last_error, 'worker lost while classifying')
            FROM dead
            WHERE p.id = dead.product_id
            RETURNING p.id
            """
        ),
        {"max_attempts": max_attempts, "lease": lease_seconds},
    )
    return len(rows.all())


@dataclass(frozen=True)
class QueueStats:
    depth: int
    claimed: int
    oldest_enqueued_at: datetime | None


def stats(db: Executor) -> QueueStats:
    row = db.execute(
        text(
            """
            SELECT count(*), count(claimed_at), min(enqueued_at)
            FROM classification_queue
            """
        )
    ).one()
    return QueueStats(depth=row[0], claimed=row[1], oldest_enqueued_at=row[2])
