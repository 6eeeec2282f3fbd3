"""The review queue as people see it: the least confident products waiting, with the model's
suggestions and why each is there; verdicts go through worker.labels like the terminal's."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, Row, text

from shelver.worker.labels import apply_review

log = logging.getLogger(__name__)

PAGE_SIZE = 20


@dataclass(frozen=True)
class Suggestion:
    category: str
    p: float


@dataclass(frozen=True)
class QueueItem:
    id: int
    sku: str
    name: str
    description: str
    has_image: bool
    predicted: str | None
    confidence: float | None
    suggestions: list[Suggestion]
    why: str


@dataclass(frozen=True)
class Choice:
    id: int
    label: str


@dataclass(frozen=True)
class ReviewPage:
    items: list[QueueItem]
    waiting: int
    categories: list[Choice]
    batches: list[Choice]


PAGE_SQL = text(
    """
    SELECT p.id, p.sku, p.name, p.description, p.image_uri IS NOT NULL AS has_image,
           c.path AS predicted, p.confidence, coalesce(h.top_k, '[]') AS top_k,
           m.threshold, p.error
    FROM products p
    LEFT JOIN categories c ON c.id = p.predicted_id
    LEFT JOIN model_versions m ON m.id = p.model_version_id
    LEFT JOIN predictions h
           ON h.product_id = p.id AND h.model_version_id = p.model_version_id
          AND h.content_hash = p.content_hash
    WHERE p.status = 'needs_review'
      AND (CAST(:category_id AS integer) IS NULL OR p.predicted_id = :category_id)
      AND (CAST(:batch_id AS integer) IS NULL OR p.import_batch_id = :batch_id)
    ORDER BY p.confidence NULLS FIRST, p.id
    LIMIT :limit
    """
)
"""One page of the queue, least confident first. Read straight from the partial
indexes of migration 0003 (no sort of the whole queue), so the page costs the
same with a hundred or a hundred thousand products waiting."""

WAITING_SQL = text(
    """
    SELECT count(*) FROM products p
    WHERE p.status = 'needs_review'
      AND (CAST(:category_id AS integer) IS NULL OR p.predicted_id = :category_id)
      AND (CAST(:batch_id AS integer) IS NULL OR p.import_batch_id = :batch_id)
    """
)


def review_page(
    engine: Engine,
    *,
    category_id: int | None = None,
    batch_id: int | None = None,
    limit: int = PAGE_SIZE,
) -> ReviewPage:
    """The products a person should look at next, and what the filters can choose from."""
    params = {"category_id": category_id, "batch_id": batch_id, "limit": limit}
    with engine.connect() as conn:
        rows = conn.execute(PAGE_SQL, params).all()
        waiting = conn.execute(WAITING_SQL, params).scalar_one()
        categories = conn.execute(text("SELECT id, path FROM categories ORDER BY path")).all()
        batches = conn.execute(
            text(
                """
                SELECT id, source || ' (' || to_char(started_at, 'YYYY-MM-DD HH24:MI') || ')'
                FROM import_batches ORDER BY id DESC LIMIT 100
                """
            )
        ).all()
    return ReviewPage(
        items=[_item(row) for row in rows],
        waiting=waiting,
        categories=[Choice(*c) for c in categories],
        batches=[Choice(*b) for b in batches],
    )


def _item(row: Row) -> QueueItem:
    suggestions = [Suggestion(s["category"], float(s["p"])) for s in row.top_k]
    return QueueItem(
        id=row.id,
        sku=row.sku,
        name=row.name,
        description=row.description,
        has_image=row.has_image,
        predicted=row.predicted,
        confidence=row.confidence,
        suggestions=suggestions,
        why=why_here(row.confidence, row.threshold, row.error),
    )


def why_here(confidence: float | None, threshold: float | None, note: str | None) -> str:
    """Why the product waits for a person, in words."""
    if confidence is None:
        reason = "the model gave no prediction"
    elif threshold is None:
        reason = f"confidence {confidence:.0%}"
    else:
        reason = f"confidence {confidence:.0%} is below the model's threshold of {threshold:.0%}"
    if note:
        reason += f"; {note}"
    return reason


@dataclass
class VerdictReport:
    accepted: int = 0
    already_reviewed: int = 0


def give_verdicts(
    engine: Engine, user_id: int, verdicts: Sequence[tuple[int, str]]
) -> VerdictReport:
    """Label products (id, category name) as a person's review, all or none.

    A product that no longer waits (another reviewer was quicker) is skipped and
    counted, never relabeled behind that reviewer's back. Raises ReviewError for
    an unknown category, and nothing is written.
    """
    report = VerdictReport()
    wanted = dict(verdicts)
    with engine.begin() as conn:
        # Locked in id order, as every multi-row writer here does, against deadlocks.
        waiting = conn.execute(
            text(
                """
                SELECT id, sku FROM products
                WHERE id = ANY(CAST(:ids AS bigint[])) AND status = 'needs_review'
                ORDER BY id
                FOR UPDATE
                """
            ),
            {"ids": list(wanted)},
        ).all()
        for product_id, sku in waiting:
            apply_review(conn, sku, wanted[product_id], labeled_by=user_id)
        report.accepted = len(waiting)
    report.already_reviewed = len(wanted) - report.accepted
    log.info("user %d: %s", user_id, report)
    return report


def search_categories(engine: Engine, query: str, limit: int = 20) -> list[str]:
    """Category paths containing ``query``, those starting with it first (the type-ahead)."""
    pattern = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    """
                    SELECT path FROM categories
                    WHERE path ILIKE '%' || :q || '%'
                    ORDER BY path ILIKE :q || '%' DESC, length(path), path
                    LIMIT :limit
                    """
                ),
                {"q": pattern, "limit": limit},
            ).scalars()
        )
