"""Train / validation / test splits: stratified by label, optionally grouped, fixed seed.

Grouping matters where one product appears as several near-identical rows (PriceRunner
merchant offers): a random split puts copies of a test product in training and
flatters every model. ``title_prefix_groups`` approximates product identity when no
cluster id is known.

API:
    split = stratified_split(labels, test_size=0.2, val_size=0.15, seed=0, groups=None)
    split.train, split.val, split.test  -> sorted int64 row indices
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

_TOKEN = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def title_prefix_groups(names: Sequence[str], words: int = 3) -> list[str]:
    """A stand-in for product identity: the first ``words`` lower-case alnum tokens.

    Offers of one product mostly start alike ("apple iphone 7 32gb ..."), so this keeps
    many near-duplicates together; it misses reordered titles, so a grouped score is
    still somewhat optimistic.
    """
    return [" ".join(_TOKEN.findall(name.lower())[:words]) for name in names]


def _grouped_holdout(
    y: np.ndarray, groups: np.ndarray, rows: np.ndarray, size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    folds = max(2, round(1 / size))
    kfold = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    keep, hold = next(kfold.split(np.zeros(len(rows)), y[rows], groups[rows]))
    return rows[keep], rows[hold]


def stratified_split(
    labels: Sequence[str],
    test_size: float = 0.2,
    val_size: float = 0.15,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> Split:
    """Hold out ``test_size`` of rows, then ``val_size`` of the rest, per label.

    With ``groups``, all rows of a group land on one side (sizes then are approximate).
    """
    y = np.asarray(labels)
    rows = np.arange(len(y))
    if groups is None:
        rest, test = train_test_split(rows, test_size=test_size, stratify=y, random_state=seed)
        train, val = train_test_split(rest, test_size=val_size, stratify=y[rest], random_state=seed)
    else:
        g = np.asarray(groups)
        rest, test = _grouped_holdout(y, g, rows, test_size, seed)
        train, val = _grouped_holdout(y, g, rest, val_size, seed)
    return Split(train=np.sort(train), val=np.sort(val), test=np.sort(test))
