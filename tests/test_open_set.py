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


def test_without_unseen_rows_there_is_no_share_to_report() -> None:
    probs = np.array([[0.97, 0.03], [0.2, 0.8]])
    figures = score_predictions(["Audio", "Cell Phones"], probs, ["Audio", "Cell Phones"], 0.9)
    assert figures["unknown_categories"] == {}
    assert figures["unknown_auto_accepted"] is None
