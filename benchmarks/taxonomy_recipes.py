"""Labels at any depth: the tree model against the flat ones, on held-out-like splits.

For each dataset and seed, one split that copies the hidden held-out part (Best Buy:
20% of the rows with an image, stratified by top-level category; Flipkart: 20%
stratified; validation 15% of the rest; ``train_recipes.heldout_split``), then:

- ``path_baseline``: the issue's reference, TF-IDF + logistic regression with each full
  path as one class (training/baseline.py on the paths), its argmax path;
- ``flat``: today's default model on top-level labels (top-level figures only);
- ``tree`` (rank r / full): the default recipe trained on every labeled path, its
  linear table factored to rank r or kept whole (``TrainParams(linear_exact_rank=r)``;
  these sets have fewer paths than ``linear_exact_classes``), scored through
  ``worker.tree``: the leaf candidate for hF and the levels, the roots for top-level
  macro-F1, and backoff at the per-level thresholds chosen on validation for precision
  0.97 (precision and coverage of the accepted nodes per level, share left for review).

Embeddings come from ``train_recipes``' cache (SHELVER_BENCH_CACHE).

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/taxonomy_recipes.py \
        --datasets bestbuy,flipkart --seeds 0,1,2 --ranks 64,full

``--photo-weights 0,0.5`` compares values of ``LexicalParams.photo_weight`` (the photo
term) in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score
from train_recipes import heldout_split, load, read_rows

from shelver.training.baseline import fit_baseline
from shelver.training.dataset import TrainingData
from shelver.training.evaluate import backoff_metrics
from shelver.training.fit import TrainParams, fit_model, level_thresholds_for, predict_keras
from shelver.training.hierarchy import hierarchical_metrics
from shelver.worker.tree import LabelTree, path_parts


def with_paths(dataset: str) -> TrainingData:
    data = load(dataset)
    paths = [r["category_path"] for r in read_rows(dataset)]
    return dataclasses.replace(data, paths=paths)


def top_macro_f1(truth: list[str], predicted: list[str]) -> float:
    return float(f1_score(truth, predicted, average="macro"))


def score_tree(data: TrainingData, split, params: TrainParams, save: Path | None = None) -> dict:
    started = time.perf_counter()
    fitted = fit_model(data, split, params)
    seconds = time.perf_counter() - started
    val, test = data.subset(split.val), data.subset(split.test)
    probs = predict_keras(fitted, test)
    tree = LabelTree(fitted.labels)
    thresholds = level_thresholds_for(val.paths, fitted.val_probs, fitted.labels, params)
    if save is not None:
        # Decoders and threshold rules can then be compared on the same fits, offline.
        save.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            save, labels=np.array(fitted.labels), val_probs=fitted.val_probs,
            val_paths=np.array(val.paths), test_probs=probs, test_paths=np.array(test.paths),
        )  # fmt: skip
    backoff = backoff_metrics(test.paths, probs, fitted.labels, thresholds)
    tops = [tree.root_names[k] for k in tree.root_probs(probs).argmax(axis=1)]
    scores = hierarchical_metrics(test.paths, backoff.pop("candidates"))
    backoff.pop("accepted")
    # The path part's table as fitted (vocabulary x rank, or x classes when kept whole),
    # rather than fit_linear's choice of shape worked out again here.
    table = fitted.parts[1].model.get_layer("linear").weights[0]
    return {
        "hF": scores["hierarchical"]["f1"],
        "levels": {k: v["accuracy"] for k, v in scores["levels"].items()},
        "top_macro_f1": top_macro_f1(test.labels, tops),
        "backoff": backoff,
        "thresholds": thresholds,
        "classes": len(fitted.labels),
        "linear_table_floats": int(np.prod(table.shape)),
        "fit_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="bestbuy,flipkart")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ranks", default="64,full")
    parser.add_argument("--flat", action="store_true", help="also fit today's flat model")
    parser.add_argument(
        "--balance", default="path", help="TrainParams.balance values to compare, comma-separated"
    )
    parser.add_argument(
        "--photo-weights",
        help="LexicalParams.photo_weight values to compare, comma-separated (default: the"
        " recipe's own)",
    )
    parser.add_argument(
        "--save", type=Path, help="folder for each tree fit's validation and test probabilities"
    )
    args = parser.parse_args()
    results = []
    for dataset in args.datasets.split(","):
        data = with_paths(dataset)
        for seed in (int(s) for s in args.seeds.split(",")):
            split = heldout_split(dataset, data, seed)
            rest = data.subset(np.concatenate([split.train, split.val]))
            test = data.subset(split.test)
            base = fit_baseline(rest.inputs.texts, rest.paths, seed=seed)
            predicted = base.predict(test.inputs.texts)
            scores = hierarchical_metrics(test.paths, predicted)
            row = {
                "dataset": dataset,
                "seed": seed,
                "recipe": "path_baseline",
                "hF": scores["hierarchical"]["f1"],
                "levels": {k: v["accuracy"] for k, v in scores["levels"].items()},
                "top_macro_f1": top_macro_f1(test.labels, [path_parts(p)[0] for p in predicted]),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
            if args.flat:
                flat = fit_model(
                    dataclasses.replace(data, paths=None), split, TrainParams(seed=seed)
                )
                probs = predict_keras(flat, test)
                tops = [flat.labels[k] for k in probs.argmax(axis=1)]
                row = {"dataset": dataset, "seed": seed, "recipe": "flat",
                       "top_macro_f1": top_macro_f1(test.labels, tops)}  # fmt: skip
                results.append(row)
                print(json.dumps(row), flush=True)
            photo_weights = args.photo_weights.split(",") if args.photo_weights else [None]
            for rank, balance, photo in itertools.product(
                args.ranks.split(","), args.balance.split(","), photo_weights
            ):
                params = TrainParams(
                    seed=seed,
                    linear_exact_rank=None if rank == "full" else int(rank),
                    balance=balance,
                )
                recipe = f"tree_rank_{rank}_{balance}"
                if photo is not None:
                    lexical = dataclasses.replace(params.lexical, photo_weight=float(photo))
                    params = dataclasses.replace(params, lexical=lexical)
                    recipe += f"_photo{photo}"
                row = {"dataset": dataset, "seed": seed, "recipe": recipe}
                save = args.save / f"{dataset}-{recipe}-s{seed}.npz" if args.save else None
                row.update(score_tree(data, split, params, save))
                results.append(row)
                print(json.dumps(row), flush=True)
    print("summary (mean over seeds):")
    keys = sorted({(r["dataset"], r["recipe"]) for r in results})
    for dataset, recipe in keys:
        rows = [r for r in results if (r["dataset"], r["recipe"]) == (dataset, recipe)]
        mean = {
            k: float(np.mean([r[k] for r in rows])) for k in ("hF", "top_macro_f1") if k in rows[0]
        }
        print(f"{dataset:10s} {recipe:28s} seeds={len(rows)} {json.dumps(mean)}")


if __name__ == "__main__":
    main()
