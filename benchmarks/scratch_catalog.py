"""A freshly migrated catalog database for one benchmark run (configured server or embedded)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, create_engine

from shelver.catalog.embedded import create_database, embedded_services
from shelver.catalog.migrate import upgrade
from shelver.catalog.settings import sqlalchemy_url


@contextlib.contextmanager
def scratch_catalog(name: str) -> Iterator[Engine]:
    """Database NAME, dropped and migrated anew, on SHELVER_DATABASE_URL's server.

    Without SHELVER_DATABASE_URL an embedded PostgreSQL (and Valkey) is started for the
    block and stopped after it.
    """
    with contextlib.ExitStack() as stack:
        server = os.environ.get("SHELVER_DATABASE_URL")
        if server:
            server = server.rpartition("/")[0] + "/postgres"
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            server, _ = stack.enter_context(embedded_services(tmp))
        url = create_database(server, name, recreate=True)
        upgrade(url)
        engine = create_engine(sqlalchemy_url(url))
        try:
            yield engine
        finally:
            engine.dispose()
