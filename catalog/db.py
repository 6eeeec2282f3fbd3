"""Engines and sessions, and the one place that names how the database can fail."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from functools import lru_cache

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shelver.catalog.settings import get_settings

log = logging.getLogger(__name__)


class DatabaseNotAvailableError(RuntimeError):
    """PostgreSQL could not be reached; the message says where we looked."""


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    # pool_pre_ping: a worker outlives PostgreSQL restarts, and a dead pooled
    # connection should cost one ping, not one failed batch.
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, future=True)


def get_engine() -> Engine:
    return engine_for(get_settings().require_database_url())


@contextlib.contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back if it raises."""
    factory = sessionmaker(bind=engine or get_engine(), expire_on_commit=False)
    with factory() as session, session.begin():
        yield session


def check_connection(engine: Engine) -> None:
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except OperationalError as exc:
        raise DatabaseNotAvailableError(
            f"Cannot reach PostgreSQL at {engine.url.render_as_string(hide_password=True)}: "
            f"{exc.orig}. Is it running, and is SHELVER_DATABASE_URL right?"
        ) from exc


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same work later can succeed.

    Connection loss (no SQLSTATE: the server never answered), class 08
    (connection), 40 (serialization failure, deadlock), 53 (out of resources,
    e.g. too many connections) and 57P (server shutting down) are transient: the
    work itself is fine, the moment was not. A unique violation (23505) from a
    concurrent writer of the same idempotent row is transient too (the retry sees
    the committed row and writes nothing). Anything else with a SQLSTATE, such as
    54000 (a value too large to index), fails the same way every time.
    """
    if not isinstance(exc, DBAPIError):
        return False
    code = getattr(exc.orig, "pgcode", None)
    if code:
        return code.startswith(("08", "40", "53", "57P")) or code == "23505"
    return isinstance(exc, OperationalError)
