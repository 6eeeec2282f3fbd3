"""``shelver beat``: at the times of ``retrain_cron``, start retraining if enough labels arrived,
and adapt the zero-label scorer to the catalog if enough products arrived.

A small loop rather than Celery beat: there is one schedule, its state (the
last training run's label watermark, the last adaptation's product count)
already lives in PostgreSQL, and a loop needs no schedule file. Run one beat
per deployment.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from croniter import croniter
from prometheus_client import Counter
from sqlalchemy import Engine, text

from shelver.catalog.categories import categories_md5
from shelver.worker import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrainDecision:
    start: bool
    new_labels: int
    watermark: datetime | None
    reason: str


NEW_LABELS_SQL = text(
    """
    WITH last AS (
        SELECT max(label_watermark) AS watermark
        FROM training_runs
        WHERE status <> 'failed'
    )
    SELECT
        (SELECT count(*) FROM products, last
         WHERE label_id IS NOT NULL
           AND labeled_at > coalesce(last.watermark, '-infinity')),
        (SELECT watermark FROM last),
        (SELECT count(*) FROM training_runs
         WHERE status = 'running' AND started_at > now() - interval '12 hours')
    """
)
"""Labels given or changed after the newest watermark of a run that did not fail
(a failed run taught nothing). A run still going, unless it is so old that it
must have died, means there is nothing to start. Reads only."""


def decide(engine: Engine, min_new_labels: int) -> RetrainDecision:
    with engine.connect() as conn:
        new_labels, watermark, running = conn.execute(NEW_LABELS_SQL).one()
    if running:
        return RetrainDecision(False, new_labels, watermark, "a training run is in progress")
    if new_labels < min_new_labels:
        return RetrainDecision(
            False, new_labels, watermark, f"{new_labels} new labels, {min_new_labels} needed"
        )
    return RetrainDecision(True, new_labels, watermark, f"{new_labels} new labels")


def send_retrain() -> None:
    from shelver.worker.celery_app import RETRAIN_TASK, TRAINING_QUEUE, app

    app.send_task(RETRAIN_TASK, queue=TRAINING_QUEUE)


def said(decision: RetrainDecision | AdaptDecision, what: str) -> str:
    """The decision in a line: "retraining queued: …" or "no retraining: …"."""
    return (
        f"{what} queued: {decision.reason}" if decision.start else f"no {what}: {decision.reason}"
    )


def act(decision: RetrainDecision | AdaptDecision, what: str, send: Callable[[], None],
        checks: Counter) -> None:  # fmt: skip
    """Send the task the decision asks for, log it as ``what``, and count the check."""
    if decision.start:
        send()
    log.info("%s", said(decision, what))
    checks.labels("queued" if decision.start else "skipped").inc()


def tick(engine: Engine, min_new_labels: int, send: Callable[[], None]) -> RetrainDecision:
    metrics.RETRAIN_LAST_CHECK.set_to_current_time()
    decision = decide(engine, min_new_labels)
    act(decision, "retraining", send, metrics.RETRAIN_CHECKS)
    return decision


@dataclass(frozen=True)
class AdaptDecision:
    start: bool
    new_products: int
    reason: str


LAST_ADAPTATION_SQL = text(
    """
    SELECT (metrics->>'catalog_products')::bigint, metrics->>'categories_md5',
           metrics ? 'withdrawn'
    FROM model_versions
    WHERE status = 'zero_label' AND metrics ? 'adapted_from'
    ORDER BY metrics->>'adapted_at' DESC
    LIMIT 1
    """
)
"""The newest adaptation (``shelver taxonomy adapt`` or this schedule), withdrawn or not."""

CATALOG_SQL = text(
    """
    SELECT (SELECT count(*) FROM categories), (SELECT count(*) FROM products),
           (SELECT version FROM model_versions WHERE status = 'champion')
    """
)


def decide_adapt(engine: Engine, min_new_products: int, merge: bool) -> AdaptDecision:
    """Adapt when the catalog gained ``min_new_products`` products since the last
    adaptation (all of them for the first), or its taxonomy changed since; never over an
    ``--undo``, and not while a champion serves alone (nothing would use the result)."""
    if min_new_products <= 0:
        return AdaptDecision(
            False, 0, "scheduled adaptation is off (SHELVER_ADAPT_MIN_NEW_PRODUCTS=0)"
        )
    with engine.connect() as conn:
        categories, products, champion = conn.execute(CATALOG_SQL).one()
        last = conn.execute(LAST_ADAPTATION_SQL).one_or_none()
        digest = categories_md5(conn)
    if categories == 0:
        return AdaptDecision(False, 0, "no taxonomy loaded (`shelver taxonomy import FILE`)")
    if champion is not None and not merge:
        return AdaptDecision(
            False, 0, f"champion {champion} serves alone; the adapted scorer is used only "
            "with SHELVER_ZERO_LABEL_MERGE=1",
        )  # fmt: skip
    if last is not None and last[2]:
        return AdaptDecision(
            False, 0, "the last adaptation was withdrawn (`shelver taxonomy adapt --undo`); "
            "`shelver taxonomy adapt` adapts again and resumes the schedule",
        )  # fmt: skip
    new_products = products - ((last[0] or 0) if last is not None else 0)
    if last is not None and last[1] is not None and last[1] != digest:
        return AdaptDecision(True, new_products, "the taxonomy changed since the last adaptation")
    if new_products < min_new_products:
        return AdaptDecision(
            False, new_products, f"{new_products} new products, {min_new_products} needed"
        )
    return AdaptDecision(True, new_products, f"{new_products} new products")


def send_adapt() -> None:
    from shelver.worker.celery_app import ADAPT_TASK, TRAINING_QUEUE, app

    app.send_task(ADAPT_TASK, queue=TRAINING_QUEUE)


def tick_adapt(
    engine: Engine, min_new_products: int, merge: bool, send: Callable[[], None]
) -> AdaptDecision:
    decision = decide_adapt(engine, min_new_products, merge)
    act(decision, "adaptation", send, metrics.ADAPT_CHECKS)
    return decision


def run_beat(
    engine: Engine,
    cron: str,
    min_new_labels: int,
    stop: threading.Event,
    send: Callable[[], None] = send_retrain,
    *,
    min_new_products: int = 0,
    merge: bool = False,
    send_adaptation: Callable[[], None] = send_adapt,
) -> None:
    """Sleep until each cron time (UTC), then tick (retraining, then adaptation); until
    ``stop`` is set."""
    schedule = croniter(cron, datetime.now(UTC))
    while not stop.is_set():
        due = schedule.get_next(datetime)
        log.info("next retraining check at %s", due.isoformat(timespec="seconds"))
        if stop.wait(max(0.0, (due - datetime.now(UTC)).total_seconds())):
            break
        try:
            tick(engine, min_new_labels, send)
        except Exception:
            # A database or broker outage costs this tick, not the beat.
            metrics.RETRAIN_CHECKS.labels("error").inc()
            log.exception("retraining check failed; trying again at the next tick")
        try:
            tick_adapt(engine, min_new_products, merge, send_adaptation)
        except Exception:
            metrics.ADAPT_CHECKS.labels("error").inc()
            log.exception("adaptation check failed; trying again at the next tick")
