"""The model ``shelver train`` would deploy against the baseline, on held-out-like rows.

For each seed: hold out rows the way the shared data's README says its hidden part
was drawn (``train_recipes.heldout_split``), give every other row to ``train()``
exactly as ``shelver train`` does (title-prefix groups, default recipe, so its own
test split and the refit of the linear part on every given row), and score the
*served* artifact on the held-out rows. The baseline is fitted on every given row.
This is the comparison a user of the catalog sees; train_recipes.py compares the
recipes on equal training rows instead.

    PYTHONPATH=. .venv/bin/python benchmarks/deployed.py bestbuy --seeds 0,1,2
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import f1_score
from train_recipes import heldout_split, load

from shelver.training.baseline import fit_baseline
from shelver.training.fit import TrainParams, train
from shelver.training.splits import title_prefix_groups
from shelver.worker.fusion import FusionModel


def macro_f1(truth: list[str], labels: list[str], probs: np.ndarray) -> float:
    return f1_score(truth, [labels[k] for k in probs.argmax(axis=1)], average="macro")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    data = load(args.dataset)
    data.groups = title_prefix_groups(data.inputs.names)  # what training/dataset.py passes
    print("seed  held  baseline  deployed  evaluated  train_s")
    diffs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        split = heldout_split(args.dataset, data, seed)
        given = data.subset(np.concatenate([split.train, split.val]))
        held = data.subset(split.test)
        result = train(given, TrainParams())
        served = FusionModel.from_artifact(result.artifact, result.sha256)
        evaluated = FusionModel.from_artifact(result.eval_artifact, result.eval_sha256)
        baseline = fit_baseline(given.inputs.texts, given.labels, seed=seed)

        ours = macro_f1(held.labels, served.labels, served.predict(held.inputs))
        before_refit = macro_f1(held.labels, evaluated.labels, evaluated.predict(held.inputs))
        base = macro_f1(held.labels, baseline.labels, baseline.predict_proba(held.inputs.texts))
        diffs.append(ours - base)
        print(
            f"{seed:4d} {len(held.labels):5d} {base:9.4f} {ours:9.4f} {before_refit:10.4f} "
            f"{result.metrics['train_seconds']:8.0f}",
            flush=True,
        )
    d = np.asarray(diffs)
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
    print(f"deployed - baseline: {d.mean():+.4f} ± {se:.4f}, ahead on {(d > 0).sum()}/{len(d)}")


if __name__ == "__main__":
    main()
