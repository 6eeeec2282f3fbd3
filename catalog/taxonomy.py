"""Loading a category taxonomy without products: Google's text file, Best Buy's JSON tree,
or a CSV of paths with what each category is.

The format is told by the content, not the file name: a JSON array is Best Buy's open
data (``[{id, name, path: [{id, name}], subCategories}]``); a first line that is a CSV
header with a ``path`` column is a taxonomy CSV (``path`` as ``A > B > C``, and optional
``description`` and ``synonyms`` columns, whose words the zero-label scorer reads beside
the names: ``worker.zero_label``); anything else is read as Google's product taxonomy (a
``#`` version line, then ``id - A > B > C`` a line; the id-less variant ``A > B > C``
too). Loading is idempotent: nodes already in the catalog are counted, not duplicated,
and every ancestor a path needs is created with it; a description replaces the stored
one only when the file gives one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, text

from shelver.catalog.categories import SEPARATOR, ensure_categories, with_ancestors

log = logging.getLogger(__name__)

GOOGLE = "google"
BESTBUY = "bestbuy"
CSV = "csv"
# A description longer than this is cut (the text encoder reads 256 tokens at most).
DESCRIPTION_CHARS = 1000

_GOOGLE_LINE = re.compile(r"^(\d+)\s+-\s+(.*)$")
_GOOGLE_VERSION = re.compile(r"version:?\s*(\S+)", re.IGNORECASE)


class TaxonomyFormatError(ValueError):
    """The file as a whole is not a taxonomy this module reads."""


@dataclass(frozen=True)
class SkippedEntry:
    """An entry that names no category: where it is (line, or position in the array) and why."""

    position: int
    reason: str


@dataclass
class Taxonomy:
    """A taxonomy file as read: its category paths, in file order, and what was skipped."""

    format: str
    version: str | None
    paths: list[str]
    skipped: list[SkippedEntry] = field(default_factory=list)
    # Path -> what the category is, for the entries whose file says (CSV only).
    descriptions: dict[str, str] = field(default_factory=dict)


@dataclass
class TaxonomyReport:
    format: str
    version: str | None
    entries: int  # categories the file lists (skipped ones not included)
    nodes: int  # distinct paths in the tree they make, ancestors included
    added: int
    existing: int
    depth: int
    per_level: dict[int, int]  # nodes at each depth, 1 = top level
    # Paths listed more than once (Best Buy lists a few under two ids), and ancestors the
    # file never lists as entries of their own but its paths need.
    duplicates: int = 0
    implied: int = 0
    skipped: list[SkippedEntry] = field(default_factory=list)
    # Categories whose stored description this load set or changed.
    described: int = 0


def read_taxonomy(path: Path) -> Taxonomy:
    """Read ``path`` in whichever of the two formats its content is."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        content = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise TaxonomyFormatError(f"{path}: not UTF-8 text ({exc})") from exc
    if content.lstrip().startswith("["):
        return _read_bestbuy(path, content)
    if _has_path_header(content):
        return _read_csv(path, content)
    return _read_google(path, content)


def _has_path_header(content: str) -> bool:
    """Whether the first non-blank line is a CSV header naming a ``path`` column."""
    first = next((line for line in content.splitlines() if line.strip()), "")
    return "path" in (f.strip().lower() for f in next(csv.reader([first]), []))


def _read_csv(path: Path, content: str) -> Taxonomy:
    taxonomy = Taxonomy(CSV, None, [])
    reader = csv.DictReader(io.StringIO(content))
    reader.fieldnames = [f.strip().lower() for f in reader.fieldnames or []]
    for row in reader:
        line = reader.line_num
        names = [part.strip() for part in (row.get("path") or "").split(">")]
        problem = _path_problem(names)
        if problem:
            taxonomy.skipped.append(SkippedEntry(line, problem))
            continue
        category = SEPARATOR.join(names)
        taxonomy.paths.append(category)
        synonyms = [s.strip() for s in re.split(r"[;|]", row.get("synonyms") or "") if s.strip()]
        words = " ".join((row.get("description") or "").split())
        described = ". ".join(p for p in (words, ", ".join(synonyms)) if p)
        if described:
            taxonomy.descriptions[category] = described[:DESCRIPTION_CHARS]
    if not taxonomy.paths:
        raise TaxonomyFormatError(
            f"{path}: a CSV with a `path` column but no categories in it (`A > B > C` a row)"
        )
    return taxonomy


def _read_google(path: Path, content: str) -> Taxonomy:
    taxonomy = Taxonomy(GOOGLE, None, [])
    for number, line in enumerate(content.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            found = _GOOGLE_VERSION.search(line)
            if found and taxonomy.version is None:
                taxonomy.version = found.group(1)
            continue
        matched = _GOOGLE_LINE.match(line)
        category = matched.group(2) if matched else line
        names = [part.strip() for part in category.split(">")]
        problem = _path_problem(names)
        if problem:
            taxonomy.skipped.append(SkippedEntry(number, problem))
            continue
        taxonomy.paths.append(SEPARATOR.join(names))
    if not taxonomy.paths:
        raise TaxonomyFormatError(
            f"{path}: no categories found; expected Google's taxonomy (`id - A > B > C` lines) "
            "or Best Buy's categories JSON array"
        )
    return taxonomy


def _read_bestbuy(path: Path, content: str) -> Taxonomy:
    try:
        data = json.loads(content)
    except json.JSONDecodeError as exc:
        raise TaxonomyFormatError(
            f"{path}: starts like a JSON array but is not JSON ({exc})"
        ) from exc
    taxonomy = Taxonomy(BESTBUY, None, [])
    for position, entry in enumerate(data, start=1):
        steps = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(steps, list) or not steps:
            taxonomy.skipped.append(SkippedEntry(position, "no `path` list of {id, name}"))
            continue
        names = [_step_name(step) for step in steps]
        problem = _path_problem(names)
        if problem:
            ids = "/".join(str(step.get("id")) for step in steps if isinstance(step, dict))
            taxonomy.skipped.append(SkippedEntry(position, f"{ids}: {problem}"))
            continue
        taxonomy.paths.append(SEPARATOR.join(names))
    if not taxonomy.paths:
        raise TaxonomyFormatError(
            f"{path}: a JSON array without categories; expected Best Buy's categories.json "
            "(objects with a `path` list of {id, name})"
        )
    return taxonomy


def _step_name(step: object) -> str:
    name = step.get("name") if isinstance(step, dict) else None
    return name.strip() if isinstance(name, str) else ""


def _path_problem(names: list[str]) -> str | None:
    if not all(names):
        return "a category on its path has no name"
    if any(">" in name for name in names):
        return "a name contains '>', which separates levels"
    return None


DESCRIBE_SQL = text(
    """
    UPDATE categories c SET description = given.description
    FROM unnest(CAST(:paths AS text[]), CAST(:descriptions AS text[]))
         AS given (path, description)
    WHERE c.path = given.path AND c.description IS DISTINCT FROM given.description
    """
)
"""Sets every description the file gives in one statement; its row count is how many
it set or changed."""


def import_taxonomy(engine: Engine, path: Path) -> TaxonomyReport:
    """Load the taxonomy at ``path`` into the catalog's categories, in one transaction."""
    taxonomy = read_taxonomy(path)
    counts = Counter(taxonomy.paths)
    listed = set(counts)
    nodes = with_ancestors(listed)
    with engine.begin() as conn:
        added = ensure_categories(conn, nodes)
        given = sorted(taxonomy.descriptions.items())
        described = conn.execute(
            DESCRIBE_SQL,
            {"paths": [p for p, _ in given], "descriptions": [d for _, d in given]},
        ).rowcount
    per_level = Counter(len(node.split(SEPARATOR)) for node in nodes)
    report = TaxonomyReport(
        format=taxonomy.format,
        version=taxonomy.version,
        entries=len(taxonomy.paths),
        nodes=len(nodes),
        added=added,
        existing=len(nodes) - added,
        depth=max(per_level),
        per_level=dict(sorted(per_level.items())),
        duplicates=sum(n - 1 for n in counts.values()),
        implied=len(nodes - listed),
        skipped=taxonomy.skipped,
        described=described,
    )
    log.info(
        "taxonomy %s (%s %s): %d nodes, %d added, %d existing, %d described, depth %d, "
        "%d skipped",
        path, report.format, report.version or "", report.nodes, report.added,
        report.existing, report.described, report.depth, len(report.skipped),
    )  # fmt: skip
    return report
