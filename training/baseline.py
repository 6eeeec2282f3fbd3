"""The bar every fusion model must clear: TF-IDF word + char n-grams and logistic regression.

Fitted on the same training rows as the fusion model (train + validation: the baseline
has no early stopping to feed) and scored on the same test rows, so the comparison in
the training report is like for like. Training-side only (scikit-learn).

API:
    baseline = fit_baseline(train_texts, train_labels, seed=0)
    probs = baseline.predict_proba(test_texts)      # columns in baseline.labels order
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline


@dataclass
class Baseline:
    pipeline: Pipeline
    labels: list[str]

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return self.pipeline.predict_proba(list(texts))

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.labels[k] for k in self.predict_proba(texts).argmax(axis=1)]


def fit_baseline(texts: Sequence[str], labels: Sequence[str], seed: int = 0) -> Baseline:
    """A strong, standard text baseline; C=10 because TF-IDF rows are L2-normalized and
    the default C=1 underfits short product titles badly."""
    features = FeatureUnion(
        [
            ("word", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)),
            (
                "char",
                TfidfVectorizer(
                    analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, min_df=2
                ),
            ),
        ]
    )
    classifier = LogisticRegression(
        C=10.0, max_iter=3000, class_weight="balanced", random_state=seed
    )
    pipeline = Pipeline([("tfidf", features), ("lr", classifier)])
    pipeline.fit(list(texts), list(labels))
    return Baseline(pipeline=pipeline, labels=[str(c) for c in pipeline.classes_])
