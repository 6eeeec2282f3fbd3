"""Audits of the model's automatic decisions and the live precision they measure.

Owns the ``audits`` table. The sample is drawn by ``shelver_audit_draw``
(migration 0003): an auto-accepted product is in it when its draw is below
SHELVER_AUDIT_RATE. A verdict is recorded as an audit row and, through
worker.labels, as a review label, so confirmations train like any label a
person gave.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine, text

from shelver.web.review import Suggestion
from shelver.worker.labels import apply_review

log = logging.getLogger(__name__)

PAGE_SIZE = 10
# Two-sided 95% interval.
Z = 1.959964


class AuditSettings(Protocol):
    """The part of catalog.settings.Settings the audit reads."""

    audit_rate: float
    audit_rate_new_model: float
    audit_new_model_days: float


class AuditError(RuntimeError):
    """The decision shown to the auditor is no longer the product's; reload and audit again."""


@dataclass(frozen=True)
class AuditItem:
    id: int
    sku: str
    name: str
    description: str
    has_image: bool
    predicted: str
    confidence: float
    model_version_id: int
    model_version: str
    suggestions: list[Suggestion]


# Only the champion's decisions: live precision is the champion's, and an audit of a
# retired model's decision would not move it (a backfill re-scores those products).
_IN_SAMPLE = """
    p.status = 'classified' AND p.label_id IS NULL AND p.model_version_id IS NOT NULL
    AND shelver_audit_draw(p.id, p.model_version_id) < :rate
    AND p.model_version_id = (SELECT id FROM model_versions WHERE status = 'champion')
"""

SAMPLE_SQL = text(
    f"""
    SELECT p.id, p.sku, p.name, p.description, p.image_uri IS NOT NULL, c.path, p.confidence,
           p.model_version_id, m.version, coalesce(h.top_k, '[]')
    FROM products p
    JOIN categories c ON c.id = p.predicted_id
    JOIN model_versions m ON m.id = p.model_version_id
    LEFT JOIN predictions h
           ON h.product_id = p.id AND h.model_version_id = p.model_version_id
          AND h.content_hash = p.content_hash
    WHERE {_IN_SAMPLE}
    ORDER BY shelver_audit_draw(p.id, p.model_version_id)
    LIMIT :limit
    """
)
"""The champion's auto-accepted products (classified, no label) whose draw puts them in
the sample, read in draw order from the products_audit_draw index."""

PENDING_SQL = text(f"SELECT count(*) FROM products p WHERE {_IN_SAMPLE}")


def audit_rate(engine: Engine, settings: AuditSettings) -> float:
    """The share to audit now: higher while the champion is new, as its live precision is
    still unknown; SHELVER_AUDIT_RATE once it has served SHELVER_AUDIT_NEW_MODEL_DAYS."""
    with engine.connect() as conn:
        new = conn.execute(
            text(
                """
                SELECT promoted_at > now() - make_interval(secs => :days * 86400)
                FROM model_versions WHERE status = 'champion'
                """
            ),
            {"days": settings.audit_new_model_days},
        ).scalar_one_or_none()
    return settings.audit_rate_new_model if new else settings.audit_rate


def audit_sample(
    engine: Engine, rate: float, limit: int = PAGE_SIZE
) -> tuple[list[AuditItem], int]:
    """The next products to audit and how many of the sample still wait."""
    with engine.connect() as conn:
        rows = conn.execute(SAMPLE_SQL, {"rate": rate, "limit": limit}).all()
        pending = conn.execute(PENDING_SQL, {"rate": rate}).scalar_one()
    items = [
        AuditItem(*row[:9], suggestions=[Suggestion(s["category"], float(s["p"])) for s in row[9]])
        for row in rows
    ]
    return items, pending


def record_audit(
    engine: Engine, user_id: int, product_id: int, model_version_id: int, category: str
) -> bool:
    """A person's verdict on one automatic decision; True when it confirmed the model.

    Raises AuditError when the product was re-classified, labeled or audited since
    the page was shown, and worker.labels.ReviewError for an unknown category.
    """
    with engine.begin() as conn:
        # The row lock keeps a re-classification from landing between the check and the write.
        row = conn.execute(
            text(
                """
                SELECT sku, predicted_id, confidence FROM products
                WHERE id = :id AND model_version_id = :model AND status = 'classified'
                  AND label_id IS NULL
                FOR UPDATE
                """
            ),
            {"id": product_id, "model": model_version_id},
        ).one_or_none()
        if row is None:
            raise AuditError(
                f"product {product_id} changed since it was shown (re-classified, labeled or "
                "already audited); its current state is on the audit page"
            )
        apply_review(conn, row.sku, category, labeled_by=user_id)
        correct = conn.execute(
            text(
                """
                INSERT INTO audits (product_id, model_version_id, predicted_id, confidence,
                                    verdict_id, audited_by)
                SELECT id, :model, :predicted, :confidence, label_id, :user
                FROM products WHERE id = :id
                RETURNING correct
                """
            ),
            {
                "id": product_id,
                "model": model_version_id,
                "predicted": row.predicted_id,
                "confidence": row.confidence,
                "user": user_id,
            },
        ).scalar_one()
    log.info("audit of product %d by user %d: %s", product_id, user_id, correct)
    return correct


@dataclass(frozen=True)
class Precision:
    category: str
    audited: int
    correct: int
    low: float
    high: float
    target: float

    @property
    def estimate(self) -> float:
        return self.correct / self.audited

    @property
    def verdict(self) -> str:
        """``under`` when even the interval's top is below target, ``meets`` when its bottom
        is at or above it, ``unclear`` while too few audits tell the two apart."""
        if self.high < self.target:
            return "under"
        if self.low >= self.target:
            return "meets"
        return "unclear"


def wilson_interval(correct: int, n: int, z: float = Z) -> tuple[float, float]:
    """Wilson score interval of a proportion; sound at 0, 1 and small n, unlike p ± z·se."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    denominator = 1 + z * z / n
    return max(0.0, (centre - spread) / denominator), min(1.0, (centre + spread) / denominator)


@dataclass(frozen=True)
class LivePrecision:
    per_category: list[Precision]
    overall: Precision | None


def live_precision(engine: Engine, target: float) -> LivePrecision:
    """Audited precision of the champion per predicted category (least sure first), and overall."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                """
                SELECT c.path, GROUPING(c.path) = 1 AS overall, count(*),
                       count(*) FILTER (WHERE a.correct)
                FROM audits a JOIN categories c ON c.id = a.predicted_id
                WHERE a.model_version_id = (
                    SELECT id FROM model_versions WHERE status = 'champion')
                GROUP BY ROLLUP (c.path)
                HAVING count(*) > 0  -- no audits: no grand-total row either
                """
            )
        ).all()
    figures = {
        (name, overall): Precision(name or "all categories", n, k, *wilson_interval(k, n), target)
        for name, overall, n, k in rows
    }
    per_category = sorted(
        (f for (_, overall), f in figures.items() if not overall),
        key=lambda f: (f.high, f.category),
    )
    overall = next((f for (_, is_overall), f in figures.items() if is_overall), None)
    return LivePrecision(per_category, overall)
