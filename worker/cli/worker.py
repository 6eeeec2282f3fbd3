"""``shelver worker``: a Celery worker consuming the classify, backfill or training queue."""

from __future__ import annotations

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
        typer.Option(
            min=1,
            help="onnxruntime intra-op threads per process (default: SHELVER_ORT_THREADS, "
            "else cores/concurrency).",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "-n",
            "--name",
            help="Celery node name, %h being the host name (default: shelver-<pid>@%h). "
            "Health checks ping it: celery inspect ping -d NAME.",
        ),
    ] = None,
    preload: Annotated[
        bool,
        typer.Option(
            help="Load the encoders and the champion once, before the prefork pool starts, so "
            "its processes share them (with --threads 1). --no-preload: each process loads "
            "its own copy.",
        ),
    ] = True,
    loglevel: Annotated[str, typer.Option("-l", "--loglevel")] = "INFO",
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus metrics of the whole pool on this port (/metrics)."),
    ] = None,
) -> None:
    """Run a Celery worker: encoders and the champion load once per process."""
    # onnxruntime and Celery come with the worker extra.
    from shelver.worker.launch import UnknownQueue
    from shelver.worker.launch import run_worker as launch
    from shelver.worker.metrics_http import MetricsPortUnavailable

    try:
        launch(
            get_settings(),
            {q.strip() for q in queues.split(",") if q.strip()},
            concurrency=concurrency,
            pool=pool,
            threads=threads,
            loglevel=loglevel,
            name=name,
            metrics_port=metrics_port,
            preload=preload,
        )
    except UnknownQueue as exc:
        raise UserError(f"-Q: {exc}") from exc
    except MetricsPortUnavailable as exc:
        raise UserError(str(exc)) from exc
