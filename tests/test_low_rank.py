"""The linear part learned as low-rank factors above ``linear_exact_classes`` classes.

Small synthetic rows: no encoders, database or network.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from shelver.training.fit import LowRankEstimator, fit_linear


def separable(n_per_class: int = 30, classes: int = 12, seed: int = 0):
    """Each class has two telling terms among shared noise terms."""
    rng = np.random.default_rng(seed)
    vocab = 2 * classes + 40
    rows, cols, vals, y = [], [], [], []
    for i in range(n_per_class * classes):
        k = i % classes
        terms = [2 * k, 2 * k + 1, *(2 * classes + rng.choice(40, size=5, replace=False))]
        rows += [i] * len(terms)
        cols += terms
        vals += list(rng.uniform(0.5, 1.0, size=len(terms)))
        y.append(k)
    x = sp.csr_matrix((vals, (rows, cols)), shape=(len(y), vocab), dtype=np.float32)
    return x, np.array(y)


def test_low_rank_factors_are_learned_directly_and_classify():
    x, y = separable()
    # 13 classes, the last absent from the rows: it must never be predicted.
    linear, estimator = fit_linear(x, y, 13, c=10.0, rank=4, class_weight={}, exact_classes=8)
    assert isinstance(estimator, LowRankEstimator)
    assert linear.coef.shape == (x.shape[1], 4) and linear.proj.shape == (4, 13)
    probs = linear.predict_proba(x)
    assert (probs.argmax(axis=1) == y).mean() > 0.95
    assert probs[:, 12].max() < 1e-6
    # At or below the switch the same call is the exact fit: whole, or factored
    # afterwards to ``exact_rank``.
    whole, exact = fit_linear(x, y, 13, c=10.0, rank=4, class_weight={}, exact_classes=13)
    assert not isinstance(exact, LowRankEstimator)
    assert whole.coef.shape == (x.shape[1], 13) and whole.proj is None
    factored, _ = fit_linear(
        x, y, 13, c=10.0, rank=4, class_weight={}, exact_classes=13, exact_rank=6
    )
    assert factored.coef.shape == (x.shape[1], 6) and factored.proj.shape == (6, 13)


def test_low_rank_warm_start_starts_from_the_earlier_factors():
    x, y = separable()
    first, estimator = fit_linear(x, y, 12, c=10.0, rank=4, class_weight={}, exact_classes=8)
    warm, _ = fit_linear(
        x, y, 12, c=10.0, estimator=estimator, rank=4, class_weight={}, exact_classes=8
    )
    # A few warm epochs stay near the first solution (a cold start begins at random).
    assert np.abs(warm.proj - first.proj).mean() < 0.5 * np.abs(first.proj).mean()
    assert (warm.predict_proba(x).argmax(axis=1) == y).mean() > 0.95
