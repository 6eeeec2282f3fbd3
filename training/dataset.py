"""Training data from the catalog: labeled products as arrays, embeddings via the cache.

Embeddings computed here are written to the cache as they are made, chunk by
chunk, so a retraining or a re-score after it does not encode them again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine, text

from shelver.catalog import embeddings
from shelver.catalog.settings import Settings
from shelver.training.fit import TrainingData
from shelver.training.splits import title_prefix_groups
from shelver.worker.encoders import ImageEncoder, TextEncoder
from shelver.worker.featurize import ProductInput, embed_products
from shelver.worker.images import ImageUsage

log = logging.getLogger(__name__)

CHUNK = 256


@dataclass
class LabeledSet:
    product_ids: list[int]
    data: TrainingData
    # How many rows gave the model an image, and why the others did not.
    images: ImageUsage


def labeled_products(engine: Engine) -> list[tuple[ProductInput, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                """
                SELECT p.id, p.content_hash, p.name, p.description, p.image_uri, c.name
                FROM products p JOIN categories c ON c.id = p.label_id
                ORDER BY p.id
                """
            )
        )
        return [(ProductInput(*r[:5]), r[5]) for r in rows]


def load_labeled_set(
    engine: Engine,
    text_encoder: TextEncoder,
    image_encoder: ImageEncoder,
    settings: Settings,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> LabeledSet:
    """Every labeled product as training arrays; ``progress(done, total)`` after each chunk."""
    rows = labeled_products(engine)
    if not rows:
        raise ValueError(
            "the catalog has no labeled products; import some with `shelver import PATH`"
        )
    parts = []
    for start in range(0, len(rows), CHUNK):
        chunk = [product for product, _ in rows[start : start + CHUNK]]
        with engine.begin() as conn:
            features = embed_products(conn, chunk, text_encoder, image_encoder, settings)
            embeddings.put(conn, text_encoder.identity, features.new_text)
            embeddings.put(conn, image_encoder.identity, features.new_image)
        parts.append(features)
        if progress:
            progress(min(start + CHUNK, len(rows)), len(rows))
    data = TrainingData(
        texts=[t for f in parts for t in f.texts],
        text_emb=np.concatenate([f.text_emb for f in parts]),
        image_emb=np.concatenate([f.image_emb for f in parts]),
        image_present=np.concatenate([f.image_present for f in parts]),
        labels=[label for _, label in rows],
        names=[n for f in parts for n in f.names],
        # Near-identical titles stay on one side of the split, and each title's side is
        # stable from one run to the next (see training/splits.py).
        groups=title_prefix_groups([product.name for product, _ in rows]),
    )
    images = sum((f.images for f in parts), ImageUsage())
    log.info("training set: %d labeled products; %s", len(rows), images.describe())
    return LabeledSet([p.product_id for p, _ in rows], data, images)
