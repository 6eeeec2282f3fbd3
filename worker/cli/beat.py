"""``shelver beat``: the retraining and adaptation schedule."""

from __future__ import annotations

from typing import Annotated

import typer

from shelver.catalog.db import get_engine
from shelver.catalog.settings import get_settings
from shelver.worker.cli.terminal import UserError, console, log_progress, stop_on_signals


def beat(
    once: Annotated[
        bool,
        typer.Option("--once", help="Check now, queue retraining and adaptation if due, and exit."),
    ] = False,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port (/metrics).")
    ] = None,
) -> None:
    """At SHELVER_RETRAIN_CRON times, queue retraining when enough new labels arrived.

    At the same times, adapt the zero-label scorer when enough new products arrived
    (SHELVER_ADAPT_MIN_NEW_PRODUCTS).
    """
    log_progress()
    # croniter and Celery come with the worker extra.
    from croniter import croniter

    from shelver.worker.metrics_http import MetricsPortUnavailable, serve
    from shelver.worker.schedule import (
        run_beat,
        said,
        send_adapt,
        send_retrain,
        tick,
        tick_adapt,
    )

    settings = get_settings()
    settings.require_broker_url()
    if not croniter.is_valid(settings.retrain_cron):
        raise UserError(f"SHELVER_RETRAIN_CRON={settings.retrain_cron!r} is not a cron expression")
    engine = get_engine()
    if once:
        decision = tick(engine, settings.retrain_min_new_labels, send_retrain)
        console.print(said(decision, "retraining"))
        adapting = tick_adapt(
            engine, settings.adapt_min_new_products, settings.zero_label_merge, send_adapt
        )
        console.print(said(adapting, "adaptation"))
        return
    if metrics_port is not None:
        try:
            serve(metrics_port)
        except MetricsPortUnavailable as exc:
            raise UserError(str(exc)) from exc
    run_beat(
        engine, settings.retrain_cron, settings.retrain_min_new_labels, stop_on_signals(),
        min_new_products=settings.adapt_min_new_products, merge=settings.zero_label_merge,
    )  # fmt: skip
