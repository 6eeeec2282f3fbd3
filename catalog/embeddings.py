"""The embedding cache: vectors keyed by product, encoder identity and content hash.

An encoder identity is "name:hash" of what the encoder computes (its source weights,
preprocessing and export recipe; worker/encoders.py), so an encoder with other weights or
preprocessing never reads another one's vectors, and a product whose text or image changed
(a new content hash) never reads its old ones. Vectors are float32 little-endian bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

VECTOR_DTYPE = np.dtype("<f4")
PUT_CHUNK = 500

Executor = Connection | Session


@dataclass(frozen=True)
class CachedEmbedding:
    """One vector to store: the product and content hash it was computed from."""

    product_id: int
    content_hash: str
    vector: np.ndarray


def to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=VECTOR_DTYPE).tobytes()


def from_bytes(data: bytes, dim: int) -> np.ndarray:
    # Copy into a native, writable float32 array: frombuffer views are read-only.
    return np.frombuffer(data, dtype=VECTOR_DTYPE, count=dim).astype(np.float32)


_SELECT_CACHED = text(
    """
    SELECT e.product_id, e.dim, e.vector
    FROM unnest(CAST(:product_ids AS bigint[]), CAST(:content_hashes AS text[]))
         AS wanted(product_id, content_hash)
    JOIN embeddings e
      ON e.product_id = wanted.product_id
     AND e.encoder = :encoder
     AND e.content_hash = wanted.content_hash
    """
)
"""Exact primary-key lookups, one per wanted (product, content hash); takes no row locks.

Entries under another content hash are stale (the product changed since) and are simply not
matched, so they are never read.
"""


def get_cached(
    conn: Executor, encoder: str, keys: Iterable[tuple[int, str]]
) -> dict[int, np.ndarray]:
    """Cached vectors of ``encoder`` for each (product_id, content_hash) that has one."""
    keys = list(keys)
    if not keys:
        return {}
    rows = conn.execute(
        _SELECT_CACHED,
        {
            "encoder": encoder,
            "product_ids": [int(product_id) for product_id, _ in keys],
            "content_hashes": [content_hash for _, content_hash in keys],
        },
    )
    found: dict[int, np.ndarray] = {}
    for product_id, dim, vector in rows:
        data = bytes(vector)
        if len(data) != dim * VECTOR_DTYPE.itemsize:
            # Only a foreign writer could do this; treat it as a miss and re-encode.
            log.warning("ignoring malformed cached %s vector of product %s", encoder, product_id)
            continue
        found[product_id] = from_bytes(data, dim)
    return found


_INSERT = text(
    """
    INSERT INTO embeddings (product_id, encoder, content_hash, dim, vector)
    SELECT x.product_id, :encoder, x.content_hash, x.dim, x.vector
    FROM unnest(CAST(:product_ids AS bigint[]), CAST(:content_hashes AS text[]),
                CAST(:dims AS integer[]), CAST(:vectors AS bytea[]))
         AS x(product_id, content_hash, dim, vector)
    ON CONFLICT (product_id, encoder, content_hash) DO NOTHING
    RETURNING product_id
    """
)
"""New cache rows only. ON CONFLICT DO NOTHING waits on, and then skips, a row another
transaction is inserting under the same key; it takes no lock on rows already there."""


def put(
    conn: Executor,
    encoder: str,
    rows: Iterable[CachedEmbedding | tuple[int, str, np.ndarray]],
) -> int:
    """Store vectors; an existing (product, encoder, content hash) entry is kept as it is.

    ON CONFLICT DO NOTHING makes a redelivered batch, or two workers encoding the same product
    at once, write nothing new instead of failing: the same encoder on the same content gives
    the same vector. Returns how many rows were new.
    """
    values: list[tuple[int, str, int, bytes]] = []
    for item in rows:
        row = item if isinstance(item, CachedEmbedding) else CachedEmbedding(*item)
        vector = np.asarray(row.vector)
        if vector.ndim != 1 or not np.isfinite(vector).all():
            raise ValueError(
                f"refusing to cache a non-finite or non-1-d vector for product {row.product_id}"
            )
        values.append(
            (int(row.product_id), row.content_hash, int(vector.shape[0]), to_bytes(vector))
        )
    inserted = 0
    # Chunked so a backfill-sized batch stays a handful of statements of bounded size.
    for start in range(0, len(values), PUT_CHUNK):
        chunk = values[start : start + PUT_CHUNK]
        params = {
            "encoder": encoder,
            "product_ids": [v[0] for v in chunk],
            "content_hashes": [v[1] for v in chunk],
            "dims": [v[2] for v in chunk],
            "vectors": [v[3] for v in chunk],
        }
        inserted += len(conn.execute(_INSERT, params).all())
    return inserted


_DELETE_STALE = text(
    """
    DELETE FROM embeddings e
    USING products p
    WHERE p.id = e.product_id AND e.content_hash <> p.content_hash
    """
)
"""Drops vectors of content a product no longer has; locks only the deleted cache rows."""


def delete_stale(conn: Executor) -> int:
    """Remove cache entries whose product has changed since they were computed."""
    return conn.execute(_DELETE_STALE).rowcount
