"""The event path end to end: real `shelver dispatch` and `shelver worker` processes.

Products are inserted with plain SQL, as any client would; nothing here calls
the worker code directly. Encoders are exported once per session and the
champion is a small real fusion model registered like training would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from support import (
    CATEGORIES,
    SHELVER,
    centroid_artifact,
    insert,
    register_champion,
    running,
    sample_products,
    scalar,
    training_titles,
    wait_for,
    worker_env,
)

from shelver.worker.encoders import load_encoders

pytestmark = pytest.mark.slow

TERMINAL = ("classified", "needs_review", "failed")


@pytest.fixture(scope="module")
def artifacts(encoder_dir: Path, fixture_data: Path) -> tuple[bytes, bytes]:
    """Two different champions: all four categories, and a second that knows only two."""
    encoders = load_encoders(encoder_dir)
    examples = training_titles(fixture_data)
    first = centroid_artifact(*encoders, examples)
    second = centroid_artifact(*encoders, {k: examples[k] for k in CATEGORIES[:2]}, scale=30)
    return first, second


@pytest.fixture
def env(
    database_url: str, broker_url: str, encoder_dir: Path, fixture_data: Path, tmp_path: Path
) -> dict[str, str]:
    return worker_env(
        database_url,
        broker_url,
        encoder_dir,
        fixture_data,
        SHELVER_LEASE_SECONDS="20",
        SHELVER_RETRY_BACKOFF_S="0.5",
    )


@contextlib.contextmanager
def pipeline(env: dict[str, str], tmp_path: Path, queues: str = "classify,backfill"):
    with (
        running(["dispatch"], env, tmp_path / "dispatch.log") as dispatcher,
        running(["worker", "-Q", queues, "-c", "1"], env, tmp_path / "worker.log") as worker,
    ):
        yield dispatcher, worker


def test_inserted_products_all_reach_a_terminal_state(
    engine: Engine,
    env: dict[str, str],
    artifacts,
    fixture_data: Path,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    champion = register_champion(engine, artifacts[0], "e2e-1")
    rows = sample_products(fixture_data, 200)
    with pipeline(env, tmp_path):
        started = time.monotonic()
        insert(engine, rows)
        wait_for(
            lambda: scalar(engine, "SELECT count(*) FROM products WHERE status = 'pending'") == 0,
            180,
            "200 products to leave `pending`",
            tmp_path,
        )
        elapsed = time.monotonic() - started
    assert (
        scalar(engine, "SELECT count(*) FROM products WHERE status = ANY(:s)", s=list(TERMINAL))
        == 200
    )
    assert scalar(engine, "SELECT count(*) FROM classification_queue") == 0
    assert (
        scalar(engine, "SELECT count(*) FROM products WHERE model_version_id = :m", m=champion)
        == 200
    )
    assert scalar(engine, "SELECT count(DISTINCT product_id) FROM predictions") == 200
    print(f"200 products classified end to end in {elapsed:.1f} s")


def test_an_update_reclassifies_its_product(
    engine: Engine,
    env: dict[str, str],
    artifacts,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    register_champion(engine, artifacts[0], "e2e-1")
    insert(
        engine,
        [{"sku": "u1", "name": "Apple iPhone 6s 64GB", "description": "", "image_uri": None}],
    )

    def category() -> tuple[str, str] | None:
        with engine.connect() as conn:
            return conn.execute(
                text(
                    "SELECT p.status, c.name FROM products p "
                    "LEFT JOIN categories c ON c.id = p.predicted_id WHERE sku = 'u1'"
                )
            ).one()

    with pipeline(env, tmp_path):
        wait_for(lambda: category()[0] != "pending", 60, "the first classification", tmp_path)
        assert category()[1] == "Cell Phones"
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE products SET name = 'Whirlpool washing machine' WHERE sku = 'u1'")
            )
        wait_for(lambda: category()[1] == "Appliances", 60, "the update to be classified", tmp_path)
    assert scalar(engine, "SELECT count(*) FROM predictions") == 2


def test_a_promotion_switches_running_workers_without_a_restart(
    engine: Engine,
    env: dict[str, str],
    artifacts,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    first = register_champion(engine, artifacts[0], "e2e-1")
    product = {"description": "", "image_uri": None}
    with pipeline(env, tmp_path) as (_, worker):
        insert(engine, [{**product, "sku": "before", "name": "Casio keyboard 61 keys"}])
        wait_for(
            lambda: (
                scalar(engine, "SELECT count(*) FROM products WHERE model_version_id = :m", m=first)
                == 1
            ),
            60,
            "classification by the first champion",
            tmp_path,
        )
        second = register_champion(engine, artifacts[1], "e2e-2")
        time.sleep(1.5)  # one model poll
        insert(engine, [{**product, "sku": "after", "name": "Casio keyboard 76 keys"}])
        wait_for(
            lambda: (
                scalar(
                    engine,
                    "SELECT count(*) FROM products WHERE sku = 'after' AND model_version_id = :m",
                    m=second,
                )
                == 1
            ),
            60,
            "classification by the promoted champion",
            tmp_path,
        )
        assert worker.poll() is None, "the worker restarted"


def test_a_backfill_of_stale_rows_rescores_them_with_the_new_champion(
    engine: Engine,
    env: dict[str, str],
    artifacts,
    fixture_data: Path,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    first = register_champion(engine, artifacts[0], "e2e-1")
    insert(engine, sample_products(fixture_data, 120))
    with pipeline(env, tmp_path):
        wait_for(
            lambda: scalar(engine, "SELECT count(*) FROM classification_queue") == 0,
            120,
            "the first classification",
            tmp_path,
        )
        assert (
            scalar(engine, "SELECT count(*) FROM products WHERE model_version_id = :m", m=first)
            == 120
        )
        vectors = scalar(engine, "SELECT count(*) FROM embeddings")
        second = register_champion(engine, artifacts[1], "e2e-2")
        result = subprocess.run(
            [*SHELVER, "backfill", "--stale", "--chunk", "50"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done: 120 products" in result.stdout
    assert (
        scalar(engine, "SELECT count(*) FROM products WHERE model_version_id = :m", m=second) == 120
    )
    assert scalar(engine, "SELECT count(*) FROM classification_queue") == 0
    with engine.connect() as conn:
        status, enqueued, total = conn.execute(
            text("SELECT status, enqueued, total FROM backfill_runs")
        ).one()
    assert (status, enqueued, total) == ("done", 120, 120)
    # Every embedding came from the cache: the re-score added history, not vectors.
    assert scalar(engine, "SELECT count(*) FROM predictions") == 240
    assert scalar(engine, "SELECT count(*) FROM embeddings") == vectors


def test_a_backfill_nobody_waits_for_ends_done(
    engine: Engine,
    env: dict[str, str],
    artifacts,
    fixture_data: Path,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    register_champion(engine, artifacts[0], "e2e-1")
    insert(engine, sample_products(fixture_data, 40))
    with pipeline(env, tmp_path):
        wait_for(
            lambda: scalar(engine, "SELECT count(*) FROM classification_queue") == 0,
            120,
            "the first classification",
            tmp_path,
        )
        result = subprocess.run(
            [*SHELVER, "backfill", "--all", "--no-wait"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        # Nobody watches the run: the worker that finishes its last row records it.
        wait_for(
            lambda: scalar(engine, "SELECT count(*) FROM backfill_runs WHERE status = 'done'") == 1,
            120,
            "the --no-wait backfill to be recorded done",
            tmp_path,
        )


# --- the people's side: labels, review, scheduled retraining (CLI processes) ------------------


def shelver(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SHELVER, *args], env=env, capture_output=True, text=True, timeout=120)


def test_label_file_applies_good_lines_and_reports_bad_ones_by_line(
    engine: Engine, env: dict[str, str], tmp_path: Path
) -> None:
    insert(
        engine,
        [
            {"sku": s, "name": n, "description": "", "image_uri": None}
            for s, n in (("s1", "iPhone"), ("s2", "Washer"), ("s3", "Piano"))
        ],
    )
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO categories (name) VALUES ('Cell Phones'), ('Appliances')"))
    labels = tmp_path / "labels.csv"
    labels.write_text("sku,category\ns1,Cell Phones\ns2,Appliances\nnope,Appliances\ns3,Pianos\n")
    result = shelver(env, "label", str(labels))
    assert result.returncode == 1
    assert f"{labels}:4: unknown sku 'nope'" in result.stderr
    assert f"{labels}:5: unknown category 'Pianos'" in result.stderr
    assert "2 labeled" in result.stdout

    result = shelver(env, "label", str(labels), "--create-categories")
    assert "1 labeled, 2 unchanged" in result.stdout
    with engine.connect() as conn:
        labeled = dict(
            conn.execute(
                text(
                    "SELECT p.sku, c.name FROM products p JOIN categories c ON c.id = p.label_id "
                    "WHERE p.label_source = 'label' AND p.labeled_at IS NOT NULL"
                )
            ).all()
        )
    assert labeled == {"s1": "Cell Phones", "s2": "Appliances", "s3": "Pianos"}


def test_review_lists_uncertain_products_and_records_a_verdict(
    engine: Engine, env: dict[str, str]
) -> None:
    insert(engine, [{"sku": "r1", "name": "Mystery gadget", "description": "", "image_uri": None}])
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO categories (name) VALUES ('Audio'), ('Toys')"))
        conn.execute(
            text(
                "UPDATE products SET status = 'needs_review', confidence = 0.31, "
                "predicted_id = (SELECT id FROM categories WHERE name = 'Audio')"
            )
        )
    listing = shelver(env, "review", "--limit", "5")
    assert listing.returncode == 0 and "r1" in listing.stdout and "0.31" in listing.stdout
    verdict = shelver(env, "review", "--set", "r1=Toys")
    assert verdict.returncode == 0, verdict.stderr
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT p.status, p.label_source, c.name FROM products p "
                "JOIN categories c ON c.id = p.label_id"
            )
        ).one()
    assert tuple(row) == ("classified", "review", "Toys")
    assert "nothing waits for review" in shelver(env, "review").stdout
    unknown = shelver(env, "review", "--set", "r1=Nope")
    assert unknown.returncode == 2 and "unknown category 'Nope'" in unknown.stderr


def test_beat_queues_retraining_only_after_enough_new_labels(
    engine: Engine, env: dict[str, str], broker_url: str
) -> None:
    import redis

    env = {**env, "SHELVER_RETRAIN_MIN_NEW_LABELS": "2"}
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO categories (name) VALUES ('Audio')"))
        conn.execute(
            text(
                "INSERT INTO products (sku, name, label_id) "
                "SELECT 'l' || g, 'p', (SELECT id FROM categories) FROM generate_series(1, 3) g"
            )
        )
        # A run that has seen all three labels.
        conn.execute(
            text("INSERT INTO training_runs (status, label_watermark) VALUES ('done', now())")
        )
    quiet = shelver(env, "beat", "--once")
    assert "no retraining: 0 new labels" in quiet.stdout, quiet.stdout + quiet.stderr
    assert redis.Redis.from_url(broker_url).llen("training") == 0

    with engine.begin() as conn:
        conn.execute(text("UPDATE products SET label_source = 'review' WHERE sku IN ('l1', 'l2')"))
    due = shelver(env, "beat", "--once")
    assert "retraining queued: 2 new labels" in due.stdout, due.stdout + due.stderr
    assert redis.Redis.from_url(broker_url).llen("training") == 1


def test_a_killed_worker_loses_no_product(
    engine: Engine,
    env: dict[str, str],
    artifacts,
    fixture_data: Path,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    # A short lease, so work held by the dead worker comes back within the test.
    env = {**env, "SHELVER_LEASE_SECONDS": "10"}
    register_champion(engine, artifacts[0], "e2e-1")
    worker_args = ["worker", "-Q", "classify", "-c", "1"]
    with running(["dispatch"], env, tmp_path / "dispatch.log"):
        with running(worker_args, env, tmp_path / "worker-1.log") as doomed:
            insert(engine, sample_products(fixture_data, 150))
            wait_for(
                lambda: (
                    scalar(engine, "SELECT count(*) FROM products WHERE status <> 'pending'") > 0
                ),
                60,
                "the first results",
                tmp_path,
            )
            # No warning, no cleanup: the whole process group dies mid-batch.
            os.killpg(doomed.pid, signal.SIGKILL)
            doomed.wait()
        left = scalar(engine, "SELECT count(*) FROM products WHERE status = 'pending'")
        assert left > 0, "the worker finished everything before it was killed"
        with running(worker_args, env, tmp_path / "worker-2.log"):
            wait_for(
                lambda: scalar(engine, "SELECT count(*) FROM classification_queue") == 0,
                180,
                "the second worker to finish the dead one's work",
                tmp_path,
            )
    assert (
        scalar(engine, "SELECT count(*) FROM products WHERE status IN ('pending', 'failed')") == 0
    )
    assert scalar(engine, "SELECT count(DISTINCT product_id) FROM predictions") == 150
