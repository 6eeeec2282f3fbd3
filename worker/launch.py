"""Starting a Celery worker: its queues, pool processes, onnxruntime threads and node name.

Settings reach the pool processes through the environment, so whatever pool Celery
uses (forked or spawned), each process's Runtime reads the same SHELVER_ORT_THREADS.

A prefork worker with one onnxruntime thread per process loads the encoders and the
champion once, in the main process, before the pool forks: the pool processes share
those pages instead of holding a copy each (docs/operations.md, "Memory").
"""

from __future__ import annotations

import logging
import os
import shutil
from functools import partial

from celery.signals import celeryd_after_setup

from shelver.catalog.settings import Settings, reset_settings
from shelver.worker.celery_app import BACKFILL_QUEUE, CLASSIFY_QUEUE, QUEUES, app
from shelver.worker.metrics_http import prepare_multiprocess_dir, serve
from shelver.worker.runtime import check_encoders, preload_runtime

# Celery expands %h to this host's name. The pid keeps several workers on one host apart;
# a deployment that pings its worker by name (docker-compose's healthcheck) passes its own.
DEFAULT_NODE_NAME = "shelver-{pid}@%h"
# Queues whose tasks run the encoders: a worker consuming them needs them exported.
ENCODER_QUEUES = frozenset({CLASSIFY_QUEUE, BACKFILL_QUEUE})

log = logging.getLogger(__name__)


class UnknownQueue(ValueError):
    """A queue name Shelver does not have."""


def ort_threads(settings: Settings, concurrency: int, requested: int | None = None) -> int:
    """Intra-op threads per pool process: asked for, else SHELVER_ORT_THREADS, else a share.

    Measured (docs/operations.md): one single-threaded process per core beats one process
    with a thread per core, since decoding and DB round trips would leave the second core
    idle between onnxruntime calls; so the default splits the cores among the processes.
    """
    return requested or settings.ort_threads or max(1, (os.cpu_count() or 1) // concurrency)


def _preload(pool: str, threads: int, **_: object) -> None:
    """Load the runtime in this (the main) process, for the pool to fork from, when safe."""
    if pool == "prefork" and threads == 1:
        preload_runtime()
    else:
        # A pool in this process has nothing to share, and onnxruntime's intra-op threads
        # would not survive a fork.
        log.info(
            "not sharing the encoders between pool processes (-P %s, %d onnxruntime threads): "
            "each pool process loads its own; prefork with --threads 1 shares them",
            pool,
            threads,
        )


def run_worker(
    settings: Settings,
    queues: set[str],
    *,
    concurrency: int | None = None,
    pool: str = "prefork",
    threads: int | None = None,
    loglevel: str = "INFO",
    name: str | None = None,
    metrics_port: int | None = None,
    preload: bool = True,
) -> None:
    """Run a Celery worker in this process until it is stopped (SIGTERM, as in production).

    With ``metrics_port``, the pool's Prometheus metrics are served from this (the
    main) process, summed over the pool processes' files in a directory of this
    process tree, prepared before any pool process starts.

    With ``preload`` (and prefork with one onnxruntime thread), the encoders and the
    champion are loaded here, before the pool forks, and shared by the pool processes.
    """
    if not queues or queues - set(QUEUES):
        raise UnknownQueue(f"queues are {', '.join(QUEUES)}; got {', '.join(sorted(queues))}")
    settings.require_broker_url()
    settings.require_database_url()
    if queues & ENCODER_QUEUES:
        check_encoders(settings.model_dir)
    concurrency = concurrency or os.cpu_count() or 1
    threads = ort_threads(settings, concurrency, threads)
    os.environ["SHELVER_ORT_THREADS"] = str(threads)
    # Pool processes must read the environment just written, not settings cached before it.
    reset_settings()
    directory = None
    if metrics_port is not None:
        directory = prepare_multiprocess_dir()
        serve(metrics_port, multiprocess_dir=str(directory))
    if preload and queues & ENCODER_QUEUES:
        # Sent in this process once Celery's logging is set up, before the pool starts.
        celeryd_after_setup.connect(
            partial(_preload, pool, threads), weak=False, dispatch_uid="shelver-preload"
        )
    try:
        app.worker_main(
            [
                "worker",
                "-Q", ",".join(sorted(queues)),
                "-c", str(concurrency),
                "-P", pool,
                "-l", loglevel,
                "-n", name or DEFAULT_NODE_NAME.format(pid=os.getpid()),
                "--without-gossip", "--without-mingle",
            ]
        )  # fmt: skip
    finally:
        # The pool has stopped; a killed worker's directory goes at the next start.
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
