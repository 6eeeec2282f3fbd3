"""Open-set figures: how often rows of categories the model never saw are auto-accepted."""

from __future__ import annotations

import numpy as np
import pytest

from shelver.training.holdout import score_predictions


def test_rows_of_unseen_categories_that_clear_the_threshold_are_counted() -> None:
    probs = np.array([[0.97, 0.03], [0.95, 0.05], [0.50, 0.50], [0.20, 0.80], [0.10, 0.90]])
    truth = ["Audio", "Drones", "Drones", "Drones", "Toothbrushes"]
    figures = score_predictions(truth, probs, ["Audio", "Cell Phones"], threshold=0.9)
    assert figures["unknown_categories"] == {"Drones": 3, "Toothbrushes": 1}
    # Drones at 0.95 and the toothbrush at 0.90 were auto-accepted: 2 of the 4 unseen rows.
    assert figures["unknown_auto_accepted"] == pytest.approx(0.5)


def test_coverage_and_precision_count_only_the_auto_accepts_the_gate_lets_stand() -> None:
    """What the worker accepts: over the threshold and admitted by the open-set gate."""
    probs = np.array([[0.97, 0.03], [0.95, 0.05], [0.93, 0.07], [0.20, 0.80], [0.10, 0.90]])
    truth = ["Audio", "Audio", "Cell Phones", "Cell Phones", "Drones"]
    labels = ["Audio", "Cell Phones"]
    ungated = score_predictions(truth, probs, labels, threshold=0.9)
    # Over 0.9: four rows, of which the third and the drone are wrong.
    assert ungated["coverage"] == pytest.approx(0.8)
    assert ungated["precision_at_threshold"] == pytest.approx(0.5)
    admitted = np.array([True, True, False, True, False])
    figures = score_predictions(truth, probs, labels, threshold=0.9, admitted=admitted)
    assert figures["coverage"] == pytest.approx(0.4) == figures["open_set_gate"]["coverage"]
    assert figures["precision_at_threshold"] == pytest.approx(1.0)
    assert (figures["open_set_gate"]["refused"], figures["open_set_gate"]["refused_known"]) == (
        2,
        1,
    )
    assert figures["unknown_auto_accepted"] == 0.0
    # The gate never adds an accept: a row under the threshold stays unaccepted.
    assert score_predictions(truth, probs, labels, 0.99, np.ones(5, bool))["coverage"] == 0.0


def test_backoff_accepts_no_level_of_a_row_the_gate_refuses() -> None:
    from shelver.training.evaluate import backoff_metrics

    labels = ["Audio > Headphones", "Audio > Speakers", "Cell Phones"]
    probs = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]])
    truth = ["Audio > Headphones", "Audio > Speakers", "Cell Phones"]
    everything = backoff_metrics(truth, probs, labels, [0.8, 0.8])
    assert everything["levels"]["1"]["coverage"] == 1.0
    assert everything["levels"]["2"]["coverage"] == 1.0 and everything["needs_review"] == 0.0
    gated = backoff_metrics(truth, probs, labels, [0.8, 0.8], np.array([False, True, True]))
    assert gated["levels"]["1"]["coverage"] == pytest.approx(2 / 3)
    assert gated["levels"]["2"]["coverage"] == pytest.approx(1 / 2)
    assert gated["needs_review"] == pytest.approx(1 / 3)
    # The refused row keeps its suggestion.
    assert gated["candidates"][0] == "Audio > Headphones" and gated["accepted"][0] is None


def test_without_unseen_rows_there_is_no_share_to_report() -> None:
    probs = np.array([[0.97, 0.03], [0.2, 0.8]])
    figures = score_predictions(["Audio", "Cell Phones"], probs, ["Audio", "Cell Phones"], 0.9)
    assert figures["unknown_categories"] == {}
    assert figures["unknown_auto_accepted"] is None


def _cluster(rng: np.random.Generator, centre: np.ndarray, n: int, spread: float) -> np.ndarray:
    rows = centre + spread * rng.standard_normal((n, len(centre)))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_the_prototype_gate_refuses_an_accept_far_from_its_class_and_survives_meta_json() -> None:
    import json

    from shelver.worker.open_set import PROTOTYPES, OpenSetGate, gated
    from shelver.worker.tree import Decision

    rng = np.random.default_rng(0)
    audio, phones, garden = np.eye(16)[0], np.eye(16)[1], np.eye(16)[2]
    fit = np.vstack([_cluster(rng, audio, 40, 0.1), _cluster(rng, phones, 40, 0.1)])
    val = np.vstack([_cluster(rng, audio, 20, 0.1), _cluster(rng, phones, 20, 0.1)])
    val_probs = np.repeat([[0.95, 0.05], [0.05, 0.95]], 20, axis=0)
    roots = ["Audio", "Cell Phones"]
    gate = OpenSetGate.fit(
        PROTOTYPES, roots, fit, ["Audio"] * 40 + ["Cell Phones"] * 40, val, val_probs, 0.9
    )
    # The floor is a low quantile of the accepted validation rows: most of them pass.
    assert 0.9 <= gate.admits(val, val_probs).mean() < 1.0
    restored = OpenSetGate.from_meta({"open_set": json.loads(json.dumps(gate.to_meta()))})
    assert restored is not None and restored.floor == pytest.approx(gate.floor)
    near, far = _cluster(rng, audio, 1, 0.05)[0], _cluster(rng, garden, 1, 0.05)[0]
    accepted = Decision("Audio > Headphones", "Audio", (0.97, 0.6))
    sure = np.array([0.97, 0.03])
    assert gated([accepted], restored, near[None], sure[None], roots) == [accepted]
    # A garden product the model put in Audio with 0.97: the suggestion stays, the
    # auto-accept goes.
    [refused] = gated([accepted], restored, far[None], sure[None], roots)
    assert (refused.candidate, refused.accepted) == ("Audio > Headphones", None)
    # A merged model's columns: named, not positional; a top level it never knew is refused.
    assert gated([accepted], restored, near[None], sure[None, ::-1], roots[::-1]) == [accepted]
    assert not restored.admits(near, np.array([[0.9, 0.1]]), ["Garden", "Audio"])[0]
    # Artifacts without a gate serve as before.
    assert OpenSetGate.from_meta({}) is None
    assert gated([accepted], None, far[None], sure[None], roots) == [accepted]


def test_the_margin_gate_refuses_a_narrow_lead_that_clears_the_threshold() -> None:
    from shelver.worker.open_set import MARGIN, OpenSetGate, gated
    from shelver.worker.tree import Decision

    val_probs = np.array([[0.99, 0.01, 0.0]] * 19 + [[0.7, 0.3, 0.0]])
    gate = OpenSetGate.fit(MARGIN, ["A", "B", "C"], None, [], None, val_probs, 0.6, 0.05)
    assert gate.floor == pytest.approx(np.quantile([0.98] * 19 + [0.4], 0.05))
    restored = OpenSetGate.from_meta({"open_set": gate.to_meta()})
    decision = Decision("A", "A", (0.75,))
    vectors = np.zeros((2, 4))
    # 0.75 clears a 0.6 threshold, but its lead over "B" (0.5) is below the floor.
    sure, narrow = gated(
        [decision, decision], restored, vectors, np.array([[0.99, 0.01, 0.0], [0.75, 0.25, 0.0]]),
        ["A", "B", "C"],
    )  # fmt: skip
    assert sure.accepted
    assert narrow.accepted is None and narrow.candidate == "A"
