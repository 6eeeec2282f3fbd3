"""``shelver dispatch``: turns ready queue rows into Celery tasks, one task per micro-batch.

NOTIFY on ``shelver_queue`` only wakes the dispatcher; the rows are in the
queue table (``catalog.queue``) and are found by polling too, so a notification lost
while no dispatcher listened costs at most one poll interval. Claims are
committed (under a lease) before the task is sent: a dispatcher that dies
between the two loses nothing, the lease runs out and the rows are claimed
again. Any number of dispatchers can run; ``SKIP LOCKED`` keeps them apart.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions
from sqlalchemy import Engine

from shelver.catalog import queue
from shelver.catalog.settings import Settings, libpq_url
from shelver.worker import metrics
from shelver.worker.celery_app import BACKFILL_QUEUE, CLASSIFY_QUEUE
from shelver.worker.heartbeat import DEAD_AFTER_SECONDS

log = logging.getLogger(__name__)

# (celery queue, product ids) -> None; raises when the broker cannot take it.
Sender = Callable[[str, list[int]], None]


@dataclass(frozen=True)
class DispatchConfig:
    batch_size: int = 32
    batch_wait_s: float = 0.2
    poll_seconds: float = 2.0
    lease_seconds: int = 300
    max_attempts: int = 5
    # Bulk rows are re-scores, mostly from cached embeddings: big batches are cheap,
    # and each batch has a fixed cost (claim, in-flight count, task, commit) that 1024
    # rows share four times better than 256 (BENCHMARKS.md, re-scoring).
    backfill_batch_size: int = 1024
    # Claimed-but-unfinished batches allowed per lane. Claiming a whole backlog
    # at once would let leases run out while tasks wait in the broker: the rows
    # would be handed out twice and spend attempts they never used.
    max_inflight_batches: int = 8
    sweep_seconds: float = 30.0
    # A worker whose heartbeat is older than this is dead: its rows are given back
    # at the next check instead of at lease expiry.
    dead_worker_seconds: float = DEAD_AFTER_SECONDS
    dead_worker_check_seconds: float = 2.0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: object) -> DispatchConfig:
        values = {
            "batch_size": settings.batch_size,
            "batch_wait_s": settings.batch_wait_ms / 1000,
            "poll_seconds": settings.poll_seconds,
            "lease_seconds": settings.lease_seconds,
            "max_attempts": settings.max_attempts,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class Lane:
    """Fresh inserts and updates, or backfill rows: claimed separately, sent to their own queue."""

    bulk: bool
    celery_queue: str
    # The lane's name in metrics and the queue_status view.
    name: str
    batch_size: int
    # Only fresh rows wait to fill a batch; a backfill has plenty ready.
    wait_s: float


def celery_sender() -> Sender:
    """Send through the Celery app's producer pool, by task name (no task code imported)."""
    from shelver.worker.celery_app import CLASSIFY_TASK, app

    def send(celery_queue: str, product_ids: list[int]) -> None:
        app.send_task(CLASSIFY_TASK, kwargs={"product_ids": product_ids}, queue=celery_queue)

    return send


class NotifyListener:
    """A LISTEN connection that is only ever a wake-up call; it reconnects when it breaks."""

    def __init__(self, database_url: str, channel: str = queue.NOTIFY_CHANNEL) -> None:
        self.dsn = libpq_url(database_url)
        self.channel = channel
        self._conn: psycopg2.extensions.connection | None = None
        self._retry_at = 0.0

    def _connect(self) -> psycopg2.extensions.connection | None:
        if self._conn is not None:
            return self._conn
        if time.monotonic() < self._retry_at:
            return None
        try:
            conn = psycopg2.connect(self.dsn, connect_timeout=5)
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"LISTEN {self.channel}")
        except psycopg2.Error as exc:
            log.warning("cannot LISTEN (%s); polling only, will try again", exc)
            self._retry_at = time.monotonic() + 5
            return None
        self._conn = conn
        return conn

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """Block until a notification, ``timeout`` or ``stop``; True if notified."""
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            # Short slices so a stop request is seen within a quarter second.
            slice_s = min(remaining, 0.25)
            conn = self._connect()
            if conn is None:
                stop.wait(slice_s)
                continue
            try:
                if select.select([conn], [], [], slice_s)[0]:
                    conn.poll()
                    if conn.notifies:
                        conn.notifies.clear()
                        return True
            except (psycopg2.Error, OSError) as exc:
                log.warning("LISTEN connection lost (%s); polling until it is back", exc)
                self.close()
        return False

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg2.Error):
                self._conn.close()
            self._conn = None


@dataclass
class DispatchStats:
    batches: int = 0
    rows: int = 0
    send_failures: int = 0
    swept: int = 0
    # Rows given back because the worker holding them stopped heartbeating.
    recovered: int = 0


class Dispatcher:
    def __init__(
        self,
        engine: Engine,
        send: Sender,
        config: DispatchConfig,
        stop: threading.Event,
        listener: NotifyListener | None = None,
    ) -> None:
        self.engine = engine
        self.send = send
        self.config = config
        self.stop = stop
        self.listener = listener or NotifyListener(engine.url.render_as_string(hide_password=False))
        self.lanes = (
            Lane(False, CLASSIFY_QUEUE, "classify", config.batch_size, config.batch_wait_s),
            Lane(True, BACKFILL_QUEUE, "backfill", config.backfill_batch_size, 0.0),
        )
        self.stats = DispatchStats()
        self._swept_at = float("-inf")
        self._dead_checked_at = float("-inf")
        self._broker_down_until = 0.0
        # Set when a lane hit its in-flight cap during the last step.
        self._capped = False

    def run(self) -> DispatchStats:
        """Dispatch until ``stop`` is set; survives PostgreSQL and broker outages."""
        log.info("dispatching (batch %d, wait %.0f ms, poll %.1f s)", self.config.batch_size,
                 self.config.batch_wait_s * 1000, self.config.poll_seconds)  # fmt: skip
        try:
            while not self.stop.is_set():
                try:
                    busy = self.step()
                except Exception as exc:
                    # One error path: log, wait a poll interval, try again. The
                    # queue table keeps every row we did not finish sending.
                    log.error("dispatch step failed: %s", exc, exc_info=not _is_db_outage(exc))
                    busy = False
                    self.stop.wait(self.config.poll_seconds)
                if not busy:
                    self.listener.wait(self._idle_wait(), self.stop)
        finally:
            self.listener.close()
        log.info("dispatcher stopped: %s", self.stats)
        return self.stats

    def _idle_wait(self) -> float:
        if time.monotonic() < self._broker_down_until:
            return self.config.poll_seconds
        # At the in-flight cap nothing notifies us when a batch finishes; look
        # again soon rather than a full poll interval later.
        return min(self.config.poll_seconds, 0.5) if self._capped else self.config.poll_seconds

    def step(self) -> bool:
        """Sweep if due, then send at most one batch per lane; True if anything was sent."""
        if time.monotonic() - self._swept_at >= self.config.sweep_seconds:
            self.sweep()
        if time.monotonic() - self._dead_checked_at >= self.config.dead_worker_check_seconds:
            self.recover_from_dead_workers()
        if time.monotonic() < self._broker_down_until:
            return False
        self._capped = False
        sent = False
        for lane in self.lanes:
            sent = self.dispatch_lane(lane) or sent
        return sent

    def sweep(self) -> int:
        """End rows that used up their attempts as ``failed``; record finished backfills."""
        self._swept_at = time.monotonic()
        with self.engine.begin() as conn:
            failed = queue.fail_exhausted(
                conn, max_attempts=self.config.max_attempts, lease_seconds=self.config.lease_seconds
            )
        if failed:
            log.warning("%d products failed after %d attempts", failed, self.config.max_attempts)
            metrics.PRODUCTS_FAILED.labels("attempts_exhausted").inc(failed)
        self.stats.swept += failed
        # Its own transaction: the run locks are not held while failing rows. This
        # catches runs whose last rows left the queue without a worker finishing
        # them (product deleted or changed meanwhile).
        with self.engine.begin() as conn:
            for run_id in queue.finish_backfills(conn):
                log.info("backfill %d done", run_id)
        return failed

    def recover_from_dead_workers(self) -> int:
        """Give back the rows of workers that stopped heartbeating; the next claim takes them."""
        self._dead_checked_at = time.monotonic()
        with self.engine.begin() as conn:
            released = queue.release_dead_workers(
                conn, dead_after_s=self.config.dead_worker_seconds
            )
        if released:
            log.warning(
                "%d products were held by a worker that stopped heartbeating for %.0f s; "
                "claiming them again",
                len(released),
                self.config.dead_worker_seconds,
            )
            metrics.CLAIMS_RELEASED.labels("worker_lost").inc(len(released))
        self.stats.recovered += len(released)
        return len(released)

    def _room(self, lane: Lane) -> int:
        cap = self.config.max_inflight_batches * lane.batch_size
        with self.engine.connect() as conn:
            inflight = queue.inflight(conn, bulk=lane.bulk, lease_seconds=self.config.lease_seconds)
        room = min(lane.batch_size, cap - inflight)
        if room <= 0:
            self._capped = True
        return room

    def _claim(self, lane: Lane, limit: int) -> list[queue.Claim]:
        # Its own short transaction: the row locks end at commit and the lease
        # (claimed_at) takes over, so no lock is held while we wait or send.
        with self.engine.begin() as conn:
            claims = queue.claim_batch(
                conn,
                limit=limit,
                lease_seconds=self.config.lease_seconds,
                max_attempts=self.config.max_attempts,
                bulk=lane.bulk,
            )
        expired = sum(c.lease_expired for c in claims)
        if expired:
            log.warning("%d %s rows claimed again after their lease ran out", expired, lane.name)
            metrics.LEASES_EXPIRED.labels(lane.name).inc(expired)
        return claims

    def dispatch_lane(self, lane: Lane) -> bool:
        room = self._room(lane)
        if room <= 0:
            return False
        claims = self._claim(lane, room)
        if not claims:
            return False
        # A partial batch waits briefly for more rows: one task of 32 costs far
        # less than 32 tasks of one, and the wait bounds the added latency.
        deadline = time.monotonic() + lane.wait_s
        while len(claims) < room and not self.stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.listener.wait(remaining, self.stop):
                break
            claims += self._claim(lane, room - len(claims))
        self._send(lane, [c.product_id for c in claims])
        return True

    def _send(self, lane: Lane, product_ids: list[int]) -> None:
        try:
            self.send(lane.celery_queue, product_ids)
        except Exception as exc:
            self.stats.send_failures += 1
            log.error(
                "broker refused a batch of %d (%s); releasing the claims", len(product_ids), exc
            )
            # Not the products' fault: the attempt is given back, and the rows
            # are ready again right away for whichever dispatcher reaches a broker.
            with self.engine.begin() as conn:
                queue.release(conn, product_ids, delay_seconds=0, note=f"broker unavailable: {exc}")
            metrics.CLAIMS_RELEASED.labels("broker_unavailable").inc(len(product_ids))
            self._broker_down_until = time.monotonic() + self.config.poll_seconds
            return
        self.stats.batches += 1
        self.stats.rows += len(product_ids)
        metrics.BATCHES_DISPATCHED.labels(lane.name).inc()
        metrics.PRODUCTS_DISPATCHED.labels(lane.name).inc(len(product_ids))
        log.debug("sent %d products to %s", len(product_ids), lane.celery_queue)


def _is_db_outage(exc: BaseException) -> bool:
    from shelver.catalog.db import is_transient

    return is_transient(exc)
