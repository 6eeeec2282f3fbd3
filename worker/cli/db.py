"""``shelver db``: the catalog schema."""

from __future__ import annotations

import typer

from shelver.catalog.db import check_connection, get_engine
from shelver.catalog.settings import get_settings
from shelver.worker.cli.terminal import console

app = typer.Typer(help="The catalog database.", no_args_is_help=True)


@app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the catalog schema (tables, trigger, queue) to the latest version."""
    # Checked first, so an unreachable server is one plain line rather than Alembic's traceback.
    check_connection(get_engine())
    # Alembic is imported here, not with the CLI: every other command starts faster.
    from shelver.catalog.migrate import upgrade

    upgrade(get_settings().require_database_url())
    console.print("catalog schema is up to date")
