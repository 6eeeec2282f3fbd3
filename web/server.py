"""Running the web application: ``shelver serve`` calls ``serve``."""

from __future__ import annotations

import logging

import uvicorn
from sqlalchemy import text

from shelver.catalog.db import check_connection, engine_for
from shelver.catalog.settings import Settings, get_settings
from shelver.web.app import create_app

log = logging.getLogger(__name__)


class WebSetupError(RuntimeError):
    """The application cannot start on this database; the message says what to run."""


def serve(host: str = "127.0.0.1", port: int = 8000, settings: Settings | None = None) -> None:
    """Serve the application with uvicorn until interrupted."""
    settings = settings or get_settings()
    engine = engine_for(settings.require_database_url())
    check_connection(engine)
    with engine.connect() as conn:
        if conn.execute(text("SELECT to_regclass('users')")).scalar() is None:
            raise WebSetupError(
                "the database has no users table yet; run `shelver db upgrade` first"
            )
        if not conn.execute(text("SELECT count(*) FROM users")).scalar():
            log.warning(
                "nobody can sign in yet: create a user with `shelver users add NAME --role admin`"
            )
    # One worker process: sessions, rate limits and every other state live in PostgreSQL,
    # so more processes (or hosts) behind a proxy need nothing shared but the database.
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="info")
