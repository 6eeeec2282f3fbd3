"""Training data: labeled model inputs, and how they are read from the catalog.

Embeddings computed here are written to the cache as they are made, chunk by
chunk, so a retraining or a re-score after it does not encode them again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine, text

from shelver.catalog import embeddings
from shelver.catalog.categories import top_level
from shelver.catalog.settings import Settings
from shelver.training.splits import title_prefix_groups
from shelver.worker.encoders import ImageEncoder, TextEncoder
from shelver.worker.featurize import embed_products
from shelver.worker.images import ImageUsage
from shelver.worker.inputs import DEFAULT_TEXT_PACKING, ModelInputs, ProductContent

log = logging.getLogger(__name__)

CHUNK = 256


@dataclass
class TrainingData:
    """Labeled model inputs, one label per row; ``groups`` keep near-duplicates together.

    ``labels`` are what the model learns: top-level categories. ``paths`` are the rows'
    whole category paths, for the metrics that fit a tree (training/hierarchy.py).
    """

    inputs: ModelInputs
    labels: list[str]
    groups: list[str] | None = None
    paths: list[str] | None = None

    def __post_init__(self) -> None:
        sizes = {len(self.inputs), len(self.labels)}
        for optional in (self.groups, self.paths):
            if optional is not None:
                sizes.add(len(optional))
        if len(sizes) > 1:
            raise ValueError(f"training data: inputs, labels and groups differ in rows: {sizes}")

    def subset(self, rows: Sequence[int] | np.ndarray) -> TrainingData:
        return TrainingData(
            inputs=self.inputs.subset(rows),
            labels=[self.labels[i] for i in rows],
            groups=None if self.groups is None else [self.groups[i] for i in rows],
            paths=None if self.paths is None else [self.paths[i] for i in rows],
        )


@dataclass
class LabeledSet:
    product_ids: list[int]
    data: TrainingData
    # How many rows gave the model an image, and why the others did not.
    images: ImageUsage


def labeled_products(engine: Engine) -> list[tuple[ProductContent, str]]:
    """Every labeled product with its label's whole category path."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                """
                SELECT p.id, p.content_hash, p.name, p.description, p.image_uri, c.path
                FROM products p JOIN categories c ON c.id = p.label_id
                ORDER BY p.id
                """
            )
        )
        return [(ProductContent(*r[:5]), r[5]) for r in rows]


def load_labeled_set(
    engine: Engine,
    text_encoder: TextEncoder,
    image_encoder: ImageEncoder,
    settings: Settings,
    *,
    text_packing: str = DEFAULT_TEXT_PACKING,
    progress: Callable[[int, int], None] | None = None,
) -> LabeledSet:
    """Every labeled product as training data; ``progress(done, total)`` after each chunk.

    Texts are packed by ``text_packing``; the model trained on them records it.
    """
    rows = labeled_products(engine)
    if not rows:
        raise ValueError(
            "the catalog has no labeled products; import some with `shelver import PATH`"
        )
    parts = []
    for start in range(0, len(rows), CHUNK):
        chunk = [product for product, _ in rows[start : start + CHUNK]]
        with engine.begin() as conn:
            features = embed_products(
                conn, chunk, text_encoder, image_encoder, settings, text_packing=text_packing
            )
            embeddings.put(conn, text_encoder.identity, features.new_text)
            embeddings.put(conn, image_encoder.identity, features.new_image)
        parts.append(features)
        if progress:
            progress(min(start + CHUNK, len(rows)), len(rows))
    data = TrainingData(
        inputs=ModelInputs.concat([f.inputs for f in parts]),
        labels=[top_level(path) for _, path in rows],
        paths=[path for _, path in rows],
        # Near-identical titles stay on one side of the split, and each title's side is
        # stable from one run to the next (see training/splits.py).
        groups=title_prefix_groups([product.name for product, _ in rows]),
    )
    images = sum((f.images for f in parts), ImageUsage())
    log.info("training set: %d labeled products; %s", len(rows), images.describe())
    return LabeledSet([p.product_id for p, _ in rows], data, images)
