"""Categories by path: the one place that creates missing ones and maps paths to ids.

A category is named by its path, the names from its root joined by `` > ``
(``Cell Phones > Cell Phone Accessories``); a root's path is its name, so a flat
label such as ``Audio`` is a path too. ``>`` always separates levels, spaced or not
(no name in the shared taxonomies or data holds one). The database derives
``categories.path`` from the parent and the name (migration 0004); this module only
ever inserts a name under a parent.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

Executor = Connection | Session

SEPARATOR = " > "


class CategoryPathError(ValueError):
    """A path with an empty level (``A >  > B``, a trailing `` > ``, or nothing at all)."""


def parse_path(path: str) -> tuple[str, ...]:
    """The names along ``path``, each stripped of surrounding spaces."""
    parts = tuple(part.strip() for part in path.split(">"))
    if not all(parts):
        raise CategoryPathError(
            f"category path {path!r} has an empty level; write names joined by ' > '"
        )
    return parts


def normalize_path(path: str) -> str:
    """``path`` with the spaces around each name trimmed: the form ``categories.path`` holds."""
    return SEPARATOR.join(parse_path(path))


def top_level(path: str) -> str:
    """The root's name of ``path``: the label a flat, top-level classifier learns."""
    return path.split(">", 1)[0].strip()


def is_valid_path(path: str) -> bool:
    return all(part.strip() for part in path.split(">"))


def with_ancestors(paths: Iterable[str]) -> set[str]:
    """Every path in ``paths`` and every prefix of one: the nodes a tree holding them needs."""
    nodes: set[str] = set()
    for path in paths:
        parts = parse_path(path)
        nodes.update(SEPARATOR.join(parts[:depth]) for depth in range(1, len(parts) + 1))
    return nodes


ENSURE_LEVEL_SQL = text(
    """
    INSERT INTO categories (name, parent_id)
    SELECT wanted.name, parent.id
    FROM unnest(CAST(:names AS text[]), CAST(:parents AS text[])) AS wanted (name, parent_path)
    LEFT JOIN categories parent ON parent.path = wanted.parent_path
    WHERE wanted.parent_path IS NULL OR parent.id IS NOT NULL
    ORDER BY wanted.parent_path NULLS FIRST, wanted.name
    ON CONFLICT (path) DO NOTHING
    """
)
"""Creates one level's missing nodes under parents that exist. A concurrent insert of
the same path waits on the unique index and then does nothing, so importers, label
files, taxonomy loads and workers may all create categories at once. Every caller
inserts level by level and, within a level, in path order, so two writers lock the
same new paths in the same order and cannot deadlock."""

IDS_SQL = text("SELECT path, id FROM categories WHERE path = ANY(CAST(:paths AS text[]))")


def ensure_categories(db: Executor, paths: Iterable[str]) -> int:
    """Create the categories along ``paths`` that do not exist, ancestors included.

    Returns how many were new. Raises CategoryPathError for a path with an empty level,
    and LookupError when a parent vanished under us (a concurrent delete).
    """
    nodes = with_ancestors(paths)
    created = 0
    for depth in range(1, max((len(parse_path(n)) for n in nodes), default=0) + 1):
        level = sorted(parse_path(n) for n in nodes if len(parse_path(n)) == depth)
        params = {
            "names": [parts[-1] for parts in level],
            "parents": [SEPARATOR.join(parts[:-1]) or None for parts in level],
        }
        created += db.execute(ENSURE_LEVEL_SQL, params).rowcount
    missing = nodes - category_ids(db, nodes).keys()
    if missing:
        raise LookupError(
            f"categories {sorted(missing)[:5]} could not be created: a parent was deleted "
            "meanwhile; try again"
        )
    return created


def category_ids(db: Executor, paths: Iterable[str]) -> dict[str, int]:
    """Ids of the existing categories among ``paths``, keyed by the path as given."""
    # A path with an empty level names no category; callers report it as unknown.
    given = {path: normalize_path(path) for path in set(paths) if is_valid_path(path)}
    if not given:
        return {}
    found = dict(db.execute(IDS_SQL, {"paths": sorted(set(given.values()))}).all())
    return {path: found[norm] for path, norm in given.items() if norm in found}


CATEGORIES_MD5_SQL = text(
    """
    SELECT md5(coalesce(string_agg(path || E'\\t' || coalesce(description, ''), E'\\n'
                                   ORDER BY path), ''))
    FROM categories
    """
)


def categories_md5(db: Executor) -> str:
    """The taxonomy as the zero-label scorer reads it (paths and descriptions), in one digest
    SQL alone computes: an adaptation stores it, and ``shelver beat`` compares it with the
    current one without loading an encoder."""
    return db.execute(CATEGORIES_MD5_SQL).scalar_one()
