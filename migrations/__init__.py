"""Alembic migrations of the catalog schema, trigger and queue DDL included."""
