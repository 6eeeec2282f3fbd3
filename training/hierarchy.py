"""Metrics that fit a category tree: ancestor-set precision/recall/F1 and figures per level.

Paths are category paths (``A > B > C``). A prediction may stop above the true node (a
coarse answer, right as far as it goes) or go below it; each path counts as the set of
its prefixes, so a coarse answer earns partial credit and a wrong branch loses only the
levels it got wrong. A flat data set is a tree of depth 1: hierarchical precision,
recall and F1 then equal accuracy, and level 1 is the flat figures.

API:
    scores = hierarchical_metrics(true_paths, predicted_paths)
    scores["hierarchical"]  # {precision, recall, f1, path_accuracy}
    scores["levels"]        # {"1": {n, accuracy, macro_f1, coverage}, "2": ...}
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

Path = tuple[str, ...]


def split_path(path: str) -> Path:
    return tuple(part.strip() for part in path.split(">"))


def hierarchical_prf(true: Sequence[Path], predicted: Sequence[Path]) -> tuple[float, float, float]:
    """Micro-averaged ancestor-set precision, recall and F1 over rows.

    Each path stands for its non-empty prefixes; the shared prefixes of the true and the
    predicted path are the row's hits. Sums over rows, then divides (micro average).
    """
    hits = sum(_common_depth(t, p) for t, p in zip(true, predicted, strict=True))
    predicted_nodes = sum(len(p) for p in predicted)
    true_nodes = sum(len(t) for t in true)
    precision = hits / predicted_nodes if predicted_nodes else 0.0
    recall = hits / true_nodes if true_nodes else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def path_accuracy(true: Sequence[Path], predicted: Sequence[Path]) -> float:
    """Share of rows predicted at their true node or below it."""
    if not true:
        return 0.0
    right = sum(p[: len(t)] == t for t, p in zip(true, predicted, strict=True))
    return right / len(true)


def level_metrics(true: Sequence[Path], predicted: Sequence[Path], level: int) -> dict:
    """Level ``level`` (1 = top): rows whose true path has at least that many parts.

    Compares the first ``level`` parts. A prediction that stops above the level answers
    nothing there: it is wrong for accuracy, a miss for its true class's recall, and
    outside ``coverage`` (the share of these rows the prediction reaches).
    Macro-F1 averages over the classes present in the truth at this level.
    """
    rows = [(t[:level], p[:level]) for t, p in zip(true, predicted, strict=True) if len(t) >= level]
    n = len(rows)
    if not n:
        return {"n": 0, "accuracy": 0.0, "macro_f1": 0.0, "coverage": 0.0}
    support = Counter(t for t, _ in rows)
    answered = Counter(p for _, p in rows if len(p) == level)
    right = Counter(t for t, p in rows if t == p)
    f1s = []
    for label, count in support.items():
        tp = right[label]
        precision = tp / answered[label] if answered[label] else 0.0
        recall = tp / count
        f1s.append(2 * precision * recall / (precision + recall) if tp else 0.0)
    return {
        "n": n,
        "accuracy": sum(right.values()) / n,
        "macro_f1": sum(f1s) / len(f1s),
        "coverage": sum(answered.values()) / n,
    }


def hierarchical_metrics(true_paths: Sequence[str], predicted_paths: Sequence[str]) -> dict:
    """Every tree metric of predicted against true paths, JSON-able."""
    if len(true_paths) != len(predicted_paths):
        raise ValueError(f"{len(true_paths)} true paths but {len(predicted_paths)} predicted paths")
    true = [split_path(t) for t in true_paths]
    predicted = [split_path(p) for p in predicted_paths]
    precision, recall, f1 = hierarchical_prf(true, predicted)
    depth = max((len(t) for t in true), default=0)
    return {
        "hierarchical": {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "path_accuracy": path_accuracy(true, predicted),
        },
        "levels": {
            str(level): level_metrics(true, predicted, level) for level in range(1, depth + 1)
        },
    }


def _common_depth(a: Path, b: Path) -> int:
    depth = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        depth += 1
    return depth
