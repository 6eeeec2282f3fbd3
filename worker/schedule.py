"""``shelver beat``: at the times of ``retrain_cron``, start retraining if enough labels arrived.

A small loop rather than Celery beat: there is one schedule, its state (the
last training run's label watermark) already lives in PostgreSQL, and a loop
needs no schedule file. Run one beat per deployment.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from croniter import croniter
from sqlalchemy import Engine, text

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


def tick(engine: Engine, min_new_labels: int, send: Callable[[], None]) -> RetrainDecision:
    metrics.RETRAIN_LAST_CHECK.set_to_current_time()
    decision = decide(engine, min_new_labels)
    if decision.start:
        send()
        log.info("retraining queued: %s", decision.reason)
    else:
        log.info("no retraining: %s", decision.reason)
    metrics.RETRAIN_CHECKS.labels("queued" if decision.start else "skipped").inc()
    return decision


def run_beat(
    engine: Engine,
    cron: str,
    min_new_labels: int,
    stop: threading.Event,
    send: Callable[[], None] = send_retrain,
) -> None:
    """Sleep until each cron time (UTC), then tick; until ``stop`` is set."""
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
