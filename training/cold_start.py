"""Scoring the zero-label scorer on a labeled file: what the worker serves without a champion.

``shelver evaluate`` calls this when the registry has no champion. The file's rows are
not written to the catalog; the catalog's categories (a loaded taxonomy) are what the
scorer chooses among. Every suggestion goes to review, so nothing is auto-accepted: the
figures say how good the suggestions in front of reviewers are.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine

from shelver.catalog.categories import normalize_path
from shelver.catalog.importer import ImportRecord, ImportReport, read_products, valid_rows
from shelver.catalog.settings import Settings
from shelver.training import registry
from shelver.training.evaluate import expected_calibration_error
from shelver.training.hierarchy import hierarchical_metrics, split_path
from shelver.worker.encoders import load_encoders
from shelver.worker.images import ImageUsage
from shelver.worker.inputs import DEFAULT_TEXT_PACKING, ProductContent, pack_texts
from shelver.worker.zero_label import MergedModel, ensure_zero_label_model

NO_TAXONOMY = (
    "there is no champion model and no category to suggest from; load a taxonomy "
    "(`shelver taxonomy import FILE`) or train a model (`shelver train`)"
)


def evaluate_zero_label_file(
    engine: Engine, path: Path, settings: Settings
) -> tuple[dict[str, Any], ImportReport]:
    """The zero-label scorer's figures on the labeled rows of ``path``, and what was rejected.

    ``unknown_categories`` counts rows whose true path is not a catalog category (they
    cannot be right); ``level1_ece`` compares the suggestion's confidence (its branch's
    probability) with how often its top level is right.
    """
    report = ImportReport()
    rows: list[ImportRecord] = [
        r for r in valid_rows(read_products(path, labeled=True), report) if r.category
    ]
    if not rows:
        raise ValueError(f"{path}: no labeled rows to evaluate")
    text_encoder, _ = load_encoders(settings.model_dir)
    model = ensure_zero_label_model(engine, text_encoder)
    if model is None:
        raise LookupError(NO_TAXONOMY)
    products = [ProductContent(0, "", r.name, r.description, None) for r in rows]
    vectors = text_encoder.encode(pack_texts(products, DEFAULT_TEXT_PACKING))
    verdicts = model.scorer.score(vectors)
    truth = [normalize_path(r.category) for r in rows if r.category]
    suggested = [v.category for v in verdicts]
    known = set(model.scorer.paths)
    right_top = np.array(
        [split_path(t)[0] == split_path(s)[0] for t, s in zip(truth, suggested, strict=True)]
    )
    ece, _ = expected_calibration_error(right_top, np.array([v.confidence for v in verdicts]))
    metrics: dict[str, Any] = {
        "scorer": "zero_label",
        "model": model.version,
        "categories": len(known),
        "n": len(rows),
        **hierarchical_metrics(truth, suggested),
        "level1_ece": ece,
        "auto_accepted": 0.0,
        "needs_review": 1.0,
        "unknown_categories": dict(Counter(t for t in truth if t not in known)),
        # Nothing is auto-accepted without a champion, unknown rows included.
        "unknown_auto_accepted": 0.0,
        "warnings": [],
    }
    return metrics, report


def evaluate_served(
    engine: Engine, path: Path, settings: Settings
) -> tuple[dict[str, Any], ImportReport, ImageUsage | None]:
    """Score on ``path`` what the worker would serve now (``zero_label.serving_classifier``):
    the champion, merged with the zero-label scorer when ``SHELVER_ZERO_LABEL_MERGE`` is on
    and the catalog has categories it was not trained on (``scorer``:
    ``champion+zero_label``, else ``champion``), or without a
    champion the zero-label scorer alone (``zero_label``)."""
    from shelver.training.holdout import champion_model, evaluate_file

    with engine.connect() as conn:
        has_champion = registry.champion(conn) is not None
    if not has_champion:
        figures, rejected = evaluate_zero_label_file(engine, path, settings)
        return figures, rejected, None
    record, model = champion_model(engine)
    metrics: dict[str, Any] = {"scorer": "champion", "model": record.version}
    if settings.zero_label_merge:
        text_encoder, _ = load_encoders(settings.model_dir)
        zero = ensure_zero_label_model(engine, text_encoder)
        merged = MergedModel(model, zero.scorer, text_encoder) if zero is not None else None
        if merged is not None and merged.unlabeled:
            model = merged
            metrics.update(
                scorer="champion+zero_label",
                zero_label_model=zero.version,
                unlabeled_categories=len(merged.unlabeled),
            )
    result = evaluate_file(model, path, settings)
    return {**metrics, **result.metrics}, result.rejected, result.images
