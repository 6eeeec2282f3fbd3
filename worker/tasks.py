"""The Celery tasks. Each says what it does; transactions, timing and retries are ShelverTask's."""

from __future__ import annotations

import logging
import os

from celery.signals import worker_process_init, worker_process_shutdown
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from shelver.catalog.settings import get_settings
from shelver.training import registry
from shelver.worker import backfill as bf
from shelver.worker import metrics
from shelver.worker.celery_app import (
    ADAPT_TASK,
    BACKFILL_QUEUE,
    CLASSIFY_TASK,
    RETRAIN_TASK,
    app,
)
from shelver.worker.classify import classify_products
from shelver.worker.heartbeat import stop_this_worker, this_worker
from shelver.worker.metrics_http import mark_this_process_dead
from shelver.worker.runtime import get_runtime
from shelver.worker.zero_label import serving_classifier

log = logging.getLogger(__name__)


@worker_process_init.connect
def _warm_up(**_: object) -> None:
    """Load encoders and the champion when a pool process starts, not on its first batch."""
    from shelver.catalog.db import get_engine

    # Connections inherited from the parent over fork() would be shared by two
    # processes; drop them (without closing the parent's sockets).
    get_engine().dispose(close=False)
    try:
        this_worker()
        runtime = get_runtime()
        if runtime.loaded_by_pid != os.getpid():
            log.info(
                "using the encoders loaded by the main process (pid %d)", runtime.loaded_by_pid
            )
        champion = runtime.champion()
        metrics.observe_champion(champion.version if champion else None)
    except Exception:
        # PostgreSQL not reachable yet: the first task loads the champion (and
        # starts the heartbeat) instead. Missing encoders cannot get here,
        # `shelver worker` checks them first.
        log.exception("could not warm up; the first task will try again")


@worker_process_shutdown.connect
def _stop(**_: object) -> None:
    """A pool process stopping cleanly: its batch is done, so it leaves the workers table."""
    stop_this_worker()
    mark_this_process_dead()


@app.task(name=CLASSIFY_TASK, bind=True)
def classify_batch(self, db: Session, product_ids: list[int]) -> dict[str, int]:  # noqa: ANN001
    """Classify queued products: fresh ones from the classify queue, backfill rows in bulk."""
    runtime = get_runtime()
    if (self.request.delivery_info or {}).get("routing_key") == BACKFILL_QUEUE:
        # A backfill usually follows a promotion. Look at the registry now (one
        # cheap probe) rather than re-score a selection with the model being
        # replaced and report it done while its rows are still stale.
        runtime.refresh()
    champion = runtime.champion()
    metrics.observe_champion(champion.version if champion else None)
    # The champion, merged with the zero-label scorer for the categories it was not
    # trained on; without a champion, taxonomy suggestions, all for review.
    classifier = serving_classifier(runtime, champion)
    summary = classify_products(
        db,
        product_ids,
        classifier,
        no_model_delay_s=max(1.0, get_settings().model_poll_seconds),
    )
    metrics.count_batch(
        classified=summary.classified,
        needs_review=summary.needs_review,
        failed_reasons=summary.failed_reasons,
        images_refused=summary.images_refused,
    )
    return summary.as_dict()


@app.task(name=RETRAIN_TASK, bind=True, transactional=False)
def retrain(self) -> None:  # noqa: ANN001
    """Train on the labels so far and let the gate decide about promotion.

    Only the training worker has TensorFlow, so the training code is imported
    here and nowhere else in the worker package.
    """
    from shelver.catalog.db import get_engine
    from shelver.training.pipeline import train_and_register

    outcome = train_and_register(get_engine(), get_settings(), promote="auto")
    log.info(
        "scheduled retraining: %s %s (%s)",
        outcome.model.version,
        "promoted" if outcome.promoted else outcome.model.status,
        "; ".join(outcome.decision.reasons) if outcome.decision else "",
    )


@app.task(name=ADAPT_TASK, bind=True, transactional=False)
def adapt(self) -> None:  # noqa: ANN001
    """Adapt the zero-label scorer to the catalog's products (``shelver taxonomy adapt``).

    Queued by ``shelver beat`` as products arrive; workers serve the result from their
    next look. Too few products, or no categories, is logged and ends the task: the next
    check tries again.
    """
    from shelver.catalog.db import get_engine
    from shelver.worker.zero_label import adapt_zero_label_model

    runtime, engine = get_runtime(), get_engine()
    try:
        report = adapt_zero_label_model(
            engine, runtime.text_encoder, runtime.image_encoder, get_settings()
        )
    except (LookupError, ValueError) as exc:
        log.warning("scheduled adaptation stored nothing: %s", exc)
        metrics.ADAPTATIONS.labels("nothing").inc()
        return
    metrics.ADAPTATIONS.labels("stored").inc()
    a = report.adaptation
    log.info(
        "scheduled adaptation: stored %s from %d of %d products (%d without text not used); "
        "%d categories moved",
        report.version, report.read, report.catalog_products, report.no_text, a.moved,
    )  # fmt: skip
    rescore_suggestions(engine, get_settings().adapt_rescore)


def rescore_suggestions(engine: Engine, enabled: bool) -> bf.BackfillRun | None:
    """Queue the suggestions waiting for review for re-scoring by the adaptation just
    stored: a backfill run of ``Selector(suggestions=True)``, which ``shelver dispatch``
    sends to the backfill queue. Only without a champion: with one, the worker serves it."""
    if not enabled:
        log.info(
            "SHELVER_ADAPT_RESCORE is off: suggestions in review keep the old scorer's until "
            "`shelver backfill --suggestions`"
        )
        return None
    with engine.connect() as conn:
        champion = registry.champion(conn)
    if champion is not None:
        log.info("champion %s serves: no suggestion re-scored", champion.version)
        return None
    run = bf.start(engine, bf.Selector(suggestions=True))
    for _ in bf.enqueue(engine, run):
        pass
    log.info(
        "backfill run %d: %d suggestions in review queued for re-scoring by the adapted scorer",
        run.id, run.enqueued,
    )  # fmt: skip
    return run
