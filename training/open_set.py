"""Fitting the open-set gate (``worker.open_set``) where ``training.fit.train`` picks the
threshold: prototypes from the training rows, the floor from the validation rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shelver.training.dataset import TrainingData
from shelver.training.splits import Split
from shelver.worker.open_set import DEFAULT_KIND, OpenSetGate
from shelver.worker.tree import LabelTree, path_parts


def fit_open_set_gate(
    data: TrainingData,
    split: Split,
    labels: Sequence[str],
    val_probs: np.ndarray,
    threshold: float,
    kind: str = DEFAULT_KIND,
) -> OpenSetGate:
    """The gate of a model with ``labels`` (paths at any depth) whose validation
    probabilities are ``val_probs`` and whose top-level threshold is ``threshold``."""
    tree = LabelTree(list(labels))
    fit = data.subset(split.train)
    val = data.subset(split.val)
    fit_roots = [path_parts(p)[0] for p in (fit.paths or fit.labels)]
    return OpenSetGate.fit(
        kind,
        tree.root_names,
        fit.inputs.text_emb,
        fit_roots,
        val.inputs.text_emb,
        tree.root_probs(val_probs),
        threshold,
    )
