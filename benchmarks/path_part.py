"""Which choice of the path part costs the deep levels: its linear part alone, text only.

For each seed, one split that copies the hidden held-out part
(``train_recipes.heldout_split``); the vocabulary and the fits on train + validation
(as the served linear part is), scored on the test rows:

- ``baseline``: the issue's reference (TF-IDF + logistic regression, each full path
  one class, argmax path);
- the path part's logistic regression over the artifact's lexical bag, its class
  weights balanced per ``root`` (each path weighing as its top-level category) or per
  ``path`` (as the baseline), its table whole (``full``) or factored to each rank of
  ``--ranks`` (64 unless told: the factored rank up to 2026-12-07);
- combined with a flat linear model on the top-level categories the way the served
  tree is (``training.fit.tree_probs``), and decoded three ways: the walk the worker
  used first (``walk``: from the most probable root to the most probable child while
  a child is more likely than the node's own label), the most probable label
  (``argmax``), and ``LabelTree``'s leaf candidate today, the most probable label under
  the most probable root (``root_argmax``).

No embeddings, no network: a split takes a few minutes. Figures: docs/training.md,
"Labels at any depth".

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/path_part.py bestbuy --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from train_recipes import heldout_split, pack, read_rows

from shelver.training.baseline import fit_baseline
from shelver.training.dataset import TrainingData
from shelver.training.fit import (
    LinearModel,
    TrainParams,
    balanced_index,
    class_weights,
    factor,
    fit_linear,
    lexical_of,
    reads_photo_term,
    root_membership,
    tree_probs,
)
from shelver.training.hierarchy import hierarchical_metrics
from shelver.worker.inputs import ModelInputs
from shelver.worker.lexical import fit_vocabulary
from shelver.worker.tree import LabelTree, path_parts


def text_only(dataset: str) -> TrainingData:
    rows = read_rows(dataset)
    n = len(rows)
    inputs = ModelInputs(
        [pack(r["name"], r["description"]) for r in rows],
        [r["name"] for r in rows],
        np.zeros((n, 384), np.float32),
        np.zeros((n, 1280), np.float32),
        # heldout_split draws Best Buy's test rows among those with a photo.
        np.array([1.0 if r["image"] else 0.0 for r in rows], np.float32),
    )
    return TrainingData(
        inputs=inputs,
        labels=[r["category"] for r in rows],
        paths=[" > ".join(path_parts(r["category_path"])) for r in rows],
    )


def walk(tree: LabelTree, node_probs: np.ndarray) -> list[str]:
    """The first leaf candidate: down from the most probable root, each time to the most
    probable child, stopping where the node's own label is at least as likely."""
    out = []
    for row in node_probs:
        node = int(tree.roots[np.argmax(row[tree.roots])])
        while len(kids := tree.children[node]):
            best = int(kids[np.argmax(row[kids])])
            own = row[node] - row[kids].sum() if tree.self_label[node] >= 0 else 0.0
            if own >= row[best]:
                break
            node = best
        out.append(tree.nodes[node])
    return out


def decoded(tree: LabelTree, labels: list[str], probs: np.ndarray) -> dict[str, list[str]]:
    nodes = tree.node_probs(probs)
    return {
        "walk": walk(tree, nodes),
        "argmax": [labels[k] for k in probs.argmax(axis=1)],
        "root_argmax": [d.candidate for d in tree.decide_rows(nodes, [1.0])],
    }


def run(dataset: str, data: TrainingData, seed: int, ranks: list[int]) -> dict:
    split = heldout_split(dataset, data, seed)
    rest = data.subset(np.concatenate([split.train, split.val]))
    test = data.subset(split.test)
    out: dict = {"dataset": dataset, "seed": seed}

    def score(name: str, predicted: list[str]) -> None:
        m = hierarchical_metrics(test.paths, predicted)
        out[name] = {
            "hF": round(m["hierarchical"]["f1"], 4),
            "levels": [round(v["accuracy"], 3) for v in m["levels"].values()],
        }

    score("baseline", fit_baseline(rest.inputs.texts, rest.paths, seed=seed).predict(
        test.inputs.texts))  # fmt: skip
    vocab = fit_vocabulary(rest.inputs.texts, TrainParams().lexical, rest.inputs.names)
    # The path part reads the photo term, the top level does not (as fit_model does).
    photos = reads_photo_term(data)
    x_rest, x_test = lexical_of(vocab, rest, photos), lexical_of(vocab, test, photos)
    roots = sorted(set(rest.labels))
    top, _ = fit_linear(
        lexical_of(vocab, rest, False),
        np.array([roots.index(label) for label in rest.labels]),
        len(roots),
        10.0,
    )
    top_probs = top.predict_proba(lexical_of(vocab, test, False))
    labels = sorted(set(data.paths))
    y = np.array([labels.index(p) for p in rest.paths])
    membership = root_membership(labels, roots)
    tree = LabelTree(labels)
    for balance in ("root", "path"):
        weights = class_weights(y, len(labels), "balanced", balanced_index(labels, balance), True)
        whole, _ = fit_linear(x_rest, y, len(labels), 10.0, class_weight=weights)
        sizes = [("full", whole)]
        for rank in ranks:
            table, proj = factor(np.asarray(whole.coef, np.float32), rank, x_rest)
            sizes.append((str(rank), LinearModel(table, whole.bias, proj)))
        for size, linear in sizes:
            probs = tree_probs(top_probs, linear.predict_proba(x_test), membership)
            for decoder, predicted in decoded(tree, labels, probs).items():
                score(f"{balance}/{size}/{decoder}", predicted)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=("bestbuy", "flipkart"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ranks", default="64", help="e.g. 64,128")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    data = text_only(args.dataset)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        results.append(run(args.dataset, data, seed, ranks))
        print(json.dumps(results[-1]), flush=True)
    print("mean hF over seeds:")
    for name in (k for k in results[0] if k not in ("dataset", "seed")):
        print(f"  {name:24s} {np.mean([r[name]['hF'] for r in results]):.4f}")


if __name__ == "__main__":
    main()
