"""Test harness: real PostgreSQL and Redis, a migrated database, a clean state per test.

With SHELVER_TEST_DATABASE_URL and SHELVER_TEST_BROKER_URL set (CI, a developer's
own servers), tests use those. Otherwise a real PostgreSQL and a real
Redis-protocol server are started from pip packages for the test session and
stopped after it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine

from shelver.catalog.settings import reset_settings, sqlalchemy_url

# Small cuts of the shared product sets, kept in the repository so a bare clone tests itself;
# fixtures/data/README.md says what each holds and fixtures/make_fixtures.py how it was cut.
FIXTURE_DATA = Path(__file__).resolve().parent / "fixtures" / "data"


@pytest.fixture(scope="session")
def fixture_data() -> Path:
    """The repository's product fixtures: bestbuy/, flipkart/, pricerunner/ in the shared schema."""
    return FIXTURE_DATA


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory, fixture_data: Path) -> Path:
    """Exported encoders, once per test session (or $SHELVER_TEST_MODEL_DIR's)."""
    from support import export_or_reuse_encoders

    return export_or_reuse_encoders(tmp_path_factory.getbasetemp(), fixture_data)


@pytest.fixture(scope="session")
def services() -> Iterator[tuple[str, str]]:
    """(database URL, broker URL) of real servers, exported to the environment for subprocesses."""
    from shelver.catalog.embedded import create_database, embedded_services

    database_url = os.environ.get("SHELVER_TEST_DATABASE_URL")
    broker_url = os.environ.get("SHELVER_TEST_BROKER_URL")
    with contextlib.ExitStack() as stack:
        if not (database_url and broker_url):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shelver-test-")))
            server_url, embedded_broker = stack.enter_context(embedded_services(tmp))
            database_url = database_url or create_database(server_url, "shelver_test")
            broker_url = broker_url or embedded_broker
        else:
            server, _, name = database_url.rpartition("/")
            create_database(f"{server}/postgres", name)
        saved = {k: os.environ.get(k) for k in ("SHELVER_DATABASE_URL", "SHELVER_BROKER_URL")}
        os.environ["SHELVER_DATABASE_URL"] = database_url
        os.environ["SHELVER_BROKER_URL"] = broker_url
        reset_settings()
        try:
            yield database_url, broker_url
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            reset_settings()


@pytest.fixture(scope="session")
def migrated_engine(services: tuple[str, str]) -> Iterator[Engine]:
    from shelver.catalog.migrate import upgrade

    database_url, _ = services
    engine = create_engine(sqlalchemy_url(database_url), future=True)
    # Migrations run once per test session, from an empty schema, so a test
    # run also proves the migrations apply to a fresh database.
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    upgrade(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(migrated_engine: Engine) -> Engine:
    """The migrated database, emptied before the test."""
    from support import empty_catalog

    empty_catalog(migrated_engine)
    return migrated_engine


@pytest.fixture
def database_url(services: tuple[str, str], engine: Engine) -> str:
    return services[0]


@pytest.fixture
def broker_url(services: tuple[str, str]) -> str:
    import redis

    url = services[1]
    redis.Redis.from_url(url).flushdb()
    return url
