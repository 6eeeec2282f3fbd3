"""Training from the catalog, the report, the gate, rollback, evaluate, and scheduled retraining.

These run the real recipe (TensorFlow, tf2onnx, onnxruntime) on a few hundred
Flipkart rows, through the CLI as a user would.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from shelver.catalog.importer import import_file

pytestmark = pytest.mark.slow

SHELVER = [sys.executable, "-m", "shelver.worker"]


def flipkart_rows(fixture_data: Path) -> dict[str, list[dict[str, str]]]:
    by_class: dict[str, list[dict[str, str]]] = defaultdict(list)
    with (fixture_data / "flipkart" / "products.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["image"]:
                row["image"] = str(fixture_data / "flipkart" / row["image"])
            by_class[row["category"]].append(row)
    return by_class


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))  # the data's columns, as read
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def env(database_url: str, encoder_dir: Path, fixture_data: Path, tmp_path: Path) -> dict:
    return {
        **os.environ,
        "SHELVER_DATABASE_URL": database_url,
        "SHELVER_MODEL_DIR": str(encoder_dir),
        "SHELVER_DATA_DIR": str(tmp_path / "var"),
        "SHELVER_IMAGE_ROOTS": json.dumps([str(fixture_data)]),
        "SHELVER_PROMOTE_MIN_IMPROVEMENT": "0.005",
        "HF_HUB_OFFLINE": "1",
    }


def shelver(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SHELVER, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def statuses(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT version, status FROM model_versions")).all())


def keep_labels(engine: Engine, per_class: int) -> None:
    """Leave only the first ``per_class`` labels of each top-level category (by product id)."""
    with engine.begin() as conn:
        conn.execute(
            text(
                """
                UPDATE products p SET label_id = NULL, label_source = NULL
                FROM (SELECT p.id, row_number() OVER (
                          PARTITION BY split_part(c.path, ' > ', 1) ORDER BY p.id) AS k
                      FROM products p JOIN categories c ON c.id = p.label_id) r
                WHERE p.id = r.id AND r.k > :n
                """
            ),
            {"n": per_class},
        )


def test_train_report_gate_rollback_and_evaluate(
    engine: Engine, env: dict, fixture_data: Path, tmp_path: Path
) -> None:
    by_class = flipkart_rows(fixture_data)
    train_rows = [r for rows in by_class.values() for r in rows[:40]]
    import_file(engine, write_csv(tmp_path / "train.csv", train_rows))

    # v1: a weak model from 10 labels per category; first model, always promoted.
    keep_labels(engine, 10)
    first = shelver(env, "train")
    assert first.returncode == 0, first.stderr
    assert "v1: promoted to champion" in first.stdout
    report = next((tmp_path / "var" / "reports").glob("run-*"))
    assert {"confusion_matrix.png", "reliability.png", "metrics.json"} <= {
        p.name for p in report.iterdir()
    }
    metrics = json.loads((report / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "per_class", "ece", "coverage"} <= set(metrics["test"])
    # Flipkart's paths are 2 or 3 levels deep; the model is trained on them and its
    # leaf candidates answer below the top level; the flat figures are the top level's.
    assert set(metrics["test"]["levels"]) == {"1", "2", "3"}
    assert metrics["test"]["levels"]["1"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert metrics["test"]["levels"]["2"]["coverage"] > 0.5
    assert 0.0 < metrics["test"]["hierarchical"]["f1"] <= 1.0
    assert metrics["test"]["labels"] == sorted(by_class)
    assert set(metrics["test"]["backoff"]["levels"]) <= {"1", "2", "3"}
    assert "macro_f1" in metrics["baseline"]

    # v2: all 40 labels per category; better on its own test rows, so promoted.
    import_file(engine, write_csv(tmp_path / "train.csv", train_rows))
    second = shelver(env, "train")
    assert second.returncode == 0, second.stderr
    assert statuses(engine) == {"v1": "retired", "v2": "champion"}, second.stdout
    # The served artifact's linear part was refit on every row; the registry keeps
    # the evaluated one, and the gate scored that one (its test figures), not the
    # refit one that has seen the test rows.
    with engine.connect() as conn:
        kept = conn.execute(
            text("SELECT eval_sha256 IS NOT NULL AND eval_sha256 <> sha256, training_run_id "
                 "FROM model_versions WHERE version = 'v2'")
        ).one()  # fmt: skip
        run = conn.execute(
            text("SELECT metrics FROM training_runs WHERE id = :id"), {"id": kept[1]}
        ).scalar_one()
    assert kept[0]
    assert run["gate"]["candidate_on_test"] == pytest.approx(run["test"]["macro_f1"])

    # v3: back to 10 labels per category; it cannot beat v2 on its test rows.
    keep_labels(engine, 10)
    third = shelver(env, "train")
    assert third.returncode == 0, third.stderr
    assert statuses(engine)["v3"] == "rejected", third.stdout
    assert statuses(engine)["v2"] == "champion"

    rollback = shelver(env, "models", "rollback")
    assert rollback.returncode == 0, rollback.stderr
    assert statuses(engine) == {"v1": "champion", "v2": "rejected", "v3": "rejected"}

    with engine.connect() as conn:
        runs = conn.execute(text("SELECT status FROM training_runs ORDER BY id")).scalars().all()
        products_before = conn.execute(text("SELECT count(*) FROM products")).scalar_one()
    assert runs == ["succeeded"] * 3

    held_out = [r for rows in by_class.values() for r in rows[40:48]]
    held_out += [
        dict(held_out[0], id="x1", category="Garden", category_path="Garden > Tools"),
        dict(held_out[1], id="x2", category="Garden", category_path="Garden"),
    ]
    result = shelver(env, "evaluate", str(write_csv(tmp_path / "held.csv", held_out)), "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["model"] == "v1"
    assert scores["n"] == len(held_out)
    assert scores["unknown_categories"] == {"Garden": 2}
    # Open-set safety: the share of the two Garden rows the champion auto-accepts.
    assert scores["unknown_auto_accepted"] in (0.0, 0.5, 1.0)
    # Coverage is what the worker accepts: over the threshold and let stand by the gate.
    assert scores["coverage"] == pytest.approx(scores["open_set_gate"]["coverage"])
    assert scores["per_class"]["Garden"]["recall"] == 0.0
    assert 0.0 < scores["accuracy"] <= (len(held_out) - 2) / len(held_out)
    # Whole paths against the model's leaf candidates: level 1 is the flat figures, and the
    # model, trained on paths, answers below it.
    assert scores["levels"]["1"]["accuracy"] == pytest.approx(scores["accuracy"])
    assert scores["levels"]["1"]["macro_f1"] == pytest.approx(scores["macro_f1"])
    assert scores["levels"]["2"]["n"] == len(held_out) - 1
    assert scores["levels"]["2"]["coverage"] > 0.5
    hierarchical = scores["hierarchical"]
    # The answers go below the top level, so they are not the flat figures any more.
    assert 0.0 < hierarchical["f1"] <= 1.0 and hierarchical["recall"] > 0.0
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM products")).scalar_one() == products_before


def test_scheduled_retraining_runs_on_the_training_queue(
    engine: Engine, env: dict, broker_url: str, fixture_data: Path, tmp_path: Path
) -> None:
    by_class = flipkart_rows(fixture_data)
    import_file(
        engine,
        write_csv(tmp_path / "train.csv", [r for rows in by_class.values() for r in rows[:15]]),
    )
    env = {**env, "SHELVER_BROKER_URL": broker_url, "SHELVER_RETRAIN_MIN_NEW_LABELS": "50"}
    trainer = subprocess.Popen(
        [*SHELVER, "worker", "-Q", "training", "-c", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        beat = shelver(env, "beat", "--once", timeout=60)
        assert beat.returncode == 0, beat.stderr
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline:
            if statuses(engine):
                break
            time.sleep(2)
        assert statuses(engine) == {"v1": "champion"}
        # Nothing new since: the next check queues nothing.
        again = shelver(env, "beat", "--once", timeout=60)
        assert again.returncode == 0
        time.sleep(5)
        with engine.connect() as conn:
            runs = conn.execute(text("SELECT count(*) FROM training_runs")).scalar_one()
        assert runs == 1
    finally:
        trainer.terminate()
        trainer.wait(timeout=60)
