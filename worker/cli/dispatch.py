"""``shelver dispatch``: the process that hands queued products to the workers."""

from __future__ import annotations

from typing import Annotated

import typer

from shelver.catalog.db import check_connection, get_engine
from shelver.catalog.settings import get_settings
from shelver.worker.cli.terminal import UserError, console, log_progress, stop_on_signals


def dispatch(
    batch_size: Annotated[
        int | None, typer.Option(help="Products per classify task (default SHELVER_BATCH_SIZE).")
    ] = None,
    batch_wait_ms: Annotated[
        int | None, typer.Option(help="Wait to fill a batch (default SHELVER_BATCH_WAIT_MS).")
    ] = None,
    backfill_batch_size: Annotated[
        int | None,
        typer.Option(
            min=1, help="Products per backfill task (default 1024; cached re-scores are cheap)."
        ),
    ] = None,
    max_inflight_batches: Annotated[
        int, typer.Option(help="Sent-but-unfinished batches allowed per queue, all dispatchers.")
    ] = 8,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus metrics, queue depth per lane included, on this port."),
    ] = None,
) -> None:
    """Send queued products to the workers: LISTEN/NOTIFY plus polling, micro-batched.

    Run as many as you like; they never hand out the same product twice under a live lease.
    """
    log_progress()
    # Celery comes with the worker extra; the core install has no dispatcher.
    from shelver.worker.dispatcher import DispatchConfig, Dispatcher, celery_sender
    from shelver.worker.metrics_http import MetricsPortUnavailable, serve

    settings = get_settings()
    settings.require_broker_url()
    engine = get_engine()
    check_connection(engine)
    config = DispatchConfig.from_settings(
        settings,
        batch_size=batch_size,
        batch_wait_s=None if batch_wait_ms is None else batch_wait_ms / 1000,
        backfill_batch_size=backfill_batch_size,
        max_inflight_batches=max_inflight_batches,
    )
    if metrics_port is not None:
        try:
            serve(metrics_port, engine=engine)
        except MetricsPortUnavailable as exc:
            raise UserError(str(exc)) from exc
    stats = Dispatcher(engine, celery_sender(), config, stop_on_signals()).run()
    console.print(f"dispatcher stopped after {stats.batches} batches, {stats.rows} products")
