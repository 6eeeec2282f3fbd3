"""Imports products from the shared CSV schema or Best Buy's open-data ``products.json``.

A product's label is a category path (``Cell Phones > Cell Phone Accessories``) at any
depth: a CSV's ``category_path`` column where the file has one, else its ``category``;
Best Buy's whole ``categoryPath``. Missing categories and their ancestors are created.

Rows are validated one by one: a bad row is reported with its line number and
skipped, and every good row lands. Upserts go by sku; the products trigger
queues new and changed rows, so the importer never touches the queue.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, text

from shelver.catalog.categories import (
    SEPARATOR,
    category_ids,
    ensure_categories,
    is_valid_path,
    normalize_path,
)
from shelver.catalog.images import RootCheck
from shelver.catalog.settings import get_settings

log = logging.getLogger(__name__)

CSV_COLUMNS = ("id", "name", "description", "category", "category_path", "image", "source")
# Far above any real product, low enough that one row cannot bloat a batch.
FIELD_LIMITS = {
    "sku": 200,
    "name": 2_000,
    "description": 200_000,
    "category": 1_000,  # a whole path; the longest in the shared taxonomies is 215
    "image": 4_000,
}
CHUNK_ROWS = 2_000
# What surrogateescape turns undecodable bytes into.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


class ImportFormatError(ValueError):
    """The file as a whole cannot be read (wrong header, not JSON, unknown format)."""


@dataclass(frozen=True)
class ImportRecord:
    """One product as a file gives it, before it is in the catalog (no id, no content hash)."""

    line: int
    sku: str
    name: str
    description: str
    # The label as a category path, names joined by " > "; a top-level label is a path too.
    category: str | None
    image_uri: str | None


@dataclass(frozen=True)
class Rejection:
    line: int
    reason: str


@dataclass
class ImportReport:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    categories_created: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    # The imported rows' local images against SHELVER_IMAGE_ROOTS: those outside will be
    # refused by the worker, and ``images.setting()`` is what would let them in.
    images: RootCheck = field(default_factory=lambda: RootCheck([]))
    # The import_batches row this run's inserted and changed products carry.
    batch_id: int | None = None


def _resolve_image(value: str, base: Path) -> str | None:
    value = value.strip()
    if not value:
        return None
    if "://" in value:
        return value
    path = Path(value)
    return str(path if path.is_absolute() else (base / path).resolve())


def _check(row: ImportRecord) -> str | None:
    """Why the row cannot be imported, or None when it can."""
    values = {
        "sku": row.sku,
        "name": row.name,
        "description": row.description,
        "category": row.category or "",
        "image": row.image_uri or "",
    }
    for column, value in values.items():
        if _UNDECODABLE.search(value):
            return f"invalid UTF-8 in {column}"
        if "\x00" in value:
            return f"NUL byte in {column}"
        if len(value) > FIELD_LIMITS[column]:
            return f"{column} is {len(value)} characters long (limit {FIELD_LIMITS[column]})"
    if not row.sku.strip():
        return "no id"
    if not row.name.strip():
        return "no name"
    if row.category and not is_valid_path(row.category):
        return f"category path {row.category!r} has an empty level; join names with ' > '"
    return None


def read_csv(path: Path, *, labeled: bool = True) -> Iterator[ImportRecord | Rejection]:
    # Undecodable bytes become lone surrogates, so one bad row is reported
    # instead of the whole file failing to decode.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    # The csv module's own field limit (128 KiB) is below FIELD_LIMITS and would report a long
    # description as "broken quoting"; no field can be longer than the file, so let _check judge.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as exc:
        raise ImportFormatError(f"{path}: no CSV header") from exc
    missing = [c for c in ("id", "name") if c not in header]
    if missing:
        raise ImportFormatError(
            f"{path}: header lacks {', '.join(missing)}; expected columns {', '.join(CSV_COLUMNS)}"
        )
    index = {name: i for i, name in enumerate(header)}
    base = path.resolve().parent
    line = reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield Rejection(line, f"broken quoting: {exc}")
            line = reader.line_num + 1
            continue
        start, line = line, reader.line_num + 1
        if not values:
            continue
        if len(values) != len(header):
            yield Rejection(start, f"expected {len(header)} fields, found {len(values)}")
            continue

        def get(column: str, row: list[str] = values) -> str:
            return row[index[column]] if column in index else ""

        category = (get("category_path").strip() or get("category").strip()) or None
        yield ImportRecord(
            line=start,
            sku=get("id").strip(),
            name=get("name").strip(),
            description=get("description").strip(),
            category=_label(category) if labeled else None,
            image_uri=_resolve_image(get("image"), base),
        )


def read_bestbuy_json(path: Path, *, labeled: bool = True) -> Iterator[ImportRecord | Rejection]:
    """Best Buy open data: a JSON array of products (or {"products": [...]}).

    The label is the whole ``categoryPath`` (older dumps call it ``category``), its
    names joined into a path. Line numbers are the product's position in the array,
    since JSON products do not map to lines.
    """
    try:
        data = json.loads(path.read_bytes().decode("utf-8", errors="surrogateescape"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImportFormatError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict):
        data = data.get("products")
    if not isinstance(data, list):
        raise ImportFormatError(f"{path}: expected a JSON array of products")
    base = path.resolve().parent
    for position, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            yield Rejection(position, "not a JSON object")
            continue
        path_entries = item.get("categoryPath") or item.get("category") or []
        category = None
        if labeled and isinstance(path_entries, list) and path_entries:
            names = [
                str((entry.get("name") if isinstance(entry, dict) else entry) or "")
                for entry in path_entries
            ]
            category = SEPARATOR.join(names)
        description = next(
            (
                str(item[k])
                for k in ("description", "shortDescription", "longDescription")
                if item.get(k)
            ),
            "",
        )
        image = item.get("image") or ""
        yield ImportRecord(
            line=position,
            sku=str(item.get("sku") or "").strip(),
            name=str(item.get("name") or "").strip(),
            description=description.strip(),
            category=_label(category),
            image_uri=_resolve_image(str(image), base),
        )


def _label(category: str | None) -> str | None:
    """The category path with spaces around each name trimmed; a bad one is kept as given,
    for _check to reject with the file's own spelling."""
    if not category or not category.strip():
        return None
    return normalize_path(category) if is_valid_path(category) else category


def read_products(path: Path, *, labeled: bool = True) -> Iterator[ImportRecord | Rejection]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() == ".json":
        return read_bestbuy_json(path, labeled=labeled)
    if path.suffix.lower() in (".csv", ".txt"):
        return read_csv(path, labeled=labeled)
    raise ImportFormatError(f"{path}: unknown format; give a .csv (shared schema) or a .json")


def valid_rows(
    rows: Iterator[ImportRecord | Rejection], report: ImportReport
) -> Iterator[ImportRecord]:
    """Drop and report bad rows, including a sku repeated within the file."""
    first_line: dict[str, int] = {}
    for row in rows:
        if isinstance(row, Rejection):
            report.rejected.append(row)
            continue
        reason = _check(row)
        if reason is None and row.sku in first_line:
            reason = f"id {row.sku!r} repeats line {first_line[row.sku]}"
        if reason:
            report.rejected.append(Rejection(row.line, reason))
            continue
        first_line[row.sku] = row.line
        yield row


# Upsert by sku. The WHERE clause makes an unchanged row a no-op, so it fires
# no trigger work and is counted as unchanged. A label a person gave in review
# is not overwritten by an import. A new or changed row belongs to this run's import
# batch, which the review queue filters on.
UPSERT_SQL = """
INSERT INTO products AS p
    (sku, name, description, image_uri, label_id, label_source, import_batch_id)
VALUES %s
ON CONFLICT (sku) DO UPDATE SET
    import_batch_id = EXCLUDED.import_batch_id,
    name = EXCLUDED.name,
    description = EXCLUDED.description,
    image_uri = EXCLUDED.image_uri,
    label_id = CASE WHEN p.label_source = 'review' OR EXCLUDED.label_source IS NULL
                    THEN p.label_id ELSE EXCLUDED.label_id END,
    label_source = CASE WHEN p.label_source = 'review' OR EXCLUDED.label_source IS NULL
                        THEN p.label_source ELSE EXCLUDED.label_source END
WHERE (p.name, p.description, p.image_uri) IS DISTINCT FROM
      (EXCLUDED.name, EXCLUDED.description, EXCLUDED.image_uri)
   OR (EXCLUDED.label_source IS NOT NULL AND p.label_source IS DISTINCT FROM 'review'
       AND (p.label_id, p.label_source) IS DISTINCT FROM (EXCLUDED.label_id, EXCLUDED.label_source))
RETURNING (xmax = 0) AS inserted
"""


def _write_chunk(engine: Engine, chunk: list[ImportRecord], report: ImportReport) -> None:
    from psycopg2.extras import execute_values

    with engine.begin() as conn:
        names = {r.category for r in chunk if r.category}
        report.categories_created += ensure_categories(conn, names)
        ids = category_ids(conn, names)
        values = [
            (
                r.sku,
                r.name,
                r.description,
                r.image_uri,
                ids.get(r.category) if r.category else None,
                "import" if r.category else None,
                report.batch_id,
            )
            for r in chunk
        ]
        # execute_values sends the chunk as one multi-row statement; it runs on the
        # same connection, inside this transaction.
        with conn.connection.driver_connection.cursor() as cur:
            results = execute_values(cur, UPSERT_SQL, values, page_size=len(values), fetch=True)
    inserted = sum(1 for (was_insert,) in results if was_insert)
    report.inserted += inserted
    report.updated += len(results) - inserted
    report.unchanged += len(chunk) - len(results)


def import_file(
    engine: Engine,
    path: Path,
    *,
    labeled: bool = True,
    progress: bool = False,
    image_roots: Sequence[Path] | None = None,
) -> ImportReport:
    """Import ``path``; each chunk of rows commits on its own, so workers start early.

    Image paths are checked against ``image_roots`` (default SHELVER_IMAGE_ROOTS) by path
    alone, so a file whose images the worker would refuse is known at import.
    """
    report = ImportReport(batch_id=_start_batch(engine, path))
    report.images = RootCheck(get_settings().image_roots if image_roots is None else image_roots)
    rows = valid_rows(read_products(path, labeled=labeled), report)
    with _progress(progress, path) as advance:
        chunk: list[ImportRecord] = []
        for row in rows:
            report.images.add(row.image_uri)
            chunk.append(row)
            if len(chunk) >= CHUNK_ROWS:
                _write_chunk(engine, chunk, report)
                advance(len(chunk))
                chunk = []
        if chunk:
            _write_chunk(engine, chunk, report)
            advance(len(chunk))
    log.info(
        "imported %s: %d inserted, %d updated, %d unchanged, %d rejected",
        path, report.inserted, report.updated, report.unchanged, len(report.rejected),
    )  # fmt: skip
    if report.images.outside:
        log.info(
            "%d of %d local images in %s lie outside the image roots; %s would let them in",
            report.images.outside, report.images.local, path, report.images.setting(),
        )  # fmt: skip
    return report


def _start_batch(engine: Engine, path: Path) -> int:
    with engine.begin() as conn:
        return conn.execute(
            text("INSERT INTO import_batches (source) VALUES (:source) RETURNING id"),
            {"source": str(path)},
        ).scalar_one()


@contextmanager
def _progress(enabled: bool, path: Path) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr when asked for, else a no-op."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task(f"importing {path.name}", total=None)
        yield lambda n: bar.advance(task, n)
