"""A worker process's identity and heartbeat, so its claims come back in seconds if it dies.

Each pool process records itself in ``workers`` and refreshes ``heartbeat_at``
every ``HEARTBEAT_SECONDS`` from a daemon thread; a batch it starts is marked
with its id (``queue.mark_working``). A dispatcher gives the rows of a worker
whose heartbeat is older than ``DEAD_AFTER_SECONDS`` back to the queue
(``queue.release_dead_workers``), instead of waiting out the 5-minute lease.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading

from sqlalchemy import Engine

from shelver.catalog import queue

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = queue.HEARTBEAT_SECONDS
DEAD_AFTER_SECONDS = queue.WORKER_DEAD_AFTER_SECONDS


class Heartbeat:
    """One process's row in ``workers``, kept fresh until ``stop``."""

    def __init__(self, engine: Engine, interval_s: float = HEARTBEAT_SECONDS) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        # The random part tells apart two processes that reuse a pid (a restarted container).
        self.worker_id = f"{self.hostname}:{self.pid}:{secrets.token_hex(3)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Register now (so a batch is never marked with an unknown id), then beat in the back."""
        with self.engine.begin() as conn:
            queue.register_worker(conn, self.worker_id, hostname=self.hostname, pid=self.pid)
        self._thread = threading.Thread(target=self._run, name="shelver-heartbeat", daemon=True)
        self._thread.start()
        log.info("worker %s heartbeating every %.0f s", self.worker_id, self.interval_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with self.engine.begin() as conn:
                    queue.heartbeat(conn, self.worker_id, hostname=self.hostname, pid=self.pid)
            except Exception as exc:
                # The database is away: nothing to do but try again. If this lasts past
                # DEAD_AFTER_SECONDS a dispatcher hands our rows to another worker;
                # both writes are idempotent, so that costs work, not correctness.
                log.warning("heartbeat of %s failed: %s", self.worker_id, exc)

    def mark_working(self, product_ids: list[int]) -> None:
        """Tie a batch's claimed rows to this worker, committed before the work starts."""
        with self.engine.begin() as conn:
            queue.mark_working(conn, self.worker_id, product_ids)

    def stop(self) -> None:
        """Stop beating and forget this worker (a clean stop: its batch is finished)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
        try:
            with self.engine.begin() as conn:
                queue.unregister_worker(conn, self.worker_id)
        except Exception as exc:
            log.warning("could not unregister worker %s (%s); it will age out", self.worker_id, exc)


_heartbeat: Heartbeat | None = None
_lock = threading.Lock()


def this_worker() -> Heartbeat:
    """This process's heartbeat, started on first use (a forked pool process starts its own)."""
    global _heartbeat
    if _heartbeat is None or _heartbeat.pid != os.getpid():
        with _lock:
            if _heartbeat is None or _heartbeat.pid != os.getpid():
                from shelver.catalog.db import get_engine

                beat = Heartbeat(get_engine())
                beat.start()
                _heartbeat = beat
    return _heartbeat


def stop_this_worker() -> None:
    global _heartbeat
    if _heartbeat is not None and _heartbeat.pid == os.getpid():
        _heartbeat.stop()
        _heartbeat = None
