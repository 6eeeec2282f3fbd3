"""``shelver taxonomy``: a category tree loaded into the catalog before any product."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress
from sqlalchemy import text

from shelver.catalog.db import get_engine
from shelver.catalog.settings import get_settings
from shelver.catalog.taxonomy import TaxonomyFormatError, import_taxonomy
from shelver.training import registry
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


@app.command("adapt")
def taxonomy_adapt(
    max_products: Annotated[
        int,
        typer.Option(min=1, help="Read at most this many products (a fixed sample beyond)."),
    ] = 100_000,
    undo: Annotated[
        bool,
        typer.Option("--undo", help="Serve the taxonomy's own vectors again; reads nothing."),
    ] = False,
) -> None:
    """Adapt the zero-label scorer to the catalog's own products; no label is read.

    Categories move toward the products they are surest of, and lean to those the catalog fills.

    Workers serve it from their next look (docs/cold_start.md).

    Products suggested before keep their suggestion until `shelver backfill --suggestions`.

    Run it again as products arrive: each run starts from the taxonomy's own vectors.
    """
    # Imported here: the encoders load onnxruntime, which `shelver taxonomy import` needs not.
    from shelver.worker.encoders import load_encoders
    from shelver.worker.zero_label import (
        ADAPT_MIN_PRODUCTS,
        adapt_zero_label_model,
        withdraw_adaptations,
    )

    settings = get_settings()
    engine = get_engine()
    text_encoder, image_encoder = load_encoders(settings.model_dir)
    if undo:
        try:
            version, withdrawn = withdraw_adaptations(engine, text_encoder)
        except LookupError as exc:
            raise UserError(str(exc)) from exc
        console.print(
            f"{withdrawn} adaptation(s) withdrawn; workers serve {version} from their next "
            "look, and `shelver backfill --suggestions` re-scores what the adapted one suggested"
        )
        return
    with engine.connect() as conn:
        total = conn.execute(text("SELECT count(*) FROM products")).scalar_one()
        champion = registry.champion(conn)
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn())
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("products read", total=min(total, max_products))
            report = adapt_zero_label_model(
                engine, text_encoder, image_encoder, settings,
                max_products=max_products, on_read=lambda n: bar.advance(task, n),
            )  # fmt: skip
    except (LookupError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    a = report.adaptation
    if report.read < report.catalog_products:
        err_console.print(
            f"read {report.read:,} of the catalog's {report.catalog_products:,} products "
            "(a fixed sample); --max-products to read more"
        )
    if report.no_text:
        err_console.print(
            f"{report.no_text:,} products without usable text not used: give them a name"
        )
    console.print(
        f"{a.products:,} products suggested a category; the {a.counted:,} at confidence "
        f"{a.cut:.3f} or more counted"
    )
    console.print(
        f"{a.moved:,} of {len(a.vectors):,} categories moved toward their products; "
        f"{a.too_few:,} had fewer than {ADAPT_MIN_PRODUCTS} and kept their vectors"
    )
    console.print(f"stored {report.version} (from {report.adapted_from})")
    console.print(
        "products suggested before keep their suggestion until `shelver backfill --suggestions`"
    )
    if champion is not None:
        console.print(
            f"the worker serves champion {champion.version}: the adapted scorer is used only "
            "with SHELVER_ZERO_LABEL_MERGE=1, or when there is no champion"
        )
