"""``shelver train``: train on the labeled catalog, register a candidate, run the gate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from shelver.catalog.db import get_engine
from shelver.catalog.settings import get_settings
from shelver.worker.cli.terminal import UserError, console, err_console, fmt

if TYPE_CHECKING:
    from shelver.training.pipeline import TrainOutcome


def train_command(
    promote: Annotated[
        str,
        typer.Option(
            help="auto: promote only if the gate passes; never: keep as candidate; "
            "force: promote regardless."
        ),
    ] = "auto",
) -> None:
    """Train on the catalog's labeled products, report, register a candidate and run the gate."""
    if promote not in ("auto", "never", "force"):
        raise UserError(f"--promote must be auto, never or force, not {promote!r}")
    # TensorFlow comes with the train extra, and takes seconds to import.
    from shelver.training.pipeline import train_and_register

    with Progress(console=err_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        try:
            outcome = train_and_register(
                get_engine(), get_settings(), promote=promote, progress=progress
            )
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    print_training(outcome)


def print_training(outcome: TrainOutcome) -> None:
    """The test-split figures against the baseline, the gate's verdict, and the report folder."""
    metrics = outcome.metrics
    test = metrics.get("test", {})
    baseline = metrics.get("baseline", {})
    table = Table(title=f"training run {outcome.run_id}: {outcome.model.version}")
    table.add_column("on the test split")
    table.add_column("fusion model", justify="right")
    table.add_column("TF-IDF baseline", justify="right")
    for key in ("accuracy", "macro_f1"):
        table.add_row(key, fmt(test.get(key)), fmt(baseline.get(key)))
    table.add_row("ECE", fmt(test.get("ece")), "")
    table.add_row(
        f"coverage at threshold {fmt(outcome.model.threshold)}", fmt(test.get("coverage")), ""
    )
    console.print(table)
    verdict = "promoted to champion" if outcome.promoted else f"left as {outcome.model.status}"
    console.print(f"{outcome.model.version}: {verdict}")
    for reason in outcome.decision.reasons if outcome.decision else []:
        console.print(f"  - {reason}")
    images = outcome.images
    console.print(f"images: {images.describe()}")
    console.print(f"report: {outcome.report_dir}")
    warning = images.text_only_warning()
    if warning:
        err_console.print(f"[yellow]warning:[/yellow] {warning}")
    elif images.roots_setting:
        console.print(f"to let the images outside the roots in, set {images.roots_setting}")
