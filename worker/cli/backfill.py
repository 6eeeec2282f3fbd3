"""``shelver backfill``: re-score a selection of the catalog, with progress."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from shelver.catalog.db import get_engine
from shelver.worker import backfill as bf
from shelver.worker.cli.terminal import UserError, console, stop_on_signals


def backfill(
    all_products: Annotated[bool, typer.Option("--all", help="Every product.")] = False,
    unclassified: Annotated[
        bool, typer.Option("--unclassified", help="Products still pending or failed.")
    ] = False,
    stale: Annotated[
        bool, typer.Option("--stale", help="Products not scored by the current champion.")
    ] = False,
    suggestions: Annotated[
        bool,
        typer.Option(
            "--suggestions",
            help="Unlabeled products in review whose zero-label suggestion is not the one "
            "the scorer served now would make (a taxonomy change or an adaptation since).",
        ),
    ] = False,
    category: Annotated[
        str | None, typer.Option("--category", help="Predicted or labeled as this category.")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Created on or after this date (YYYY-MM-DD).")
    ] = None,
    resume: Annotated[
        int | None, typer.Option("--resume", help="Continue backfill run ID where it stopped.")
    ] = None,
    chunk: Annotated[int, typer.Option(help="Products enqueued per transaction.")] = 5000,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Enqueue and exit instead of showing progress.")
    ] = False,
) -> None:
    """Re-score a selection of the catalog through the backfill queue, with progress.

    Ctrl-C stops it safely; `shelver backfill --resume ID` continues. Needs `shelver dispatch`
    and a worker consuming the `backfill` queue.
    """
    engine = get_engine()
    selector = bf.Selector(
        unclassified=unclassified, stale=stale, suggestions=suggestions, category=category,
        since=since,
    )  # fmt: skip
    try:
        run = bf.open_run(engine, selector, every=all_products, resume=resume)
    except bf.BackfillError as exc:
        raise UserError(str(exc)) from exc
    console.print(f"backfill run {run.id}: {run.total} products selected")
    stop = stop_on_signals()
    started = time.monotonic()
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeRemainingColumn(), console=console) as bar:
        enqueue_task = bar.add_task("enqueued", total=run.total, completed=run.enqueued)
        done_task = bar.add_task("re-scored", total=run.total)
        if run.status == "running":
            for step in bf.enqueue(engine, run, chunk=chunk):
                bar.update(enqueue_task, completed=step.enqueued)
                if stop.is_set():
                    break
        if not (stop.is_set() or no_wait):
            bar.update(enqueue_task, completed=run.enqueued, total=run.enqueued)
            while not stop.is_set():
                state = bf.progress(engine, run)
                bar.update(done_task, completed=state.finished, total=state.enqueued)
                if state.enqueue_done and state.remaining == 0:
                    break
                # Short: a re-score of cached rows runs thousands of rows a second.
                stop.wait(0.1)
    elapsed = time.monotonic() - started
    if stop.is_set():
        console.print(
            f"stopped; queued rows still get re-scored. Resume with `shelver backfill --resume "
            f"{run.id}`"
        )
        raise typer.Exit(130)
    if no_wait:
        console.print(f"backfill {run.id}: {run.enqueued} products queued")
        return
    console.print(
        f"backfill {run.id} done: {run.enqueued} products in {elapsed:.1f} s "
        f"({run.enqueued / max(elapsed, 1e-9):.0f} rows/s)"
    )
