"""``shelver backfill``: re-score a selection of the catalog through the queue, resumably.

Rows are enqueued server-side (INSERT ... SELECT, ``queue.enqueue_backfill_chunk``),
one id range per transaction, and each chunk records how far it got in
``backfill_runs`` in the same transaction, so an interrupted run resumes
exactly where it stopped. A run goes ``running`` -> ``enqueued`` -> ``done``;
``done`` is recorded by whoever removes its last queue row.
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

from shelver.catalog import queue
from shelver.catalog.categories import CATEGORIES_MD5_SQL, category_ids, normalize_path

log = logging.getLogger(__name__)

CHUNK = 5000


SERVED_ZERO_LABEL_SQL = f"""
    WITH base AS (
        SELECT id, version FROM model_versions
        WHERE status = 'zero_label' AND NOT metrics ? 'adapted_from'
          AND metrics->>'categories_md5' = ({CATEGORIES_MD5_SQL.text})
        ORDER BY id DESC LIMIT 1
    )
    SELECT coalesce(
        (SELECT a.id FROM model_versions a JOIN base ON a.metrics->>'adapted_from' = base.version
         WHERE a.status = 'zero_label' AND NOT a.metrics ? 'withdrawn'
         ORDER BY a.metrics->>'adapted_at' DESC LIMIT 1),
        (SELECT id FROM base))
"""
"""The id of the zero-label scorer a worker serves for the categories as they are now
(``zero_label.ensure_zero_label_model``): the latest adaptation not withdrawn of the
taxonomy's own row, else that row; NULL while no row was made for this taxonomy (the
worker makes one at its next look), when every zero-label suggestion is another
scorer's. A row is the taxonomy's by the ``categories_md5`` it recorded; one stored
before rows recorded it gets it at a worker's next look, and until then its
suggestions are selected too: re-scored once more, never missed."""


class BackfillError(ValueError):
    """The selection or the run to resume is not usable; the message says why."""


@dataclass(frozen=True)
class Selector:
    """Which products to re-score. Set filters combine with AND; none set means all."""

    unclassified: bool = False
    stale: bool = False
    # Unlabeled products waiting for review with a zero-label suggestion that the scorer
    # served now did not make (``SERVED_ZERO_LABEL_SQL``; ``shelver taxonomy adapt``).
    suggestions: bool = False
    # A category path: products labeled or predicted at it or anywhere below it.
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
        if self.suggestions:
            # Live too: a run resumed after another adaptation skips what that one scored.
            clauses.append(
                "p.status = 'needs_review' AND p.label_id IS NULL AND p.model_version_id IN "
                "(SELECT id FROM model_versions WHERE status = 'zero_label') AND "
                f"p.model_version_id IS DISTINCT FROM ({SERVED_ZERO_LABEL_SQL})"
            )
        if self.category is not None:
            clauses.append(
                "EXISTS (SELECT 1 FROM categories c WHERE c.id IN (p.predicted_id, p.label_id) "
                "AND (c.path = :category OR starts_with(c.path, :category || ' > ')))"
            )
            params["category"] = normalize_path(self.category)
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
                found = category_ids(conn, [self.category])
            if not found:
                raise BackfillError(
                    f"no category at {self.category!r}; give a path such as 'Cell Phones' or "
                    "'Cell Phones > Cell Phone Accessories'"
                )


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

    @property
    def done(self) -> bool:
        return self.enqueue_done and self.remaining == 0


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


def open_run(
    engine: Engine, selector: Selector, *, every: bool = False, resume: int | None = None
) -> BackfillRun:
    """The run a command line asks for: run ``resume`` again, or a new run of ``selector``
    (``every`` product when it sets no filter). Raises BackfillError on a request that
    says too little or two contradicting things."""
    if resume is not None:
        if every or selector != Selector():
            raise BackfillError("--resume continues a run with its own selection; give no filters")
        return load(engine, resume)
    if not every and selector == Selector():
        raise BackfillError(
            "say what to re-score: --all, --unclassified, --stale, --suggestions, --category "
            "or --since"
        )
    return start(engine, selector)


def enqueue(engine: Engine, run: BackfillRun, chunk: int = CHUNK) -> Iterator[BackfillRun]:
    """Enqueue the run's remaining selection chunk by chunk; yields after each commit.

    When the last chunk is in, the run is ``enqueued``, or ``done`` straight
    away if workers already finished every row; otherwise whoever removes its
    last queue row records ``done`` (``queue.finish_backfills``), so a run
    nobody waits for (``--no-wait``) ends ``done`` too.
    """
    selection, params = run.selector.where()
    while True:
        with engine.begin() as conn:
            step = queue.enqueue_backfill_chunk(
                conn,
                run_id=run.id,
                selection=selection,
                params=params,
                after=run.last_product_id,
                chunk=chunk,
            )
        run.last_product_id, run.enqueued = step.last_product_id, step.enqueued
        if not step.scanned:
            break
        yield run
    with engine.begin() as conn:
        # Locks the run's row before finish_backfills counts what is left: a
        # worker removing the last rows meanwhile either committed before (and
        # is counted) or waits for this commit and then records ``done`` itself.
        conn.execute(
            text(
                "UPDATE backfill_runs SET status = 'enqueued' WHERE id = :id AND status = 'running'"
            ),
            {"id": run.id},
        )
        finished = queue.finish_backfills(conn, [run.id])
    run.status = "done" if finished else "enqueued"


def progress(engine: Engine, run: BackfillRun) -> Progress:
    """How much of the run is still queued; rows leave the queue when classified or failed.

    A read only: it writes nothing, so watching a run (or several watchers)
    never changes it. ``done`` is recorded by whoever removes the last row.
    """
    with engine.connect() as conn:
        status, enqueued, total = conn.execute(
            text("SELECT status, enqueued, total FROM backfill_runs WHERE id = :id"),
            {"id": run.id},
        ).one()
        remaining = queue.backfill_remaining(conn, run.id)
    return Progress(enqueued, remaining, total, status in ("enqueued", "done"))
