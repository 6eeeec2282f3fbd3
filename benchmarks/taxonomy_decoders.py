"""Which path to name, and which thresholds to accept at, on saved tree fits.

Reads the validation and test probabilities that ``taxonomy_recipes.py --save DIR``
writes (one file per dataset, recipe and seed) and compares, on the same fits:

Decoders (hF, path_accuracy and level accuracy on the test rows):
- ``leaf``: the leaf candidate (``LabelTree.candidate_paths``: the likeliest label
  under the likeliest root);
- ``served``: what the worker writes, the accepted node, else the leaf candidate;
- ``hf_walk``: the node whose path maximises the expected micro hF. A predicted node
  with probability q (that the true path runs through it) adds q expected hits and one
  predicted node, so with F the hF the set reaches, naming it pays when 2q > F; the
  best node maximises the sum of (2q - F) along its path. F is chosen on the
  validation rows of each fit (grid), never on the test rows;
- ``hf_dinkelbach``: the same walk with F set without a grid: the leaf candidate's
  validation hF, then the walk's own validation hF until it settles;
- ``hf_F<f>``: the walk at a fixed F, for the shape of the curve;
- ``hf_walk_T``: the grid walk on temperature-scaled probabilities (T fitted to the
  validation labels' log-loss), since the walk trusts q as a probability.

Threshold rules (per level, precision and coverage of the accepted nodes on the test
rows, backoff from the root as the worker does):
- ``balanced``: ``choose_level_thresholds(class_balanced=True)`` (the training default
  until 2026-12-05);
- ``plain``: the same, unweighted;
- ``wilson_z``: at every level, the loosest threshold whose accepted validation rows'
  Wilson lower bound (z) on precision meets the target (``surest_threshold``): the
  validation sets are small (tens of rows at deep levels), so the point estimate at
  the loosest threshold lands below the target on new rows about half the time;
- ``balanced_then_wilson_1.0``: ``balanced`` at level 1, ``wilson_1.0`` below it
  (``choose_level_thresholds(class_balanced=True, deep_z=1.0)``, the training default
  since 2026-12-05);
- ``branch_<base>_<m>``: the ``base`` rule's level thresholds, tightened for the
  children of any node with at least m validation rows under it whose own rows need a
  higher threshold to reach the target (an ambiguous branch);
- ``served`` (with ``--gate``): the training default's thresholds with the open-set
  gate ``shelver train`` fits beside them (``training.open_set``, refitted here on the
  same split's rows), which withdraws the auto-accepts of rows it refuses at every
  level: what the worker accepts.

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/taxonomy_recipes.py \
        --datasets flipkart,bestbuy --seeds 0,1,2 --ranks 64 --save var/bench/tree-probs
    PYTHONPATH=benchmarks .venv/bin/python benchmarks/taxonomy_decoders.py var/bench/tree-probs \
        --gate
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from shelver.catalog.categories import SEPARATOR
from shelver.training.evaluate import (
    backoff_metrics,
    choose_level_thresholds,
    loosest_threshold,
    surest_threshold,
)
from shelver.training.hierarchy import hierarchical_metrics
from shelver.worker.tree import LabelTree, path_parts

TARGET = 0.97
F_GRID = np.round(np.arange(0.20, 1.21, 0.05), 2)


def hf_walk_paths(tree: LabelTree, nodes: np.ndarray, f: float) -> list[str]:
    """Per row, the node maximising the sum of (2q - f) along its path from its root."""
    gain = 2.0 * nodes - f
    score = np.zeros_like(gain)
    # Sorted paths: a parent comes before its children, so one pass down the list.
    for j, node in enumerate(tree.nodes):
        parts = path_parts(node)
        above = score[:, tree.node_index[SEPARATOR.join(parts[:-1])]] if len(parts) > 1 else 0.0
        score[:, j] = gain[:, j] + above
    return [tree.nodes[j] for j in score.argmax(axis=1)]


def tempered(probs: np.ndarray, t: float) -> np.ndarray:
    logits = np.log(np.clip(probs, 1e-12, None)) / t
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: list[str], paths: list[str]) -> float:
    index = {label: k for k, label in enumerate(labels)}
    y = np.array([index.get(" > ".join(path_parts(p)), -1) for p in paths])
    keep = y >= 0
    grid = np.exp(np.linspace(np.log(0.3), np.log(3.0), 41))
    rows = np.arange(keep.sum())
    nll = [-np.log(tempered(probs[keep], t)[rows, y[keep]] + 1e-12).mean() for t in grid]
    return float(grid[int(np.argmin(nll))])


def level_thresholds(tree, nodes, truths, rule) -> list[float]:
    """choose_level_thresholds' walk down the levels, with any per-level rule."""
    paths = tree.candidate_paths(nodes)
    open_rows = np.ones(len(truths), dtype=bool)
    thresholds = []
    for level in range(1, tree.depth + 1):
        rows = [i for i in np.nonzero(open_rows)[0] if min(len(paths[i]), len(truths[i])) >= level]
        if not rows:
            break
        confidence = np.array([nodes[i, paths[i][level - 1]] for i in rows])
        correct = np.array(
            [path_parts(tree.nodes[paths[i][level - 1]]) == truths[i][:level] for i in rows],
            dtype=float,
        )
        threshold = rule(confidence, correct, level)
        thresholds.append(threshold)
        open_rows[:] = False
        open_rows[[i for i, c in zip(rows, confidence, strict=True) if c >= threshold]] = True
    return thresholds or [1.0]


def branch_thresholds(tree, nodes, truths, base: list[float], minimum: int) -> dict[int, float]:
    """Per parent node: a threshold for its children chosen on the validation rows under
    it (the loosest meeting the target, never looser than the level's), where at least
    ``minimum`` rows reach the children's level; the level's threshold elsewhere."""
    paths = tree.candidate_paths(nodes)
    overrides: dict[int, float] = {}
    open_rows = np.ones(len(truths), dtype=bool)
    for level in range(1, len(base) + 1):
        rows = [i for i in np.nonzero(open_rows)[0] if min(len(paths[i]), len(truths[i])) >= level]
        if not rows:
            break
        by_parent: dict[int, list[int]] = defaultdict(list)
        for i in rows:
            by_parent[paths[i][level - 2] if level > 1 else -1].append(i)
        for parent, members in by_parent.items():
            if parent < 0 or len(members) < minimum:
                continue
            confidence = np.array([nodes[i, paths[i][level - 1]] for i in members])
            correct = np.array(
                [path_parts(tree.nodes[paths[i][level - 1]]) == truths[i][:level] for i in members]
            )
            own = loosest_threshold(confidence, correct, TARGET)
            if own > base[level - 1]:
                overrides[parent] = own
        open_rows[:] = False
        for i in rows:
            parent = paths[i][level - 2] if level > 1 else -1
            if nodes[i, paths[i][level - 1]] >= overrides.get(parent, base[level - 1]):
                open_rows[i] = True
    return overrides


def backoff_with(tree, nodes, truths, base, overrides) -> dict:
    paths = tree.candidate_paths(nodes)
    accepted_level = []
    for path, row in zip(paths, nodes, strict=True):
        depth = 0
        for level, node in enumerate(path, start=1):
            if level > len(base):
                break
            parent = path[level - 2] if level > 1 else -1
            if row[node] < overrides.get(parent, base[level - 1]):
                break
            depth = level
        accepted_level.append(depth)
    out = {}
    for level in range(1, len(base) + 1):
        rows = [i for i, t in enumerate(truths) if len(t) >= level]
        acc = [i for i in rows if accepted_level[i] >= level]
        right = sum(path_parts(tree.nodes[paths[i][level - 1]]) == truths[i][:level] for i in acc)
        out[str(level)] = (
            right / len(acc) if acc else None,
            len(acc) / len(rows) if rows else 0.0,
            len(rows),
        )
    out["review"] = sum(a == 0 for a in accepted_level) / len(truths)
    return out


def gate_admits(
    file: Path, labels: list[str], val_probs, test_probs, test_paths: list[str], threshold: float
):
    """Per test row, whether the open-set gate ``shelver train`` would fit for this fit
    admits it: the gate is refitted on the same split (the file name gives the data set
    and seed), from the embeddings ``taxonomy_recipes`` trained on."""
    from taxonomy_recipes import with_paths
    from train_recipes import heldout_split

    from shelver.training.open_set import fit_open_set_gate

    dataset, seed = file.stem.split("-")[0], int(file.stem.rsplit("-s", 1)[1])
    data = with_paths(dataset)
    split = heldout_split(dataset, data, seed)
    test = data.subset(split.test)
    if test_paths != list(test.paths):
        raise SystemExit(f"{file}: its test rows are not this split's; fit it again")
    gate = fit_open_set_gate(data, split, labels, val_probs, threshold)
    tree = LabelTree(labels)
    return gate.admits(test.inputs.text_emb, tree.root_probs(test_probs), tree.root_names)


def study(file: Path, with_gate: bool = False) -> dict:
    saved = np.load(file)
    labels = [str(s) for s in saved["labels"]]
    val_paths = [str(s) for s in saved["val_paths"]]
    test_paths = [str(s) for s in saved["test_paths"]]
    tree = LabelTree(labels)
    val_nodes = tree.node_probs(saved["val_probs"])
    test_nodes = tree.node_probs(saved["test_probs"])
    val_truths = [path_parts(p) for p in val_paths]

    out: dict = {"decoders": {}, "rules": {}}

    def scored(predicted: list[str]) -> dict:
        s = hierarchical_metrics(test_paths, predicted)
        return {
            "hF": s["hierarchical"]["f1"],
            "path_accuracy": s["hierarchical"]["path_accuracy"],
            "levels": {k: v["accuracy"] for k, v in s["levels"].items()},
        }

    balanced = choose_level_thresholds(
        val_paths, saved["val_probs"], labels, TARGET, class_balanced=True
    )
    decisions = tree.decide_rows(test_nodes, balanced)
    out["decoders"]["leaf"] = scored([d.candidate for d in decisions])
    out["decoders"]["served"] = scored([d.accepted or d.candidate for d in decisions])
    val_hf = {
        float(f): hierarchical_metrics(val_paths, hf_walk_paths(tree, val_nodes, f))[
            "hierarchical"
        ]["f1"]
        for f in F_GRID
    }
    best_f = max(val_hf, key=val_hf.get)
    out["decoders"]["hf_walk"] = scored(hf_walk_paths(tree, test_nodes, best_f))
    out["decoders"]["hf_walk"]["f"] = best_f
    # Dinkelbach: start from the leaf candidate's validation hF, then set F to the hF
    # the walk reaches on validation until it settles (no grid, no choice).
    f = hierarchical_metrics(val_paths, [d.candidate for d in tree.decide_rows(val_nodes, [])])[
        "hierarchical"
    ]["f1"]
    for _ in range(10):
        f_next = hierarchical_metrics(val_paths, hf_walk_paths(tree, val_nodes, f))["hierarchical"][
            "f1"
        ]
        if abs(f_next - f) < 1e-4:
            break
        f = f_next
    out["decoders"]["hf_dinkelbach"] = scored(hf_walk_paths(tree, test_nodes, f))
    out["decoders"]["hf_dinkelbach"]["f"] = round(f, 3)
    for fixed in (0.8, 0.9, 1.0):
        out["decoders"][f"hf_F{fixed}"] = scored(hf_walk_paths(tree, test_nodes, fixed))
    # The same walk on temperature-scaled probabilities (T fitted to the validation
    # labels' log-loss): the walk trusts q as a probability.
    t = fit_temperature(saved["val_probs"], labels, val_paths)
    val_t = tree.node_probs(tempered(saved["val_probs"], t))
    test_t = tree.node_probs(tempered(saved["test_probs"], t))
    val_hf = {
        float(f): hierarchical_metrics(val_paths, hf_walk_paths(tree, val_t, f))["hierarchical"][
            "f1"
        ]
        for f in F_GRID
    }
    best_f = max(val_hf, key=val_hf.get)
    out["decoders"]["hf_walk_T"] = scored(hf_walk_paths(tree, test_t, best_f))
    out["decoders"]["hf_walk_T"]["f"] = (best_f, round(t, 2))

    rules = {
        "balanced": balanced,
        "plain": choose_level_thresholds(val_paths, saved["val_probs"], labels, TARGET),
    }
    for z in (1.0, 1.64):
        rules[f"wilson_{z}"] = level_thresholds(
            tree, val_nodes, val_truths, lambda c, k, _, z=z: surest_threshold(c, k, TARGET, z)
        )
    # The training default: level 1 as "balanced", Wilson (z 1) below it.
    rules["balanced_then_wilson_1.0"] = choose_level_thresholds(
        val_paths, saved["val_probs"], labels, TARGET, class_balanced=True, deep_z=1.0
    )
    admitted = {name: None for name in rules}
    if with_gate:
        rules["served"] = rules["balanced_then_wilson_1.0"]
        admitted["served"] = gate_admits(
            file, labels, saved["val_probs"], saved["test_probs"], test_paths, rules["served"][0]
        )
    for name, thresholds in rules.items():
        backoff = backoff_metrics(
            test_paths, saved["test_probs"], labels, thresholds, admitted[name]
        )
        out["rules"][name] = {
            level: (v["precision"], v["coverage"], v["n"]) for level, v in backoff["levels"].items()
        }
        out["rules"][name]["review"] = backoff["needs_review"]
    test_truths = [path_parts(p) for p in test_paths]
    for base_name in ("plain", "balanced"):
        for minimum in (20, 40):
            overrides = branch_thresholds(tree, val_nodes, val_truths, rules[base_name], minimum)
            out["rules"][f"branch_{base_name}_{minimum}"] = backoff_with(
                tree, test_nodes, test_truths, rules[base_name], overrides
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument(
        "--gate", action="store_true", help="also the served rule, with the open-set gate"
    )
    args = parser.parse_args()
    by_set: dict[str, list[dict]] = defaultdict(list)
    for file in sorted(args.folder.glob("*.npz")):
        result = study(file, args.gate)
        print(file.stem, json.dumps(result), flush=True)
        by_set[file.stem.split("-")[0]].append(result)

    for dataset, results in by_set.items():
        print(f"\n{dataset}: decoders, mean over {len(results)} seeds")
        print("decoder    hF      path_acc  levels")
        for name in results[0]["decoders"]:
            rows = [r["decoders"][name] for r in results]
            levels = sorted({k for r in rows for k in r["levels"]})
            level_means = " ".join(
                f"L{k}={np.mean([r['levels'][k] for r in rows if k in r['levels']]):.3f}"
                for k in levels
            )
            extra = f" F={[r['f'] for r in rows]}" if "f" in rows[0] else ""
            print(
                f"{name:10s} {np.mean([r['hF'] for r in rows]):.4f}  "
                f"{np.mean([r['path_accuracy'] for r in rows]):.4f}    {level_means}{extra}"
            )
        print(f"\n{dataset}: threshold rules, test precision / coverage per level, per seed")
        for name in results[0]["rules"]:
            cells = []
            for r in results:
                rule = r["rules"][name]
                cells.append(
                    " ".join(
                        f"L{k}:{'-' if p is None else f'{p:.3f}'}/{c:.2f}"
                        for k, (p, c, _) in ((k, v) for k, v in rule.items() if k != "review")
                    )
                    + f" review={rule['review']:.2f}"
                )
            print(f"{name:12s} " + "  |  ".join(cells))


if __name__ == "__main__":
    main()
