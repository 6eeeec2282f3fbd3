"""``shelver import``: products from a file into the catalog."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shelver.catalog.db import get_engine
from shelver.catalog.importer import ImportFormatError, import_file
from shelver.worker.cli.terminal import UserError, console, err_console


def import_products(
    path: Annotated[Path, typer.Argument(help="A products CSV or a Best Buy products.json.")],
    unlabeled: Annotated[
        bool, typer.Option("--unlabeled", help="Ignore the category column: import as unlabeled.")
    ] = False,
) -> None:
    """Import products: create categories, upsert by sku, report rejected rows with line numbers.

    Exits 1 when any row was rejected (the good rows are imported all the same).
    """
    try:
        report = import_file(get_engine(), path, labeled=not unlabeled, progress=True)
    except (ImportFormatError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    for rejection in report.rejected:
        err_console.print(f"{path}:{rejection.line}: rejected: {rejection.reason}")
    console.print(
        f"{report.inserted} inserted, {report.updated} updated, {report.unchanged} unchanged, "
        f"{len(report.rejected)} rejected, {report.categories_created} new categories"
    )
    images = report.images
    if images.outside:
        roots = ", ".join(str(root) for root in images.roots)
        err_console.print(
            f"[yellow]warning:[/yellow] {images.outside} of {images.local} images lie outside "
            f"SHELVER_IMAGE_ROOTS ({roots}): they will be refused and those products classified "
            "from text alone. To use them, run the worker and `shelver train` with "
            f"{images.setting()}"
        )
    if report.rejected:
        raise typer.Exit(1)
