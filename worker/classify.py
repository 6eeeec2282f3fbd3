"""Classifying one batch of products and writing the results back in one transaction.

``classify_products`` is the body of the classify task and knows nothing of
Celery: load the rows, score them with a ``Classifier`` (the fusion model on
cached or fresh embeddings), then lock the products and write the embedding
cache, the prediction history, the current result and the queue completion
together. One bad row never fails its batch; it ends ``failed`` with a reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from shelver.catalog import embeddings as cache
from shelver.catalog import queue
from shelver.catalog.categories import category_ids, ensure_categories
from shelver.catalog.images import image_not_used
from shelver.worker import metrics
from shelver.worker.encoders import ImageEncoder, TextEncoder
from shelver.worker.featurize import embed_products
from shelver.worker.images import ImageSettings, ImageUsage
from shelver.worker.inputs import ProductContent
from shelver.worker.open_set import gated
from shelver.worker.tree import LabelTree

log = logging.getLogger(__name__)

TOP_K = 3


@dataclass
class Outcome:
    """The verdict on one product: a category, or a reason it could not get one.

    ``category`` is the deepest node whose level was sure when ``accepted``; otherwise
    the leaf candidate, for the person who reviews it. ``top_k`` starts with the leaf
    candidate, then the other most probable label paths (``worker.tree``).
    """

    product_id: int
    content_hash: str
    category: str | None = None
    confidence: float | None = None
    accepted: bool = False
    top_k: list[dict] = field(default_factory=list)
    # Why part of the input was not used (e.g. the image); kept in products.error.
    note: str | None = None
    # Set when the product cannot be classified at all; it ends `failed`.
    failure: str | None = None


@dataclass
class ScoredBatch:
    outcomes: list[Outcome]
    # Fresh vectors to cache, per encoder identity.
    new_embeddings: dict[str, list[cache.CachedEmbedding]] = field(default_factory=dict)
    images: ImageUsage = field(default_factory=ImageUsage)


class Classifier(Protocol):
    """Scores rows. The worker's is the fusion model; tests may bring a small real one."""

    model_version_id: int

    def score(self, db: Session, rows: Sequence[ProductContent]) -> ScoredBatch: ...


@dataclass
class BatchSummary:
    classified: int = 0
    needs_review: int = 0
    failed: int = 0
    # Changed while we worked; their queue rows stay and they are classified again.
    stale: int = 0
    # Given back unprocessed (no model yet).
    released: int = 0
    # Rows classified without their image (or failed), by refusal reason.
    images_refused: dict[str, int] = field(default_factory=dict)
    # Rows that ended failed, by reason (``metrics.failure_reason``).
    failed_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int | dict[str, int]]:
        return dict(self.__dict__)


LOAD_SQL = text(
    """
    SELECT id, content_hash, name, description, image_uri
    FROM products
    WHERE id = ANY(CAST(:ids AS bigint[]))
    ORDER BY id
    """
)
"""A plain read, no locks: encoding takes seconds and must not block writers of
these products. What changes meanwhile is caught by the content hash at write time."""


def load_rows(db: Session, product_ids: Sequence[int]) -> list[ProductContent]:
    return [ProductContent(*row) for row in db.execute(LOAD_SQL, {"ids": list(product_ids)})]


def top_k(
    probs: np.ndarray, node_probs: np.ndarray, tree: LabelTree, candidate: str, k: int = TOP_K
) -> list[dict]:
    """The leaf candidate, then the most probable other labels: ``k`` paths, each with
    its node probability (itself and everything below it)."""
    index = tree.node_index
    # The k most probable labels hold the k - 1 best others whether or not the
    # candidate is among them; a partial sort keeps this cheap at thousands of labels.
    best = np.argpartition(-probs, k - 1)[:k] if len(probs) > k else np.arange(len(probs))
    best = best[np.argsort(-probs[best], kind="stable")]
    others = [tree.labels[i] for i in best if tree.labels[i] != candidate]
    return [
        {"category": path, "p": round(float(node_probs[index[path]]), 6)}
        for path in [candidate, *others][:k]
    ]


class FusionClassifier:
    """Embeddings from the cache or the encoders, then the champion fusion model."""

    def __init__(
        self,
        text_encoder: TextEncoder,
        image_encoder: ImageEncoder,
        champion,  # noqa: ANN001 - worker.runtime.Champion; not imported to keep this module light
        image_settings: ImageSettings,
    ) -> None:
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.champion = champion
        self.image_settings = image_settings
        self.model_version_id: int = champion.model_version_id
        # Level 1's threshold is the registry row's; deeper levels come with the model.
        self.thresholds: list[float] = [
            champion.threshold,
            *champion.model.level_thresholds[1:],
        ]

    def score(self, db: Session, rows: Sequence[ProductContent]) -> ScoredBatch:
        model = self.champion.model
        features = embed_products(
            db,
            rows,
            self.text_encoder,
            self.image_encoder,
            self.image_settings,
            text_packing=model.text_packing,
        )
        texts, present = features.inputs.texts, features.inputs.image_present
        outcomes: list[Outcome] = []
        usable = []
        for i, row in enumerate(rows):
            error = features.image_errors.get(row.product_id)
            note = image_not_used(error.reason, error.message) if error else None
            if not texts[i].strip() and not present[i]:
                reason = "no usable text and no usable image"
                if error:
                    reason += f" ({note})"
                outcomes.append(Outcome(row.product_id, row.content_hash, failure=reason))
            else:
                usable.append(i)
                outcomes.append(Outcome(row.product_id, row.content_hash, note=note))
        if usable:
            with metrics.stage("model"):
                probs = model.predict(features.inputs.subset(usable))
            nodes = model.tree.node_probs(probs)
            # An answer among the classes the model knows can still be a product of none of
            # them: the model's open-set gate, if it has one, withdraws such auto-accepts.
            decisions = gated(
                model.tree.decide_rows(nodes, self.thresholds),
                model.open_set,
                features.inputs.text_emb[usable],
                nodes[:, model.tree.roots],
                model.tree.root_names,
            )
            for i, p, n, decision in zip(usable, probs, nodes, decisions, strict=True):
                outcome = outcomes[i]
                outcome.accepted = decision.accepted is not None
                if outcome.accepted:
                    outcome.category = decision.accepted
                    outcome.confidence = decision.path_probs[decision.accepted_level - 1]
                else:
                    outcome.category = decision.candidate
                    outcome.confidence = decision.path_probs[-1]
                outcome.top_k = top_k(p, n, model.tree, decision.candidate)
        return ScoredBatch(
            outcomes,
            {
                self.text_encoder.identity: features.new_text,
                self.image_encoder.identity: features.new_image,
            },
            features.images,
        )


LOCK_SQL = text(
    """
    SELECT id, content_hash
    FROM products
    WHERE id = ANY(CAST(:ids AS bigint[]))
    ORDER BY id
    FOR UPDATE
    """
)
"""Row locks on the batch's products, taken in id order so two workers holding
overlapping batches (a lease that ran out) queue up instead of deadlocking.
Held to the end of the write transaction: an UPDATE of one of these products
waits until our result is committed, and then its trigger re-queues it, so a
result can never be written over content it was not computed from."""

INSERT_PREDICTIONS_SQL = text(
    """
    INSERT INTO predictions
        (product_id, model_version_id, content_hash, predicted_id, confidence, top_k)
    SELECT x.product_id, :model_version_id, x.content_hash, x.predicted_id, x.confidence,
           CAST(x.top_k AS jsonb)
    FROM unnest(CAST(:product_ids AS bigint[]), CAST(:content_hashes AS text[]),
                CAST(:predicted_ids AS integer[]), CAST(:confidences AS double precision[]),
                CAST(:top_ks AS text[]))
         AS x(product_id, content_hash, predicted_id, confidence, top_k)
    ON CONFLICT (product_id, model_version_id, content_hash) DO NOTHING
    """
)
"""Append-only history; a redelivered batch writes nothing new."""

UPDATE_PRODUCTS_SQL = text(
    """
    UPDATE products p
    SET predicted_id = x.predicted_id,
        confidence = x.confidence,
        model_version_id = :model_version_id,
        -- clock_timestamp, not now(): now() is when the transaction began,
        -- before encoding, and classified_at - created_at is our latency.
        classified_at = clock_timestamp(),
        error = x.note,
        status = CASE WHEN x.accepted OR p.label_id IS NOT NULL
                      THEN 'classified' ELSE 'needs_review' END
    FROM unnest(CAST(:product_ids AS bigint[]), CAST(:predicted_ids AS integer[]),
                CAST(:confidences AS double precision[]), CAST(:accepted AS boolean[]),
                CAST(:notes AS text[]))
         AS x(id, predicted_id, confidence, accepted, note)
    WHERE p.id = x.id
    RETURNING p.status
    """
)
"""The current result: the deepest sure node, or the leaf candidate for review when
not even the top level was sure. A product a person has labeled is never sent to review:
someone has already decided. Result columns are not in the trigger's content
columns, so this update does not queue the product again."""


def write_results(
    db: Session, rows: Sequence[ProductContent], scored: ScoredBatch, classifier: Classifier
) -> BatchSummary:
    """Write a scored batch for the products that still have the content it was scored on."""
    summary = BatchSummary()
    loaded = {row.product_id: row.content_hash for row in rows}
    locked = dict(db.execute(LOCK_SQL, {"ids": list(loaded)}).all())
    current = {pid for pid, h in loaded.items() if locked.get(pid) == h}
    summary.stale = len(loaded) - len(current)

    for encoder, vectors in scored.new_embeddings.items():
        keep = [v for v in vectors if v.product_id in current]
        if keep:
            cache.put(db, encoder, keep)

    done = [o for o in scored.outcomes if o.product_id in current and o.failure is None]
    failures = {
        o.product_id: o.failure for o in scored.outcomes if o.product_id in current and o.failure
    }
    if done:
        names = sorted({o.category for o in done})
        # A label the model knows but the catalog does not yet (a fresh database,
        # a renamed category) is created.
        ensure_categories(db, names)
        ids = category_ids(db, names)
        params = {
            "model_version_id": classifier.model_version_id,
            "product_ids": [o.product_id for o in done],
            "content_hashes": [o.content_hash for o in done],
            "predicted_ids": [ids[o.category] for o in done],
            "confidences": [o.confidence for o in done],
            "accepted": [o.accepted for o in done],
            "top_ks": [json.dumps(o.top_k) for o in done],
            "notes": [o.note for o in done],
        }
        db.execute(INSERT_PREDICTIONS_SQL, params)
        statuses = db.execute(UPDATE_PRODUCTS_SQL, params).scalars().all()
        summary.classified = statuses.count("classified")
        summary.needs_review = statuses.count("needs_review")
    queue.fail(db, failures)
    summary.failed = len(failures)
    for reason in failures.values():
        key = metrics.failure_reason(reason)
        summary.failed_reasons[key] = summary.failed_reasons.get(key, 0) + 1
    queue.complete(db, {o.product_id: o.content_hash for o in done})
    return summary


def classify_products(
    db: Session,
    product_ids: Sequence[int],
    classifier: Classifier | None,
    *,
    no_model_delay_s: float = 30.0,
) -> BatchSummary:
    """Classify the given queued products inside the caller's transaction."""
    if classifier is None:
        # Nothing to classify with yet (no champion, or it was refused). The
        # attempt is given back: waiting for a model is not the product's fault.
        queue.release(
            db, product_ids, delay_seconds=no_model_delay_s, note="no champion model in service"
        )
        return BatchSummary(released=len(product_ids))
    with metrics.stage("load"):
        rows = load_rows(db, product_ids)
    if not rows:
        return BatchSummary()
    scored = classifier.score(db, rows)
    with metrics.stage("write"):
        summary = write_results(db, rows, scored, classifier)
    summary.images_refused = dict(scored.images.refused.most_common())
    log.info("batch of %d: %s", len(product_ids), summary.as_dict())
    if scored.images.refused:
        # Each row records its own reason in products.error; this says it where operators look.
        setting = scored.images.roots_setting
        log.warning(
            "batch of %d: %s; those rows were classified from text alone%s",
            len(product_ids), scored.images.describe(),
            f" (to admit the images outside the roots: {setting})" if setting else "",
        )  # fmt: skip
    return summary
