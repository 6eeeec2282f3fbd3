"""Alembic environment: runs migrations online against SHELVER_DATABASE_URL.

The schema has one source: the migrations in versions/, written by hand (the
trigger, the queue and the constraints are SQL that models could not express).
No metadata is given to compare the database with, so ``alembic revision
--autogenerate`` refuses to run instead of proposing to drop whatever no model
describes; write a revision with ``alembic revision -m "..."``.
"""

from alembic import context
from sqlalchemy import create_engine, pool

from shelver.catalog.settings import get_settings

config = context.config


def run_migrations_online() -> None:
    url = config.attributes.get("database_url") or get_settings().require_database_url()
    connectable = create_engine(url, poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
