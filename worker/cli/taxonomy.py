"""``shelver taxonomy``: a category tree loaded into the catalog before any product."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shelver.catalog.db import get_engine
from shelver.catalog.taxonomy import TaxonomyFormatError, import_taxonomy
from shelver.worker.cli.terminal import UserError, console, err_console

app = typer.Typer(help="Category taxonomies.", no_args_is_help=True)


@app.command("import")
def taxonomy_import(
    path: Annotated[
        Path,
        typer.Argument(
            help="Google's product taxonomy (`id - A > B > C` lines), Best Buy's "
            "categories JSON, or a CSV with a `path` column and optional `description` and "
            "`synonyms` (`;`-separated) columns; the format is told by the content."
        ),
    ],
) -> None:
    """Load a taxonomy's categories, ancestors included; running it again adds nothing.

    Exits 1 when any entry was skipped (the others are loaded all the same).
    """
    try:
        report = import_taxonomy(get_engine(), path)
    except (TaxonomyFormatError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    for skipped in report.skipped:
        err_console.print(f"{path}:{skipped.position}: skipped: {skipped.reason}")
    levels = ", ".join(f"{count:,} at level {level}" for level, count in report.per_level.items())
    version = f" {report.version}" if report.version else ""
    console.print(
        f"{report.format} taxonomy{version}: {report.nodes:,} nodes, depth {report.depth} "
        f"({levels})"
    )
    console.print(
        f"{report.added:,} added, {report.existing:,} already in the catalog, "
        f"{len(report.skipped)} skipped"
    )
    if report.described:
        console.print(f"{report.described:,} descriptions set or changed")
    if report.duplicates or report.implied:
        console.print(
            f"from {report.entries:,} entries: {report.duplicates} listed twice (loaded once), "
            f"{report.implied} ancestors the file names only in paths (created)"
        )
    if report.skipped:
        raise typer.Exit(1)
