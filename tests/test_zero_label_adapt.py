"""Adapting the zero-label scorer to the catalog's own products (``shelver taxonomy adapt``):
no label read, a new scorer row that workers serve from their next look."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session
from support import SHELVER, insert_products, running, scalar, wait_for, worker_env

from shelver.catalog.queue import claim_batch
from shelver.catalog.settings import Settings
from shelver.catalog.taxonomy import import_taxonomy
from shelver.worker.classify import classify_products
from shelver.worker.encoders import ImageEncoder, TextEncoder, load_encoders
from shelver.worker.runtime import Runtime
from shelver.worker.zero_label import (
    ADAPT_SHARE,
    ADAPTED_CONFIDENCE_TEMPERATURE,
    CATALOG_PRIOR,
    ZeroLabelClassifier,
    ZeroLabelScorer,
    adapt_vectors,
    adapt_zero_label_model,
    ensure_zero_label_model,
    serving_classifier,
    withdraw_adaptations,
)

GOOGLE_HEAD = (
    Path(__file__).resolve().parent
    / "fixtures"
    / "taxonomies"
    / "google-product-taxonomy-2021-09-21-head40.txt"
)
DOG_TOYS = "Animals & Pet Supplies > Pet Supplies > Dog Supplies > Dog Toys"
CAT_LITTER = "Animals & Pet Supplies > Pet Supplies > Cat Supplies > Cat Litter"
TOYS = [
    "Squeaky rubber chew toy for dogs",
    "Rope tug toy for large dogs",
    "Dog fetch ball, durable rubber, 3 pack",
    "Plush squeaker toy for puppies",
]
LITTER = [
    "Clumping clay cat litter, 20 lb",
    "Unscented cat litter, 40 lb bag",
    "Crystal cat litter for odor control",
    "Natural pine pellet cat litter",
]


@pytest.fixture(scope="session")
def encoders(encoder_dir: Path) -> tuple[TextEncoder, ImageEncoder]:
    return load_encoders(encoder_dir)


def unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_a_category_moves_toward_the_products_it_is_surest_of_and_only_those() -> None:
    # "Software" is named far from what this catalog puts in it (games, along the third
    # axis); a vague game is closer to the name "Toys" than to "Software".
    software, toys = unit(1, 0, 0), unit(0, 1, 0)
    scorer = ZeroLabelScorer(["Software", "Toys"], np.stack([software, toys]))
    rng = np.random.default_rng(0)
    games = [unit(0.6, 0.3, 0.74) + rng.normal(0, 0.01, 3) for _ in range(6)]
    vague_game = unit(0.3, 0.45, 0.84)
    # Products the scorer hesitates about, a little nearer "Toys": the less confident half.
    unsure = [unit(0.49, 0.5, 0.71) + rng.normal(0, 0.005, 3) for _ in range(6)]
    products = np.stack([*games, vague_game, *unsure]).astype(np.float32)
    assert scorer.score(vague_game[None])[0].category == "Toys"

    adaptation = adapt_vectors(scorer, products)

    assert (adaptation.products, adaptation.counted) == (13, 7)  # the games and the vague one
    assert (adaptation.moved, adaptation.too_few) == (1, 1)  # "Toys" had one: too few
    centroid = np.mean(games, axis=0)
    expected = (1 - ADAPT_SHARE) * software + ADAPT_SHARE * centroid / np.linalg.norm(centroid)
    np.testing.assert_allclose(
        adaptation.vectors[0], expected / np.linalg.norm(expected), atol=1e-5
    )
    # The unsure products were suggested "Toys" but did not count, so it did not move.
    np.testing.assert_array_equal(adaptation.vectors[1], toys)
    # The catalog prior: each category's counted share against an even one, plus one each.
    np.testing.assert_allclose(
        adaptation.catalog_prior, CATALOG_PRIOR * np.log(np.array([7, 2]) / 9 * 2), rtol=1e-6
    )
    adapted = ZeroLabelScorer(
        scorer.paths, adaptation.vectors, catalog_prior=adaptation.catalog_prior
    )
    assert adapted.score(vague_game[None])[0].category == "Software"
    stored = ZeroLabelScorer.from_bytes(adapted.to_bytes())
    np.testing.assert_array_equal(stored.prior, adapted.prior)


def test_a_catalog_prior_tips_a_tie_toward_the_category_the_catalog_fills() -> None:
    paths = ["Full", "Empty"]
    scorer = ZeroLabelScorer(paths, np.stack([unit(1, 0), unit(0, 1)]))
    torn = unit(1, 1.02)[None]  # a hair closer to "Empty"
    assert scorer.score(torn)[0].category == "Empty"
    prior = np.array([0.01, -0.01], dtype=np.float32)
    assert ZeroLabelScorer(paths, scorer.vectors, catalog_prior=prior).score(torn)[0].category == (
        "Full"
    )
    with pytest.raises(ValueError, match="catalog prior"):
        ZeroLabelScorer(paths, scorer.vectors, catalog_prior=np.zeros(3))


def test_adapting_with_no_product_moves_nothing() -> None:
    scorer = ZeroLabelScorer(["A", "B"], np.stack([unit(1, 0), unit(0, 1)]))
    adaptation = adapt_vectors(scorer, np.zeros((0, 2), dtype=np.float32))
    assert (adaptation.products, adaptation.counted, adaptation.moved) == (0, 0, 0)
    np.testing.assert_array_equal(adaptation.vectors, scorer.vectors)


def adapted_rows(engine: Engine) -> int:
    return scalar(
        engine,
        "SELECT count(*) FROM model_versions WHERE status = 'zero_label' "
        "AND metrics ? 'adapted_from'",
    )


def test_an_adapted_scorer_is_stored_and_served_and_its_source_kept(
    engine: Engine, encoders: tuple[TextEncoder, ImageEncoder], fixture_data: Path
) -> None:
    settings = Settings(image_roots=[fixture_data], model_poll_seconds=0)
    text_encoder, image_encoder = encoders
    import_taxonomy(engine, GOOGLE_HEAD)
    ids = insert_products(
        engine,
        [{"sku": f"p{i}", "name": name} for i, name in enumerate(TOYS + LITTER)]
        + [{"sku": "blank", "name": "  "}],
    )
    base = ensure_zero_label_model(engine, text_encoder)
    assert base is not None

    report = adapt_zero_label_model(engine, text_encoder, image_encoder, settings)

    a = report.adaptation
    assert (report.catalog_products, report.read, report.no_text) == (9, 9, 1)
    # The more confident half counts (more when confidences tie at the cut).
    assert a.products == 8 and 4 <= a.counted < 8
    assert a.moved >= 1 and report.adapted_from == base.version
    assert report.version.startswith(f"{base.version}-adapted-")
    served = ensure_zero_label_model(engine, text_encoder)
    assert served is not None and served.version == report.version
    assert served.scorer.confidence_temperature == ADAPTED_CONFIDENCE_TEMPERATURE
    assert served.scorer.paths == base.scorer.paths
    assert served.scorer.catalog_prior is not None and base.scorer.catalog_prior is None
    moved = np.any(served.scorer.vectors != base.scorer.vectors, axis=1).sum()
    assert moved == a.moved
    # The taxonomy's own vectors stay, and are what the next adaptation starts from.
    source = ensure_zero_label_model(engine, text_encoder, adapted=False)
    assert source is not None and source.version == base.version
    np.testing.assert_array_equal(source.scorer.vectors, base.scorer.vectors)
    # Products' text vectors were cached on the way: the worker does not encode them again.
    assert scalar(engine, "SELECT count(*) FROM embeddings") == 9

    # A worker's next look classifies with it, and the predictions name it.
    runtime = Runtime(engine, settings, text_encoder, image_encoder)
    classifier = serving_classifier(runtime, None)
    assert isinstance(classifier, ZeroLabelClassifier)
    assert classifier.model_version_id == served.model_version_id
    with engine.begin() as conn:
        claimed = [
            c.product_id for c in claim_batch(conn, limit=100, lease_seconds=300, max_attempts=5)
        ]
    with Session(engine) as db, db.begin():
        summary = classify_products(db, claimed, classifier)
    assert (summary.needs_review, summary.classified) == (8, 0)  # still nothing auto-accepted
    with engine.connect() as conn:
        rows = dict(
            conn.execute(
                text(
                    "SELECT p.id, c.path FROM products p JOIN categories c "
                    "ON c.id = p.predicted_id WHERE p.model_version_id = :m"
                ),
                {"m": served.model_version_id},
            ).all()
        )
    assert [rows[i] for i in ids[:4]] == [DOG_TOYS] * 4
    assert [rows[i] for i in ids[4:8]] == [CAT_LITTER] * 4

    # The same products again: the same vectors, one row, refreshed rather than duplicated.
    again = adapt_zero_label_model(engine, text_encoder, image_encoder, settings)
    assert again.version == report.version and adapted_rows(engine) == 1
    # More products: another adaptation, and the latest is served. (The same names again,
    # so the same ones count, twice as many: the catalog prior moves whatever the encoder's
    # rounding.)
    insert_products(
        engine, [{"sku": f"more{i}", "name": name} for i, name in enumerate(TOYS + LITTER)]
    )
    newer = adapt_zero_label_model(engine, text_encoder, image_encoder, settings)
    assert newer.version != report.version and adapted_rows(engine) == 2
    latest = ensure_zero_label_model(engine, text_encoder)
    assert latest is not None and latest.version == newer.version

    # Undone: the taxonomy's own vectors are served again, the rows kept; adapting again
    # serves again, the same vectors included.
    assert withdraw_adaptations(engine, text_encoder) == (base.version, 2)
    assert withdraw_adaptations(engine, text_encoder) == (base.version, 0)
    undone = ensure_zero_label_model(engine, text_encoder)
    assert undone is not None and undone.version == base.version and adapted_rows(engine) == 2
    redone = adapt_zero_label_model(engine, text_encoder, image_encoder, settings)
    assert redone.version == newer.version
    served_again = ensure_zero_label_model(engine, text_encoder)
    assert served_again is not None and served_again.version == newer.version


def test_adapting_without_categories_or_enough_products_stores_nothing(
    engine: Engine, encoders: tuple[TextEncoder, ImageEncoder], fixture_data: Path
) -> None:
    settings = Settings(image_roots=[fixture_data])
    with pytest.raises(LookupError, match="load a taxonomy"):
        adapt_zero_label_model(engine, *encoders, settings)
    import_taxonomy(engine, GOOGLE_HEAD)
    insert_products(engine, [{"sku": "one", "name": TOYS[0]}, {"sku": "two", "name": LITTER[0]}])
    with pytest.raises(ValueError, match="no category moved: of 2 products"):
        adapt_zero_label_model(engine, *encoders, settings)
    assert adapted_rows(engine) == 0


def test_the_command_reports_what_it_read_used_and_stored(
    engine: Engine, database_url: str, encoder_dir: Path
) -> None:
    env = {
        **os.environ,
        "SHELVER_DATABASE_URL": database_url,
        "SHELVER_MODEL_DIR": str(encoder_dir),
    }

    def adapt(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "shelver.worker", "taxonomy", "adapt", *args],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    refused = adapt()
    assert refused.returncode == 2 and "load a taxonomy first" in refused.stderr
    import_taxonomy(engine, GOOGLE_HEAD)
    insert_products(
        engine,
        [{"sku": f"p{i}", "name": name} for i, name in enumerate(TOYS + LITTER)]
        + [{"sku": f"q{i}", "name": f"{name}, new"} for i, name in enumerate(TOYS + LITTER)]
        + [{"sku": "blank", "name": ""}],
    )
    result = adapt("--max-products", "16")
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert re.search(r"\d+ products suggested a category; the \d+ at confidence", out)
    assert "categories moved toward their products" in out
    assert "stored zero-label-" in out and "shelver backfill --suggestions" in out
    # Fewer products read than the catalog holds, said with the way to read them all.
    assert "read 16 of the catalog's 17 products" in " ".join(result.stderr.split())
    assert "--max-products" in result.stderr

    undone = adapt("--undo")
    assert undone.returncode == 0, undone.stderr
    assert "1 adaptation(s) withdrawn" in " ".join(undone.stdout.split())


def suggested_by(engine: Engine) -> set[str]:
    """The scorer versions behind the suggestions waiting for review."""
    with engine.connect() as conn:
        return set(
            conn.execute(
                text(
                    "SELECT DISTINCT m.version FROM products p JOIN model_versions m "
                    "ON m.id = p.model_version_id WHERE p.status = 'needs_review'"
                )
            ).scalars()
        )


def test_beat_adapts_as_products_arrive_and_a_training_worker_stores_it(
    engine: Engine, database_url: str, broker_url: str, encoder_dir: Path,
    encoders: tuple[TextEncoder, ImageEncoder], fixture_data: Path, tmp_path: Path,
) -> None:  # fmt: skip
    import redis

    env = worker_env(
        database_url, broker_url, encoder_dir, fixture_data, SHELVER_ADAPT_MIN_NEW_PRODUCTS="8"
    )
    queued = redis.Redis.from_url(broker_url)

    def beat(**overrides: str) -> str:
        result = subprocess.run(
            [*SHELVER, "beat", "--once"], env={**env, **overrides},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return " ".join(result.stdout.split())

    assert "no adaptation: no taxonomy loaded" in beat()
    import_taxonomy(engine, GOOGLE_HEAD)
    insert_products(engine, [{"sku": f"p{i}", "name": name} for i, name in enumerate(TOYS)])
    assert "no adaptation: 4 new products, 8 needed" in beat()
    assert "scheduled adaptation is off" in beat(SHELVER_ADAPT_MIN_NEW_PRODUCTS="0")
    insert_products(engine, [{"sku": f"q{i}", "name": name} for i, name in enumerate(LITTER)])
    # The taxonomy's own scorer suggests a category for each; all wait for review.
    settings = Settings(image_roots=[fixture_data], model_poll_seconds=0)
    classifier = serving_classifier(Runtime(engine, settings, *encoders), None)
    with engine.begin() as conn:
        claimed = [c.product_id for c in claim_batch(conn, limit=100, lease_seconds=300,
                                                     max_attempts=5)]  # fmt: skip
    with Session(engine) as db, db.begin():
        assert classify_products(db, claimed, classifier).needs_review == 8
    base = suggested_by(engine)
    assert len(base) == 1 and "adapted" not in next(iter(base))
    assert "adaptation queued: 8 new products" in beat()
    assert queued.llen("training") == 1

    with (
        running(["dispatch"], env, tmp_path / "dispatch.log"),
        running(["worker", "-Q", "training,backfill", "-c", "1"], env, tmp_path / "trainer.log"),
    ):
        wait_for(lambda: adapted_rows(engine) == 1, 180, "the scheduled adaptation", tmp_path)
        with engine.connect() as conn:
            version, metrics = conn.execute(
                text("SELECT version, metrics FROM model_versions WHERE metrics ? 'adapted_from'")
            ).one()
        assert metrics["catalog_products"] == 8 and metrics["categories_md5"]
        # The suggestions in review are re-scored by the adapted scorer, through a backfill.
        wait_for(lambda: suggested_by(engine) == {version}, 120, "the re-scored suggestions",
                 tmp_path)  # fmt: skip
        assert scalar(engine, "SELECT total FROM backfill_runs") == 8
        assert "no adaptation: 0 new products, 8 needed" in beat()
        assert queued.llen("training") == 0

        # A category added to the tree: the scorer it serves is new, so it is adapted again.
        # Four more products, fewer than the schedule's minimum, so that it is the taxonomy
        # change that queues it; with only the eight, whether a category gets three of the
        # surer half of the suggestions turned on float noise (CI, 2026-12-07).
        insert_products(engine, [{"sku": f"s{i}", "name": f"{n}, value pack"}
                                 for i, n in enumerate(LITTER)])  # fmt: skip
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO categories (name) VALUES ('Gift Cards')"))
        assert "adaptation queued: the taxonomy changed since the last adaptation" in beat()
        wait_for(lambda: adapted_rows(engine) == 2, 180, "the second adaptation", tmp_path)
    log = (tmp_path / "trainer.log").read_text()
    assert "scheduled adaptation: stored zero-label-" in log
    assert "8 suggestions in review queued for re-scoring" in log

    # An --undo is not overridden by the schedule.
    undo = subprocess.run(
        [*SHELVER, "taxonomy", "adapt", "--undo"], env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert undo.returncode == 0, undo.stderr
    insert_products(engine, [{"sku": f"r{i}", "name": f"{n}, new"} for i, n in enumerate(TOYS * 2)])
    assert "no adaptation: the last adaptation was withdrawn" in beat()
    # A champion serving alone would not use an adaptation; merged, it would.
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO model_versions (version, status, artifact, sha256, labels, encoders, "
                "threshold) VALUES ('c1', 'champion', 'x', 'x', '[]', '{}', 0.5)"
            )
        )
    assert "no adaptation: champion c1 serves alone" in beat()
    assert "the last adaptation was withdrawn" in beat(SHELVER_ZERO_LABEL_MERGE="1")
    assert queued.llen("training") == 0
