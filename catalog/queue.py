"""The durable classification queue: enqueue, claim under a lease, complete, retry, fail.

The table is filled by the trigger on ``products`` (see migrations/); this
module is everything else that touches it. Each statement is written out in
SQL with what it locks and why, because the queue's correctness is exactly
those locks.

Lock order. A transaction that locks rows of more than one of these tables
takes them in this order, and never the other way round:

    products  ->  classification_queue  ->  backfill_runs

The worker's write path locks its products first (``FOR UPDATE``, id order),
then deletes their queue rows (``complete``, ``fail``), then records a
backfill that has no row left (``finish_backfills``). The trigger of an
``UPDATE products`` holds the product and then upserts its queue row; a
backfill chunk inserts queue rows and then moves its run's bookmark; the sweep
(``fail_exhausted``) locks products before their queue rows. Statements that
lock only one table (``claim_batch``, ``retry_later``, ``release``,
``mark_working``) cannot close a cycle. ``workers`` rows come after queue rows
(``release_dead_workers``); a worker's heartbeat locks only its own row. With
one order a transaction may wait for another, but never for one that is waiting
for it, so none of these paths deadlocks another.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

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
    # The row was claimed before and its lease ran out (task lost, worker hung).
    lease_expired: bool = False


CLAIM_SQL = text(
    """
    WITH ready AS (
        SELECT id, claimed_at IS NOT NULL AS lease_expired
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
    SET claimed_at = now(), attempts = q.attempts + 1, worker_id = NULL
    FROM ready
    WHERE q.id = ready.id
    RETURNING q.id, q.product_id, q.attempts, q.backfill_id, ready.lease_expired
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

    A new claim belongs to no worker yet (``worker_id`` cleared): the worker
    that starts the batch marks it (``mark_working``), and from then on the
    row comes back as soon as that worker stops heartbeating
    (``release_dead_workers``), not only when the lease runs out.

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
    Locks: the deleted queue rows, then the runs of any backfill they belonged
    to (``finish_backfills``). Returns the product ids whose rows were deleted.
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
            RETURNING q.product_id, q.backfill_id
            """
        ),
        {"ids": list(processed), "hashes": list(processed.values())},
    ).all()
    finish_backfills(db, {r.backfill_id for r in rows if r.backfill_id is not None})
    return {r.product_id for r in rows}


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
    """End products as ``failed`` with their reason and drop their queue rows.

    Locks: the products, then their queue rows, then the runs of any backfill
    they belonged to; the worker calls this with the products already locked.
    """
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
    runs = db.execute(
        text(
            """
            DELETE FROM classification_queue WHERE product_id = ANY(CAST(:ids AS bigint[]))
            RETURNING backfill_id
            """
        ),
        params,
    ).scalars()
    finish_backfills(db, {run for run in runs if run is not None})


EXHAUSTED_PRODUCTS_SQL = text(
    """
    SELECT p.id
    FROM products p JOIN classification_queue q ON q.product_id = p.id
    WHERE q.attempts >= :max_attempts
      AND (q.claimed_at IS NULL OR q.claimed_at < now() - make_interval(secs => :lease))
    ORDER BY p.id
    FOR UPDATE OF p SKIP LOCKED
    """
)
"""The products of rows out of attempts, locked first: the lock order (products,
then queue rows) is the worker's. ``SKIP LOCKED``: a product a worker is writing
right now (its lease ran out while it worked) is left to that worker; if the
worker does not finish it, the next sweep finds it."""

FAIL_EXHAUSTED_SQL = text(
    """
    WITH dead AS (
        DELETE FROM classification_queue
        WHERE id IN (
            SELECT id FROM classification_queue
            WHERE product_id = ANY(CAST(:ids AS bigint[]))
              AND attempts >= :max_attempts
              AND (claimed_at IS NULL OR claimed_at < now() - make_interval(secs => :lease))
            FOR UPDATE SKIP LOCKED)
        RETURNING product_id, attempts, last_error, backfill_id
    )
    UPDATE products p
    SET status = 'failed', classified_at = now(),
        error = 'gave up after ' || dead.attempts || ' attempts: '
                || coalesce(dead.last_error, 'worker lost while classifying')
    FROM dead
    WHERE p.id = dead.product_id
    RETURNING p.id, dead.backfill_id
    """
)
"""Then their queue rows, conditions checked again under our product locks. The
queue rows are taken ``SKIP LOCKED`` too (a task's error path may be giving one
back this instant), so the sweep never waits for a product or a queue row."""


def fail_exhausted(db: Executor, *, max_attempts: int, lease_seconds: int) -> int:
    """Fail rows that used up their attempts and whose last lease has run out.

    Locks, in the module's order: the products (``EXHAUSTED_PRODUCTS_SQL``),
    their queue rows, then the runs of any backfill they belonged to. Products
    and queue rows someone holds are skipped and swept next time; only a run's
    row, last in the order, is waited for. Taking queue rows first and products
    second, as this once did, deadlocked with a worker writing the same
    product: each held what the other wanted. Returns how many products failed.
    """
    params = {"max_attempts": max_attempts, "lease": lease_seconds}
    ids = db.execute(EXHAUSTED_PRODUCTS_SQL, params).scalars().all()
    if not ids:
        return 0
    rows = db.execute(FAIL_EXHAUSTED_SQL, {**params, "ids": list(ids)}).all()
    finish_backfills(db, {r.backfill_id for r in rows if r.backfill_id is not None})
    return len(rows)


def finish_backfills(db: Executor, run_ids: Iterable[int] | None = None) -> list[int]:
    """Record as ``done`` the enqueued backfill runs that have no row left in the queue.

    Called with the runs whose rows a transaction just removed (the worker's
    ``complete`` and ``fail``, the sweep), by the backfill when it has queued
    its last chunk, and with no ids by the dispatcher's sweep for every
    enqueued run: rows also leave a backfill when their product is deleted or
    changed (the update trigger clears ``backfill_id``), and nobody's write
    path sees those.

    Locks: the runs' rows, in id order, until commit, and only then counts
    what is left. Two workers finishing a run's last two rows, or a worker and
    the backfill marking its run ``enqueued``, therefore take turns, and the
    second one's count (a new statement, so a new snapshot) sees the first
    one's deletions: a run cannot be left ``enqueued`` with nothing queued.
    With no ids, runs not yet ``enqueued`` are not locked, so the sweep never
    waits on a backfill still queueing. Returns the ids recorded ``done``.
    """
    ids = None if run_ids is None else sorted(set(run_ids))
    if ids == []:
        return []
    locked = (
        db.execute(
            text(
                """
                SELECT id FROM backfill_runs
                WHERE id = ANY(CAST(:ids AS integer[])) OR (:every AND status = 'enqueued')
                ORDER BY id
                FOR UPDATE
                """
            ),
            {"ids": ids or [], "every": ids is None},
        )
        .scalars()
        .all()
    )
    if not locked:
        return []
    return list(
        db.execute(
            text(
                """
                UPDATE backfill_runs r
                SET status = 'done', finished_at = now()
                WHERE r.id = ANY(CAST(:ids AS integer[]))
                  AND r.status = 'enqueued'
                  AND NOT EXISTS (SELECT 1 FROM classification_queue q WHERE q.backfill_id = r.id)
                RETURNING r.id
                """
            ),
            {"ids": list(locked)},
        ).scalars()
    )


@dataclass(frozen=True)
class BackfillChunk:
    scanned: int  # products of the selection in this id range
    last_product_id: int  # the run's bookmark after it
    enqueued: int  # the run's total so far


ENQUEUE_BACKFILL_CHUNK_SQL = """
WITH chunk AS (
    SELECT p.id
    FROM products p
    WHERE p.id > :after AND {selection}
    ORDER BY p.id
    LIMIT :chunk
), queued AS (
    INSERT INTO classification_queue (product_id, reason, backfill_id)
    SELECT id, 'backfill', :run_id FROM chunk
    ON CONFLICT (product_id) DO NOTHING
    RETURNING 1
), progress AS (
    UPDATE backfill_runs
    SET last_product_id = coalesce((SELECT max(id) FROM chunk), last_product_id),
        enqueued = enqueued + (SELECT count(*) FROM queued)
    WHERE id = :run_id
    RETURNING last_product_id, enqueued
)
SELECT (SELECT count(*) FROM chunk), last_product_id, enqueued FROM progress
"""


def enqueue_backfill_chunk(
    db: Executor,
    *,
    run_id: int,
    selection: str,
    params: Mapping[str, object],
    after: int,
    chunk: int,
) -> BackfillChunk:
    """Queue one id range of a backfill's selection and move the run's bookmark, in one statement.

    ``selection`` is a SQL condition on ``products p`` with its ``params``
    (the backfill's selector). Walking the primary key keeps each chunk an
    index range scan however large the catalog. A product already queued (a
    fresh insert or update) is left as it is: it will be classified by the
    current champion anyway. Locks: the inserted queue rows, then the run's row
    (the bookmark update reads the insert's count, so it runs after it), until
    commit; a second ``--resume`` of the same run waits.
    """
    scanned, last_product_id, enqueued = db.execute(
        text(ENQUEUE_BACKFILL_CHUNK_SQL.format(selection=selection)),
        {**params, "after": after, "chunk": chunk, "run_id": run_id},
    ).one()
    if scanned:
        db.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})
    return BackfillChunk(scanned, last_product_id, enqueued)


def backfill_remaining(db: Executor, run_id: int) -> int:
    """How many of a backfill's rows are still queued. A plain read, no locks."""
    return db.execute(
        text("SELECT count(*) FROM classification_queue WHERE backfill_id = :id"), {"id": run_id}
    ).scalar_one()


def inflight(db: Executor, *, bulk: bool, lease_seconds: int) -> int:
    """Rows of one lane (backfill or fresh) claimed under a live lease, by every dispatcher.

    A plain read, no locks: the dispatcher's in-flight cap is a throttle, not
    an invariant, so a race that overshoots by a batch is fine.
    """
    return db.execute(
        text(
            """
            SELECT count(*)
            FROM classification_queue
            WHERE (backfill_id IS NOT NULL) = :bulk
              AND claimed_at >= now() - make_interval(secs => :lease)
            """
        ),
        {"bulk": bulk, "lease": lease_seconds},
    ).scalar_one()


@dataclass(frozen=True)
class QueueStats:
    depth: int
    claimed: int
    backfill: int  # rows queued by a backfill
    retrying: int  # given back after an error, waiting out their backoff
    oldest_age_s: float | None  # age of the oldest row, by the database's clock


def stats(db: Executor) -> QueueStats:
    """What is in the queue, for ``shelver status`` and the demo. A plain read, no locks."""
    row = db.execute(
        text(
            """
            SELECT count(*), count(claimed_at),
                   count(*) FILTER (WHERE backfill_id IS NOT NULL),
                   count(*) FILTER (WHERE attempts > 0 AND claimed_at IS NULL),
                   extract(epoch FROM now() - min(enqueued_at))
            FROM classification_queue
            """
        )
    ).one()
    return QueueStats(
        depth=row[0],
        claimed=row[1],
        backfill=row[2],
        retrying=row[3],
        oldest_age_s=float(row[4]) if row[4] is not None else None,
    )


@dataclass(frozen=True)
class LaneStatus:
    lane: str  # "classify" (fresh inserts and updates) or "backfill"
    depth: int
    ready: int
    claimed: int
    retrying: int
    oldest_age_s: float | None


def lane_status(db: Executor) -> list[LaneStatus]:
    """The ``queue_status`` view: one row per lane, zeros when empty. A plain read, no locks."""
    rows = db.execute(
        text(
            "SELECT lane, depth, ready, claimed, retrying, oldest_age_s "
            "FROM queue_status ORDER BY lane"
        )
    )
    return [LaneStatus(*row) for row in rows]


# Workers. Each worker process keeps a row in ``workers`` fresh while it lives and
# marks the queue rows of the batch it starts with its id, so a dispatcher can give
# a dead worker's rows back in seconds instead of waiting out their lease.

HEARTBEAT_SECONDS = 2.0
# Five missed beats: a worker busy in onnxruntime or waiting on a slow database
# still beats (the thread runs while native code holds no GIL), a dead one is
# noticed within seconds.
WORKER_DEAD_AFTER_SECONDS = 10.0


def register_worker(db: Executor, worker_id: str, *, hostname: str, pid: int) -> None:
    """Record a worker process, alive as of now. Locks: its own ``workers`` row."""
    db.execute(
        text(
            """
            INSERT INTO workers (id, hostname, pid) VALUES (:id, :hostname, :pid)
            ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()
            """
        ),
        {"id": worker_id, "hostname": hostname, "pid": pid},
    )


def heartbeat(db: Executor, worker_id: str, *, hostname: str, pid: int) -> None:
    """Say the worker is still alive. Its row is put back if a dispatcher had given it up
    (a worker cut off from PostgreSQL for a while): it may take new batches again.
    Locks: its own ``workers`` row."""
    register_worker(db, worker_id, hostname=hostname, pid=pid)


def unregister_worker(db: Executor, worker_id: str) -> None:
    """Forget a worker that stops cleanly (it finished its batch first). Locks: its row."""
    db.execute(text("DELETE FROM workers WHERE id = :id"), {"id": worker_id})


def mark_working(db: Executor, worker_id: str, product_ids: Iterable[int]) -> int:
    """Tie the claimed rows of a batch to the worker that starts it.

    The dispatcher claims rows before any worker has the task, so the claim
    itself cannot name the worker; the worker does, in its own short
    transaction committed before it starts encoding, so a dispatcher sees it.
    Rows no longer claimed (finished meanwhile by another delivery, or given
    back) are left alone. Locks: those queue rows, until commit; one table only.
    Returns how many rows it marked.
    """
    return db.execute(
        text(
            """
            UPDATE classification_queue
            SET worker_id = :worker
            WHERE product_id = ANY(CAST(:ids AS bigint[])) AND claimed_at IS NOT NULL
            """
        ),
        {"worker": worker_id, "ids": list(product_ids)},
    ).rowcount


RELEASE_DEAD_WORKERS_SQL = text(
    """
    WITH orphaned AS (
        SELECT q.id
        FROM classification_queue q
        WHERE q.worker_id IS NOT NULL
          AND q.claimed_at IS NOT NULL
          AND NOT EXISTS (
              SELECT 1 FROM workers w
              WHERE w.id = q.worker_id
                AND w.heartbeat_at >= now() - make_interval(secs => :dead_after))
        FOR UPDATE OF q SKIP LOCKED
    )
    UPDATE classification_queue q
    SET claimed_at = NULL,
        worker_id = NULL,
        last_error = 'worker ' || q.worker_id || ' stopped while classifying (no heartbeat)'
    FROM orphaned
    WHERE q.id = orphaned.id
    RETURNING q.product_id
    """
)
"""A worker that has not beaten for ``dead_after`` seconds, or whose row is gone, is
dead: its rows become ready again. The attempt it spent stays spent, as with an
expired lease, so a product that kills every worker still runs out of attempts.
``SKIP LOCKED``: a row being written right now belongs to a live transaction (a
SIGKILLed worker's connection ends and with it its locks); if that write rolls back,
the next pass finds the row."""


def release_dead_workers(db: Executor, *, dead_after_s: float) -> list[int]:
    """Give back the rows of workers that stopped heartbeating, then forget those workers.

    Locks: the orphaned queue rows (``SKIP LOCKED``), then the stale ``workers``
    rows; nothing else, so it cannot close a cycle with the worker's write path.
    Returns the product ids given back.
    """
    released = list(db.execute(RELEASE_DEAD_WORKERS_SQL, {"dead_after": dead_after_s}).scalars())
    db.execute(
        text("DELETE FROM workers WHERE heartbeat_at < now() - make_interval(secs => :dead_after)"),
        {"dead_after": dead_after_s},
    )
    return released


def live_workers(db: Executor, *, dead_after_s: float) -> int:
    """Worker processes that heartbeated within ``dead_after_s``. A plain read, no locks."""
    return db.execute(
        text(
            "SELECT count(*) FROM workers "
            "WHERE heartbeat_at >= now() - make_interval(secs => :dead_after)"
        ),
        {"dead_after": dead_after_s},
    ).scalar_one()
