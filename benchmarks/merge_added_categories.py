"""The merge in the case it is for: categories added to the tree after the champion.

For each split seed, ``open_set.py``'s protocol: three Best Buy top-level categories
are *absent* (never trained on), the rest are split as the hidden held-out part was
drawn, and a champion is trained by ``train()`` on the known categories' given rows.
The catalog's tree is then every ``category_path`` of the shared Best Buy rows, so the
absent categories' nodes are in it, unlabeled. Scored as the worker decides
(``Tree.decide_rows`` at the model's thresholds, then its open-set gate), by the
champion alone and merged with the zero-label scorer of that tree
(``worker.zero_label.MergedModel``), and by two variants of the merge that were meant to
cost known rows less: the unlabeled side's mass scaled by the champion's doubt (1 - its
top level's probability), and the unlabeled side made to win by a cosine margin
(``MARGINS``):

- the held-out rows of the known categories: the suggested top level's accuracy,
  the share auto-accepted (coverage) and the precision of what is accepted;
- every row of the absent categories: the share whose suggestion is under its true
  (unlabeled) top level, and the share auto-accepted (all wrongly).

Champions are cached in ``--workdir`` (about 5 minutes to train the three); embeddings as
``train_recipes`` caches them.

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/merge_added_categories.py \
        --json benchmarks/cold_start/merge-added-categories.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from open_set import absent_categories
from train_recipes import heldout_split, load, read_rows

from shelver.catalog.settings import get_settings
from shelver.training.fit import TrainParams, train
from shelver.worker import zero_label
from shelver.worker.encoders import load_encoders
from shelver.worker.fusion import FusionModel, sha256_hex
from shelver.worker.open_set import gated

MARGINS = (0.02, 0.04, 0.06, 0.08, 0.12)  # 0 is the served merge


class Doubted(zero_label.MergedModel):
    """The merge, its unlabeled side's mass times the champion's doubt."""

    def unlabeled_mass(self, text, best_elsewhere, trained):  # noqa: ANN001, ANN201
        doubt = 1.0 - self.champion_model.tree.root_probs(trained).max(axis=1)
        return super().unlabeled_mass(text, best_elsewhere, trained) * doubt


class Margined(zero_label.MergedModel):
    """The merge, the unlabeled side to win by ``margin`` (cosine) for half the mass."""

    margin = 0.0

    def unlabeled_mass(self, text, best_elsewhere, trained):  # noqa: ANN001, ANN201
        shift = self.margin / zero_label.MERGE_TEMPERATURE
        return super().unlabeled_mass(text, best_elsewhere - shift, trained)


def served(model, part, true_roots: np.ndarray) -> dict:  # noqa: ANN001 - a model
    """What the worker would write for ``part``: accepted or not, and the top level."""
    nodes = model.tree.node_probs(model.predict(part.inputs))
    decisions = gated(
        model.tree.decide_rows(nodes, model.level_thresholds),
        model.open_set,
        part.inputs.text_emb,
        nodes[:, model.tree.roots],
        model.tree.root_names,
    )
    accepted = np.asarray([d.accepted is not None for d in decisions])
    top = np.asarray([(d.accepted or d.candidate).split(" > ")[0] for d in decisions])
    right = top == true_roots
    return {
        "top_level_accuracy": float(right.mean()),
        "auto_accepted": float(accepted.mean()),
        "accepted_precision": float(right[accepted].mean()) if accepted.any() else None,
    }


def run_split(data, scorer, text_encoder, seed: int, workdir: Path) -> dict:  # noqa: ANN001
    y = np.asarray(data.labels)
    absent = absent_categories(data.labels, seed)
    split = heldout_split("bestbuy", data, seed)
    is_absent = np.isin(y, absent)
    cached = workdir / f"merge-added-seed{seed}.zip"
    if not cached.exists():
        given = np.setdiff1d(np.concatenate([split.train, split.val]), np.nonzero(is_absent)[0])
        cached.write_bytes(train(data.subset(given), TrainParams()).artifact)
    artifact = cached.read_bytes()
    champion = FusionModel.from_artifact(artifact, sha256_hex(artifact))
    known_rows, absent_rows = split.test[~is_absent[split.test]], np.nonzero(is_absent)[0]
    known, unknown = data.subset(known_rows), data.subset(absent_rows)
    result: dict = {
        "absent": absent,
        "known_rows": len(known_rows),
        "absent_rows": len(absent_rows),
    }

    def score(name: str, model) -> None:  # noqa: ANN001
        result[name] = {
            "known": served(model, known, y[known_rows]),
            "absent": served(model, unknown, y[absent_rows]),
        }

    score("champion", champion)
    score("merged (served)", zero_label.MergedModel(champion, scorer, text_encoder))
    score("merged x doubt", Doubted(champion, scorer, text_encoder))
    for margin in MARGINS:
        margined = Margined(champion, scorer, text_encoder)
        margined.margin = margin
        score(f"merged, margin {margin}", margined)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path, default=Path("var/bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    data = load("bestbuy")
    text_encoder, _ = load_encoders(get_settings().model_dir)
    paths = sorted({r["category_path"] or r["category"] for r in read_rows("bestbuy")})
    scorer = zero_label.ZeroLabelScorer(paths, zero_label.category_vectors(paths, text_encoder))
    results = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        results[seed] = run_split(data, scorer, text_encoder, seed, args.workdir)
        print(f"seed {seed}, absent {results[seed]['absent']}:")
        for name, figures in results[seed].items():
            if isinstance(figures, dict):
                k, a = figures["known"], figures["absent"]
                print(
                    f"  {name:21} known: top level {k['top_level_accuracy']:.3f}, "
                    f"auto {k['auto_accepted']:.3f}, precision {k['accepted_precision']:.3f}"
                    f" | absent: right top level {a['top_level_accuracy']:.3f}, "
                    f"auto {a['auto_accepted']:.3f}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
