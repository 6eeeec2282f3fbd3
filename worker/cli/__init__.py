"""The ``shelver`` command line: one Typer app assembled from a module per command.

A command parses its options, calls the function that owns the work (in catalog/,
worker/ or training/), and prints. Only the CLI prints; everything it calls logs.
Commands needing an extra (onnxruntime, Celery, TensorFlow) import it when they run,
so ``shelver status``, ``import`` and ``db`` work with the core install alone.
"""

from __future__ import annotations

import logging
import sys

import typer
from sqlalchemy.exc import OperationalError

from shelver.catalog.db import DatabaseNotAvailableError
from shelver.catalog.settings import SettingsError
from shelver.worker.cli import (
    backfill,
    beat,
    db,
    demo,
    dispatch,
    encoders,
    evaluate,
    import_products,
    labels,
    models,
    serve,
    status,
    taxonomy,
    train,
    users,
    worker,
)
from shelver.worker.cli.terminal import UserError, err_console
from shelver.worker.errors import EncoderUnavailable

app = typer.Typer(
    help="Shelver keeps a product catalog categorized by itself.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# The catalog.
app.add_typer(db.app, name="db")
app.command("import")(import_products.import_products)
app.command("status")(status.status)
app.add_typer(taxonomy.app, name="taxonomy")
# The event path.
app.command("dispatch")(dispatch.dispatch)
app.command("worker")(worker.run_worker)
app.command("backfill")(backfill.backfill)
app.command("beat")(beat.beat)
# Models.
app.add_typer(encoders.app, name="encoders")
app.command("train")(train.train_command)
app.add_typer(models.app, name="models")
app.command("evaluate")(evaluate.evaluate_command)
# People in the loop.
app.command("label")(labels.label)
app.command("review")(labels.review)
app.command("serve")(serve.serve)
app.add_typer(users.app, name="users")
app.command("demo")(demo.demo)


def main() -> None:
    # Commands that run for a long time (dispatch, beat; Celery configures the worker's
    # own) log at INFO; one-shot commands show only warnings, so their output stays readable.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app()
    except (UserError, SettingsError, DatabaseNotAvailableError, EncoderUnavailable) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except OperationalError as exc:
        # Connection refused, wrong database name, bad password: a setting to fix,
        # not a bug to report, so no traceback.
        err_console.print(
            f"[red]error:[/red] cannot reach PostgreSQL: {str(exc.orig).strip()}. "
            "Is it running, and is SHELVER_DATABASE_URL right?"
        )
        sys.exit(2)
