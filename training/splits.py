"""Train / validation / test splits: stratified by label, optionally grouped, fixed seed.

Grouping matters where one product appears as several near-identical rows (PriceRunner
merchant offers): a random split puts copies of a test product in training and
flatters every model. ``title_prefix_groups`` approximates product identity when no
cluster id is known.

A grouped split is also *stable*: a group's side is a hash of (seed, group), not a
draw over the whole set, so when the catalog grows between two training runs a row
that was held out stays held out. That is what lets the registry gate score the
champion on the candidate's test rows: the champion never trained on them.

API:
    split = stratified_split(labels, test_size=0.2, val_size=0.15, seed=0, groups=None)
    split.train, split.val, split.test  -> sorted int64 row indices
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

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


def _unit_hash(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _stable_grouped(
    y: np.ndarray, groups: np.ndarray, test_size: float, val_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sides from a hash of each group: test below ``test_size``, then validation, then train.

    A label with at least three groups but no test (or validation) row gets its
    lowest-hash training group moved there, so small classes are still measured;
    only those few moves depend on the rest of the data.
    """
    u = np.array([_unit_hash(str(g), seed) for g in groups])
    side = np.where(u < test_size, 2, np.where(u < test_size + (1 - test_size) * val_size, 1, 0))
    for label in np.unique(y):
        mine = np.nonzero(y == label)[0]
        if len(np.unique(groups[mine])) < 3:
            continue
        for wanted in (2, 1):
            if (side[mine] == wanted).any():
                continue
            candidates = mine[side[mine] == 0]
            if len(candidates) == 0:
                continue
            group = groups[candidates[np.argmin(u[candidates])]]
            side[mine[groups[mine] == group]] = wanted
    rows = np.arange(len(y))
    return rows[side == 0], rows[side == 1], rows[side == 2]


def stratified_split(
    labels: Sequence[str],
    test_size: float = 0.2,
    val_size: float = 0.15,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> Split:
    """Hold out ``test_size`` of rows, then ``val_size`` of the rest, per label.

    With ``groups``, all rows of a group land on one side, chosen by a hash of the group
    (stable as the data grows; sizes then are approximate).
    """
    y = np.asarray(labels)
    rows = np.arange(len(y))
    if groups is None:
        rest, test = train_test_split(rows, test_size=test_size, stratify=y, random_state=seed)
        train, val = train_test_split(rest, test_size=val_size, stratify=y[rest], random_state=seed)
    else:
        train, val, test = _stable_grouped(y, np.asarray(groups), test_size, val_size, seed)
    return Split(train=np.sort(train), val=np.sort(val), test=np.sort(test))
