"""What ``shelver status`` reports: products by status, the queue, and the champion model.

Also the products classified without their image, by refusal reason, so a catalog that is
quietly being classified from text alone shows it.
"""

from __future__ import annotations

from dataclasses import asdict
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
        lanes = queue.lane_status(conn)
        workers = queue.live_workers(conn, dead_after_s=queue.WORKER_DEAD_AFTER_SECONDS)
        # The recent_errors view (migration 0005): failures of the last day and rows
        # waiting to retry, one row per reason.
        errors = conn.execute(
            text(
                "SELECT kind, reason, products, example_sku, example_error "
                "FROM recent_errors LIMIT 10"
            )
        ).all()
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
            "lanes": [asdict(lane) for lane in lanes],
        },
        "workers_alive": workers,
        "recent_errors": [dict(row._mapping) for row in errors],
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
