"""The ``shelver`` command line. Only this module prints; everything it calls logs.

Commands import their heavy modules lazily, so ``shelver status`` does not pay
for onnxruntime and ``shelver worker`` never loads TensorFlow.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from catalog.settings import SettingsError, get_settings

app = typer.Typer(
    help="Shelver keeps a product catalog categorized by itself.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The catalog database.", no_args_is_help=True)
app.add_typer(db_app, name="db")

# soft_wrap: lines such as "file:line: reason" must stay whole for grep and tests.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


class UserError(Exception):
    """A mistake the user can fix; shown as one line, without a traceback."""


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app()
    except (UserError, SettingsError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the catalog schema (tables, trigger, queue) to the latest version."""
    from catalog.db import check_connection, get_engine
    from catalog.migrate import upgrade

    settings = get_settings()
    check_connection(get_engine())
    upgrade(settings.require_database_url())
    console.print("catalog schema is up to date")


@app.command("import")
def import_products(
    path: Annotated[Path, typer.Argument(help="A products CSV or a Best Buy products.json.")],
    unlabeled: Annotated[
        bool, typer.Option("--unlabeled", help="Ignore the category column: import as unlabeled.")
    ] = False,
) -> None:
    """Import products: create categories, upsert by sku, report rejected rows with line numbers.

    Exits 1 when any row was rejected (the good rows are imported all the same).
    """
    from catalog.db import get_engine
    from catalog.importer import ImportFormatError, import_file

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
    if report.rejected:
        raise typer.Exit(1)


@app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Products by status, queue depth, age of the oldest pending row, and the champion model."""
    from catalog.db import get_engine
    from catalog.status import catalog_status

    report = catalog_status(get_engine())
    if as_json:
        print(json.dumps(report, default=str, indent=2))
        return
    table = Table(title="products")
    table.add_column("status")
    table.add_column("count", justify="right")
    for name, count in report["products"].items():
        table.add_row(name, str(count))
    console.print(table)
    queue = report["queue"]
    age = queue["oldest_pending_age_s"]
    console.print(
        f"queue: {queue['depth']} rows ({queue['claimed']} claimed), oldest pending "
        + (f"{age:.1f} s old" if age is not None else "none")
    )
    champion = report["champion"]
    console.print(
        f"champion: {champion['version']} (macro-F1 {champion.get('macro_f1')})"
        if champion
        else "champion: none yet (run `shelver train`)"
    )
