"""Every Prometheus metric Shelver exposes, and the helpers that record them.

Worker pool processes, the dispatcher and beat all import these definitions;
each process records what it does and ``worker.metrics_http`` serves them. In a
prefork worker the values live in files under ``PROMETHEUS_MULTIPROC_DIR``
(prepared by ``shelver worker`` before this module is imported) and the worker's
main process sums them over its pool.

Names carry the ``shelver_`` prefix and their unit. Label values are bounded:
lanes, outcomes, stages, exception class names and failure reasons cut to their
first clause, never product data.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

# Classify batches take tens of milliseconds (cached re-scores) to tens of seconds
# (a cold batch of photos on a busy machine).
BATCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

STAGES = ("load", "encode_text", "decode_image", "encode_image", "model", "write")

# Worker.
PRODUCTS = Counter(
    "shelver_products_total",
    "Products a worker finished, by outcome: classified, needs_review or failed.",
    ["outcome"],
)
PRODUCTS_FAILED = Counter(
    "shelver_products_failed_total",
    "Products that ended failed, by reason (worker: why the row could not be "
    "classified; dispatcher: attempts_exhausted).",
    ["reason"],
)
IMAGES_REFUSED = Counter(
    "shelver_images_refused_total",
    "Products classified without their image, by refusal reason.",
    ["reason"],
)
BATCH_SECONDS = Histogram(
    "shelver_batch_duration_seconds",
    "Wall time of one task, by lane (classify, backfill, training) and outcome.",
    ["lane", "outcome"],
    buckets=BATCH_BUCKETS,
)
STAGE_SECONDS = Histogram(
    "shelver_stage_duration_seconds",
    "Wall time of one stage of a classify batch: " + ", ".join(STAGES) + ".",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
RETRIES = Counter(
    "shelver_retries_total",
    "Queue rows given back to be tried again after a backoff, by the error's class.",
    ["error"],
)
MODEL_RELOADS = Counter(
    "shelver_model_reloads_total",
    "Champion models a worker process loaded (its first one included).",
)
CHAMPION = Gauge(
    "shelver_champion_info",
    "1 for the champion version a worker process serves, 0 for one it served before.",
    ["version"],
    multiprocess_mode="livemax",
)

# Dispatcher. The queue's figures are read from PostgreSQL at each scrape
# (``metrics_http.QueueCollector``), under these names, each labelled by lane.
QUEUE_DEPTH = "shelver_queue_depth"
QUEUE_CLAIMED = "shelver_queue_claimed"
QUEUE_OLDEST_AGE = "shelver_queue_oldest_age_seconds"
WORKERS_ALIVE = "shelver_workers_alive"
BATCHES_DISPATCHED = Counter(
    "shelver_batches_dispatched_total", "Batches sent to the broker, by lane.", ["lane"]
)
PRODUCTS_DISPATCHED = Counter(
    "shelver_products_dispatched_total", "Products sent to the broker, by lane.", ["lane"]
)
LEASES_EXPIRED = Counter(
    "shelver_leases_expired_total",
    "Queue rows claimed again because their lease ran out, by lane.",
    ["lane"],
)
CLAIMS_RELEASED = Counter(
    "shelver_claims_released_total",
    "Claimed rows given back before their lease ran out, by reason "
    "(worker_lost: its worker stopped heartbeating; broker_unavailable).",
    ["reason"],
)

# Beat.
RETRAIN_CHECKS = Counter(
    "shelver_retrain_checks_total",
    "Scheduled retraining checks, by result: queued, skipped or error.",
    ["result"],
)
ADAPT_CHECKS = Counter(
    "shelver_adapt_checks_total",
    "Scheduled zero-label adaptation checks, by result: queued, skipped or error.",
    ["result"],
)
ADAPTATIONS = Counter(
    "shelver_adaptations_total",
    "Scheduled zero-label adaptations run, by result: stored, or nothing (too few products "
    "or no taxonomy: the log says which).",
    ["result"],
)
RETRAIN_LAST_CHECK = Gauge(
    "shelver_retrain_last_check_timestamp_seconds",
    "Unix time of the last retraining check beat made.",
    multiprocess_mode="max",
)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time one stage of a classify batch."""
    started = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS.labels(name).observe(time.perf_counter() - started)


def failure_reason(message: str) -> str:
    """A bounded label for a failure message: its first clause, as the ``recent_errors`` view
    groups them ("no usable text and no usable image (...)" -> no_usable_text_and_no_usable_image).
    """
    head = re.split(r"[:(]", message, maxsplit=1)[0].strip().lower()
    return re.sub(r"[^a-z0-9]+", "_", head).strip("_")[:60] or "unknown"


def count_batch(
    *,
    classified: int,
    needs_review: int,
    failed_reasons: dict[str, int],
    images_refused: dict[str, int],
) -> None:
    """What one classify batch decided; ``failed_reasons`` as ``failure_reason`` gives them."""
    PRODUCTS.labels("classified").inc(classified)
    PRODUCTS.labels("needs_review").inc(needs_review)
    PRODUCTS.labels("failed").inc(sum(failed_reasons.values()))
    for reason, n in failed_reasons.items():
        PRODUCTS_FAILED.labels(reason).inc(n)
    for reason, n in images_refused.items():
        IMAGES_REFUSED.labels(reason).inc(n)


_served_version: str | None = None


def observe_champion(version: str | None) -> None:
    """Count a reload when this process's champion changed since its last batch."""
    global _served_version
    if version is None or version == _served_version:
        return
    if _served_version is not None:
        CHAMPION.labels(_served_version).set(0)
    CHAMPION.labels(version).set(1)
    MODEL_RELOADS.inc()
    _served_version = version
