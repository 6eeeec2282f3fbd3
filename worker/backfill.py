"""``shelver backfill``: re-score a selection of the catalog through the queue, resumably.

Rows are enqueued server-side (INSERT ... SELECT), one id range per
transaction, and each chunk records how far it got in ``backfill_runs`` in the
same transaction, so an interrupted run resumes exactly where it stopped.
Backfill rows carry their ``backfill_id``: dispatchers send them to the
``backfill`` queue in large batches, never in front of a fresh product.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import date

from sqlalchemy import Engine, text

from shelver.catalog.queue import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

CHUNK = 5000


class BackfillError(ValueError):
    """The selection or the run to resume is not usable; the message says why."""


@dataclass(frozen=True)
class Selector:
    """Which products to re-score. Set filters combine with AND; none set means all."""

    unclassified: bool = False
    stale: bool = False
    category: str | None = None
    since: str | None = None  # ISO date; products created on or after it

    def where(self) -> tuple[str, dict[str, object]]:
        """The SQL condition on ``products p`` and its parameters."""
        clauses, params = ["TRUE"], {}
        if self.unclassified:
            clauses.append("p.status IN ('pending', 'failed')")
        if self.stale:
            # Live, not frozen at start: resuming after a promotion re-scores
            # against the champion then in service.
            clauses.append(
                "p.model_version_id IS DISTINCT FROM "
                "(SELECT id FROM model_versions WHERE status = 'champion')"
            )
        if self.category is not None:
            clauses.append(
                "(SELECT id FROM categories WHERE name = :category) IN (p.predicted_id, p.label_id)"
            )
            params["category"] = self.category
        if self.since is not None:
            clauses.append("p.created_at >= CAST(:since AS date)")
            params["since"] = self.since
        return " AND ".join(clauses), params

    def validate(self, engine: Engine) -> None:
        if self.since is not None:
            try:
                date.fromisoformat(self.since)
            except ValueError as exc:
                raise BackfillError(
                    f"--since wants a date like 2026-01-31, not {self.since!r}"
                ) from exc
        if self.category is not None:
            with engine.connect() as conn:
                found = conn.execute(
                    text("SELECT 1 FROM categories WHERE name = :n"), {"n": self.category}
                ).first()
            if found is None:
                raise BackfillError(f"no category named {self.category!r}")


@dataclass
class BackfillRun:
    id: int
    selector: Selector
    status: str
    total: int
    enqueued: int
    last_product_id: int


@dataclass(frozen=True)
class Progress:
    enqueued: int
    remaining: int  # still in the queue
    total: int
    enqueue_done: bool

    @property
    def finished(self) -> int:
        return self.enqueued - self.remaining


def start(engine: Engine, selector: Selector) -> BackfillRun:
    """Record a new run with the number of products it selects now."""
    selector.validate(engine)
    where, params = selector.where()
    with engine.begin() as conn:
        total = conn.execute(
            text(f"SELECT count(*) FROM products p WHERE {where}"), params
        ).scalar_one()
        run_id = conn.execute(
            text(
                "INSERT INTO backfill_runs (selector, total) VALUES (CAST(:s AS jsonb), :total) "
                "RETURNING id"
            ),
            {"s": json.dumps(asdict(selector)), "total": total},
        ).scalar_one()
    log.info("backfill %s: %d products selected by %s", run_id, total, selector)
    return BackfillRun(run_id, selector, "running", total, 0, 0)


def load(engine: Engine, run_id: int) -> BackfillRun:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT id, selector, status, total, enqueued, last_product_id "
                "FROM backfill_runs WHERE id = :id"
            ),
            {"id": run_id},
        ).one_or_none()
    if row is None:
        raise BackfillError(f"no backfill run {run_id}")
    return BackfillRun(row[0], Selector(**row[1]), row[2], row[3], row[4], row[5])


ENQUEUE_CHUNK_SQL = """
WITH chunk AS (
    SELECT p.id
    FROM products p
    WHERE p.id > :after AND {where}
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
"""One id range: queue it and move the run's bookmark in the same statement.

Walking the primary key keeps each chunk an index range scan however large the
catalog. A product already queued (a fresh insert or update) is left as it is:
it will be classified by the current champion anyway. Locks: the inserted queue
rows, and the run's row until commit (a second `--resume` of the same run waits)."""


def enqueue(engine: Engine, run: BackfillRun, chunk: int = CHUNK) -> Iterator[BackfillRun]:
    """Enqueue the run's remaining selection chunk by chunk; yields after each commit."""
    where, params = run.selector.where()
    sql = text(ENQUEUE_CHUNK_SQL.format(where=where))
    while True:
        with engine.begin() as conn:
            scanned, run.last_product_id, run.enqueued = conn.execute(
                sql, {**params, "after": run.last_product_id, "chunk": chunk, "run_id": run.id}
            ).one()
            if scanned:
                conn.execute(text("SELECT pg_notify(:c, '')"), {"c": NOTIFY_CHANNEL})
        if not scanned:
            break
        yield run
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE backfill_runs SET status = 'enqueued' WHERE id = :id AND status = 'running'"
            ),
            {"id": run.id},
        )
    run.status = "enqueued"


def progress(engine: Engine, run: BackfillRun) -> Progress:
    """How much of the run is still queued; rows leave the queue when classified or failed."""
    with engine.begin() as conn:
        remaining = conn.execute(
            text("SELECT count(*) FROM classification_queue WHERE backfill_id = :id"),
            {"id": run.id},
        ).scalar_one()
        if remaining == 0 and run.status == "enqueued":
            conn.execute(
                text(
                    "UPDATE backfill_runs SET status = 'done', finished_at = now() "
                    "WHERE id = :id AND status <> 'done'"
                ),
                {"id": run.id},
            )
            run.status = "done"
    return Progress(run.enqueued, remaining, run.total, run.status in ("enqueued", "done"))
