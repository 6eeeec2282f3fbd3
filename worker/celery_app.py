"""The Celery application and the task base class every Shelver task runs under.

PostgreSQL is the system of record: the queue table says what work exists, and
results are written to the catalog, never to a result backend. The broker only
carries "please do this batch now", so everything it holds can be rebuilt from
the queue table (a flushed Redis costs one lease period, not data).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import celery
from kombu import Exchange, Queue

from shelver.catalog.db import is_transient, session_scope
from shelver.catalog.settings import get_settings

log = logging.getLogger(__name__)

CLASSIFY_QUEUE = "classify"
BACKFILL_QUEUE = "backfill"
TRAINING_QUEUE = "training"
QUEUES = (CLASSIFY_QUEUE, BACKFILL_QUEUE, TRAINING_QUEUE)

CLASSIFY_TASK = "shelver.classify_batch"
RETRAIN_TASK = "shelver.retrain"
ADAPT_TASK = "shelver.adapt"

# Redis re-delivers an unacknowledged message after the visibility timeout. With
# late acks a task is acknowledged when it ends, so this must exceed the longest
# task (a retraining run, tens of minutes), or the same run starts twice. Lost
# classify work does not depend on it: the queue lease brings it back sooner.
VISIBILITY_TIMEOUT_S = 6 * 3600


def celery_config() -> dict[str, Any]:
    """Celery settings; called when the app is first configured, so the broker URL is read late."""
    return {
        "broker_url": get_settings().require_broker_url(),
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            # A dispatcher must notice a dead broker in seconds and release its claims.
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
        },
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        # Acknowledge after the task ran, and hand the message back if the worker
        # process dies mid-task: delivery is at-least-once, every write idempotent.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One message per process at a time: a prefetched batch would wait behind
        # the current one while its lease runs down.
        "worker_prefetch_multiplier": 1,
        # Each queue its own direct exchange and routing key: a bare Queue(name)
        # would bind every queue to the default key, and a backfill batch sent to
        # "backfill" would be copied into "classify" too.
        "task_queues": [
            Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES
        ],
        "task_default_queue": CLASSIFY_QUEUE,
        "task_routes": {
            RETRAIN_TASK: {"queue": TRAINING_QUEUE},
            ADAPT_TASK: {"queue": TRAINING_QUEUE},
        },
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


class ShelverTask(celery.Task):
    """Runs a task in one database transaction, times it, and turns its failure into a retry.

    Tasks that work on queue rows take ``product_ids``; any error that escapes
    them gives those rows back to the queue with a backoff (``retry_later``),
    so retries are scheduled by ``not_before`` in PostgreSQL, counted by the
    queue's ``attempts``, and survive a broker flush. The message is then
    acknowledged: the queue row, not the message, is the work. Tasks without
    queue rows (retraining) retry through Celery on transient errors.
    """

    # Results live in PostgreSQL.
    ignore_result = True
    # Arguments are checked by the task body; callers send by name.
    typing = False
    # False for tasks that manage their own transactions (retraining holds none
    # open for minutes).
    transactional = True
    max_retries = 3

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from shelver.worker import metrics

        started = time.perf_counter()
        outcome = "ok"
        try:
            if kwargs.get("product_ids"):
                # Tie the rows to this process before working on them, so a
                # dispatcher gives them back within seconds if it dies.
                from shelver.worker.heartbeat import this_worker

                this_worker().mark_working(kwargs["product_ids"])
            if not self.transactional:
                return self.run(*args, **kwargs)
            with session_scope() as session:
                return self.run(session, *args, **kwargs)
        except celery.exceptions.Retry:
            outcome = "retry"
            raise
        except Exception as exc:
            outcome = "transient error" if is_transient(exc) else "error"
            return self._handle_failure(exc, kwargs)
        finally:
            elapsed = time.perf_counter() - started
            lane = (self.request.delivery_info or {}).get("routing_key") or "direct"
            metrics.BATCH_SECONDS.labels(lane, outcome.replace(" ", "_")).observe(elapsed)
            log.info("task %s[%s] %s in %.3f s", self.name, self.request.id, outcome, elapsed)

    def _handle_failure(self, exc: Exception, kwargs: dict[str, Any]) -> None:
        product_ids = kwargs.get("product_ids")
        if product_ids is None:
            if is_transient(exc):
                log.warning("%s: transient error, retrying: %s", self.name, exc)
                raise self.retry(exc=exc, countdown=get_settings().retry_backoff_s * 30)
            raise exc
        if is_transient(exc):
            log.warning("%s: transient error on %d rows: %s", self.name, len(product_ids), exc)
        else:
            log.exception("%s failed on %d rows", self.name, len(product_ids))
        self._give_back(product_ids, exc)
        return None

    def _give_back(self, product_ids: list[int], exc: Exception) -> None:
        from shelver.catalog.queue import retry_later
        from shelver.worker.metrics import RETRIES

        error = f"{type(exc).__name__}: {exc}"

        try:
            with session_scope() as session:
                retry_later(
                    session,
                    product_ids,
                    error=error,
                    backoff_seconds=get_settings().retry_backoff_s,
                )
        except Exception as unreachable:
            # PostgreSQL is unreachable: nothing to write to. The claims' lease
            # runs out (or this worker's heartbeat with it) and a dispatcher
            # hands the rows out again.
            log.error(
                "could not schedule a retry for %d rows (%s); the lease will",
                len(product_ids),
                unreachable,
            )
            return
        RETRIES.labels(type(exc).__name__).inc(len(product_ids))


def create_app() -> celery.Celery:
    app = celery.Celery("shelver", task_cls=ShelverTask, include=["shelver.worker.tasks"])
    # A callable default is evaluated when the configuration is first read, so
    # importing this module needs no broker URL (tests, `shelver --help`).
    app.add_defaults(celery_config)
    return app


app = create_app()
