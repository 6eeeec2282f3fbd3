"""Tree metrics against values worked out by hand, and a flat data set scoring as before."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from shelver.training.evaluate import evaluate
from shelver.training.hierarchy import hierarchical_metrics

TRUE = ["A > B > C", "A > B", "D", "A > E"]
PREDICTED = ["A > B", "A > B > F", "D > X", "A > B"]


def test_ancestor_sets_give_partial_credit_micro_averaged_over_rows() -> None:
    scores = hierarchical_metrics(TRUE, PREDICTED)["hierarchical"]
    # Shared prefixes per row: 2 (A, A>B), 2 (A, A>B), 1 (D), 1 (A) -> 6 hits.
    # Predicted prefixes: 2 + 3 + 2 + 2 = 9; true prefixes: 3 + 2 + 1 + 2 = 8.
    assert scores["precision"] == pytest.approx(6 / 9)
    assert scores["recall"] == pytest.approx(6 / 8)
    assert scores["f1"] == pytest.approx(12 / 17)


def test_path_accuracy_counts_rows_predicted_at_or_below_their_true_node() -> None:
    # Row 1 stops above its node, row 4 takes the wrong branch; rows 2 and 3 go below theirs.
    assert hierarchical_metrics(TRUE, PREDICTED)["hierarchical"]["path_accuracy"] == 0.5


def test_each_level_compares_the_first_parts_over_rows_that_deep() -> None:
    levels = hierarchical_metrics(TRUE, PREDICTED)["levels"]
    assert levels["1"] == {"n": 4, "accuracy": 1.0, "macro_f1": 1.0, "coverage": 1.0}
    # Level 2: rows 1, 2, 4. A > B: support 2, predicted 3 times, 2 right -> P 2/3, R 1, F1 0.8;
    # A > E: never predicted -> F1 0.
    assert levels["2"] == pytest.approx(
        {"n": 3, "accuracy": 2 / 3, "macro_f1": 0.4, "coverage": 1.0}
    )
    # Level 3: row 1 only, whose prediction stops at level 2: not covered, not right.
    assert levels["3"] == {"n": 1, "accuracy": 0.0, "macro_f1": 0.0, "coverage": 0.0}
    assert set(levels) == {"1", "2", "3"}


def test_a_flat_model_is_exact_at_level_one_and_uncovered_below() -> None:
    scores = hierarchical_metrics(["A > B", "C > D > E", "A"], ["A", "C", "C"])
    assert scores["levels"]["1"]["accuracy"] == pytest.approx(2 / 3)
    assert scores["levels"]["2"] == {"n": 2, "accuracy": 0.0, "macro_f1": 0.0, "coverage": 0.0}
    # Hits 1 + 1 + 0 over 3 predicted and 6 true prefixes.
    assert scores["hierarchical"]["precision"] == pytest.approx(2 / 3)
    assert scores["hierarchical"]["recall"] == pytest.approx(2 / 6)


def test_a_flat_data_set_scores_as_the_flat_metrics() -> None:
    rng = np.random.default_rng(7)
    labels = ["Audio", "Cameras", "Phones", "Toys"]
    y_true = [labels[i] for i in rng.integers(0, 3, size=200)]  # "Toys" never true
    probs = rng.dirichlet(np.ones(len(labels)), size=200)
    predicted = [labels[k] for k in probs.argmax(axis=1)]
    flat = evaluate(y_true, probs, labels)
    scores = hierarchical_metrics(y_true, predicted)
    assert flat["accuracy"] < 0.5  # a real mix of right and wrong, predicted "Toys" included
    assert "Toys" in predicted
    for key in ("precision", "recall", "f1"):
        assert scores["hierarchical"][key] == pytest.approx(flat["accuracy"])
    assert scores["hierarchical"]["path_accuracy"] == pytest.approx(flat["accuracy"])
    assert scores["levels"]["1"]["accuracy"] == pytest.approx(flat["accuracy"])
    assert scores["levels"]["1"]["macro_f1"] == pytest.approx(flat["macro_f1"])
    assert list(scores["levels"]) == ["1"]


def test_true_and_predicted_must_pair_up() -> None:
    with pytest.raises(ValueError, match="2 true paths but 1 predicted"):
        hierarchical_metrics(["A", "B"], ["A"])


def test_evaluate_file_scores_whole_paths_against_a_flat_champion(
    encoder_dir: Path, fixture_data: Path, tmp_path: Path
) -> None:
    from support import CATEGORIES, centroid_artifact, training_titles

    from shelver.catalog.settings import Settings
    from shelver.training.holdout import evaluate_file
    from shelver.worker.encoders import load_encoders
    from shelver.worker.fusion import FusionModel, sha256_hex

    artifact = centroid_artifact(*load_encoders(encoder_dir), training_titles(fixture_data))
    model = FusionModel.from_artifact(artifact, sha256_hex(artifact))
    with (fixture_data / "bestbuy" / "products.csv").open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["category"] in CATEGORIES][:60]
    held = tmp_path / "held.csv"
    with held.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "image": ""} for r in rows)
    depths = [len(r["category_path"].split(" > ")) for r in rows]
    assert max(depths) >= 3 and min(depths) == 1  # the fixture mixes coarse and deep labels

    metrics = evaluate_file(model, held, Settings(model_dir=encoder_dir)).metrics

    # The flat keys keep their top-level meaning; level 1 is the same figures.
    assert metrics["n"] == len(rows)
    assert 0.5 < metrics["accuracy"] < 1.0
    assert metrics["levels"]["1"]["accuracy"] == pytest.approx(metrics["accuracy"])
    assert metrics["levels"]["1"]["macro_f1"] == pytest.approx(metrics["macro_f1"])
    # The flat model names top levels only: deeper levels are counted, never covered.
    assert set(metrics["levels"]) == {str(level) for level in range(1, max(depths) + 1)}
    assert metrics["levels"]["2"]["n"] == sum(d >= 2 for d in depths)
    assert all(
        metrics["levels"][str(level)]["coverage"] == 0.0 for level in range(2, max(depths) + 1)
    )
    tree = metrics["hierarchical"]
    assert tree["precision"] == pytest.approx(metrics["accuracy"])
    assert tree["recall"] == pytest.approx(metrics["accuracy"] * len(rows) / sum(depths))
    assert tree["path_accuracy"] <= sum(d == 1 for d in depths) / len(rows)


def candidate_path(tree, node_probs: np.ndarray) -> list[int]:  # noqa: ANN001
    """The leaf candidate for one row, as the tree's docstring defines it: the most probable
    label under the most probable root, its own probability being its node's less its
    children's; the path from that root down to it."""
    root = tree.nodes[int(tree.roots[np.argmax(node_probs[tree.roots])])]
    best, best_p = None, -np.inf
    for j, node in enumerate(tree.nodes):
        if tree.self_label[j] < 0 or not (node == root or node.startswith(root + " > ")):
            continue
        own = node_probs[j] - sum(node_probs[c] for c in tree.children[j])
        if own > best_p:
            best, best_p = node, own
    parts = best.split(" > ")
    return [tree.node_index[" > ".join(parts[:d])] for d in range(1, len(parts) + 1)]


def test_a_batch_is_decided_row_by_row_as_the_tree_defines(fixture_data: Path) -> None:
    """decide_rows decides every row of a batch at once; each row's decision must be the
    one-row definition's, with backoff from the root, on a real taxonomy's paths at mixed
    depths, coarse labels included."""
    from shelver.worker.tree import Decision, LabelTree

    taxonomy = fixture_data.parent / "taxonomies" / "google-product-taxonomy-2021-09-21-head40.txt"
    paths = [
        line.split(" - ", 1)[1].strip()
        for line in taxonomy.read_text(encoding="utf-8").splitlines()
        if " - " in line and not line.startswith("#")
    ]
    tree = LabelTree(paths)
    assert tree.depth >= 3 and any(tree.self_label[tree.roots] >= 0)
    rng = np.random.default_rng(0)
    # Peaked and flat rows, so candidates end at every depth.
    logits = rng.normal(size=(400, len(paths))) * rng.choice([0.5, 3.0, 8.0], size=(400, 1))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    nodes = tree.node_probs(probs)

    def one_row(row: np.ndarray, thresholds: list[float]) -> Decision:
        path = candidate_path(tree, row)
        p = tuple(float(row[i]) for i in path)
        sure = 0
        while sure < min(len(path), len(thresholds)) and p[sure] >= thresholds[sure]:
            sure += 1
        return Decision(tree.nodes[path[-1]], tree.nodes[path[sure - 1]] if sure else None, p)

    for thresholds in ([0.5, 0.4, 0.3], [0.9], []):
        batch = tree.decide_rows(nodes, thresholds)
        assert batch == [one_row(row, thresholds) for row in nodes]
        assert tree.decide(nodes[7], thresholds) == batch[7]
    depths = {len(d.path_probs) for d in tree.decide_rows(nodes, [0.5])}
    assert len(depths) >= 3  # the rows really end at different depths


def test_the_leaf_candidate_is_the_likeliest_label_not_the_heaviest_branch() -> None:
    from shelver.worker.tree import LabelTree

    # Eight rare accessories outweigh the phone label together (0.40 against 0.35), but
    # each is far less likely: the candidate is the phone, not one accessory.
    labels = ["A > phones", *(f"A > accessories > a{i}" for i in range(8)), "B"]
    probs = np.array([[0.35, *[0.05] * 8, 0.25]])
    tree = LabelTree(labels)
    (decision,) = tree.decide_rows(tree.node_probs(probs), [0.7, 0.3])
    assert decision.candidate == "A > phones"
    assert decision.path_probs == pytest.approx((0.75, 0.35))
    assert decision.accepted == "A > phones"
