"""Serving ``/metrics`` over HTTP, and the multiprocess directory of a prefork worker.

The dispatcher and beat are single processes: they serve their own registry, the
dispatcher adding the queue's depth and age per lane read from PostgreSQL at each
scrape. A Celery worker's pool processes each write their values to files in a
directory of their own process tree; the worker's main process serves the sum.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Under the temporary directory: one subdirectory per worker process tree.
MULTIPROC_ROOT = "shelver-metrics"


class MetricsPortUnavailable(OSError):
    """The ``--metrics-port`` given is taken or not ours to bind."""


def prepare_multiprocess_dir(root: Path | None = None) -> Path:
    """Give this process tree a fresh, empty metrics directory and point the client at it.

    Must run before ``prometheus_client`` is imported: the client picks its value
    store when it is first imported. The directory is named by this process's pid
    and emptied if a previous tree with the same pid left it; directories of trees
    whose main process is gone are removed too, so restarts do not pile them up.
    """
    if "prometheus_client" in sys.modules or "shelver.worker.metrics" in sys.modules:
        raise RuntimeError("prepare_multiprocess_dir must run before prometheus_client is imported")
    base = root or Path(tempfile.gettempdir()) / MULTIPROC_ROOT
    base.mkdir(parents=True, exist_ok=True)
    for old in base.glob("worker-*"):
        pid = old.name.removeprefix("worker-")
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = base / f"worker-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LiveProcessCollector:
    """The pool's summed metrics, after forgetting the live gauges of processes that died.

    Celery tells a pool process it is stopping (``mark_this_process_dead``) but not
    the main process that one was killed; checking the pids at each scrape covers both.
    """

    def __init__(self, path: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.path = path
        self._collector = MultiProcessCollector(None, path)

    def collect(self) -> Iterable:
        from prometheus_client import multiprocess

        for pid in _gauge_pids(self.path):
            if not _alive(pid):
                multiprocess.mark_process_dead(pid, self.path)
        return self._collector.collect()


def _gauge_pids(path: str) -> set[int]:
    pids = set()
    for file in Path(path).glob("gauge_live*_*.db"):
        pid = file.stem.rsplit("_", 1)[-1]
        if pid.isdigit():
            pids.add(int(pid))
    return pids


def mark_this_process_dead() -> None:
    """A pool process on its way out drops its live gauges (the champion it served)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid(), path)


class QueueCollector:
    """Queue depth, claimed rows and the oldest row's age per lane, and live workers, read
    from PostgreSQL at scrape time."""

    def __init__(self, engine) -> None:  # noqa: ANN001 - a SQLAlchemy Engine
        self.engine = engine

    def collect(self) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily

        from shelver.catalog import queue
        from shelver.worker import metrics
        from shelver.worker.heartbeat import DEAD_AFTER_SECONDS

        try:
            with self.engine.connect() as conn:
                lanes = queue.lane_status(conn)
                alive = queue.live_workers(conn, dead_after_s=DEAD_AFTER_SECONDS)
        except Exception as exc:
            # A scrape during a database outage shows no queue figures (Prometheus
            # marks them absent) rather than failing the whole scrape.
            log.warning("queue metrics unavailable: %s", exc)
            return
        depth = GaugeMetricFamily(
            metrics.QUEUE_DEPTH, "Rows in the classification queue, by lane.", labels=["lane"]
        )
        claimed = GaugeMetricFamily(
            metrics.QUEUE_CLAIMED, "Queue rows claimed under a lease, by lane.", labels=["lane"]
        )
        age = GaugeMetricFamily(
            metrics.QUEUE_OLDEST_AGE,
            "Age of the oldest row in the queue, by lane (0 when empty).",
            labels=["lane"],
        )
        for lane in lanes:
            depth.add_metric([lane.lane], lane.depth)
            claimed.add_metric([lane.lane], lane.claimed)
            age.add_metric([lane.lane], lane.oldest_age_s or 0.0)
        yield from (depth, claimed, age)
        yield GaugeMetricFamily(
            metrics.WORKERS_ALIVE,
            "Worker pool processes whose heartbeat is fresh.",
            value=alive,
        )


def serve(port: int, *, engine=None, multiprocess_dir: str | None = None) -> None:  # noqa: ANN001
    """Serve ``/metrics`` on ``port`` (all interfaces) from a daemon thread.

    ``engine`` adds the queue collector (the dispatcher); ``multiprocess_dir``
    serves a prefork pool's summed files (the worker's main process).
    """
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

    if multiprocess_dir:
        registry = CollectorRegistry()
        registry.register(LiveProcessCollector(multiprocess_dir))
    else:
        registry = REGISTRY
    if engine is not None:
        registry.register(QueueCollector(engine))
    # The definitions register themselves on import; the single-process registry
    # shows them from the first scrape on.
    import shelver.worker.metrics  # noqa: F401

    try:
        start_http_server(port, registry=registry)
    except OSError as exc:
        raise MetricsPortUnavailable(
            f"cannot serve metrics on port {port} ({exc.strerror or exc}); "
            "pick a free one with --metrics-port"
        ) from exc
    log.info("metrics on http://0.0.0.0:%d/metrics", port)
