"""What ``shelver status`` reports: products by status, the queue, and the champion model.

Also the products classified without their image, by refusal reason, so a catalog that is
quietly being classified from text alone shows it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text

from shelver.catalog import queue
from shelver.catalog.images import refused_images

# The values products.status may take (its CHECK constraint, migrations/versions/0001),
# so that a status no product has yet is shown with 0.
PRODUCT_STATUSES = ("pending", "classified", "needs_review", "failed")


def catalog_status(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        counts = dict(
            conn.execute(text("SELECT status, count(*) FROM products GROUP BY status")).all()
        )
        waiting = queue.stats(conn)
        oldest_pending = conn.execute(
            text(
                "SELECT extract(epoch FROM now() - min(updated_at)) FROM products "
                "WHERE status = 'pending'"
            )
        ).scalar()
        champion = conn.execute(
            text(
                """
                SELECT version, promoted_at, threshold, metrics -> 'test' ->> 'macro_f1'
                FROM model_versions WHERE status = 'champion'
                """
            )
        ).one_or_none()
        refused = refused_images(conn)
    return {
        "products": {s: counts.get(s, 0) for s in PRODUCT_STATUSES},
        "images_refused": {"total": sum(refused.values()), "by_reason": refused},
        "queue": {
            "depth": waiting.depth,
            "claimed": waiting.claimed,
            "oldest_enqueued_age_s": waiting.oldest_age_s,
            "oldest_pending_age_s": float(oldest_pending) if oldest_pending is not None else None,
            "backfill": waiting.backfill,
            "retrying": waiting.retrying,
        },
        "champion": (
            {
                "version": champion[0],
                "promoted_at": champion[1],
                "threshold": champion[2],
                "macro_f1": float(champion[3]) if champion[3] is not None else None,
            }
            if champion
            else None
        ),
    }
