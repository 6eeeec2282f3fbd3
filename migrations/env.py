"""Alembic environment: runs migrations online against SHELVER_DATABASE_URL."""

from alembic import context
from sqlalchemy import create_engine, pool

from shelver.catalog.models import Base
from shelver.catalog.settings import get_settings

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    url = config.attributes.get("database_url") or get_settings().require_database_url()
    connectable = create_engine(url, poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
