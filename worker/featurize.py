"""Turns products into fusion-model inputs, through the embedding cache.

The classify task, backfill and training all call ``embed_products``, so a
product is encoded the same way everywhere and at most once per encoder and
content hash.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from shelver.catalog.embeddings import CachedEmbedding, Executor, get_cached
from shelver.worker import metrics
from shelver.worker.encoders import ImageEncoder, TextEncoder
from shelver.worker.images import ImageRejected, ImageSettings, ImageUsage, load_image
from shelver.worker.inputs import ModelInputs, ProductContent, pack_texts

log = logging.getLogger(__name__)


@dataclass
class EmbeddedBatch:
    """Model inputs in the order of the products given, plus what to write to the cache."""

    inputs: ModelInputs
    # product id -> why the image it gave is not used
    image_errors: dict[int, ImageRejected] = field(default_factory=dict)
    new_text: list[CachedEmbedding] = field(default_factory=list)
    new_image: list[CachedEmbedding] = field(default_factory=list)
    images: ImageUsage = field(default_factory=ImageUsage)


def embed_products(
    db: Executor | None,
    products: Sequence[ProductContent],
    text_encoder: TextEncoder,
    image_encoder: ImageEncoder,
    image_settings: ImageSettings,
    *,
    text_packing: str,
) -> EmbeddedBatch:
    """Cached vectors where the content hash matches; the rest encoded in batches.

    ``text_packing`` is the model's (its meta.json, or the one training records).

    Nothing is written here: the caller stores ``new_text`` and ``new_image``
    in its own transaction (the worker in the one that writes results). With
    ``db`` None (rows not in the catalog) the cache is skipped.
    """
    keys = [(p.product_id, p.content_hash) for p in products]
    texts = pack_texts(products, text_packing)

    text_emb = np.zeros((len(products), text_encoder.dim), dtype=np.float32)
    cached = get_cached(db, text_encoder.identity, keys) if db is not None else {}
    missing = [i for i, p in enumerate(products) if p.product_id not in cached]
    for i, p in enumerate(products):
        if p.product_id in cached:
            text_emb[i] = cached[p.product_id]
    new_text: list[CachedEmbedding] = []
    if missing:
        with metrics.stage("encode_text"):
            vectors = text_encoder.encode([texts[i] for i in missing])
        text_emb[missing] = vectors
        new_text = [
            CachedEmbedding(products[i].product_id, products[i].content_hash, v)
            for i, v in zip(missing, vectors, strict=True)
        ]

    image_emb = np.zeros((len(products), image_encoder.dim), dtype=np.float32)
    present = np.zeros(len(products), dtype=np.float32)
    with_image = [i for i, p in enumerate(products) if p.image_uri]
    image_keys = [keys[i] for i in with_image]
    cached = get_cached(db, image_encoder.identity, image_keys) if db is not None else {}
    to_load: list[int] = []
    for i in with_image:
        vector = cached.get(products[i].product_id)
        if vector is None:
            to_load.append(i)
        else:
            image_emb[i], present[i] = vector, 1.0
    errors: dict[int, ImageRejected] = {}
    loaded_rows: list[int] = []
    loaded_images = []
    with metrics.stage("decode_image") if to_load else contextlib.nullcontext():
        for i in to_load:
            try:
                loaded_images.append(load_image(products[i].image_uri or "", image_settings))
                loaded_rows.append(i)
            except ImageRejected as exc:
                errors[products[i].product_id] = exc
            except Exception as exc:  # one hostile file must not take the batch with it
                log.warning("product %s: unexpected error loading its image",
                            products[i].product_id, exc_info=True)  # fmt: skip
                errors[products[i].product_id] = ImageRejected(
                    "unexpected_error", f"{type(exc).__name__}: {exc}"
                )
    new_image: list[CachedEmbedding] = []
    if loaded_images:
        with metrics.stage("encode_image"):
            vectors = image_encoder.encode(loaded_images)
        image_emb[loaded_rows] = vectors
        present[loaded_rows] = 1.0
        new_image = [
            CachedEmbedding(products[i].product_id, products[i].content_hash, v)
            for i, v in zip(loaded_rows, vectors, strict=True)
        ]
    images = ImageUsage.count(
        [p.image_uri for p in products],
        present > 0,
        [errors.get(p.product_id) for p in products],
        image_settings,
    )
    if errors:
        log.info("%s; the refused use text alone", images.describe())
    names = [(p.name or "").strip() for p in products]
    inputs = ModelInputs(
        texts=texts,
        names=names,
        text_emb=text_emb,
        image_emb=image_emb,
        image_present=present,
        text_packing=text_packing,
    )
    return EmbeddedBatch(inputs, errors, new_text, new_image, images)
