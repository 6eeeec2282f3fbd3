"""The embedding cache returns exactly the vectors of the current content and encoder."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import Connection, Engine, text

from shelver.catalog.db import session_scope
from shelver.catalog.embeddings import CachedEmbedding, delete_stale, get_cached, put

TEXT = "all-MiniLM-L6-v2:7b3ae2cebf5dd09a"
OTHER_EXPORT = "all-MiniLM-L6-v2:0123456789abcdef"


def add_product(conn: Connection, sku: str, name: str) -> tuple[int, str]:
    return conn.execute(
        text(
            "INSERT INTO products (sku, name, description) VALUES (:sku, :name, 'd') "
            "RETURNING id, content_hash"
        ),
        {"sku": sku, "name": name},
    ).one()


def vector(seed: int, dim: int = 384) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_stored_vectors_come_back_bit_for_bit(engine: Engine) -> None:
    with engine.begin() as conn:
        a = add_product(conn, "a", "AAA batteries")
        b = add_product(conn, "b", "USB cable")
        assert put(conn, TEXT, [CachedEmbedding(*a, vector(1)), (*b, vector(2))]) == 2
    with engine.connect() as conn:
        cached = get_cached(conn, TEXT, [a, b])
    assert set(cached) == {a[0], b[0]}
    assert cached[a[0]].dtype == np.float32
    assert np.array_equal(cached[a[0]], vector(1)) and np.array_equal(cached[b[0]], vector(2))


def test_changed_product_never_reads_its_stale_vector(engine: Engine) -> None:
    with engine.begin() as conn:
        product_id, old_hash = add_product(conn, "a", "AAA batteries")
        put(conn, TEXT, [(product_id, old_hash, vector(1))])
        new_hash = conn.execute(
            text("UPDATE products SET name = 'AA batteries' WHERE id = :id RETURNING content_hash"),
            {"id": product_id},
        ).scalar_one()
    assert new_hash != old_hash
    with engine.begin() as conn:
        assert get_cached(conn, TEXT, [(product_id, new_hash)]) == {}
        assert delete_stale(conn) == 1
        assert get_cached(conn, TEXT, [(product_id, old_hash)]) == {}


def test_another_encoder_export_does_not_share_vectors(engine: Engine) -> None:
    with engine.begin() as conn:
        key = add_product(conn, "a", "AAA batteries")
        put(conn, TEXT, [(*key, vector(1))])
        assert get_cached(conn, OTHER_EXPORT, [key]) == {}
        # Image and text vectors of the same product live side by side.
        put(conn, OTHER_EXPORT, [(*key, vector(3, dim=1280))])
        assert get_cached(conn, OTHER_EXPORT, [key])[key[0]].shape == (1280,)


def test_repeated_put_keeps_the_first_vector_and_does_not_fail(engine: Engine) -> None:
    with engine.begin() as conn:
        key = add_product(conn, "a", "AAA batteries")
        assert put(conn, TEXT, [(*key, vector(1))]) == 1
    # A redelivered batch writes the same key again, in a later transaction.
    with session_scope(engine) as session:
        assert put(session, TEXT, [(*key, vector(9))]) == 0
        assert np.array_equal(get_cached(session, TEXT, [key])[key[0]], vector(1))


def test_misses_are_simply_absent(engine: Engine) -> None:
    with engine.begin() as conn:
        key = add_product(conn, "a", "AAA batteries")
        assert get_cached(conn, TEXT, []) == {}
        assert get_cached(conn, TEXT, [key, (999_999, "nohash")]) == {}
        assert put(conn, TEXT, []) == 0


def test_non_finite_vectors_are_refused(engine: Engine) -> None:
    bad = vector(1)
    bad[3] = np.nan
    with engine.begin() as conn:
        key = add_product(conn, "a", "AAA batteries")
        with pytest.raises(ValueError):
            put(conn, TEXT, [(*key, bad)])


def test_large_batches_are_written_in_chunks(engine: Engine) -> None:
    with engine.begin() as conn:
        keys = [add_product(conn, f"sku-{i}", f"product {i}") for i in range(1_200)]
        assert put(conn, TEXT, [(*k, vector(i, dim=8)) for i, k in enumerate(keys)]) == 1_200
        assert len(get_cached(conn, TEXT, keys)) == 1_200
