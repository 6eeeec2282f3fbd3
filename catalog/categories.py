"""Categories by name: the one place that creates missing ones and maps names to ids."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

Executor = Connection | Session

ENSURE_SQL = text(
    """
    INSERT INTO categories (name)
    SELECT unnest(CAST(:names AS text[]))
    ON CONFLICT (name) DO NOTHING
    """
)
"""Creates the names that do not exist yet. A concurrent insert of the same name
waits on the unique index and then does nothing, so importers, label files and
workers may all create categories at once."""

IDS_SQL = text("SELECT name, id FROM categories WHERE name = ANY(CAST(:names AS text[]))")


def ensure_categories(db: Executor, names: Iterable[str]) -> int:
    """Create the categories among ``names`` that do not exist; return how many were new."""
    wanted = sorted(set(names))
    if not wanted:
        return 0
    return db.execute(ENSURE_SQL, {"names": wanted}).rowcount


def category_ids(db: Executor, names: Iterable[str]) -> dict[str, int]:
    """Ids of the existing categories among ``names``."""
    wanted = sorted(set(names))
    if not wanted:
        return {}
    return dict(db.execute(IDS_SQL, {"names": wanted}).all())
