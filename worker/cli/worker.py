"""``shelver worker``: a Celery worker consuming the classify, backfill or training queue."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from shelver.catalog.settings import get_settings
from shelver.worker.cli.terminal import UserError


def run_worker(
    queues: Annotated[
        str, typer.Option("-Q", "--queues", help="Comma-separated: classify, backfill, training.")
    ] = "classify,backfill",
    concurrency: Annotated[
        int | None,
        typer.Option("-c", "--concurrency", help="Pool processes (default: one per core)."),
    ] = None,
    pool: Annotated[
        str, typer.Option("-P", "--pool", help="prefork, solo or threads.")
    ] = "prefork",
    threads: Annotated[
        int | None,
        typer.Option(help="onnxruntime intra-op threads per process (default: cores/concurrency)."),
    ] = None,
    loglevel: Annotated[str, typer.Option("-l", "--loglevel")] = "INFO",
) -> None:
    """Run a Celery worker: encoders and the champion load once per process."""
    # onnxruntime and Celery come with the worker extra.
    from shelver.worker.errors import EncoderUnavailable
    from shelver.worker.runtime import check_encoders

    settings = get_settings()
    settings.require_broker_url()
    settings.require_database_url()
    wanted = {q.strip() for q in queues.split(",") if q.strip()}
    if wanted - {"classify", "backfill", "training"}:
        raise UserError(f"unknown queue(s) {sorted(wanted - {'classify', 'backfill', 'training'})}")
    if wanted & {"classify", "backfill"}:
        try:
            check_encoders(settings.model_dir)
        except EncoderUnavailable as exc:
            raise UserError(str(exc)) from exc
    # Measured (docs/operations.md): one single-threaded process per core beats
    # one process with a thread per core, since decoding and DB round trips
    # would leave the second core idle between onnxruntime calls.
    concurrency = concurrency or os.cpu_count() or 1
    per_process = threads or max(1, (os.cpu_count() or 1) // concurrency)
    os.environ["SHELVER_ORT_THREADS"] = str(per_process)
    from shelver.worker.celery_app import app as celery_app

    celery_app.worker_main(
        [
            "worker",
            "-Q", ",".join(sorted(wanted)),
            "-c", str(concurrency),
            "-P", pool,
            "-l", loglevel,
            # Unique per process, so several workers on one host do not clash.
            "-n", f"shelver-{os.getpid()}@%h",
            "--without-gossip", "--without-mingle",
        ]
    )  # fmt: skip
