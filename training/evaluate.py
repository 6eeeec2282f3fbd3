"""Evaluation of a classifier's probabilities: the figures the registry and people read.

Owns the metrics (accuracy, macro-F1, per-class precision/recall/F1, ECE), the
auto-accept threshold (the lowest confidence whose accepted validation rows reach the
target precision), one per tree level for backoff, with the coverage they give on
test, and the report PNGs (confusion matrix, reliability diagram). Everything returned is JSON-able.

API:
    metrics = evaluate(y_true, probs, labels, threshold=t, report_dir=path)
    t = choose_threshold(y_val, probs_val, labels, target_precision=0.97)
    ts = choose_level_thresholds(paths_val, probs_val, labels, target_precision=0.97, deep_z=1.0)
    figures = backoff_metrics(paths_test, probs_test, labels, ts)

A packaged model is scored on labeled rows by ``training.holdout.score_model``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from shelver.worker.open_set import withdrawn
from shelver.worker.tree import LabelTree, path_parts

log = logging.getLogger(__name__)

ECE_BINS = 10


def _indices(y_true: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    index = {label: k for k, label in enumerate(labels)}
    unknown = sorted({y for y in y_true if y not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not among the model's classes")
    return np.array([index[y] for y in y_true], dtype=np.int64)


def expected_calibration_error(
    correct: np.ndarray, confidence: np.ndarray, bins: int = ECE_BINS
) -> tuple[float, list[dict]]:
    """ECE over equal-width confidence bins, with the bins for the reliability diagram."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Right-closed bins so confidence 1.0 lands in the last bin.
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        acc = float(correct[mask].mean()) if n else 0.0
        conf = float(confidence[mask].mean()) if n else 0.0
        ece += n / max(len(correct), 1) * abs(acc - conf)
        table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n,
                      "accuracy": acc, "confidence": conf})  # fmt: skip
    return float(ece), table


def choose_threshold(
    y_true: Sequence[str],
    probs: np.ndarray,
    labels: Sequence[str],
    target_precision: float = 0.97,
    class_balanced: bool = False,
) -> float:
    """Lowest confidence t such that rows with confidence >= t are right often enough.

    Scans candidate thresholds from the most confident row down and keeps the loosest
    one whose accepted set still meets ``target_precision``. If none does, returns a
    threshold above every seen confidence (accept nothing automatically) rather than
    silently accepting at a lower precision.

    ``class_balanced`` weighs each row by 1 / (rows of its true class), i.e. precision
    as if every category were equally common. Without it, a catalog that is mostly one
    easy category reaches any target at any threshold, and the rare categories, where
    the mistakes are, are never sent to review.
    """
    y = _indices(y_true, labels)
    weight = 1.0 / np.bincount(y, minlength=len(labels))[y] if class_balanced else None
    return loosest_threshold(probs.max(axis=1), probs.argmax(axis=1) == y, target_precision, weight)


def loosest_threshold(
    confidence: np.ndarray,
    correct: np.ndarray,
    target_precision: float,
    weight: np.ndarray | None = None,
) -> float:
    """The lowest t whose rows with ``confidence >= t`` are ``correct`` often enough
    (``weight`` per row, 1 by default); above every confidence when none is."""
    if len(confidence) == 0:
        return 1.0
    weight = np.ones(len(confidence)) if weight is None else weight
    order = np.argsort(-confidence, kind="stable")
    precision = np.cumsum((weight * correct)[order]) / np.cumsum(weight[order])
    ok = np.nonzero(precision >= target_precision)[0]
    if len(ok) == 0:
        return float(min(1.0, confidence.max() + 1e-6))
    last = ok[-1]
    # Ties: every row at the chosen confidence is accepted together, so step back to
    # the last position where the confidence strictly drops.
    threshold = confidence[order[last]]
    while last + 1 < len(order) and confidence[order[last + 1]] == threshold:
        last += 1
    if precision[last] < target_precision:
        threshold = np.nextafter(threshold, np.float32(2.0))
    return float(threshold)


def surest_threshold(
    confidence: np.ndarray, correct: np.ndarray, target_precision: float, z: float
) -> float:
    """The lowest t whose rows with ``confidence >= t`` have a Wilson lower bound (``z``
    standard errors) on their precision of at least ``target_precision``; above every
    confidence when none has. Asks more rows, the fewer there are: 40 rows all right
    bound precision at 0.976 with z 1, 20 rows at 0.952."""
    if len(confidence) == 0:
        return 1.0
    order = np.argsort(-confidence, kind="stable")
    n = np.arange(1, len(order) + 1)
    p = np.cumsum(np.asarray(correct, dtype=np.float64)[order]) / n
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lower = (p + z * z / (2 * n) - spread) / (1 + z * z / n)
    # Ties: every row at a confidence is accepted together, so only a position where the
    # confidence strictly drops can be the cut.
    ranked = confidence[order]
    last_of_tie = np.r_[ranked[1:] != ranked[:-1], True]
    ok = np.nonzero((lower >= target_precision) & last_of_tie)[0]
    if len(ok) == 0:
        return float(min(1.0, confidence.max() + 1e-6))
    return float(ranked[ok[-1]])


def choose_level_thresholds(
    true_paths: Sequence[str],
    probs: np.ndarray,
    labels: Sequence[str],
    target_precision: float = 0.97,
    class_balanced: bool = False,
    deep_z: float = 0.0,
) -> list[float]:
    """One auto-accept threshold per tree level, level 1 first (``worker.tree``).

    Level by level from the top, over the rows the worker would consider there: those
    whose leaf candidate reaches the level, whose true path does (a coarse label says
    nothing about the level below it) and whose levels above were accepted at the
    thresholds already chosen. A node is right when it is the true path's prefix;
    ``class_balanced`` weighs rows by 1 / (rows of their true node at this level), as
    ``choose_threshold`` does per category. The list stops at the first level with no
    such row: nothing deeper was measured, so nothing deeper is accepted.

    With ``deep_z`` > 0, every level below the top instead takes ``surest_threshold``
    over its rows unweighted: there validation holds tens of rows per node, and the
    point estimate at the loosest threshold landed below the target on test at 10 of 24
    (split, level) cells, against 6 of 22 with z 1 (docs/training.md, "Which path to
    name, which thresholds to accept at").

    A flat label set is a tree of depth 1, and its one threshold is
    ``choose_threshold``'s.
    """
    tree = LabelTree(labels)
    nodes = tree.node_probs(probs)
    truths = [path_parts(t) for t in true_paths]
    paths = tree.candidate_paths(nodes)
    open_rows = np.ones(len(truths), dtype=bool)
    thresholds: list[float] = []
    for level in range(1, tree.depth + 1):
        rows = [
            i for i in np.nonzero(open_rows)[0]
            if len(paths[i]) >= level and len(truths[i]) >= level
        ]  # fmt: skip
        if not rows:
            break
        confidence = np.array([nodes[i, paths[i][level - 1]] for i in rows])
        truth = [truths[i][:level] for i in rows]
        named = [path_parts(tree.nodes[paths[i][level - 1]]) for i in rows]
        correct = np.array([n == t for n, t in zip(named, truth, strict=True)])
        if level > 1 and deep_z > 0:
            threshold = surest_threshold(confidence, correct, target_precision, deep_z)
        else:
            weight = None
            if class_balanced:
                counts = Counter(truth)
                weight = np.array([1.0 / counts[t] for t in truth])
            threshold = loosest_threshold(confidence, correct, target_precision, weight)
        thresholds.append(threshold)
        open_rows[:] = False
        open_rows[[i for i, c in zip(rows, confidence, strict=True) if c >= threshold]] = True
    return thresholds or [1.0]


def backoff_metrics(
    true_paths: Sequence[str],
    probs: np.ndarray,
    labels: Sequence[str],
    thresholds: Sequence[float],
    admitted: np.ndarray | None = None,
) -> dict:
    """What backoff does at ``thresholds``: per level, how many rows were accepted there
    or deeper and how often the accepted node was right (only over rows whose true path
    reaches the level), and the share left for review. JSON-able. ``admitted``, as in
    ``evaluate``: a row the open-set gate refuses is accepted at no level, as in the
    worker."""
    tree = LabelTree(labels)
    nodes = tree.node_probs(probs)
    decisions = tree.decide_rows(nodes, thresholds)
    if admitted is not None:
        decisions = withdrawn(decisions, admitted)
    truths = [path_parts(t) for t in true_paths]
    levels = {}
    for level in range(1, len(thresholds) + 1):
        rows = [i for i, t in enumerate(truths) if len(t) >= level]
        accepted = [i for i in rows if decisions[i].accepted_level >= level]
        right = sum(
            path_parts(decisions[i].accepted)[:level] == truths[i][:level] for i in accepted
        )
        levels[str(level)] = {
            "threshold": float(thresholds[level - 1]),
            "n": len(rows),
            "coverage": len(accepted) / len(rows) if rows else 0.0,
            "precision": right / len(accepted) if accepted else None,
        }
    n = len(decisions)
    return {
        "levels": levels,
        "needs_review": sum(d.accepted is None for d in decisions) / n if n else 0.0,
        "candidates": [d.candidate for d in decisions],
        "accepted": [d.accepted for d in decisions],
    }


def evaluate(
    y_true: Sequence[str],
    probs: np.ndarray,
    labels: Sequence[str],
    threshold: float | None = None,
    report_dir: Path | None = None,
    prefix: str = "",
    admitted: np.ndarray | None = None,
) -> dict:
    """Metrics of ``probs`` (n, K; columns in ``labels`` order) against ``y_true``.

    ``admitted``: per row, whether the model's open-set gate lets an auto-accept stand
    (``worker.open_set``); ``coverage`` and ``precision_at_threshold`` then count the
    auto-accepts the worker would make, not every row over the threshold.
    """
    labels = list(labels)
    y = _indices(y_true, labels)
    pred = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    correct = pred == y
    p, r, f, support = precision_recall_fscore_support(
        y, pred, labels=range(len(labels)), zero_division=0
    )
    present = support > 0  # a class absent from this test set has no meaningful F1
    ece, bins = expected_calibration_error(correct, confidence)
    cm = confusion_matrix(y, pred, labels=range(len(labels)))
    metrics: dict = {
        "n": int(len(y)),
        "accuracy": float(correct.mean()) if len(y) else 0.0,
        "macro_f1": float(f[present].mean()) if present.any() else 0.0,
        "ece": ece,
        "per_class": {
            label: {
                "precision": float(p[k]),
                "recall": float(r[k]),
                "f1": float(f[k]),
                "support": int(support[k]),
            }  # fmt: skip
            for k, label in enumerate(labels)
        },
        "confusion_matrix": cm.tolist(),
        "labels": labels,
        "reliability": bins,
    }
    if threshold is not None:
        accepted = confidence >= threshold
        if admitted is not None:
            accepted &= np.asarray(admitted, dtype=bool)
        metrics["threshold"] = float(threshold)
        metrics["coverage"] = float(accepted.mean()) if len(y) else 0.0
        metrics["precision_at_threshold"] = (
            float(correct[accepted].mean()) if accepted.any() else None
        )
    if report_dir is not None:
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        cm_png = _plot_confusion(cm, labels, report_dir / f"{prefix}confusion_matrix.png")
        rel_png = _plot_reliability(bins, ece, report_dir / f"{prefix}reliability.png")
        metrics["plots"] = {"confusion_matrix": str(cm_png), "reliability": str(rel_png)}
    return metrics


def _plot_confusion(cm: np.ndarray, labels: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on workers or CI
    import matplotlib.pyplot as plt

    # Row-normalized: with 300:1 imbalance raw counts hide every small class.
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if cm[i, j]:
                color = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    ax.set_title("Confusion matrix (counts; color = row share)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_reliability(bins: list[dict], ece: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    width = bins[0]["hi"] - bins[0]["lo"] if bins else 0.1
    acc = [b["accuracy"] if b["n"] else 0.0 for b in bins]
    ax.bar(centers, acc, width=width * 0.95, edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    for c, b in zip(centers, bins, strict=True):
        if b["n"]:
            ax.text(c, 0.02, str(b["n"]), ha="center", fontsize=7, rotation=90)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"Reliability (ECE {ece:.3f}; bar labels = rows)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
