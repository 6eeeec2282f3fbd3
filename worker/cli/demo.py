"""``shelver demo``: the whole event path on this machine, shown as it happens."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.live import Live
from rich.progress import Progress, TaskID
from rich.table import Table

from shelver.catalog.settings import get_settings
from shelver.worker.cli.terminal import UserError, console
from shelver.worker.cli.train import print_training
from shelver.worker.demo import DemoError, ProductView, run_demo

if TYPE_CHECKING:
    from shelver.training.pipeline import TrainOutcome


def demo(
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="A labeled CSV: import it, train on it, and classify its rows."
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for classification.")] = 300.0,
) -> None:
    """Run the whole event path here: services, encoders, a champion, dispatcher, worker, products.

    With SHELVER_DATABASE_URL and SHELVER_BROKER_URL unset it starts an embedded
    PostgreSQL and Valkey and stops them at the end.
    """
    observer = _Screen()
    try:
        outcome = run_demo(
            get_settings(), observer, data, timeout, serve_until_interrupted=sys.stdin.isatty()
        )
    except DemoError as exc:
        raise UserError(str(exc)) from exc
    finally:
        observer.close()
    counts = outcome.by_status
    if data is not None:
        shown = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
        console.print(f"products by status: {shown}")
    else:
        suggested = outcome.taxonomy_suggestions
        console.print(
            f"{counts.get('classified', 0)} classified automatically, "
            f"{counts.get('needs_review', 0)} left for a person (`shelver review`)"
            + (
                f", {suggested} of them with a taxonomy category the model was never "
                "trained on as the suggestion"
                if suggested is not None
                else ""
            )
            + (f", {counts['failed']} failed" if counts.get("failed") else "")
        )
    if not outcome.finished:
        raise UserError(f"not everything was classified in {timeout:.0f} s; see {outcome.log_path}")
    console.print("[bold]done.[/bold] everything the demo started is stopped.")


class _Screen:
    """The demo's DemoObserver: numbered steps, a progress bar or a live table of products."""

    def __init__(self) -> None:
        self.steps = 0
        self.live: Live | None = None
        self.bar: Progress | None = None
        self.bar_task: TaskID | None = None

    def step(self, message: str) -> None:
        self.steps += 1
        console.print(f"[bold]{self.steps}.[/bold] {message}")

    def note(self, message: str) -> None:
        console.print(f"    {message}")

    def trained(self, outcome: TrainOutcome) -> None:
        print_training(outcome)

    def classifying(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = Progress(console=console)
            self.bar.start()
            self.bar_task = self.bar.add_task("classifying imported rows", total=total)
        self.bar.update(self.bar_task, completed=done)

    def products(self, rows: list[ProductView]) -> None:
        if self.live is None:
            self.live = Live(console=console, refresh_per_second=4)
            self.live.start()
        self.live.update(_products_table(rows))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.live is not None:
            self.live.stop()
            console.print()


def _products_table(rows: list[ProductView]) -> Table:
    table = Table(title="products, as the worker classifies them")
    table.add_column("product", max_width=26, overflow="ellipsis", no_wrap=True)
    table.add_column("category", no_wrap=True)
    table.add_column("conf.", justify="right", no_wrap=True, min_width=5)
    table.add_column("status", no_wrap=True, min_width=12)
    colours = {"classified": "green", "needs_review": "yellow", "failed": "red"}
    for r in rows:
        table.add_row(
            r.name,
            r.category or "",
            f"{r.confidence:.2f}" if r.confidence is not None else "",
            f"[{colours.get(r.status, 'white')}]{r.status}[/]",
        )
    return table
