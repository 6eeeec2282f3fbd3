"""``shelver label`` and ``shelver review``: the labels people give."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from shelver.catalog.db import get_engine
from shelver.worker.cli.terminal import UserError, console, err_console
from shelver.worker.labels import (
    LabelFileError,
    ReviewError,
    apply_label_file,
    needs_review,
    record_review,
)


def label(
    path: Annotated[Path, typer.Argument(help="CSV with `sku` and `category` columns.")],
    create_categories: Annotated[
        bool, typer.Option("--create-categories", help="Create categories the catalog lacks.")
    ] = False,
) -> None:
    """Apply labels from a CSV; unknown SKUs and categories are reported per line (exit 1)."""
    try:
        report = apply_label_file(get_engine(), path, create_categories=create_categories)
    except LabelFileError as exc:
        raise UserError(str(exc)) from exc
    for problem in report.problems:
        err_console.print(f"{path}:{problem.line}: {problem.reason}")
    console.print(
        f"{report.labeled} labeled, {report.unchanged} unchanged, {report.kept_review} kept "
        f"(labeled in review), {len(report.problems)} rejected, "
        f"{report.categories_created} new categories"
    )
    if report.problems:
        raise typer.Exit(1)


def review(
    limit: Annotated[int, typer.Option(help="How many products to list.")] = 20,
    corrections: Annotated[
        list[str] | None,
        typer.Option("--set", help="Record a verdict: SKU=CATEGORY (repeatable)."),
    ] = None,
) -> None:
    """List products waiting for review, least confident first, or record verdicts with --set."""
    engine = get_engine()
    if corrections:
        for item in corrections:
            sku, sep, category = item.partition("=")
            if not sep or not sku.strip() or not category.strip():
                raise UserError(f"--set wants SKU=CATEGORY, got {item!r}")
            try:
                record_review(engine, sku.strip(), category.strip())
            except ReviewError as exc:
                raise UserError(str(exc)) from exc
            console.print(f"{sku.strip()}: labeled {category.strip()!r}")
        return
    items = needs_review(engine, limit)
    if not items:
        console.print("nothing waits for review")
        return
    table = Table(title=f"needs review ({len(items)} shown)")
    for column in ("sku", "name", "predicted", "confidence", "alternatives"):
        table.add_column(column)
    for item in items:
        alternatives = ", ".join(f"{t['category']} {t['p']:.2f}" for t in item.top_k[1:])
        table.add_row(
            item.sku,
            item.name[:60],
            item.predicted or "",
            f"{item.confidence:.2f}" if item.confidence is not None else "",
            alternatives,
        )
    console.print(table)
    console.print("record a verdict with: shelver review --set SKU=CATEGORY")
