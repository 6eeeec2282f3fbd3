"""Ground truth from people: label CSVs (``shelver label``) and review of uncertain products.

Only ``label_id``/``label_source`` are written here, never the model's columns;
the products trigger timestamps every label change (``labeled_at``), which is
what scheduled retraining counts. A label given in review is the strongest
word: a CSV does not overwrite it.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from shelver.catalog.categories import category_ids, ensure_categories, is_valid_path
from shelver.catalog.importer import Rejection

log = logging.getLogger(__name__)

CSV_SOURCE = "label"
REVIEW_SOURCE = "review"


class LabelFileError(ValueError):
    """The label file cannot be read at all; the message says what is wrong with it."""


@dataclass
class LabelReport:
    labeled: int = 0
    unchanged: int = 0
    kept_review: int = 0
    categories_created: int = 0
    problems: list[Rejection] = field(default_factory=list)


APPLY_LABEL_SQL = text(
    """
    UPDATE products
    SET label_id = :category_id, label_source = :source
    WHERE sku = :sku
      AND (label_id, label_source) IS DISTINCT FROM (:category_id, :source)
      AND (:source = 'review' OR label_source IS DISTINCT FROM 'review')
    RETURNING id
    """
)
"""One product's label. A no-op when already so (no new labeled_at), and a CSV
never overwrites a reviewer's label. Row lock on that product until commit."""


def _read_rows(path: Path) -> list[tuple[int, str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = {name.strip().lower() for name in reader.fieldnames or []}
            if not {"sku", "category"} <= fields:
                raise LabelFileError(
                    f"{path} needs a header with `sku` and `category` columns, found "
                    f"{sorted(fields)}"
                )
            rows = []
            for record in reader:
                record = {k.strip().lower(): (v or "").strip() for k, v in record.items() if k}
                rows.append((reader.line_num, record["sku"], record["category"]))
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelFileError(f"cannot read {path}: {exc}") from exc


def apply_label_file(engine: Engine, path: Path, *, create_categories: bool = False) -> LabelReport:
    """Apply a ``sku,category`` CSV in one transaction; bad lines reported, good ones applied."""
    report = LabelReport()
    rows = _read_rows(path)
    with Session(engine) as db, db.begin():
        names = {category for _, _, category in rows if category}
        if create_categories:
            # A path with an empty level cannot be created; it is reported below as unknown.
            report.categories_created = ensure_categories(db, filter(is_valid_path, names))
        categories = category_ids(db, names)
        known = set(
            db.execute(
                text("SELECT sku FROM products WHERE sku = ANY(CAST(:s AS text[]))"),
                {"s": [sku for _, sku, _ in rows]},
            ).scalars()
        )
        for line, sku, category in rows:
            problem = _problem(sku, category, known, categories)
            if problem:
                report.problems.append(Rejection(line, problem))
                continue
            changed = db.execute(
                APPLY_LABEL_SQL,
                {"sku": sku, "category_id": categories[category], "source": CSV_SOURCE},
            ).first()
            if changed:
                report.labeled += 1
            elif _has_review_label(db, sku):
                report.kept_review += 1
            else:
                report.unchanged += 1
    log.info("labels from %s: %s", path, report)
    return report


def _problem(sku: str, category: str, known: set[str], categories: dict[str, int]) -> str | None:
    if not sku:
        return "empty sku"
    if not category:
        return f"sku {sku!r}: empty category"
    if sku not in known:
        return f"unknown sku {sku!r}"
    if category not in categories:
        return (
            f"unknown category {category!r} (create it with --create-categories, "
            "or check the spelling)"
        )
    return None


def _has_review_label(db: Session, sku: str) -> bool:
    return bool(
        db.execute(
            text("SELECT 1 FROM products WHERE sku = :sku AND label_source = 'review'"),
            {"sku": sku},
        ).first()
    )


@dataclass(frozen=True)
class ReviewItem:
    sku: str
    name: str
    predicted: str | None
    confidence: float | None
    top_k: list[dict]


def needs_review(engine: Engine, limit: int = 20) -> list[ReviewItem]:
    """The least confident products waiting for a person, with the model's top guesses."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                """
                SELECT p.sku, p.name, c.path, p.confidence, coalesce(h.top_k, '[]')
                FROM products p
                LEFT JOIN categories c ON c.id = p.predicted_id
                LEFT JOIN predictions h
                       ON h.product_id = p.id AND h.model_version_id = p.model_version_id
                      AND h.content_hash = p.content_hash
                WHERE p.status = 'needs_review'
                ORDER BY p.confidence NULLS FIRST, p.id
                LIMIT :limit
                """
            ),
            {"limit": limit},
        ).all()
    return [ReviewItem(*row) for row in rows]


class ReviewError(ValueError):
    """A correction names an unknown product or category."""


REVIEW_SQL = text(
    """
    UPDATE products
    SET label_id = :category_id, label_source = 'review', labeled_by = :labeled_by,
        status = CASE WHEN status = 'needs_review' THEN 'classified' ELSE status END
    WHERE sku = :sku
    RETURNING id
    """
)
"""A person's verdict on one product; row lock on it until the caller commits."""


def apply_review(
    conn: Connection, sku: str, category: str, *, labeled_by: int | None = None
) -> int:
    """A person's verdict, in the caller's transaction: the label, who gave it, and the
    product no longer waits for review. Returns the product's id.

    The status becomes ``classified`` because a person has now decided; the
    model's own prediction stays as it was, for the record and for evaluation.
    ``labeled_by`` is the web user who decided (None from the terminal).
    """
    category_id = category_ids(conn, [category]).get(category)
    if category_id is None:
        raise ReviewError(f"unknown category {category!r}")
    product_id = conn.execute(
        REVIEW_SQL, {"category_id": category_id, "sku": sku, "labeled_by": labeled_by}
    ).scalar_one_or_none()
    if product_id is None:
        raise ReviewError(f"unknown sku {sku!r}")
    return product_id


def record_review(engine: Engine, sku: str, category: str) -> None:
    """``apply_review`` in a transaction of its own."""
    with engine.begin() as conn:
        apply_review(conn, sku, category)
