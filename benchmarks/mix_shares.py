"""Test macro-F1 of every fixed share of the linear part in the mix (an oracle view).

For each seed: the network (``linear_c=None``) and the logistic regression over the
TF-IDF bag are fitted once on the held-out-like split of train_recipes.py, and
``w * p_linear + (1 - w) * p_network`` is scored on test for w = 0, 0.1, ..., 1. No
real run can pick w on test; this shows which fixed share is safe across datasets.

    PYTHONPATH=. .venv/bin/python benchmarks/mix_shares.py flipkart --seeds 0,1,2 --name-weight 0
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from sklearn.metrics import f1_score
from train_recipes import heldout_split, load

from shelver.training.fit import TrainParams, fit_linear, fit_model, lexical_of, predict_keras
from shelver.worker.lexical import fit_vocabulary

SHARES = [k / 10 for k in range(11)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--name-weight", type=float, default=TrainParams().lexical.name_weight)
    args = parser.parse_args()
    data = load(args.dataset, args.dataset == "pricerunner")
    lexical = dataclasses.replace(TrainParams().lexical, name_weight=args.name_weight)
    print("seed " + " ".join(f"{w:>6.1f}" for w in SHARES))
    table = []
    for seed in (int(s) for s in args.seeds.split(",")):
        split = heldout_split(args.dataset, data, seed)
        fitted = fit_model(data, split, TrainParams(seed=seed, linear_c=None))
        labels = fitted.labels
        y = np.array([labels.index(label) for label in data.labels])
        rest_rows = np.concatenate([split.train, split.val])
        rest, test = data.subset(rest_rows), data.subset(split.test)
        vocabulary = fit_vocabulary(rest.inputs.texts, lexical, rest.inputs.names)
        linear, _ = fit_linear(
            lexical_of(vocabulary, rest, False),
            y[rest_rows],
            len(labels),
            10.0,
        )
        p_linear = linear.predict_proba(lexical_of(vocabulary, test, False))
        p_network = predict_keras(fitted, test)
        row = [
            f1_score(y[split.test], (w * p_linear + (1 - w) * p_network).argmax(1), average="macro")
            for w in SHARES
        ]
        table.append(row)
        print(f"{seed:4d} " + " ".join(f"{x:6.4f}" for x in row), flush=True)
    print("mean " + " ".join(f"{x:6.4f}" for x in np.mean(table, axis=0)))


if __name__ == "__main__":
    main()
