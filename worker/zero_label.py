"""Classifying into a taxonomy nobody has labeled yet: products against what categories are named.

Each category is embedded once with the worker's text encoder, mostly by its own name
(``category_vectors``), and by its description where the taxonomy gives one (a taxonomy
CSV's ``description`` and ``synonyms`` columns, ``categories.description``). A product's
text vector is compared with every node; a node whose own name says accessories or parts
must be clearly closer (``ACCESSORY_PENALTY``). The similarities, sharpened by a
temperature, make one softmax over all nodes, which ``worker.tree.LabelTree`` sums into
node probabilities (a parent's mass is its subtree's). The top level is the root with
the most mass, and the answer is the node of that branch most like the product.
Measured on Best Buy, Flipkart and PriceRunner titles mapped onto Google's taxonomy
(benchmarks/cold_start.py, docs/cold_start.md): names beat whole paths as category text,
and choosing the branch by mass before the node beats the nearest node overall.

These suggestions are never auto-accepted: their calibration is measured only at the top
level, on our own mapped sets, so every product classified this way waits for a person
(``needs_review``) with the suggestion and its alternatives in front of them.

The category vectors are stored once per (taxonomy, text encoder) as a ``model_versions``
row with status ``zero_label`` (migration 0006): its version is ``zero-label-<key>``, the
key a hash of the sorted category paths and the encoder identity, so every worker and
``shelver evaluate`` reuse them and a changed taxonomy gets its own row, and predictions
name the scorer that made them.

``shelver taxonomy adapt`` (``adapt_zero_label_model``) lets the catalog's own products
say what its categories hold, without a label: the categories the scorer is surest of
products for move toward those products (``adapt_vectors``), stored as another
``zero_label`` row that names its source and is served instead of it from the next look.

API:
    model = ensure_zero_label_model(engine, text_encoder)   # None without categories
    report = adapt_zero_label_model(engine, text_encoder, image_encoder, settings)
    verdicts = model.scorer.score(product_vectors)
    classifier = ZeroLabelClassifier(text_encoder, image_encoder, model, image_settings)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from shelver.catalog import embeddings as cache
from shelver.catalog.categories import CATEGORIES_MD5_SQL, SEPARATOR, categories_md5
from shelver.worker.classify import Classifier, FusionClassifier, Outcome, ScoredBatch
from shelver.worker.encoders import ImageEncoder, TextEncoder
from shelver.worker.featurize import embed_products
from shelver.worker.images import ImageSettings
from shelver.worker.inputs import DEFAULT_TEXT_PACKING, ModelInputs, ProductContent
from shelver.worker.tree import Decision, LabelTree, path_parts

if TYPE_CHECKING:
    from shelver.worker.runtime import Champion, Runtime

log = logging.getLogger(__name__)

ZERO_LABEL_STATUS = "zero_label"
VERSION_PREFIX = "zero-label-"
# Chosen on the dev half of benchmarks/cold_start.py's set: 0.03 and 0.07 both did worse.
TEMPERATURE = 0.05
# The one whose level-1 probabilities were best calibrated there, with the accessory
# prior (0.008 to 0.04 tried; level-1 ECE 0.079 on dev against 0.097 at 0.02).
CONFIDENCE_TEMPERATURE = 0.025
# The merge's two-way softmax (MergedModel): the scorer's confidence temperature before
# the accessory prior, kept so the measured merge (docs/cold_start.md) is what is served.
MERGE_TEMPERATURE = 0.02
TOP_K = 3
CONTEXT_SHARE = 0.2
# A described category's vector: this share its description ("name: description"), the
# rest its name as above. Half, so a description weighs as much as the name; not tuned:
# none of the taxonomies of our mapped sets has descriptions (docs/cold_start.md).
DESCRIPTION_SHARE = 0.5
# A category whose own name says it holds accessories or parts ("Freezer Accessories",
# "Dishwasher Parts & Accessories") loses this much cosine similarity: MiniLM puts a
# freezer as close to "Freezer Accessories" as to "Freezers", and most products are not
# accessories. A real accessory still gets there when it is closer by more than this, and
# a node that names the accessory itself ("Mobile Phone Cases") is not touched. Chosen on
# the dev half of benchmarks/cold_start.py's set (0.02-0.12 tried; 0.08 and 0.12 tied):
# path accuracy 0.514 -> 0.576 there (docs/cold_start.md, "Accessory nodes").
ACCESSORY_PENALTY = 0.08
ACCESSORY_NAME = re.compile(r"\b(accessory|accessories|parts)\b", re.IGNORECASE)
# Self-training on the catalog's own products (``adapt_vectors``), chosen on the dev half
# of benchmarks/cold_start.py's set with the other shared rows as the catalog
# (docs/cold_start.md, "Adapting to the catalog"): the more confident half of the
# suggestions count (0.3 and 0.7 did worse), a category needs 3 of them to move (2 and 10
# did worse), and its vector becomes 0.9 their centroid, 0.1 its name (0.3-0.7 did worse,
# 1.0 tied). One pass: a second and third did worse.
ADAPT_QUANTILE = 0.5
ADAPT_MIN_PRODUCTS = 3
ADAPT_SHARE = 0.9
# Weight of the adapted scorer's catalog prior, in cosine similarity per unit of log share
# (``adapt_vectors``): 0.005-0.04 tried on the dev half, path accuracy 0.615 -> 0.636.
CATALOG_PRIOR = 0.03
# The adapted scorer's shown confidence: its level-1 probabilities were best calibrated at
# this temperature on the dev half (0.015-0.06 tried, and again with the catalog prior),
# sharper ones overconfident.
ADAPTED_CONFIDENCE_TEMPERATURE = 0.04
# At most this many products are read (a fixed sample beyond): 150 MB of text vectors.
ADAPT_MAX_PRODUCTS = 100_000
ADAPT_READ_CHUNK = 1_000
# Bumped whenever category_vectors, the artifact layout or how the scorer uses the vectors
# changes, so old rows are not reused and predictions name the recipe that made them.
RECIPE = 2


def is_accessory_node(path: str) -> bool:
    """Whether a category's own name (not its ancestors') says accessories or parts."""
    return bool(ACCESSORY_NAME.search(path_parts(path)[-1]))


def category_texts(path: str) -> tuple[str, str]:
    """What a category is, as text: its own name, and its name with its ancestors'.

    Names alone are the stronger signal: embedding every node's whole path pulled all of
    a branch's nodes together and lost the node's meaning (path accuracy 0.33 against 0.49
    on the dev half). A fifth of the name-in-context vector mixed in helps a little (0.51):
    "Accessories" under "Mobile Phones" is not "Accessories" under "Cameras".
    """
    parts = path_parts(path)
    if len(parts) == 1:
        return parts[0], parts[0]
    return parts[-1], f"{parts[-1]} ({SEPARATOR.join(parts[:-1])})"


def category_vectors(
    paths: Sequence[str],
    text_encoder: TextEncoder,
    descriptions: Mapping[str, str] | None = None,
) -> np.ndarray:
    """One unit vector per path: ``CONTEXT_SHARE`` of name-in-context, the rest name; for
    a path with a description, ``DESCRIPTION_SHARE`` of "name: description" mixed in."""
    texts = [category_texts(p) for p in paths]
    names = text_encoder.encode([t[0] for t in texts])
    in_context = text_encoder.encode([t[1] for t in texts])
    mixed = (1 - CONTEXT_SHARE) * names + CONTEXT_SHARE * in_context
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    described = [k for k, p in enumerate(paths) if (descriptions or {}).get(p)]
    if described:
        said = text_encoder.encode([f"{texts[k][0]}: {descriptions[paths[k]]}" for k in described])
        mixed[described] = (1 - DESCRIPTION_SHARE) * mixed[described] + DESCRIPTION_SHARE * said
    return mixed / np.linalg.norm(mixed, axis=1, keepdims=True)


def taxonomy_key(
    paths: Sequence[str], encoder_identity: str, descriptions: Mapping[str, str] | None = None
) -> str:
    """A hash naming the category vectors of these paths (and descriptions) under this
    encoder."""
    digest = hashlib.sha256(f"{RECIPE}\n{encoder_identity}\n".encode())
    digest.update("\n".join(sorted(paths)).encode())
    if descriptions:
        digest.update(json.dumps(sorted(descriptions.items())).encode())
    return digest.hexdigest()[:20]


@dataclass(frozen=True)
class Verdict:
    """One product's suggestion: the node, its probability, and the runners-up."""

    category: str
    confidence: float
    top_k: list[dict]


class ZeroLabelScorer:
    """Category vectors and the tree they span; scores product vectors against them."""

    def __init__(
        self,
        paths: Sequence[str],
        vectors: np.ndarray,
        temperature: float = TEMPERATURE,
        confidence_temperature: float = CONFIDENCE_TEMPERATURE,
        catalog_prior: np.ndarray | None = None,
    ) -> None:
        if len(paths) != len(vectors):
            raise ValueError(f"{len(paths)} category paths but {len(vectors)} vectors")
        self.tree = LabelTree(paths)
        # LabelTree normalizes the paths; keep the vectors in its label order.
        self.paths = self.tree.labels
        self.vectors = np.asarray(vectors, dtype=np.float32)
        self.temperature = temperature
        self.confidence_temperature = confidence_temperature
        node_of = {node: i for i, node in enumerate(self.tree.nodes)}
        self._node_of = node_of
        # For each root, the label columns in its branch.
        self._branch: dict[int, np.ndarray] = {}
        root_of = np.array([node_of[path_parts(p)[0]] for p in self.paths])
        for root in self.tree.roots:
            self._branch[int(root)] = np.nonzero(root_of == root)[0]
        # Added to every product's similarity to each category: ACCESSORY_PENALTY, and an
        # adapted scorer's catalog prior (``adapt_vectors``), in the vectors' label order.
        self.catalog_prior = (
            None if catalog_prior is None else np.asarray(catalog_prior, dtype=np.float32)
        )
        if self.catalog_prior is not None and self.catalog_prior.shape != (len(self.paths),):
            raise ValueError(f"{len(self.paths)} category paths but a catalog prior of "
                             f"shape {self.catalog_prior.shape}")  # fmt: skip
        self.prior = np.array(
            [-ACCESSORY_PENALTY if is_accessory_node(p) else 0.0 for p in self.paths],
            dtype=np.float32,
        )
        if self.catalog_prior is not None:
            self.prior += self.catalog_prior

    def node_probabilities(self, similarity: np.ndarray, temperature: float) -> np.ndarray:
        """(n, len(tree.nodes)): the softmax of ``similarity / temperature`` over the
        category labels, summed up the tree."""
        logits = similarity / temperature
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        return self.tree.node_probs(probs)

    def similarity(self, product_vectors: np.ndarray) -> np.ndarray:
        """(n, len(paths)): cosine similarity to each category, with the accessory prior."""
        return np.asarray(product_vectors, dtype=np.float32) @ self.vectors.T + self.prior

    def score(self, product_vectors: np.ndarray) -> list[Verdict]:
        similarity = self.similarity(product_vectors)
        deciding = self.node_probabilities(similarity, self.temperature)
        # Probabilities people see: sharper, so that the chosen branch's probability
        # matches how often its top level is right (level-1 ECE 0.079 on the dev half,
        # against 0.32 at the deciding temperature; 0.072 on test).
        shown = self.node_probabilities(similarity, self.confidence_temperature)
        verdicts = []
        for sim, n, calibrated in zip(similarity, deciding, shown, strict=True):
            root = int(self.tree.roots[np.argmax(n[self.tree.roots])])
            branch = self._branch[root]
            best = int(branch[np.argmax(sim[branch])])
            category = self.paths[best]
            others = [self.paths[k] for k in np.argsort(-sim)[: TOP_K + 1] if k != best]
            top = [
                {"category": path, "p": round(float(calibrated[self._node_of[path]]), 6)}
                for path in [category, *others][:TOP_K]
            ]
            # The branch's probability: how sure the scorer is of the top level it chose.
            verdicts.append(Verdict(category, min(1.0, float(calibrated[root])), top))
        return verdicts

    def to_bytes(self) -> bytes:
        """The artifact: an .npz of the vectors and the paths as JSON (no pickle)."""
        buffer = io.BytesIO()
        extra = {} if self.catalog_prior is None else {"catalog_prior": self.catalog_prior}
        np.savez(
            buffer,
            vectors=self.vectors,
            paths=np.frombuffer(json.dumps(self.paths).encode(), dtype=np.uint8),
            confidence_temperature=np.array(self.confidence_temperature),
            **extra,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, artifact: bytes) -> ZeroLabelScorer:
        with np.load(io.BytesIO(artifact), allow_pickle=False) as data:
            paths = json.loads(data["paths"].tobytes().decode())
            # Rows stored before adaptation existed have none: theirs was the default.
            confidence = (
                float(data["confidence_temperature"])
                if "confidence_temperature" in data
                else CONFIDENCE_TEMPERATURE
            )
            prior = data.get("catalog_prior")
            return cls(
                paths, data["vectors"], confidence_temperature=confidence, catalog_prior=prior
            )


@dataclass(frozen=True)
class ZeroLabelModel:
    """The scorer of one taxonomy and its registry row (predictions name it)."""

    model_version_id: int
    version: str
    scorer: ZeroLabelScorer


CATEGORIES_SQL = text("SELECT path, description FROM categories ORDER BY path")

TAXONOMY_SQL = text(
    f"""
    SELECT path, description, ({CATEGORIES_MD5_SQL.text}) FROM categories ORDER BY path
    """
)
"""The categories and their ``categories_md5`` in one statement, so from one snapshot: the
digest a scorer row records names exactly the taxonomy its vectors were made of."""

RECORD_MD5_SQL = text(
    """
    UPDATE model_versions
    SET metrics = metrics || jsonb_build_object('categories_md5', CAST(:md5 AS text))
    WHERE version = :version AND NOT metrics ? 'categories_md5'
    """
)
"""A taxonomy's row stored before its rows recorded the digest gets it on the next look."""

FIND_SQL = text("SELECT id, version, sha256, artifact FROM model_versions WHERE version = :version")

INSERT_SQL = text(
    """
    INSERT INTO model_versions (version, status, artifact, sha256, labels, encoders, metrics,
                                threshold)
    VALUES (:version, 'zero_label', :artifact, :sha256, CAST(:labels AS jsonb),
            CAST(:encoders AS jsonb), CAST(:metrics AS jsonb), 1.0)
    ON CONFLICT (version) DO NOTHING
    """
)
"""Two workers computing the same taxonomy's vectors at once: the second insert does
nothing and both read the one row back. Threshold 1.0: nothing is auto-accepted."""


def catalog_categories(conn: Connection) -> tuple[list[str], dict[str, str]]:
    """The catalog's category paths in order, and path -> description for those a
    taxonomy described: what the category vectors are made of, in one read."""
    rows = conn.execute(CATEGORIES_SQL).all()
    return [path for path, _ in rows], {path: d for path, d in rows if d is not None}


def category_paths(conn: Connection) -> list[str]:
    return catalog_categories(conn)[0]


ADAPTED_SQL = text(
    """
    SELECT id, version, sha256, artifact FROM model_versions
    WHERE status = 'zero_label' AND metrics->>'adapted_from' = :version
      AND NOT metrics ? 'withdrawn'
    ORDER BY metrics->>'adapted_at' DESC
    LIMIT 1
    """
)
"""The latest adaptation of a taxonomy's vectors to its catalog (``adapt_zero_label_model``)."""

WITHDRAW_SQL = text(
    """
    UPDATE model_versions
    SET metrics = metrics || jsonb_build_object('withdrawn', CAST(:at AS text))
    WHERE status = 'zero_label' AND metrics->>'adapted_from' = :version
      AND NOT metrics ? 'withdrawn'
    """
)
"""Rows are kept (predictions name them); a withdrawn one is no longer served."""


def ensure_zero_label_model(
    engine: Engine,
    text_encoder: TextEncoder,
    temperature: float = TEMPERATURE,
    *,
    adapted: bool = True,
) -> ZeroLabelModel | None:
    """The zero-label scorer of the catalog's categories as they are now, or None if it has
    none: the latest adaptation to the catalog's products when there is one (and
    ``adapted``), else the taxonomy's own vectors. Encodes the category names only when
    this taxonomy has no stored row yet."""
    with engine.connect() as conn:
        rows = conn.execute(TAXONOMY_SQL).all()
        if not rows:
            return None
        paths = [path for path, _, _ in rows]
        descriptions = {path: d for path, d, _ in rows if d is not None}
        digest = rows[0][2]
        version = VERSION_PREFIX + taxonomy_key(paths, text_encoder.identity, descriptions)
        base = conn.execute(FIND_SQL, {"version": version}).one_or_none()
        row = conn.execute(ADAPTED_SQL, {"version": version}).one_or_none() if adapted else None
    if base is not None:
        with engine.begin() as conn:
            conn.execute(RECORD_MD5_SQL, {"md5": digest, "version": version})
    row = row or base
    if row is None:
        log.info("encoding %d categories for the zero-label scorer", len(paths))
        vectors = category_vectors(paths, text_encoder, descriptions)
        artifact = ZeroLabelScorer(paths, vectors, temperature).to_bytes()
        params = {
            "version": version,
            "artifact": artifact,
            "sha256": hashlib.sha256(artifact).hexdigest(),
            "labels": json.dumps(paths),
            "encoders": json.dumps({"text": text_encoder.identity}),
            "metrics": json.dumps({"kind": "zero_label", "categories": len(paths),
                                   "described": len(descriptions), "categories_md5": digest,
                                   "temperature": temperature, "recipe": RECIPE}),
        }  # fmt: skip
        with engine.begin() as conn:
            conn.execute(INSERT_SQL, params)
            row = conn.execute(FIND_SQL, {"version": version}).one()
    return model_from_row(row, temperature)


def model_from_row(row: Sequence, temperature: float = TEMPERATURE) -> ZeroLabelModel:
    """A stored scorer row (id, version, sha256, artifact), its artifact checked."""
    model_version_id, version, sha256, artifact = row
    artifact = bytes(artifact)
    if hashlib.sha256(artifact).hexdigest() != sha256:
        raise ValueError(
            f"zero-label scorer {version}: artifact does not match its sha256; delete the "
            "model_versions row and it is computed again"
        )
    scorer = ZeroLabelScorer.from_bytes(artifact)
    scorer.temperature = temperature
    return ZeroLabelModel(model_version_id, version, scorer)


@dataclass(frozen=True)
class Adaptation:
    """Category vectors moved toward the catalog's products, and what moved them."""

    vectors: np.ndarray
    products: int  # product vectors scored
    counted: int  # their suggestions at or above the confidence cut
    cut: float  # that cut: the ADAPT_QUANTILE of the suggestions' confidence
    moved: int  # categories with at least ADAPT_MIN_PRODUCTS counted suggestions
    too_few: int  # categories with counted suggestions, but fewer: left as they were
    catalog_prior: np.ndarray  # per category, added to its similarity (CATALOG_PRIOR)


def adapt_vectors(
    scorer: ZeroLabelScorer, product_vectors: np.ndarray, chunk: int = 2_000
) -> Adaptation:
    """Self-training, one pass, no labels: the scorer suggests a category for every
    product; the more confident half of those suggestions (``ADAPT_QUANTILE``) count;
    a category with at least ``ADAPT_MIN_PRODUCTS`` of them gets ``ADAPT_SHARE`` of their
    centroid in its vector, the rest its own vector. Every other category is unchanged.

    A category's name says little of what a catalog puts in it ("Software" of video
    games); the products the scorer is surest of say more, and they pull their look-alikes
    that the name alone missed.

    The counted suggestions also say which categories this catalog fills: each category
    gets ``CATALOG_PRIOR`` × log of its share of them against an even share (one
    suggestion added to every category), added to its similarity, so a product torn
    between a category its catalog is full of and one it never showed leans to the first.
    """
    product_vectors = np.asarray(product_vectors, dtype=np.float32)
    position = {path: k for k, path in enumerate(scorer.paths)}
    assigned = np.empty(len(product_vectors), dtype=np.int64)
    confidence = np.empty(len(product_vectors), dtype=np.float64)
    # In chunks: the similarities of every product to thousands of nodes at once would
    # take gigabytes.
    for start in range(0, len(product_vectors), chunk):
        verdicts = scorer.score(product_vectors[start : start + chunk])
        for i, verdict in enumerate(verdicts, start):
            assigned[i], confidence[i] = position[verdict.category], verdict.confidence
    cut = float(np.quantile(confidence, ADAPT_QUANTILE)) if len(confidence) else 1.0
    counted = confidence >= cut
    vectors = scorer.vectors.copy()
    members = np.bincount(assigned[counted], minlength=len(scorer.paths))
    moving = np.nonzero(members >= ADAPT_MIN_PRODUCTS)[0]
    for k in moving:
        centroid = product_vectors[counted & (assigned == k)].mean(axis=0)
        mixed = (1 - ADAPT_SHARE) * scorer.vectors[k] + ADAPT_SHARE * (
            centroid / np.linalg.norm(centroid)
        )
        vectors[k] = mixed / np.linalg.norm(mixed)
    share = (members + 1) / (members.sum() + len(members))
    return Adaptation(
        vectors=vectors,
        products=len(product_vectors),
        counted=int(counted.sum()),
        cut=cut,
        moved=len(moving),
        too_few=int(((members > 0) & (members < ADAPT_MIN_PRODUCTS)).sum()),
        catalog_prior=(CATALOG_PRIOR * np.log(share * len(members))).astype(np.float32),
    )


@dataclass(frozen=True)
class AdaptReport:
    """What ``adapt_zero_label_model`` read, used and stored."""

    version: str
    adapted_from: str
    catalog_products: int  # products in the catalog
    read: int  # of them read (at most max_products)
    no_text: int  # of those, without usable text: not used
    adaptation: Adaptation


PRODUCTS_SQL = text(
    """
    SELECT id, content_hash, name, description FROM products
    ORDER BY md5(id::text)
    LIMIT :limit
    """
)
"""A fixed pseudo-random sample when the catalog has more products than are read."""

ADAPTED_INSERT_SQL = text(
    """
    INSERT INTO model_versions (version, status, artifact, sha256, labels, encoders, metrics,
                                threshold)
    VALUES (:version, 'zero_label', :artifact, :sha256, CAST(:labels AS jsonb),
            CAST(:encoders AS jsonb), CAST(:metrics AS jsonb), 1.0)
    ON CONFLICT (version) DO UPDATE SET metrics = EXCLUDED.metrics
    """
)
"""The same vectors again (a re-run on the same products) refresh ``adapted_at``, so the
latest adaptation is the one served."""


def adapt_zero_label_model(
    engine: Engine,
    text_encoder: TextEncoder,
    image_encoder: ImageEncoder,
    image_settings: ImageSettings,
    *,
    max_products: int = ADAPT_MAX_PRODUCTS,
    on_read: Callable[[int], None] | None = None,
) -> AdaptReport:
    """Adapt the catalog's zero-label scorer to its own products (``adapt_vectors``) and
    store the result as a new ``zero_label`` row, which workers and ``shelver evaluate``
    serve from their next look (``ensure_zero_label_model``). No label is read.

    Products' text vectors come from the embedding cache where they are there, and the new
    ones are stored in it. Raises LookupError without categories and ValueError when no
    category could move (too few products).
    """
    # Read before the categories are: a taxonomy changed meanwhile then looks changed.
    with engine.connect() as conn:
        digest = categories_md5(conn)
    base = ensure_zero_label_model(engine, text_encoder, adapted=False)
    if base is None:
        raise LookupError("the catalog has no categories; load a taxonomy first")
    with engine.connect() as conn:
        catalog_products = conn.execute(text("SELECT count(*) FROM products")).scalar_one()
        rows = conn.execute(PRODUCTS_SQL, {"limit": max_products}).all()
    products = [ProductContent(r.id, r.content_hash, r.name, r.description, None) for r in rows]
    vectors, no_text = [], 0
    for start in range(0, len(products), ADAPT_READ_CHUNK):
        part = products[start : start + ADAPT_READ_CHUNK]
        with Session(engine) as db, db.begin():
            features = embed_products(
                db, part, text_encoder, image_encoder, image_settings,
                text_packing=DEFAULT_TEXT_PACKING,
            )  # fmt: skip
            cache.put(db, text_encoder.identity, features.new_text)
        usable = [i for i, t in enumerate(features.inputs.texts) if t.strip()]
        no_text += len(part) - len(usable)
        vectors.append(features.inputs.text_emb[usable])
        if on_read is not None:
            on_read(len(part))
    product_vectors = np.vstack(vectors) if vectors else np.zeros((0, text_encoder.dim))
    adaptation = adapt_vectors(base.scorer, product_vectors)
    if adaptation.moved == 0:
        raise ValueError(
            f"no category moved: of {adaptation.products} products with text, no category "
            f"got {ADAPT_MIN_PRODUCTS} of the more confident half of the suggestions; "
            "import more products and run it again"
        )
    scorer = ZeroLabelScorer(
        base.scorer.paths,
        adaptation.vectors,
        confidence_temperature=ADAPTED_CONFIDENCE_TEMPERATURE,
        catalog_prior=adaptation.catalog_prior,
    )
    artifact = scorer.to_bytes()
    sha256 = hashlib.sha256(artifact).hexdigest()
    version = f"{base.version}-adapted-{sha256[:10]}"
    metrics = {
        "kind": "zero_label",
        "adapted_from": base.version,
        "adapted_at": datetime.now(UTC).isoformat(),
        "catalog_products": catalog_products,
        "products": adaptation.products,
        "no_text": no_text,
        "counted": adaptation.counted,
        "confidence_cut": round(adaptation.cut, 6),
        "moved": adaptation.moved,
        "too_few": adaptation.too_few,
        "categories_md5": digest,
        "adapt": {"quantile": ADAPT_QUANTILE, "min_products": ADAPT_MIN_PRODUCTS,
                  "share": ADAPT_SHARE, "catalog_prior": CATALOG_PRIOR},
        "recipe": RECIPE,
    }  # fmt: skip
    with engine.begin() as conn:
        conn.execute(
            ADAPTED_INSERT_SQL,
            {
                "version": version,
                "artifact": artifact,
                "sha256": sha256,
                "labels": json.dumps(scorer.paths),
                "encoders": json.dumps({"text": text_encoder.identity}),
                "metrics": json.dumps(metrics),
            },
        )
    return AdaptReport(version, base.version, catalog_products, len(rows), no_text, adaptation)


def withdraw_adaptations(engine: Engine, text_encoder: TextEncoder) -> tuple[str, int]:
    """Go back to the taxonomy's own vectors: the current taxonomy's adaptations are no
    longer served (a new ``adapt`` serves again). Returns the taxonomy scorer's version and
    how many adaptations were withdrawn."""
    base = ensure_zero_label_model(engine, text_encoder, adapted=False)
    if base is None:
        raise LookupError("the catalog has no categories; load a taxonomy first")
    with engine.begin() as conn:
        withdrawn = conn.execute(
            WITHDRAW_SQL, {"version": base.version, "at": datetime.now(UTC).isoformat()}
        ).rowcount
    return base.version, withdrawn


class ZeroLabelClassifier:
    """The worker's classifier when no champion exists but the catalog has categories.

    Text only: an ImageNet feature vector says nothing about category names without a
    trained head. Every outcome waits for review (``accepted`` stays False).
    """

    def __init__(
        self,
        text_encoder: TextEncoder,
        image_encoder: ImageEncoder,
        model: ZeroLabelModel,
        image_settings: ImageSettings,
    ) -> None:
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.model = model
        self.image_settings = image_settings
        self.model_version_id = model.model_version_id

    def score(self, db: Session, rows: Sequence[ProductContent]) -> ScoredBatch:
        # Text only: no image is fetched or encoded for a scorer that would not read it.
        features = embed_products(
            db,
            [ProductContent(r.product_id, r.content_hash, r.name, r.description, None)
             for r in rows],
            self.text_encoder,
            self.image_encoder,
            self.image_settings,
            text_packing=DEFAULT_TEXT_PACKING,
        )  # fmt: skip
        outcomes: list[Outcome] = []
        usable = []
        for i, row in enumerate(rows):
            if not features.inputs.texts[i].strip():
                reason = "no usable text (the zero-label scorer reads text only)"
                outcomes.append(Outcome(row.product_id, row.content_hash, failure=reason))
            else:
                usable.append(i)
                outcomes.append(Outcome(row.product_id, row.content_hash))
        verdicts = self.model.scorer.score(features.inputs.text_emb[usable]) if usable else []
        for i, verdict in zip(usable, verdicts, strict=True):
            outcome = outcomes[i]
            outcome.category = verdict.category
            outcome.confidence = verdict.confidence
            outcome.top_k = verdict.top_k
        return ScoredBatch(outcomes, {self.text_encoder.identity: features.new_text})


class ZeroLabelRuntime:
    """A worker process's zero-label scorer, looked up again at most every ``poll_seconds``
    (a taxonomy import changes it) and kept in memory between looks."""

    def __init__(self, engine: Engine, text_encoder: TextEncoder, poll_seconds: float) -> None:
        self.engine = engine
        self.text_encoder = text_encoder
        self.poll_seconds = poll_seconds
        self._model: ZeroLabelModel | None = None
        self._checked_at = float("-inf")
        self._lock = threading.Lock()

    def model(self) -> ZeroLabelModel | None:
        with self._lock:
            if time.monotonic() - self._checked_at >= self.poll_seconds:
                self._checked_at = time.monotonic()
                self._model = ensure_zero_label_model(self.engine, self.text_encoder)
            return self._model


class KnownBackoffTree(LabelTree):
    """A label tree whose answers are only ever auto-accepted on nodes the champion was
    trained on: an accepted node the champion does not know backs off to its deepest
    ancestor it does know, or to review."""

    def __init__(self, labels: Sequence[str], known_nodes: set[str]) -> None:
        super().__init__(labels)
        self.known_nodes = known_nodes

    def decide_rows(self, node_probs: np.ndarray, thresholds: Sequence[float]) -> list[Decision]:
        return [self._known(d) for d in super().decide_rows(node_probs, thresholds)]

    def _known(self, decision: Decision) -> Decision:
        accepted = decision.accepted
        while accepted is not None and accepted not in self.known_nodes:
            parts = path_parts(accepted)
            accepted = SEPARATOR.join(parts[:-1]) if len(parts) > 1 else None
        return Decision(decision.candidate, accepted, decision.path_probs)


def unlabeled_categories(champion_labels: Sequence[str], paths: Sequence[str]) -> list[int]:
    """Indexes of ``paths`` the champion cannot answer even coarsely: not one of its tree's
    nodes, and not below one of its labels (a label covers its subtree)."""
    tree = LabelTree(champion_labels)
    nodes, labels = set(tree.nodes), set(tree.labels)
    return [
        k
        for k, path in enumerate(paths)
        if path not in nodes
        and not any(
            SEPARATOR.join(path_parts(path)[:d]) in labels for d in range(1, len(path_parts(path)))
        )
    ]


class MergedModel:
    """The champion and the zero-label scorer as one model over labeled and unlabeled
    categories, with the champion's interface (``FusionClassifier`` and
    ``training.holdout.evaluate_file`` take it as they take a ``FusionModel``).

    How likely the product is to be in a category the champion never learned is the
    zero-label scorer's two-way choice between the closest unlabeled category and the
    closest one the champion covers, at the calibrated temperature (``unlabeled_mass``).
    The champion's probabilities are scaled by the rest, and that mass is shared among
    the unlabeled categories by their zero-label softmax: one distribution summing to 1.
    A product that looks like an unlabeled category thus loses the champion's confidence
    and goes to review, and a category added to the tree is suggested from the next
    product on; nothing unlabeled is auto-accepted (``KnownBackoffTree``).
    """

    def __init__(
        self,
        champion_model,  # noqa: ANN001 - a FusionModel; not imported to keep this module light
        scorer: ZeroLabelScorer,
        text_encoder: TextEncoder,
    ) -> None:
        self.champion_model = champion_model
        self.scorer = scorer
        self.unlabeled = unlabeled_categories(champion_model.labels, scorer.paths)
        unlabeled = set(self.unlabeled)
        # What the champion covers: the catalog's categories it answers, and its own tree's
        # nodes (a bundled champion's labels need not be catalog categories yet).
        covered = scorer.vectors[[k for k in range(len(scorer.paths)) if k not in unlabeled]]
        missing = sorted(set(champion_model.tree.nodes) - set(scorer.paths))
        if missing:
            covered = np.vstack([covered, category_vectors(missing, text_encoder)])
        self._covered_vectors = covered
        self.labels = [*champion_model.labels, *(scorer.paths[k] for k in self.unlabeled)]
        self.tree = KnownBackoffTree(self.labels, set(champion_model.tree.nodes))
        self.threshold = champion_model.threshold
        self.level_thresholds = champion_model.level_thresholds
        self.text_packing = champion_model.text_packing
        self.meta = champion_model.meta
        self.open_set = champion_model.open_set

    def predict(self, inputs: ModelInputs) -> np.ndarray:
        trained = self.champion_model.predict(inputs)
        if not self.unlabeled:
            return trained
        text = np.asarray(inputs.text_emb, dtype=np.float32)
        elsewhere = (text @ self.scorer.vectors[self.unlabeled].T) / MERGE_TEMPERATURE
        best_elsewhere = elsewhere.max(axis=1)
        unlabeled_mass = self.unlabeled_mass(text, best_elsewhere, trained)
        within = np.exp(elsewhere - best_elsewhere[:, None])
        within /= within.sum(axis=1, keepdims=True)
        return np.hstack(
            [trained * (1.0 - unlabeled_mass)[:, None], within * unlabeled_mass[:, None]]
        )

    def unlabeled_mass(
        self, text: np.ndarray, best_elsewhere: np.ndarray, trained: np.ndarray
    ) -> np.ndarray:
        """How likely each product is to be of a category the champion never learned.

        The best unlabeled category against the best covered one, not all of them
        against all: a taxonomy of thousands of nodes beside a champion of a dozen
        labels would otherwise win on numbers alone. The champion's own confidence
        (``trained``) is left out on purpose: scaling by its doubt keeps known rows but
        lets products of a new category that it is sure of be auto-accepted wrongly
        (docs/cold_start.md, benchmarks/merge_added_categories.py).
        """
        best_covered = (text @ self._covered_vectors.T).max(axis=1) / MERGE_TEMPERATURE
        return 1.0 / (1.0 + np.exp(best_covered - best_elsewhere))


_runtime: ZeroLabelRuntime | None = None
_runtime_lock = threading.Lock()
_merged: dict[tuple[str, str], MergedModel] = {}


def serving_classifier(runtime: Runtime, champion: Champion | None) -> Classifier | None:
    """What the worker classifies with, given the champion in service (or None):

    - a champion, categories it was not trained on and ``SHELVER_ZERO_LABEL_MERGE``: the
      champion merged with the zero-label scorer (``MergedModel``);
    - otherwise a champion: the champion alone;
    - no champion: the zero-label scorer of the catalog's categories, all for review;
    - neither: None (the rows wait for a model).
    """
    global _runtime
    if champion is not None and not runtime.settings.zero_label_merge:
        # The taxonomy's vectors are not even looked up: encoding thousands of category
        # names is a minute and a half of a worker's time.
        return FusionClassifier(
            runtime.text_encoder, runtime.image_encoder, champion, runtime.settings
        )
    with _runtime_lock:
        if _runtime is None or _runtime.engine is not runtime.engine:
            _runtime = ZeroLabelRuntime(
                runtime.engine, runtime.text_encoder, runtime.settings.model_poll_seconds
            )
    zero = _runtime.model()
    if champion is None:
        if zero is None:
            return None
        return ZeroLabelClassifier(
            runtime.text_encoder, runtime.image_encoder, zero, runtime.settings
        )
    if zero is not None:
        key = (champion.sha256, zero.version)
        with _runtime_lock:
            if key not in _merged:
                _merged.clear()  # only the pair in service is kept
                _merged[key] = MergedModel(champion.model, zero.scorer, runtime.text_encoder)
            merged = _merged[key]
        if merged.unlabeled:
            champion = dataclasses.replace(champion, model=merged)
    return FusionClassifier(runtime.text_encoder, runtime.image_encoder, champion, runtime.settings)
