"""The classify batch: results, history, cache and queue written together; per-row failures.

Runs the real encoders (exported once per session) and a small real fusion model:
a nearest-centroid ONNX graph built here from product titles of the fixture data,
packaged and registered exactly as training would. The helpers live in
tests/support.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, text
from support import (
    CATEGORIES,
    centroid_artifact,
    insert_products,
    register_champion,
    training_titles,
)

from shelver.catalog.db import session_scope
from shelver.catalog.queue import claim_batch
from shelver.catalog.settings import Settings
from shelver.worker.classify import FusionClassifier, classify_products, load_rows, write_results
from shelver.worker.encoders import ImageEncoder, TextEncoder, load_encoders
from shelver.worker.fusion import FusionModel, sha256_hex
from shelver.worker.inputs import ModelInputs
from shelver.worker.open_set import MARGIN, OpenSetGate
from shelver.worker.runtime import Runtime

# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def encoders(encoder_dir: Path) -> tuple[TextEncoder, ImageEncoder]:
    return load_encoders(encoder_dir)


@pytest.fixture(scope="session")
def artifact(encoders: tuple[TextEncoder, ImageEncoder], fixture_data: Path) -> bytes:
    return centroid_artifact(*encoders, training_titles(fixture_data))


@pytest.fixture
def settings(fixture_data: Path) -> Settings:
    return Settings(image_roots=[fixture_data], model_poll_seconds=0)


@pytest.fixture
def runtime(engine: Engine, settings: Settings, encoders, artifact: bytes) -> Runtime:  # noqa: ANN001
    register_champion(engine, artifact, "centroid-1")
    return Runtime(engine, settings, *encoders)


def classifier_for(runtime: Runtime) -> FusionClassifier:
    champion = runtime.champion()
    assert champion is not None
    return FusionClassifier(runtime.text_encoder, runtime.image_encoder, champion, runtime.settings)


def claim_all(engine: Engine) -> list[int]:
    with engine.begin() as conn:
        claims = claim_batch(conn, limit=1000, lease_seconds=300, max_attempts=5)
    return [c.product_id for c in claims]


def products(engine: Engine) -> dict[str, dict]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                """
                SELECT p.sku, p.status, c.name AS category, p.confidence, p.error,
                       p.model_version_id
                FROM products p LEFT JOIN categories c ON c.id = p.predicted_id
                """
            )
        ).mappings()
        return {row["sku"]: dict(row) for row in rows}


def scalar(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return conn.execute(text(sql)).scalar_one()


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_batch_writes_results_history_cache_and_finishes_its_queue_rows(
    engine: Engine, runtime: Runtime
) -> None:
    image = "bestbuy/" + next(
        p.relative_to(runtime.settings.image_roots[0] / "bestbuy").as_posix()
        for p in sorted((runtime.settings.image_roots[0] / "bestbuy" / "images").glob("*.jpg"))
    )
    insert_products(
        engine,
        [
            {"sku": "phone", "name": "Apple iPhone 7 32GB Gold Unlocked smartphone"},
            {"sku": "washer", "name": "Samsung 4.5 cu. ft. front load washer, white"},
            {"sku": "game", "name": "Halo 5: Guardians for Xbox One", "image_uri": image},
        ],
    )
    ids = claim_all(engine)
    with session_scope(engine) as db:
        summary = classify_products(db, ids, classifier_for(runtime))

    assert summary.classified + summary.needs_review == 3 and summary.failed == 0
    result = products(engine)
    assert result["phone"]["category"] == "Cell Phones"
    assert result["washer"]["category"] == "Appliances"
    assert result["game"]["category"] == "Video Games"
    for row in result.values():
        assert row["status"] == ("classified" if row["confidence"] >= 0.5 else "needs_review")
        assert row["error"] is None
    assert scalar(engine, "SELECT count(*) FROM predictions") == 3
    assert scalar(engine, "SELECT count(*) FROM classification_queue") == 0
    # Text vectors for all three, an image vector for the one with a photo.
    assert scalar(engine, "SELECT count(*) FROM embeddings") == 4
    with engine.connect() as conn:
        top_k = conn.execute(text("SELECT top_k FROM predictions LIMIT 1")).scalar_one()
    assert len(top_k) == 3 and top_k[0]["p"] >= top_k[1]["p"]


@pytest.mark.slow
def test_missing_image_is_classified_from_text_with_the_reason_recorded(
    engine: Engine, runtime: Runtime
) -> None:
    insert_products(
        engine,
        [
            {"sku": "a", "name": "Yamaha digital piano 88 keys", "image_uri": "no/such.jpg"},
            {"sku": "b", "name": "Fender electric guitar", "image_uri": "/etc/passwd"},
        ],
    )
    with session_scope(engine) as db:
        classify_products(db, claim_all(engine), classifier_for(runtime))
    result = products(engine)
    assert result["a"]["category"] == "Musical Instruments"
    assert result["a"]["error"].startswith("image not used: not_found")
    assert result["b"]["error"].startswith("image not used: outside_root")
    assert result["b"]["status"] in ("classified", "needs_review")


@pytest.mark.slow
def test_a_row_without_text_or_image_fails_alone(engine: Engine, runtime: Runtime) -> None:
    insert_products(
        engine,
        [
            {"sku": "empty", "name": "  ", "image_uri": "missing.jpg"},
            {"sku": "ok", "name": "Samsung Galaxy S7 edge 32GB"},
        ],
    )
    with session_scope(engine) as db:
        summary = classify_products(db, claim_all(engine), classifier_for(runtime))
    assert summary.failed == 1
    result = products(engine)
    assert result["empty"]["status"] == "failed"
    assert "no usable text and no usable image" in result["empty"]["error"]
    assert result["ok"]["category"] == "Cell Phones"
    assert scalar(engine, "SELECT count(*) FROM classification_queue") == 0


@pytest.mark.slow
def test_product_changed_while_scoring_keeps_its_queue_row_and_gets_no_result(
    engine: Engine, runtime: Runtime
) -> None:
    (pid,) = insert_products(engine, [{"sku": "x", "name": "Roland drum kit"}])
    ids = claim_all(engine)
    with session_scope(engine) as db:
        rows = load_rows(db, ids)
        classifier = classifier_for(runtime)
        scored = classifier.score(db, rows)
        # Someone edits the product after we read it and before we write.
        with engine.begin() as other:
            other.execute(
                text("UPDATE products SET name = 'LG dishwasher' WHERE id = :id"), {"id": pid}
            )
        summary = write_results(db, rows, scored, classifier)
    assert summary.stale == 1
    assert products(engine)["x"]["status"] == "pending"
    with engine.connect() as conn:
        queued = conn.execute(
            text("SELECT reason, claimed_at FROM classification_queue WHERE product_id = :id"),
            {"id": pid},
        ).one()
    assert queued == ("update", None)
    assert scalar(engine, "SELECT count(*) FROM predictions") == 0


@pytest.mark.slow
def test_redelivered_batch_writes_nothing_new_and_reuses_the_cache(
    engine: Engine, runtime: Runtime
) -> None:
    insert_products(engine, [{"sku": "p", "name": "Nintendo Switch console with Joy-Con"}])
    ids = claim_all(engine)
    classifier = classifier_for(runtime)
    with session_scope(engine) as db:
        classify_products(db, ids, classifier)
    with session_scope(engine) as db:
        rows = load_rows(db, ids)
        again = classifier.score(db, rows)
        write_results(db, rows, again, classifier)
    assert all(not fresh for fresh in again.new_embeddings.values())
    assert scalar(engine, "SELECT count(*) FROM predictions") == 1
    assert scalar(engine, "SELECT count(*) FROM embeddings") == 1


def test_without_a_champion_rows_are_released_without_spending_an_attempt(
    engine: Engine,
) -> None:
    insert_products(engine, [{"sku": "q", "name": "Dyson vacuum"}])
    ids = claim_all(engine)
    with session_scope(engine) as db:
        summary = classify_products(db, ids, None, no_model_delay_s=60)
    assert summary.released == 1
    with engine.connect() as conn:
        attempts, claimed_at, waits = conn.execute(
            text(
                "SELECT attempts, claimed_at, not_before > now() + interval '50 seconds' "
                "FROM classification_queue"
            )
        ).one()
    assert (attempts, claimed_at, waits) == (0, None, True)
    assert products(engine)["q"]["status"] == "pending"


@pytest.mark.slow
def test_new_champion_is_swapped_in_and_a_tampered_one_refused(
    engine: Engine,
    runtime: Runtime,
    encoders,
    fixture_data: Path,  # noqa: ANN001
) -> None:
    first = runtime.champion()
    assert first is not None and first.version == "centroid-1"

    examples = training_titles(fixture_data)
    second = centroid_artifact(*encoders, {k: examples[k] for k in CATEGORIES[:2]})
    second_id = register_champion(engine, second, "centroid-2")
    assert runtime.champion().version == "centroid-2"
    assert runtime.champion().labels == sorted(CATEGORIES[:2])

    third = centroid_artifact(*encoders, {k: examples[k] for k in CATEGORIES[2:]})
    third_id = register_champion(engine, third, "centroid-3")
    # Altered in place after registration: the bytes no longer hash to the recorded sha256.
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE model_versions SET artifact = :other WHERE id = :id"),
            {"other": second, "id": third_id},
        )
    assert runtime.champion().version == "centroid-2"
    assert runtime.champion().model_version_id == second_id


# --- backoff on a category tree ----------------------------------------------------------------

PHONE = "Apple iPhone 7 32GB Gold Unlocked smartphone"


def tree_examples(fixture_data: Path) -> dict[str, list[str]]:
    """Labels at two depths: Cell Phones split in two leaves, the rest flat roots."""
    titles = training_titles(fixture_data)
    phones = titles.pop("Cell Phones")
    return {
        "Cell Phones > Unlocked Phones": phones[::2],
        "Cell Phones > Prepaid Phones": phones[1::2],
        **titles,
    }


def phone_path_probs(encoders, examples: dict[str, list[str]]) -> tuple[float, float]:  # noqa: ANN001
    """The tree model's probability of Cell Phones and of the phone's leaf candidate."""
    text_encoder, image_encoder = encoders
    artifact = centroid_artifact(text_encoder, image_encoder, examples)
    model = FusionModel.from_artifact(artifact, sha256_hex(artifact))
    emb = text_encoder.encode([PHONE])
    inputs = ModelInputs(
        [PHONE], [PHONE], emb, np.zeros((1, image_encoder.dim)), np.zeros(1, dtype=np.float32)
    )
    decision = model.tree.decide(model.tree.node_probs(model.predict(inputs))[0], [0.0, 0.0])
    assert decision.candidate.startswith("Cell Phones > ")
    root, leaf = decision.path_probs
    assert leaf < root, "the two phone leaves must share the root's probability"
    return root, leaf


def classify_phone(engine: Engine, settings: Settings, encoders, artifact: bytes, level1: float):  # noqa: ANN001, ANN201
    register_champion(engine, artifact, "tree-1", threshold=level1)
    runtime = Runtime(engine, settings, *encoders)
    insert_products(engine, [{"sku": "phone", "name": PHONE}])
    with session_scope(engine) as db:
        classify_products(db, claim_all(engine), classifier_for(runtime))
    with engine.connect() as conn:
        return conn.execute(
            text(
                """
                SELECT p.status, c.path, p.confidence, h.top_k, hc.path AS history_path
                FROM products p
                JOIN categories c ON c.id = p.predicted_id
                JOIN predictions h ON h.product_id = p.id
                JOIN categories hc ON hc.id = h.predicted_id
                WHERE p.sku = 'phone'
                """
            )
        ).one()


@pytest.mark.slow
def test_unsure_leaf_under_a_sure_parent_gets_the_parent(
    engine: Engine,
    settings: Settings,
    encoders,
    fixture_data: Path,  # noqa: ANN001
) -> None:
    examples = tree_examples(fixture_data)
    root, leaf = phone_path_probs(encoders, examples)
    # Level 1 sure at the phone's root probability, level 2 just above its leaf's.
    artifact = centroid_artifact(
        *encoders, examples, threshold=root, extra_meta={"level_thresholds": [root, leaf + 1e-3]}
    )
    status, path, confidence, top_k, history_path = classify_phone(
        engine, settings, encoders, artifact, level1=root - 1e-6
    )
    assert (status, path, history_path) == ("classified", "Cell Phones", "Cell Phones")
    assert confidence == pytest.approx(root, abs=1e-5)
    # The history keeps the leaf candidate first, then other label paths.
    assert top_k[0]["category"].startswith("Cell Phones > ")
    assert top_k[0]["p"] == pytest.approx(leaf, abs=1e-5)
    assert len(top_k) == 3 and {t["category"] for t in top_k} <= set(examples)


@pytest.mark.slow
def test_sure_leaf_is_written_at_its_depth(
    engine: Engine,
    settings: Settings,
    encoders,
    fixture_data: Path,  # noqa: ANN001
) -> None:
    examples = tree_examples(fixture_data)
    root, leaf = phone_path_probs(encoders, examples)
    artifact = centroid_artifact(
        *encoders, examples, threshold=root, extra_meta={"level_thresholds": [root, leaf - 1e-3]}
    )
    status, path, confidence, top_k, _ = classify_phone(
        engine, settings, encoders, artifact, level1=root - 1e-6
    )
    assert status == "classified" and path == top_k[0]["category"]
    assert path.startswith("Cell Phones > ") and confidence == pytest.approx(leaf, abs=1e-5)


@pytest.mark.slow
def test_unsure_at_every_level_goes_to_review_with_the_leaf_candidate(
    engine: Engine,
    settings: Settings,
    encoders,
    fixture_data: Path,  # noqa: ANN001
) -> None:
    examples = tree_examples(fixture_data)
    root, leaf = phone_path_probs(encoders, examples)
    artifact = centroid_artifact(
        *encoders, examples, threshold=root, extra_meta={"level_thresholds": [root, leaf]}
    )
    status, path, confidence, top_k, history_path = classify_phone(
        engine, settings, encoders, artifact, level1=root + 1e-3
    )
    assert status == "needs_review"
    # The suggestion a person sees, and the history, are the leaf candidate.
    assert path == history_path == top_k[0]["category"]
    assert path.startswith("Cell Phones > ") and confidence == pytest.approx(leaf, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("floor, status", [(0.0, "classified"), (1.01, "needs_review")])
def test_the_models_open_set_gate_decides_whether_a_sure_answer_is_auto_accepted(
    engine: Engine,
    settings: Settings,
    encoders,  # noqa: ANN001
    fixture_data: Path,
    floor: float,
    status: str,
) -> None:
    """A margin floor above any possible lead refuses every auto-accept; the answer stays
    as the suggestion. Floor 0 lets the same answer stand."""
    examples = tree_examples(fixture_data)
    root, leaf = phone_path_probs(encoders, examples)
    gate = OpenSetGate(MARGIN, floor, sorted({path.split(" > ")[0] for path in examples}))
    artifact = centroid_artifact(
        *encoders,
        examples,
        threshold=root,
        extra_meta={"level_thresholds": [root, leaf - 1e-3], "open_set": gate.to_meta()},
    )
    got, path, confidence, top_k, _ = classify_phone(
        engine, settings, encoders, artifact, level1=root - 1e-6
    )
    assert got == status
    assert path == top_k[0]["category"] and path.startswith("Cell Phones > ")
