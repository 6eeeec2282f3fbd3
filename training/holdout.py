"""Scoring a packaged model on labeled rows it may not fully know.

The gate compares champion and candidate with this, and ``shelver evaluate``
reports it. A row whose category the model has never seen cannot be right:
it counts as an error, its class scores F1 0, and it is also listed apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine

from shelver.catalog.categories import top_level
from shelver.catalog.importer import ImportRecord, ImportReport, read_products, valid_rows
from shelver.catalog.settings import Settings
from shelver.training.dataset import TrainingData
from shelver.training.evaluate import evaluate
from shelver.training.hierarchy import hierarchical_metrics
from shelver.worker.encoders import load_encoders
from shelver.worker.featurize import embed_products
from shelver.worker.fusion import FusionModel
from shelver.worker.images import ImageUsage
from shelver.worker.inputs import ProductContent


def score_predictions(
    y_true: Sequence[str],
    probs: np.ndarray,
    model_labels: Sequence[str],
    threshold: float,
    admitted: np.ndarray | None = None,
) -> dict[str, Any]:
    """``training.evaluate.evaluate``, with categories the model lacks scored as misses.

    Unknown categories become extra columns of probability zero: never
    predicted, so their rows count as errors and their recall and F1 are 0.
    ``admitted``: per row, whether the model's open-set gate lets an auto-accept stand
    (``worker.open_set``); ``coverage``, ``precision_at_threshold`` and the open-set
    figures count only those, as the worker accepts.
    """
    unknown = Counter(y for y in y_true if y not in set(model_labels))
    labels = list(model_labels) + sorted(unknown)
    probs = np.asarray(probs, dtype=np.float64)
    padded = np.hstack([probs, np.zeros((len(probs), len(unknown)))])
    metrics = evaluate(list(y_true), padded, labels, threshold=threshold, admitted=admitted)
    metrics["unknown_categories"] = dict(unknown)
    # Open-set safety: of the rows whose category the model never saw, the share it
    # would have auto-accepted anyway (necessarily into a wrong category).
    is_unknown = np.array([y in unknown for y in y_true], dtype=bool)
    accepted = probs.max(axis=1) >= threshold
    if admitted is not None:
        refused = accepted & ~np.asarray(admitted, dtype=bool)
        metrics["open_set_gate"] = {
            "refused": int(refused.sum()),
            "refused_known": int(refused[~is_unknown].sum()),
            "coverage": float((accepted & ~refused).mean()),
        }
        accepted &= ~refused
    metrics["unknown_auto_accepted"] = (
        float(accepted[is_unknown].mean()) if is_unknown.any() else None
    )
    return metrics


def score_model(
    model: FusionModel, data: TrainingData, rows: Sequence[int] | None = None
) -> dict[str, Any]:
    """Score ``model`` on labeled inputs, or on ``rows`` of them (e.g. the test split).

    The gate compares models this way, on the top level whatever depth the model's
    labels have (``worker.tree``); the model's own threshold and open-set gate give the
    coverage.
    """
    if rows is not None:
        data = data.subset(np.asarray(rows))
    tree = model.tree
    probs = tree.root_probs(model.predict(data.inputs))
    return score_predictions(
        data.labels,
        probs,
        tree.root_names,
        model.threshold,
        admitted_by(model, data.inputs.text_emb, probs),
    )


def admitted_by(
    model: FusionModel, text_emb: np.ndarray, root_probs: np.ndarray
) -> np.ndarray | None:
    """Per row, whether ``model``'s open-set gate lets an auto-accept stand; None
    without a gate (an older artifact: every auto-accept stands)."""
    gate = model.open_set
    return None if gate is None else gate.admits(text_emb, root_probs, model.tree.root_names)


@dataclass
class FileEvaluation:
    metrics: dict[str, Any]
    rejected: ImportReport
    images: ImageUsage


def evaluate_file(model: FusionModel, path: Path, settings: Settings) -> FileEvaluation:
    """Score ``model`` on a labeled file, without writing its rows to the catalog.

    The flat figures compare top levels (the model's labels summed to their roots);
    ``hierarchical`` and ``levels`` compare the rows' whole paths with the model's leaf
    candidates (``worker.tree``).
    """
    report = ImportReport()
    rows: list[ImportRecord] = [
        r for r in valid_rows(read_products(path, labeled=True), report) if r.category
    ]
    if not rows:
        raise ValueError(f"{path}: no labeled rows to evaluate")
    text_encoder, image_encoder = load_encoders(settings.model_dir)
    # Not in the catalog: no id (made-up negative ones) and no content hash to cache under.
    products = [
        ProductContent(-(i + 1), "", r.name, r.description, r.image_uri) for i, r in enumerate(rows)
    ]
    features = embed_products(
        None, products, text_encoder, image_encoder, settings, text_packing=model.text_packing
    )
    probs = model.predict(features.inputs)
    tree = model.tree
    paths = [r.category for r in rows if r.category]
    root_probs = tree.root_probs(probs)
    admitted = admitted_by(model, features.inputs.text_emb, root_probs)
    metrics = score_predictions(
        [top_level(path) for path in paths], root_probs, tree.root_names, model.threshold, admitted
    )
    nodes = tree.node_probs(probs)
    metrics.update(hierarchical_metrics(paths, [d.candidate for d in tree.decide_rows(nodes, [])]))
    metrics["images"] = features.images.as_dict()
    metrics["warnings"] = [w for w in [features.images.text_only_warning()] if w]
    return FileEvaluation(metrics, report, features.images)


def champion_model(engine: Engine) -> tuple[Any, FusionModel]:
    from shelver.training import registry

    with engine.connect() as conn:
        record = registry.champion(conn)
        if record is None:
            raise LookupError("there is no champion model yet; run `shelver train` first")
        artifact = registry.artifact_of(conn, record.id)
    return record, FusionModel.from_artifact(artifact, record.sha256)
