"""Which database errors are worth retrying, from real PostgreSQL errors."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError

from shelver.catalog.db import is_transient


def error_of(engine: Engine, sql: str) -> DBAPIError:
    with pytest.raises(DBAPIError) as caught, engine.begin() as conn:
        conn.execute(text(sql))
    return caught.value


def test_lost_connection_is_transient() -> None:
    engine = create_engine("postgresql+psycopg2://postgres@127.0.0.1:1/none")
    with pytest.raises(DBAPIError) as caught:
        engine.connect()
    assert is_transient(caught.value)


def test_deadlock_class_and_unique_violation_are_transient(engine: Engine) -> None:
    serialization = error_of(
        engine, "DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = 'serialization_failure'; END $$"
    )
    assert is_transient(serialization)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO categories (name) VALUES ('Audio')"))
    assert is_transient(error_of(engine, "INSERT INTO categories (name) VALUES ('Audio')"))


def test_errors_that_repeat_every_time_are_not_transient(engine: Engine) -> None:
    too_big = error_of(
        engine, "DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = 'program_limit_exceeded'; END $$"
    )
    assert not is_transient(too_big)
    assert not is_transient(error_of(engine, "SELECT 1 / 0"))
    assert not is_transient(ValueError("not a database error"))
