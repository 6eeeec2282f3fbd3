"""``shelver evaluate``: what the worker serves, scored on a labeled file the catalog never sees."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from shelver.catalog.db import get_engine
from shelver.catalog.importer import ImportFormatError
from shelver.catalog.settings import get_settings
from shelver.worker.cli.terminal import UserError, console, err_console, fmt


def evaluate_command(
    path: Annotated[Path, typer.Argument(help="A labeled CSV in the shared schema.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Score what the worker serves (the champion, else the zero-label scorer of the loaded
    taxonomy) on a labeled file without inserting its rows into the catalog."""
    # onnxruntime comes with the worker extra.
    from shelver.training.cold_start import evaluate_served

    try:
        metrics, rejected, images = evaluate_served(get_engine(), path, get_settings())
    except (LookupError, ValueError, ImportFormatError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    metrics["rejected_rows"] = [{"line": r.line, "reason": r.reason} for r in rejected.rejected]
    # On stderr, so it reaches a person even when stdout is JSON for a program.
    for warning in metrics["warnings"]:
        err_console.print(f"[yellow]warning:[/yellow] {warning}")
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    if images is None:
        console.print(
            f"no champion: zero-label scorer {metrics['model']} ({metrics['categories']} "
            f"categories) on {path}: n={metrics['n']}, every suggestion goes to review"
        )
        _print_tree(metrics)
        if metrics["unknown_categories"]:
            console.print(f"categories not in the catalog: {metrics['unknown_categories']}")
        return
    console.print(
        f"{metrics['model']} on {path}: n={metrics['n']} accuracy={metrics['accuracy']:.4f} "
        f"macro-F1={metrics['macro_f1']:.4f} coverage={metrics['coverage']:.3f}"
    )
    _print_tree(metrics)
    table = Table()
    for column in ("category", "precision", "recall", "F1", "support"):
        table.add_column(column)
    for label, row in metrics["per_class"].items():
        table.add_row(
            label, fmt(row["precision"]), fmt(row["recall"]), fmt(row["f1"]), str(row["support"])
        )
    console.print(table)
    if metrics["unknown_categories"]:
        console.print(f"categories the model does not know: {metrics['unknown_categories']}")
    console.print(f"images: {images.describe()}")
    if images.roots_setting and not metrics["warnings"]:
        console.print(f"to let the images outside the roots in, set {images.roots_setting}")


def _print_tree(metrics: dict) -> None:
    tree = metrics["hierarchical"]
    console.print(
        f"hierarchical: precision={tree['precision']:.4f} recall={tree['recall']:.4f} "
        f"F1={tree['f1']:.4f} path accuracy={tree['path_accuracy']:.4f}"
    )
    for level, row in metrics["levels"].items():
        console.print(
            f"  level {level}: n={row['n']} accuracy={row['accuracy']:.4f} "
            f"macro-F1={row['macro_f1']:.4f} coverage={row['coverage']:.3f}"
        )
