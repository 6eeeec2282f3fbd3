"""The zero-label scorer: a loaded taxonomy and no champion still give every product a
suggestion, stored once per taxonomy, always for review."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from support import (
    CATEGORIES,
    centroid_artifact,
    insert_products,
    register_champion,
    scalar,
    stop,
    training_titles,
)

from shelver.catalog.categories import categories_md5, ensure_categories
from shelver.catalog.embedded import create_database
from shelver.catalog.migrate import alembic_config, upgrade
from shelver.catalog.queue import claim_batch
from shelver.catalog.settings import Settings, sqlalchemy_url
from shelver.catalog.taxonomy import import_taxonomy
from shelver.worker.classify import FusionClassifier, classify_products
from shelver.worker.encoders import ImageEncoder, TextEncoder, load_encoders
from shelver.worker.runtime import Runtime
from shelver.worker.zero_label import (
    ACCESSORY_PENALTY,
    ZeroLabelClassifier,
    ZeroLabelScorer,
    ensure_zero_label_model,
    is_accessory_node,
    serving_classifier,
    unlabeled_categories,
)

GOOGLE_HEAD = (
    Path(__file__).resolve().parent
    / "fixtures"
    / "taxonomies"
    / "google-product-taxonomy-2021-09-21-head40.txt"
)
DOG_TOYS = "Animals & Pet Supplies > Pet Supplies > Dog Supplies > Dog Toys"
CAT_LITTER = "Animals & Pet Supplies > Pet Supplies > Cat Supplies > Cat Litter"


@pytest.fixture(scope="session")
def encoders(encoder_dir: Path) -> tuple[TextEncoder, ImageEncoder]:
    return load_encoders(encoder_dir)


def claim_all(engine: Engine) -> list[int]:
    with engine.begin() as conn:
        return [
            c.product_id for c in claim_batch(conn, limit=100, lease_seconds=300, max_attempts=5)
        ]


def test_branch_is_chosen_by_its_mass_then_the_closest_node_inside_it() -> None:
    # One product vector; branch A has one node a little closer than anything in B, but B
    # has many close nodes: B holds more mass, and B's closest node is the answer.
    paths = ["A", "A > a1", "B", "B > b1", "B > b2", "B > b3"]
    product = np.array([[1.0, 0.0]], dtype=np.float32)

    def unit(cos: float) -> list[float]:
        return [cos, float(np.sqrt(1 - cos * cos))]

    vectors = np.array([unit(0.0), unit(0.80), unit(0.0), unit(0.78), unit(0.77), unit(0.79)])
    verdict = ZeroLabelScorer(paths, vectors, temperature=0.05).score(product)[0]
    assert verdict.category == "B > b3"
    assert 0.5 < verdict.confidence < 1.0  # B's mass
    assert [s["category"] for s in verdict.top_k][0] == "B > b3"
    assert len(verdict.top_k) == 3


def test_a_node_named_for_accessories_must_be_clearly_closer_to_win() -> None:
    # A freezer is as close to "Freezer Accessories" as to "Freezers" (MiniLM does that);
    # the accessory node loses ACCESSORY_PENALTY, so only a clear lead keeps it.
    paths = ["Home", "Home > Freezers", "Home > Freezer Accessories", "Home > Freezer Parts"]

    def unit(cos: float) -> list[float]:
        return [cos, float(np.sqrt(1 - cos * cos))]

    def answer(freezers: float, accessories: float) -> str:
        vectors = np.array([unit(0.0), unit(freezers), unit(accessories), unit(0.0)])
        scorer = ZeroLabelScorer(paths, vectors)
        return scorer.score(np.array([[1.0, 0.0]], dtype=np.float32))[0].category

    assert answer(0.70, 0.72) == "Home > Freezers"
    assert answer(0.70, 0.70 + ACCESSORY_PENALTY + 0.01) == "Home > Freezer Accessories"
    assert [is_accessory_node(p) for p in paths] == [False, False, True, True]
    # Only the node's own name counts: a case under an accessories branch is a product.
    assert not is_accessory_node("Electronics > Phone Accessories > Phone Cases")


def test_without_a_champion_products_get_taxonomy_suggestions_and_wait_for_review(
    engine: Engine, encoders: tuple[TextEncoder, ImageEncoder], fixture_data: Path
) -> None:
    import_taxonomy(engine, GOOGLE_HEAD)
    insert_products(
        engine,
        [
            {"sku": "toy", "name": "Squeaky rubber chew toy for dogs"},
            {"sku": "litter", "name": "Clumping clay cat litter, 20 lb"},
            {"sku": "empty", "name": "   "},
        ],
    )
    runtime = Runtime(engine, Settings(image_roots=[fixture_data], model_poll_seconds=0), *encoders)
    classifier = serving_classifier(runtime, None)
    assert isinstance(classifier, ZeroLabelClassifier)
    with Session(engine) as db, db.begin():
        summary = classify_products(db, claim_all(engine), classifier)
    assert (summary.classified, summary.needs_review, summary.failed) == (0, 2, 1)

    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT p.sku, p.status, c.path, p.confidence, m.status AS model_status "
                "FROM products p LEFT JOIN categories c ON c.id = p.predicted_id "
                "LEFT JOIN model_versions m ON m.id = p.model_version_id ORDER BY p.id"
            )
        ).all()
    by_sku = {r.sku: r for r in rows}
    assert by_sku["toy"].path == DOG_TOYS
    assert by_sku["litter"].path == CAT_LITTER
    for sku in ("toy", "litter"):
        assert by_sku[sku].status == "needs_review"
        assert by_sku[sku].model_status == "zero_label"
        assert 0 < by_sku[sku].confidence <= 1
    assert by_sku["empty"].status == "failed"
    assert scalar(engine, "SELECT count(*) FROM predictions") == 2
    # Every row is finished: two suggestions, one failure with its reason.
    assert scalar(engine, "SELECT count(*) FROM classification_queue") == 0


def test_category_vectors_are_stored_once_per_taxonomy(
    engine: Engine, encoders: tuple[TextEncoder, ImageEncoder]
) -> None:
    text_encoder = encoders[0]
    assert ensure_zero_label_model(engine, text_encoder) is None  # no categories, no scorer

    import_taxonomy(engine, GOOGLE_HEAD)
    first = ensure_zero_label_model(engine, text_encoder)
    again = ensure_zero_label_model(engine, text_encoder)
    assert first is not None and again is not None
    assert again.model_version_id == first.model_version_id
    assert scalar(engine, "SELECT count(*) FROM model_versions WHERE status = 'zero_label'") == 1
    # The row names its taxonomy by the digest `backfill --suggestions` compares; a row
    # stored before rows recorded it gets it at the next look.
    with engine.connect() as conn:
        digest = categories_md5(conn)
    recorded = "SELECT metrics->>'categories_md5' FROM model_versions WHERE status = 'zero_label'"
    assert scalar(engine, recorded) == digest
    with engine.begin() as conn:
        conn.execute(text("UPDATE model_versions SET metrics = metrics - 'categories_md5'"))
    ensure_zero_label_model(engine, text_encoder)
    assert scalar(engine, recorded) == digest

    with engine.begin() as conn:
        ensure_categories(conn, ["Animals & Pet Supplies > Pet Supplies > Fish Supplies"])
    changed = ensure_zero_label_model(engine, text_encoder)
    assert changed is not None and changed.model_version_id != first.model_version_id
    with engine.connect() as conn:
        assert conn.execute(
            text("SELECT metrics->>'categories_md5' FROM model_versions WHERE id = :id"),
            {"id": changed.model_version_id},
        ).scalar_one() == categories_md5(conn)
    assert "Animals & Pet Supplies > Pet Supplies > Fish Supplies" in changed.scorer.paths
    # Not a model the registry may promote: no champion appeared.
    assert scalar(engine, "SELECT count(*) FROM model_versions WHERE status = 'champion'") == 0


def test_a_category_is_found_by_the_description_its_taxonomy_gives(
    engine: Engine, encoders: tuple[TextEncoder, ImageEncoder], tmp_path: Path
) -> None:
    text_encoder = encoders[0]
    watch = text_encoder.encode(["Smartwatch 42mm Aluminum Case with Sport Band"])
    taxonomy = tmp_path / "taxonomy.csv"
    # Names that say nothing of what the categories hold; the synonyms column does.
    models = []
    for watches, knives in (("Line B", "Line A"), ("Line A", "Line B")):
        taxonomy.write_text(
            f"path,synonyms\n{watches},smartwatches; fitness trackers\n"
            f"{knives},kitchen knives; cutting boards\n"
        )
        assert import_taxonomy(engine, taxonomy).described == 2
        model = ensure_zero_label_model(engine, text_encoder)
        assert model is not None
        assert model.scorer.score(watch)[0].category == watches
        models.append(model.version)
    # Changed descriptions are another scorer, not the stored vectors of the old ones.
    assert models[0] != models[1]
    assert scalar(engine, "SELECT count(*) FROM model_versions WHERE status = 'zero_label'") == 2


def write_labeled(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "name", "description", "category", "category_path", "image"])
        for i, (name, category_path) in enumerate(rows):
            writer.writerow([f"e{i}", name, "", category_path.split(" > ")[0], category_path, ""])
    return path


def shelver_cli(
    database_url: str, encoder_dir: Path, *args: str, merge: bool = False
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "SHELVER_DATABASE_URL": database_url,
        "SHELVER_MODEL_DIR": str(encoder_dir),
        "SHELVER_ZERO_LABEL_MERGE": "1" if merge else "0",
    }
    return subprocess.run(
        [sys.executable, "-m", "shelver.worker", *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_evaluate_without_a_champion_scores_the_zero_label_scorer_and_says_so(
    engine: Engine, database_url: str, encoder_dir: Path, tmp_path: Path
) -> None:
    import_taxonomy(engine, GOOGLE_HEAD)
    held = write_labeled(
        tmp_path / "held.csv",
        [
            ("Squeaky rubber chew toy for dogs", DOG_TOYS),
            ("Clumping clay cat litter, 20 lb", CAT_LITTER),
            ("4K television, 55 inch", "Electronics > Video > Televisions"),
        ],
    )
    result = shelver_cli(database_url, str(encoder_dir), "evaluate", str(held), "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["scorer"] == "zero_label"
    assert figures["model"].startswith("zero-label-")
    assert figures["n"] == 3
    assert figures["hierarchical"]["path_accuracy"] == pytest.approx(2 / 3)
    assert figures["unknown_categories"] == {"Electronics > Video > Televisions": 1}
    assert (figures["auto_accepted"], figures["unknown_auto_accepted"]) == (0.0, 0.0)
    # Nothing was written to the catalog but the scorer's stored category vectors.
    assert scalar(engine, "SELECT count(*) FROM products") == 0


def test_evaluate_with_neither_champion_nor_taxonomy_says_what_to_load(
    engine: Engine, database_url: str, encoder_dir: Path, tmp_path: Path
) -> None:
    held = write_labeled(tmp_path / "held.csv", [("Squeaky chew toy", DOG_TOYS)])
    result = shelver_cli(database_url, str(encoder_dir), "evaluate", str(held), "--json")
    assert result.returncode != 0
    assert "shelver taxonomy import" in result.stderr
    assert result.stdout == ""


def test_with_a_champion_categories_it_never_learned_are_suggested_and_wait_for_review(
    engine: Engine, encoders: tuple[TextEncoder, ImageEncoder], fixture_data: Path
) -> None:
    artifact = centroid_artifact(*encoders, training_titles(fixture_data))
    register_champion(engine, artifact, "centroid-1")
    new_branch = ["Toys, Games & Drones > Drones", "Health & Beauty > Electric Toothbrushes"]
    with engine.begin() as conn:
        ensure_categories(conn, [*CATEGORIES, *new_branch])
    products = [
        {"sku": "drone", "name": "Quadcopter drone with 4K camera and remote controller"},
        {"sku": "brush", "name": "Rechargeable electric toothbrush with 3 brushing modes"},
        {"sku": "fridge", "name": "Whirlpool 25 cu. ft. side-by-side refrigerator, stainless"},
    ]
    settings = Settings(image_roots=[fixture_data], model_poll_seconds=0, zero_label_merge=True)
    runtime = Runtime(engine, settings, *encoders)
    champion = runtime.champion()
    assert champion is not None
    unmerged = Runtime(engine, settings.model_copy(update={"zero_label_merge": False}), *encoders)

    def classify(classifier: object, run: str) -> dict[str, tuple[str, str]]:
        insert_products(engine, [{**p, "sku": f"{p['sku']}-{run}"} for p in products])
        with Session(engine) as db, db.begin():
            classify_products(db, claim_all(engine), classifier)
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT p.sku, c.path, p.status FROM products p "
                    "JOIN categories c ON c.id = p.predicted_id WHERE p.sku LIKE :run"
                ),
                {"run": f"%-{run}"},
            ).all()
        return {sku.split("-")[0]: (path, status) for sku, path, status in rows}

    alone = classify(
        FusionClassifier(runtime.text_encoder, runtime.image_encoder, champion, settings), "alone"
    )
    merged = classify(serving_classifier(runtime, champion), "merged")
    off = classify(serving_classifier(unmerged, champion), "off")

    # The champion alone can only name what it learned.
    assert alone["drone"][0] in CATEGORIES and alone["brush"][0] in CATEGORIES
    assert merged["drone"] == ("Toys, Games & Drones > Drones", "needs_review")
    assert merged["brush"] == ("Health & Beauty > Electric Toothbrushes", "needs_review")
    # What the champion knows it still answers as before.
    assert merged["fridge"] == alone["fridge"] == ("Appliances", "classified")
    # SHELVER_ZERO_LABEL_MERGE off (the default): the champion serves alone.
    assert off == alone


def test_unlabeled_categories_are_those_no_label_covers() -> None:
    labels = ["Cell Phones", "Electronics > Audio"]
    paths = [
        "Cell Phones",
        "Cell Phones > Cases",  # below a label: the champion answers it coarsely
        "Electronics",  # an ancestor of a label: a node of the champion's tree
        "Electronics > Audio",
        "Electronics > Video",  # a sibling of a label: unlabeled
        "Toys",
    ]
    assert [paths[k] for k in unlabeled_categories(labels, paths)] == [
        "Electronics > Video",
        "Toys",
    ]


def test_evaluate_with_a_champion_scores_it_merged_with_the_unlabeled_categories(
    engine: Engine,
    database_url: str,
    encoder_dir: Path,
    encoders: tuple[TextEncoder, ImageEncoder],
    fixture_data: Path,
    tmp_path: Path,
) -> None:
    register_champion(engine, centroid_artifact(*encoders, training_titles(fixture_data)), "c-1")
    held = write_labeled(
        tmp_path / "held.csv",
        [
            ("Quadcopter drone with 4K camera and remote controller", "Toys > Drones"),
            ("Whirlpool 25 cu. ft. side-by-side refrigerator, stainless", "Appliances"),
        ],
    )
    alone = shelver_cli(database_url, encoder_dir, "evaluate", str(held), "--json", merge=True)
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout)["scorer"] == "champion"  # no category beyond its labels

    with engine.begin() as conn:
        ensure_categories(conn, [*CATEGORIES, "Toys > Drones"])
    off = shelver_cli(database_url, encoder_dir, "evaluate", str(held), "--json")
    assert json.loads(off.stdout)["scorer"] == "champion"  # SHELVER_ZERO_LABEL_MERGE off
    result = shelver_cli(database_url, encoder_dir, "evaluate", str(held), "--json", merge=True)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["scorer"] == "champion+zero_label"
    assert figures["model"] == "c-1" and figures["zero_label_model"].startswith("zero-label-")
    assert figures["unlabeled_categories"] == 2  # Toys, Toys > Drones
    assert figures["hierarchical"]["path_accuracy"] == 1.0
    assert json.loads(alone.stdout)["hierarchical"]["path_accuracy"] == 0.5


def test_a_worker_without_a_champion_sends_taxonomy_suggestions_to_review(
    engine: Engine, database_url: str, broker_url: str, encoder_dir: Path, tmp_path: Path
) -> None:
    import_taxonomy(engine, GOOGLE_HEAD)
    env = {
        **os.environ,
        "SHELVER_DATABASE_URL": database_url,
        "SHELVER_BROKER_URL": broker_url,
        "SHELVER_MODEL_DIR": str(encoder_dir),
        "SHELVER_MODEL_POLL_SECONDS": "1",
        "SHELVER_POLL_SECONDS": "1",
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "shelver.worker", *args],
            env=env,
            stdout=(tmp_path / f"{args[0]}.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for args in (["dispatch"], ["worker", "-Q", "classify", "-c", "1"])
    ]
    try:
        insert_products(
            engine,
            [
                {"sku": "toy", "name": "Squeaky rubber chew toy for dogs"},
                {"sku": "litter", "name": "Clumping clay cat litter, 20 lb"},
            ],
        )
        deadline = time.monotonic() + 180
        while scalar(engine, "SELECT count(*) FROM products WHERE status = 'pending'"):
            logs = "".join(p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("*.log"))
            assert time.monotonic() < deadline, f"products still pending\n{logs}"
            time.sleep(0.5)
    finally:
        stop(*processes)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT p.sku, p.status, c.path, m.status FROM products p "
                "JOIN categories c ON c.id = p.predicted_id "
                "JOIN model_versions m ON m.id = p.model_version_id ORDER BY p.sku"
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        ("litter", "needs_review", CAT_LITTER, "zero_label"),
        ("toy", "needs_review", DOG_TOYS, "zero_label"),
    ]


def test_migration_0006_down_removes_zero_label_scorers_and_what_they_predicted(
    services: tuple[str, str], encoders: tuple[TextEncoder, ImageEncoder]
) -> None:
    server, _, name = services[0].rpartition("/")
    url = create_database(f"{server}/postgres", f"{name}_zero_label_migration", recreate=True)
    upgrade(url)
    engine = create_engine(sqlalchemy_url(url), future=True)
    try:
        import_taxonomy(engine, GOOGLE_HEAD)
        model = ensure_zero_label_model(engine, encoders[0])
        assert model is not None
        insert_products(engine, [{"sku": "toy", "name": "Squeaky chew toy"}])
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO predictions (product_id, model_version_id, content_hash, "
                    "predicted_id, confidence, top_k) SELECT id, :m, content_hash, "
                    "(SELECT min(id) FROM categories), 0.5, '[]' FROM products"
                ),
                {"m": model.model_version_id},
            )
            conn.execute(
                text("UPDATE products SET model_version_id = :m"), {"m": model.model_version_id}
            )

        command.downgrade(alembic_config(url), "0005")
        assert scalar(engine, "SELECT count(*) FROM model_versions") == 0
        assert scalar(engine, "SELECT count(*) FROM predictions") == 0
        assert scalar(engine, "SELECT count(model_version_id) FROM products") == 0
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO model_versions (version, status, artifact, sha256, labels, "
                    "encoders, threshold) VALUES ('z', 'zero_label', '', '', '[]', '{}', 1)"
                )
            )
    finally:
        engine.dispose()
