"""Training the fusion classifier from arrays: split, fit, evaluate, export, package.

This module owns the recipe (what is trained, how, with which defaults) and the one
entry point the CLI and the scheduled retraining call. Reading rows from the catalog
and computing or caching embeddings happen before; registering the result after.

API:
    data = TrainingData(ModelInputs(texts, names, text_emb, image_emb, image_present), labels)
    result = train(data, TrainParams(), report_dir=Path("reports/run-1"))
    result.artifact, result.sha256       # bytes for the registry, and their sha256
    result.metrics                       # JSON-able: test metrics + baseline side by side
    result.labels, result.threshold, result.split.test

    fitted = fit_model(data, split, params)   # lower level: Keras model + vocabulary only

The model is an ensemble: a logistic regression over the TF-IDF bag (convex, fitted
with scikit-learn, carried as plain weights inside the graph) mixed with the neural
fusion model, 0.8 : 0.2 by default. See docs/training.md for why.

Labels may be category paths of any depth (``TrainingData.paths``). The model then
scores the tree (``worker.tree``): the flat recipe on the top level gives each root its
probability, the same recipe on every labeled path shares it among the paths, and
validation picks one auto-accept threshold per level (docs/training.md, "Labels at
any depth").

``TrainingData`` (training/dataset.py) holds ``worker.inputs.ModelInputs``: the packed
product texts, the same strings the text embeddings were computed from, which the
lexical branch reads too, and the product names, which feed its name block. The
artifact records how the texts were packed, and the worker packs them the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shelver.training.baseline import fit_baseline
from shelver.training.dataset import TrainingData
from shelver.training.evaluate import backoff_metrics, choose_level_thresholds, evaluate
from shelver.training.export import export_artifact
from shelver.training.hierarchy import hierarchical_metrics
from shelver.training.holdout import admitted_by
from shelver.training.open_set import fit_open_set_gate
from shelver.training.splits import Split, stratified_split
from shelver.worker.fusion import FusionModel, fusion_inputs
from shelver.worker.lexical import LexicalParams, LexicalVocabulary, fit_vocabulary
from shelver.worker.tree import path_parts

log = logging.getLogger(__name__)

# Below this a root's share is taken as 0 (a root the path model gives no mass).
TREE_EPSILON = 1e-12


@dataclass
class TrainParams:
    """The recipe. Defaults are the measured default (docs/training.md).

    Mutable on purpose: callers fill ``encoders`` once the encoders are loaded.
    """

    seed: int = 0
    test_size: float = 0.2
    val_size: float = 0.15
    epochs: int = 60
    batch_size: int = 64
    # Above this many training rows batches grow to ``large_batch_size``: the same
    # epochs at a fraction of the steps, which keeps 25k rows within two minutes.
    large_rows: int = 10000
    large_batch_size: int = 512
    learning_rate: float = 1e-3
    patience: int = 8
    dropout: float = 0.3
    # 0: the neural model has no lexical branch and reads embeddings only.
    lexical_units: int = 0
    lexical_wide: bool = False
    # Logistic regression over the lexical bag (the baseline's model on the artifact's
    # own features), inverse regularization C; None leaves the neural model alone.
    linear_c: float | None = 10.0
    # Candidate shares of the linear model in the mix; validation macro-F1 picks one
    # when there are several. One fixed share by default: validation sets of a few
    # hundred rows picked badly (0.5-1.0 from seed to seed), while a share of 0.8 was
    # at or near the best on test for every dataset and seed (docs/training.md).
    linear_weights: tuple[float, ...] = (0.8,)
    # Above ``linear_exact_classes`` classes the linear part's (vocabulary x classes)
    # weights are learned as factors of this rank (``fit_low_rank``: bag -> rank ->
    # classes, trained by gradient descent) instead of a whole logistic regression,
    # whose memory and time grow with vocabulary x classes: the artifact then grows
    # with the vocabulary only (docs/training.md, "Cost at 5,000 categories"). None
    # fits the exact regression at any number of classes (``linear_exact_rank`` still
    # applies to it).
    linear_rank: int | None = 64
    linear_exact_classes: int = 256
    # At or below ``linear_exact_classes``, the exact fit's table is factored afterwards
    # (``factor``) to this rank when it has more classes; None keeps it whole.
    linear_exact_rank: int | None = 64
    # Ranks the path part of a tree may take instead, when its validation rows show
    # it better (``fit_model``, ``tree_key``): the same exact fit factored once per
    # rank, no second network. Empty keeps ``linear_exact_rank``. At 128 (whole, for
    # them) Flipkart's 136 paths gained 0.7 points of hF on each of 3 splits, but Best
    # Buy's 147 stayed level and lost every accept below level 2 on two splits
    # (docs/training.md, "The path part's rank"): no one rank suits both.
    linear_exact_rank_choices: tuple[int, ...] = (128,)
    modality_dropout: float = 0.3
    label_smoothing: float = 0.0
    # "balanced" (n / (K * count)), "sqrt" (its square root: softer on 300:1 imbalance)
    # or "none".
    class_weight: str = "balanced"
    # What the class weights balance when the labels are paths: "path", every labeled
    # path as the baseline does (+0.8 to +1.7 points of hF on Best Buy and Flipkart,
    # docs/training.md); "root", the top-level categories, each path weighing as its
    # root does (a path seen once is then worth little). A flat label set is the same
    # either way.
    balance: str = "path"
    # The baseline's TF-IDF (training/baseline.py) in the artifact's own format, so
    # that the linear model alone is the baseline: same analyzers, per-block norms,
    # word terms seen once kept (rare model numbers are telling), rows barely cut.
    lexical: LexicalParams | None = field(
        default_factory=lambda: LexicalParams(
            analyzer="tfidf_union",
            min_df=2,
            word_min_df=1,
            max_chars=5000,
            max_terms=300000,
            max_row_terms=4096,
            # The name again, as blocks of its own at half weight: +0.04 macro-F1 on
            # Best Buy, where long descriptions drown the name (docs/training.md).
            name_weight=0.5,
            # Rows with a usable photo get one more term, read by the path part only
            # (and where photos are neither rare nor near universal: reads_photo_term).
            # Best Buy shelved photo rows differently (hF +0.3 over 3 splits, the top
            # level unchanged; docs/training.md, "Whether a product has a photo").
            photo_weight=0.5,
        )
    )
    # After evaluation, refit the vocabulary and the linear part on every row (test
    # rows included) for the artifact that serves (``refit_linear``); the evaluated
    # artifact is kept for the registry gate.
    refit_all: bool = True
    target_precision: float = 0.97
    # Precision counted as if categories were equally common (training/evaluate.py).
    threshold_class_balanced: bool = True
    # Below the top level, thresholds must meet target_precision by a Wilson lower bound
    # this many standard errors down, not by the point estimate (training/evaluate.py).
    threshold_deep_z: float = 1.0
    # Recorded in the artifact so the worker picks encoders as trained.
    encoders: dict = field(default_factory=dict)


@dataclass
class FittedModel:
    """A trained Keras model with what it needs to be fed."""

    model: object  # keras.Model; typed loosely so importing this module stays light
    labels: list[str]
    vocabulary: LexicalVocabulary | None
    history: dict[str, list[float]]
    seconds: float
    # Validation probabilities of ``model`` as chosen, from parts that did not see the
    # validation rows (the served linear model is refitted on them afterwards).
    val_probs: np.ndarray
    linear_weight: float = 0.0
    # The network alone and the fitted scikit-learn estimator of the linear part, so
    # ``refit_linear`` can refit the latter on more rows (None without a linear part).
    network: object = None
    linear_estimator: object = None
    linear_rank: int | None = None
    linear_exact_classes: int | None = None
    linear_exact_rank: int | None = None
    # A tree model's two fits (``fit_model``): the top level's and the paths'.
    parts: tuple[FittedModel, FittedModel] | None = None
    # ``TrainParams.balance`` as fitted (``refit_linear`` weighs the same way).
    balance: str = "path"


# The linear part's table (vocabulary x classes, or x rank) is most of an artifact and
# of a worker's model memory; it is kept in half precision, in the fit as in the graph
# (``training.model.LinearBag``), so what is evaluated is what is served
# (docs/training.md, "Cost at 5,000 categories").
TABLE_DTYPE = np.float16


@dataclass
class LinearModel:
    """Softmax regression over the lexical bag as plain arrays (ids index ``coef``)."""

    coef: np.ndarray  # (vocabulary size, K) TABLE_DTYPE, or (vocabulary size, r) with ``proj``
    bias: np.ndarray  # (K,) float32
    # (r, K): the weights are ``coef @ proj`` (``factor``), None when kept whole.
    proj: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.coef = np.asarray(self.coef, dtype=TABLE_DTYPE)

    def predict_proba(self, features) -> np.ndarray:
        # Only the rows of the table these features use, widened to float32.
        cols, bag = used_terms(features)
        logits = np.asarray(bag @ self.coef[cols].astype(np.float32))
        if self.proj is not None:
            logits = logits @ self.proj
        logits = logits + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)


def used_terms(features):
    """The distinct term ids ``features`` (rows x vocabulary) uses, and the same rows as a
    CSR matrix over those terms only, so a step or a prediction touches just their
    table rows."""
    import scipy.sparse as sp

    x = sp.csr_matrix(features)
    cols, inverse = np.unique(x.indices, return_inverse=True)
    return cols, sp.csr_matrix((x.data, inverse.ravel(), x.indptr), shape=(x.shape[0], len(cols)))


def lexical_matrix(
    vocabulary: LexicalVocabulary,
    texts: list[str],
    names: list[str] | None = None,
    photos: np.ndarray | None = None,
):
    """The TF-IDF bags as a scipy CSR matrix (n, vocabulary size) for scikit-learn."""
    import scipy.sparse as sp

    ids, weights = vocabulary.transform(texts, names, photos)
    rows = np.repeat(np.arange(len(ids)), ids.shape[1])
    keep = weights.ravel() != 0
    return sp.csr_matrix(
        (weights.ravel()[keep], (rows[keep], ids.ravel()[keep])),
        shape=(len(ids), vocabulary.size),
    )


# Rows with a photo, and rows without one, the photo term needs each to be of a set.
PHOTO_TERM_MIN_SHARE = 0.05


def reads_photo_term(data: TrainingData) -> bool:
    """Whether a linear part fitted on ``data`` reads the photo term: only a path part,
    one whose labels go below the top level, and only where both kinds of row are
    common. On the top level it cost Best Buy's macro-F1 0.1-0.6 points on each of 3
    splits; on the paths it gained hF. With photos on all but a few rows (Flipkart: 2
    of 840 without) the term mostly picks out those rows: hF fell 0.8 points on one
    split of 3 (docs/training.md, "Whether a product has a photo")."""
    if data.paths is None or all(len(path_parts(p)) == 1 for p in data.paths):
        return False
    share = float(np.mean(data.inputs.image_present > 0))
    return PHOTO_TERM_MIN_SHARE <= share <= 1 - PHOTO_TERM_MIN_SHARE


def lexical_of(vocabulary: LexicalVocabulary, data: TrainingData, photos: bool):
    """``lexical_matrix`` of a set: its texts and names, and its photo flags when
    ``photos`` (``reads_photo_term`` of the whole fit's rows), else none."""
    inputs = data.inputs
    flags = inputs.image_present if photos else np.zeros_like(inputs.image_present)
    return lexical_matrix(vocabulary, inputs.texts, inputs.names, flags)


def without_photo_term(linear: LinearModel, vocabulary: LexicalVocabulary, photos: bool):
    """``linear`` with the photo term's row zeroed unless it read ``photos``: it was
    fitted on a zero column, and served rows carry the term."""
    if vocabulary.reads_photos and not photos:
        coef = linear.coef.copy()
        coef[vocabulary.photo_id] = 0
        linear = dataclasses.replace(linear, coef=coef)
    return linear


def factor(coef: np.ndarray, rank: int, features) -> tuple[np.ndarray, np.ndarray]:
    """``coef`` (V, K) as (V, rank) @ (rank, K), keeping the logits of ``features``.

    Each term's weights are first centred over the classes (adding one number to every
    class's logit changes no softmax). The projection spans the ``rank`` directions of
    class space in which the training rows' logits vary most, so what the factored
    model loses is what these rows least use, not what is smallest in the weights.
    """
    centred = coef - coef.mean(axis=1, keepdims=True)
    logits = np.asarray(features @ centred)
    _, _, vt = np.linalg.svd(logits - logits.mean(axis=0), full_matrices=False)
    proj = vt[:rank].astype(np.float32)
    return (centred @ proj.T).astype(np.float32), proj


@dataclass
class LowRankEstimator:
    """What ``fit_low_rank`` learned: ``C`` and ``classes_`` as scikit-learn's
    estimator has them (``refit_linear`` reads both), and the factors to start from."""

    C: float
    classes_: np.ndarray
    model: LinearModel


# ``fit_low_rank``'s optimisation: Adam on minibatches, fixed epochs (a warm start
# needs fewer). On the synthetic 500-category catalog (benchmarks/taxonomy_scale.py,
# 10,000 rows, one 80/20 split) batches of 2,048 for 10 epochs at 0.02 reached 0.939
# held-out accuracy in 40% of the time of 512 x 20 epochs at 0.01 (0.946).
LOW_RANK_BATCH = 2048
LOW_RANK_EPOCHS = 10
LOW_RANK_WARM_EPOCHS = 3
LOW_RANK_LR = 0.02
# Small sets take more epochs: at least this many steps (cold, warm).
LOW_RANK_MIN_STEPS = (100, 30)


def fit_low_rank(
    features,
    y: np.ndarray,
    num_classes: int,
    c: float,
    rank: int,
    class_weight: dict[int, float] | None = None,
    init: LinearModel | None = None,
    seed: int = 0,
) -> LinearModel:
    """Softmax regression whose weights are learned as (vocabulary x rank) @ (rank x K).

    Minimises the weighted cross-entropy (mean over rows, weights ``class_weight``) plus
    the L2 penalty of scikit-learn's ``C`` spread over rows, ``||A||^2 + ||B||^2`` over
    ``2 C n``, by Adam on minibatches (numpy). Each step touches only the table rows of the
    batch's terms (gathered, updated with a lazy Adam), so a step costs the batch's
    terms x rank plus rank x K, never vocabulary x K: memory and time grow with the
    classes only through the (rank x K) projection and the logits.
    """

    x = features.tocsr().astype(np.float32)
    n, vocab = x.shape
    steps = -(-n // LOW_RANK_BATCH)
    rng = np.random.default_rng(seed)
    weights = np.ones(num_classes, dtype=np.float32)
    for k, w in (class_weight or {}).items():
        weights[k] = w
    if init is not None:
        table, proj, bias = (
            np.array(a, dtype=np.float32) for a in (init.coef, init.proj, init.bias)
        )
        epochs = max(LOW_RANK_WARM_EPOCHS, -(-LOW_RANK_MIN_STEPS[1] // steps))
    else:
        table = rng.normal(0.0, 0.1, (vocab, rank)).astype(np.float32)
        proj = rng.normal(0.0, 0.1, (rank, num_classes)).astype(np.float32)
        bias = np.zeros(num_classes, dtype=np.float32)
        epochs = max(LOW_RANK_EPOCHS, -(-LOW_RANK_MIN_STEPS[0] // steps))
    moments = {name: (np.zeros_like(v), np.zeros_like(v)) for name, v in
               (("table", table), ("proj", proj), ("bias", bias))}  # fmt: skip
    penalty = 1.0 / (c * n)  # the gradient of ||.||^2 / (2 C n)
    beta1, beta2, eps = 0.9, 0.999, 1e-7

    def adam(name, var, grad, lr, rows=None):
        m, v = moments[name]
        if rows is None:
            m *= beta1
            m += (1 - beta1) * grad
            v *= beta2
            v += (1 - beta2) * grad * grad
            var -= lr * m / (np.sqrt(v) + eps)
            return
        # Lazy: only the table rows of this batch's terms move.
        m_rows = beta1 * m[rows] + (1 - beta1) * grad
        v_rows = beta2 * v[rows] + (1 - beta2) * grad * grad
        m[rows], v[rows] = m_rows, v_rows
        var[rows] -= lr * m_rows / (np.sqrt(v_rows) + eps)

    t = 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, LOW_RANK_BATCH):
            t += 1
            rows = np.sort(order[start : start + LOW_RANK_BATCH])
            cols, bag = used_terms(x[rows])
            sub = table[cols]
            hidden = np.asarray(bag @ sub)
            logits = hidden @ proj + bias
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
            yb = y[rows]
            wb = weights[yb]
            probs[np.arange(len(rows)), yb] -= 1.0
            grad_logits = probs * (wb / wb.sum()).astype(np.float32)[:, None]
            g_proj = hidden.T @ grad_logits + penalty * proj
            g_bias = grad_logits.sum(axis=0)
            g_sub = np.asarray(bag.T @ (grad_logits @ proj.T)) + penalty * sub
            lr = float(LOW_RANK_LR * np.sqrt(1.0 - beta2**t) / (1.0 - beta1**t))
            adam("table", table, g_sub.astype(np.float32), lr, rows=cols)
            adam("proj", proj, g_proj.astype(np.float32), lr)
            adam("bias", bias, g_bias.astype(np.float32), lr)
    return LinearModel(coef=table, bias=bias, proj=proj)


def fit_linear(
    features,
    y: np.ndarray,
    num_classes: int,
    c: float,
    estimator=None,
    rank: int | None = None,
    class_weight: dict[int, float] | str = "balanced",
    exact_classes: int | None = None,
    exact_rank: int | None = None,
):
    """Balanced multinomial logistic regression, as the baseline (C, class weights).

    Pass the ``estimator`` of an earlier call to start from its solution (a refit on
    more rows then converges in a fraction of the iterations). Above ``exact_classes``
    classes, with a ``rank``, the weights are learned as factors of that rank
    (``fit_low_rank``); otherwise the whole fit is factored (``factor``) to
    ``exact_rank`` when that is below the number of classes, and kept whole when not.
    Returns the arrays and the estimator.
    """
    from sklearn.linear_model import LogisticRegression

    if estimator is not None and set(np.unique(y)) != set(estimator.classes_):
        # A warm start needs the same classes; with paths as labels, a rare path may
        # first appear in the validation or test rows.
        estimator = None
    if rank is not None and exact_classes is not None and num_classes > exact_classes:
        if isinstance(class_weight, str):
            raise ValueError("the low-rank linear model takes class weights as a dict")
        present = np.unique(y)
        linear = fit_low_rank(
            features, y, num_classes, c, rank, class_weight,
            init=estimator.model if isinstance(estimator, LowRankEstimator) else None,
        )  # fmt: skip
        absent = np.setdiff1d(np.arange(num_classes), present)
        # As below: a class absent from these rows is never predicted.
        linear.bias[absent] = float(linear.bias[present].min()) - 30.0
        return linear, LowRankEstimator(C=c, classes_=present, model=linear)
    if estimator is None:
        estimator = LogisticRegression(C=c, max_iter=3000, class_weight=class_weight)
    else:
        estimator.set_params(warm_start=True)
    estimator.fit(features, y)
    if len(estimator.classes_) < 2:
        raise ValueError("the linear model needs at least two classes in training")
    return exact_linear(estimator, num_classes, exact_rank, features), estimator


def exact_linear(estimator, num_classes: int, exact_rank: int | None, features) -> LinearModel:
    """A fitted scikit-learn estimator's weights over all ``num_classes``, factored
    (``factor``, keeping the logits of ``features``) to ``exact_rank`` when that is
    below the number of classes, whole when not."""
    classes = estimator.classes_
    coef, bias = estimator.coef_, estimator.intercept_
    if len(classes) == 2:
        # Binary: scikit-learn keeps one logit z; softmax([-z/2, z/2]) == sigmoid(z).
        coef, bias = np.vstack([-coef / 2, coef / 2]), np.concatenate([-bias / 2, bias / 2])
    full_coef = np.zeros((features.shape[1], num_classes), dtype=np.float32)
    # A class absent from these rows gets a logit far below the others: never predicted.
    full_bias = np.full(num_classes, float(bias.min()) - 30.0, dtype=np.float32)
    full_coef[:, classes] = coef.T
    full_bias[classes] = bias
    if exact_rank is not None and exact_rank < num_classes:
        table, proj = factor(full_coef, exact_rank, features)
        return LinearModel(coef=table, bias=full_bias, proj=proj)
    return LinearModel(coef=full_coef, bias=full_bias)


def choose_linear_weight(
    y_val: np.ndarray, linear_probs: np.ndarray, mlp_probs: np.ndarray, weights
) -> float:
    """The share of the linear model with the best validation macro-F1; ties go to the
    larger share (the convex model varies less from run to run than the network)."""
    from sklearn.metrics import f1_score

    def macro_f1(w: float) -> float:
        pred = (w * linear_probs + (1 - w) * mlp_probs).argmax(axis=1)
        return round(float(f1_score(y_val, pred, average="macro")), 6)

    return max(weights, key=lambda w: (macro_f1(w), w))


def class_weights(
    y: np.ndarray,
    num_classes: int,
    mode: str,
    roots: np.ndarray | None = None,
    only_present: bool = False,
) -> dict[int, float] | None:
    """Weights per class. With ``roots`` (each class's top-level index) the balance is
    between top-level categories: every path under a root weighs as its root does, so
    a path seen once is not worth a whole category, and the top level is balanced as
    in a flat model."""
    if mode == "none":
        return None
    if roots is None:
        roots = np.arange(num_classes)
    counts = np.bincount(roots[y], minlength=int(roots.max()) + 1).astype(np.float64)
    # As scikit-learn's "balanced": over the categories present in ``y``.
    present = int((counts > 0).sum())
    w = (len(y) / (present * np.maximum(counts, 1.0)))[roots]
    if mode == "sqrt":
        w = np.sqrt(w)
    elif mode != "balanced":
        raise ValueError(f"class_weight must be balanced, sqrt or none, not {mode!r}")
    return {int(k): float(w[k]) for k in (np.unique(y) if only_present else range(num_classes))}


def _seed_everything(seed: int) -> None:
    import keras

    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    keras.utils.set_random_seed(seed)


def fit_model(
    data: TrainingData,
    split: Split,
    params: TrainParams,
    on_epoch: Callable[[int, int], None] | None = None,
) -> FittedModel:
    """The model of ``params`` on ``data``'s labels, or on its paths when they go deeper
    than the top level.

    On paths it is two fits of the same recipe joined into one model: today's flat
    model on the top-level categories gives each root its probability, and the same
    recipe on every labeled path gives how a root's probability divides among the
    paths under it (``training.model.build_tree_model``). The tree's top level is then
    exactly the flat model's, and the paths only add depth.
    """
    if data.paths is None or all(len(path_parts(p)) == 1 for p in data.paths):
        return _fit_one(data, split, params, on_epoch)
    top = _fit_one(
        dataclasses.replace(data, paths=None, labels=top_levels(data)), split, params, on_epoch
    )
    val_paths = model_labels(data.subset(split.val))

    def key(labels: list[str], path_val_probs: np.ndarray) -> tuple[int, float]:
        membership = root_membership(labels, top.labels)
        probs = tree_probs(top.val_probs, path_val_probs, membership)
        return tree_key(val_paths, probs, labels, params)

    paths = _fit_one(data, split, params, on_epoch, rank_key=key)
    return join_tree(top, paths)


def tree_key(
    true_paths: list[str], probs: np.ndarray, labels: list[str], params: TrainParams
) -> tuple[int, float]:
    """How good a tree's validation probabilities are, for choosing the path part's
    rank: first the deepest level the thresholds ``train`` would choose on them accept
    any row at (a rank that makes the deep levels unprovable at the target precision
    loses them in service), then the leaf candidates' hF."""
    thresholds = level_thresholds_for(true_paths, probs, labels, params)
    backoff = backoff_metrics(true_paths, probs, labels, thresholds)
    depth = max(
        (int(level) for level, v in backoff["levels"].items() if v["coverage"] > 0), default=0
    )
    hf = hierarchical_metrics(true_paths, backoff["candidates"])["hierarchical"]["f1"]
    return depth, float(hf)


def level_thresholds_for(
    true_paths: list[str], probs: np.ndarray, labels: list[str], params: TrainParams
) -> list[float]:
    """The per-level auto-accept thresholds ``params`` asks for on these rows."""
    return choose_level_thresholds(
        true_paths,
        probs,
        labels,
        params.target_precision,
        class_balanced=params.threshold_class_balanced,
        deep_z=params.threshold_deep_z,
    )


def join_tree(top: FittedModel, paths: FittedModel) -> FittedModel:
    """One model: ``top``'s root probabilities shared among the paths as ``paths`` shares them."""
    from shelver.training.model import build_tree_model

    membership = root_membership(paths.labels, top.labels)
    model = build_tree_model(top.model, paths.model, membership)
    return FittedModel(
        model=model,
        labels=paths.labels,
        vocabulary=top.vocabulary,
        history=paths.history,
        seconds=top.seconds + paths.seconds,
        val_probs=tree_probs(top.val_probs, paths.val_probs, membership),
        linear_weight=paths.linear_weight,
        parts=(top, paths),
    )


def root_membership(labels: list[str], roots: list[str]) -> np.ndarray:
    """(K, R) float32: 1 where label k lies under root r."""
    out = np.zeros((len(labels), len(roots)), dtype=np.float32)
    for k, label in enumerate(labels):
        out[k, roots.index(path_parts(label)[0])] = 1.0
    return out


def tree_probs(top: np.ndarray, paths: np.ndarray, membership: np.ndarray) -> np.ndarray:
    """``build_tree_model``'s arithmetic in numpy (for validation probabilities)."""
    share = top / np.maximum(paths @ membership, TREE_EPSILON)
    return paths * (share @ membership.T)


def _fit_one(
    data: TrainingData,
    split: Split,
    params: TrainParams,
    on_epoch: Callable[[int, int], None] | None = None,
    rank_key: Callable[[list[str], np.ndarray], tuple] | None = None,
) -> FittedModel:
    """Fit on ``split.train``, early-stop and schedule the LR on ``split.val``.

    With ``params.linear_c``, also fit the logistic regression on ``split.train``, pick
    its share of the mix on ``split.val`` (when ``params.linear_weights`` offers more
    than one), refit it on train + validation (like the baseline, which has no early
    stopping either) and return the mix as one model. The returned ``val_probs`` mix
    the train-only fit, so the threshold is chosen on rows no part has seen. With
    ``rank_key`` (labels, validation probabilities -> a key, larger is better) and an
    exact linear fit, its table takes the rank among ``linear_exact_rank`` and
    ``linear_exact_rank_choices`` whose mix has the largest key (ties: the first).
    ``on_epoch(done, most)`` is called after each epoch (for progress bars).
    """
    import keras

    from shelver.training.model import ModelShape, build_ensemble, build_model

    started = time.perf_counter()
    _seed_everything(params.seed)
    targets = model_labels(data)
    labels = sorted(set(targets))
    index = {label: k for k, label in enumerate(labels)}
    roots = balanced_index(labels, params.balance)
    y = np.array([index[label] for label in targets], dtype=np.int64)
    train, val = data.subset(split.train), data.subset(split.val)

    # The vocabulary is fitted on train + validation texts (no labels), like the
    # baseline's TF-IDF, so the refitted linear model knows validation-only terms.
    rest = data.subset(np.concatenate([split.train, split.val]))
    vocabulary = (
        fit_vocabulary(rest.inputs.texts, params.lexical, rest.inputs.names)
        if params.lexical
        else None
    )
    neural_lexical = vocabulary is not None and (params.lexical_units > 0 or params.lexical_wide)
    shape = ModelShape(
        num_classes=len(labels),
        image_dim=data.inputs.image_emb.shape[1],
        text_dim=data.inputs.text_emb.shape[1],
        lexical_vocab_size=vocabulary.size if neural_lexical else 0,
        lexical_units=params.lexical_units,
        lexical_wide=params.lexical_wide,
        dropout=params.dropout,
        modality_dropout=params.modality_dropout,
    )
    model = build_model(shape, seed=params.seed)
    model.compile(
        optimizer=keras.optimizers.Adam(params.learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing),
    )

    def feeds(part: TrainingData):
        return fusion_inputs(vocabulary if neural_lexical else None, part.inputs)

    one_hot = np.eye(len(labels), dtype=np.float32)
    large = len(split.train) > params.large_rows
    val_feeds = feeds(val)
    history = model.fit(
        feeds(train),
        one_hot[y[split.train]],
        validation_data=(val_feeds, one_hot[y[split.val]]),
        epochs=params.epochs,
        batch_size=params.large_batch_size if large else params.batch_size,
        class_weight=class_weights(y[split.train], len(labels), params.class_weight, roots),
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=params.patience, restore_best_weights=True
            ),
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.5, patience=max(1, params.patience // 3), min_lr=1e-5
            ),
            *(
                [
                    keras.callbacks.LambdaCallback(
                        on_epoch_end=lambda epoch, _logs: on_epoch(epoch + 1, params.epochs)
                    )
                ]
                if on_epoch
                else []
            ),
        ],
        shuffle=True,
        verbose=0,
    )
    hist = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    log.info(
        "fusion model: %d epochs, best val_loss %.4f, %.1fs",
        len(hist["loss"]),
        min(hist["val_loss"]),
        time.perf_counter() - started,
    )
    val_probs = np.asarray(model.predict(val_feeds, batch_size=1024, verbose=0))
    weight = 0.0
    if params.linear_c is not None and vocabulary is not None:
        photos = reads_photo_term(data)
        x_train, x_val = (
            lexical_of(vocabulary, train, photos),
            lexical_of(vocabulary, val, photos),
        )
        linear, estimator = fit_linear(
            x_train, y[split.train], len(labels), params.linear_c, rank=params.linear_rank,
            class_weight=class_weights(y[split.train], len(labels), "balanced", roots, True),
            exact_classes=params.linear_exact_classes, exact_rank=params.linear_exact_rank,
        )  # fmt: skip
        exact_rank = params.linear_exact_rank
        ranks = [exact_rank, *(r for r in params.linear_exact_rank_choices if r != exact_rank)]
        if rank_key is None or isinstance(estimator, LowRankEstimator):
            ranks = ranks[:1]
        candidates = []  # (rank, share of the linear part, validation mix)
        for rank in ranks:
            if rank != params.linear_exact_rank:
                linear = exact_linear(estimator, len(labels), rank, x_train)
            linear_val = linear.predict_proba(x_val)
            w = choose_linear_weight(y[split.val], linear_val, val_probs, params.linear_weights)
            candidates.append((rank, w, w * linear_val + (1 - w) * val_probs))
        chosen = 0
        if len(candidates) > 1:
            keys = [rank_key(labels, mixed) for _, _, mixed in candidates]
            chosen = max(range(len(keys)), key=keys.__getitem__)  # the first on ties
            log.info(
                "path part's linear table at rank %s (validation depth, hF: %s)",
                ranks[chosen],
                "; ".join(f"rank {r}: {d}, {h:.4f}" for r, (d, h) in zip(ranks, keys, strict=True)),
            )
        exact_rank, weight, val_probs = candidates[chosen]
        y_rest = np.concatenate([y[split.train], y[split.val]])
        linear, estimator = fit_linear(
            lexical_of(vocabulary, rest, photos),
            y_rest,
            len(labels),
            params.linear_c,
            estimator,
            rank=params.linear_rank,
            class_weight=class_weights(y_rest, len(labels), "balanced", roots, True),
            exact_classes=params.linear_exact_classes,
            exact_rank=exact_rank,
        )
        linear = without_photo_term(linear, vocabulary, photos)
        network, model = model, build_ensemble(model, linear.coef, linear.bias, weight, linear.proj)
        log.info("linear model share %.2f", weight)
        seconds = time.perf_counter() - started
        return FittedModel(
            model, labels, vocabulary, hist, seconds, val_probs, weight, network, estimator,
            params.linear_rank, params.linear_exact_classes, exact_rank,
            balance=params.balance,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    if not neural_lexical:
        vocabulary = None  # nothing in the graph reads the bag
    return FittedModel(model, labels, vocabulary, hist, seconds, val_probs, weight)


def refit_linear(fitted: FittedModel, data: TrainingData) -> FittedModel:
    """The same model with its linear part refitted on every row of ``data``.

    For the artifact that serves, once the test rows have done their job: the
    linear part carries most of the mix and most of what rare classes have, and
    holding a fifth of a 10-row class out of it for good costs more than any
    recipe change gained (docs/training.md). The vocabulary is refitted too (the
    held-out rows' names and model numbers are terms the served model should
    know) unless the network reads it. The network, the share and the threshold
    stay as evaluated.
    """
    from shelver.training.model import build_ensemble

    if fitted.parts is not None:
        top, paths = fitted.parts
        flat = dataclasses.replace(data, paths=None, labels=top_levels(data))
        return join_tree(refit_linear(top, flat), refit_linear(paths, data))
    if fitted.linear_estimator is None or fitted.vocabulary is None:
        raise ValueError("this model has no linear part to refit")
    index = {label: k for k, label in enumerate(fitted.labels)}
    y = np.array([index[label] for label in model_labels(data)], dtype=np.int64)
    vocabulary, warm = fitted.vocabulary, fitted.linear_estimator
    if "lex_ids" not in {t.name for t in fitted.network.inputs}:
        vocabulary = fit_vocabulary(data.inputs.texts, vocabulary.params, data.inputs.names)
        warm = None  # other columns: nothing to start from
    photos = reads_photo_term(data)
    linear, estimator = fit_linear(
        lexical_of(vocabulary, data, photos),
        y,
        len(fitted.labels),
        float(fitted.linear_estimator.C),
        warm,
        rank=fitted.linear_rank,
        class_weight=class_weights(
            y, len(fitted.labels), "balanced", balanced_index(fitted.labels, fitted.balance), True
        ),
        exact_classes=fitted.linear_exact_classes,
        exact_rank=fitted.linear_exact_rank,
    )
    linear = without_photo_term(linear, vocabulary, photos)
    model = build_ensemble(
        fitted.network, linear.coef, linear.bias, fitted.linear_weight, linear.proj
    )
    return dataclasses.replace(
        fitted, model=model, vocabulary=vocabulary, linear_estimator=estimator
    )


def balanced_index(labels: list[str], balance: str) -> np.ndarray | None:
    """``class_weights``' ``roots`` for ``TrainParams.balance``: None balances each label."""
    if balance == "path":
        return None
    if balance == "root":
        return root_index(labels)
    raise ValueError(f"balance must be path or root, not {balance!r}")


def root_index(labels: list[str]) -> np.ndarray:
    """For each label (a path), the index of its top-level category among the roots."""
    roots = sorted({path_parts(label)[0] for label in labels})
    return np.array([roots.index(path_parts(label)[0]) for label in labels], dtype=np.int64)


def model_labels(data: TrainingData) -> list[str]:
    """What the model learns for each row: its whole category path when the data has
    paths (a label at any depth is a label, ``worker.tree``), else its label."""
    return data.paths if data.paths is not None else data.labels


def top_levels(data: TrainingData) -> list[str]:
    return [path_parts(label)[0] for label in model_labels(data)]


def tree_metrics(
    true_paths: list[str],
    probs: np.ndarray,
    labels: list[str],
    thresholds: list[float],
    admitted: np.ndarray | None = None,
) -> dict:
    """The tree figures: hierarchical and per-level ones of the leaf candidates (what
    the model names when made to answer), and what backoff at ``thresholds`` accepts
    (of the rows the open-set gate ``admitted``, as the worker does)."""
    backoff = backoff_metrics(true_paths, probs, labels, thresholds, admitted)
    return {
        **hierarchical_metrics(true_paths, backoff.pop("candidates")),
        "backoff": {k: v for k, v in backoff.items() if k != "accepted"},
    }


def predict_keras(fitted: FittedModel, data: TrainingData, batch_size: int = 1024) -> np.ndarray:
    """Class probabilities (n, K) from the Keras model, columns in ``fitted.labels`` order."""
    feeds = fusion_inputs(fitted.vocabulary, data.inputs)
    return np.asarray(fitted.model.predict(feeds, batch_size=batch_size, verbose=0))


def split_for(data: TrainingData, params: TrainParams) -> Split:
    return stratified_split(
        data.labels, params.test_size, params.val_size, params.seed, groups=data.groups
    )


@dataclass
class TrainResult:
    """What a training run hands to the registry."""

    artifact: bytes  # what serves: with ``refit_all``, the linear part has seen every row
    sha256: str
    labels: list[str]
    threshold: float
    # {"test": ..., "validation": ..., "baseline": ..., "beats_baseline": bool, ...}
    metrics: dict
    split: Split
    history: dict[str, list[float]]
    # The artifact the test metrics are of (trained without the test rows). The gate
    # scores this one, never ``artifact``, on test rows. Equal to ``artifact`` when
    # nothing was refitted.
    eval_artifact: bytes = b""
    eval_sha256: str = ""


def _aligned(probs: np.ndarray, have: list[str], want: list[str]) -> np.ndarray:
    out = np.zeros((len(probs), len(want)), dtype=np.float32)
    for k, label in enumerate(have):
        out[:, want.index(label)] = probs[:, k]
    return out


def train(
    data: TrainingData,
    params: TrainParams | None = None,
    report_dir: Path | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Split, fit, pick the threshold on validation, export with parity check, and score
    the exported artifact and the TF-IDF baseline on the same test rows.

    Test metrics are computed from the ONNX artifact through ``FusionModel`` (what the
    worker will serve), not from Keras. ``report_dir`` receives the PNGs and metrics.json.
    """
    params = params or TrainParams()
    split = split_for(data, params)
    log.info(
        "split: %d train, %d validation, %d test rows",
        len(split.train),
        len(split.val),
        len(split.test),
    )
    fitted = fit_model(data, split, params, on_epoch=on_epoch)
    val, test = data.subset(split.val), data.subset(split.test)
    val_probs = fitted.val_probs
    level_thresholds = level_thresholds_for(model_labels(val), val_probs, fitted.labels, params)
    threshold = level_thresholds[0]
    log.info("thresholds per level: %s", ", ".join(f"{t:.3f}" for t in level_thresholds))
    # No auto-accept for a product unlike what its class was trained on (worker.open_set):
    # its floor is chosen on the validation rows the threshold accepts.
    open_set = fit_open_set_gate(data, split, fitted.labels, val_probs, threshold)
    log.info("open-set gate: %s, floor %.4f", open_set.kind, open_set.floor)

    test_feeds = fusion_inputs(fitted.vocabulary, test.inputs)
    exported = export_artifact(
        fitted,
        test_feeds,
        threshold,
        text_packing=data.inputs.text_packing,
        encoders=params.encoders,
        extra_meta={
            "target_precision": params.target_precision,
            "level_thresholds": level_thresholds,
            "open_set": open_set.to_meta(),
        },
    )
    served = FusionModel.from_artifact(exported.artifact, exported.sha256)
    test_probs = served.predict(test.inputs)
    tree = served.tree
    # The flat figures are of the top level, whatever depth the labels have; coverage
    # and precision count the auto-accepts the served artifact's gate lets stand, as the
    # worker makes them.
    test_roots, val_roots = tree.root_probs(test_probs), tree.root_probs(val_probs)
    test_admitted = admitted_by(served, test.inputs.text_emb, test_roots)
    test_metrics = evaluate(
        top_levels(test),
        test_roots,
        tree.root_names,
        threshold,
        report_dir,
        admitted=test_admitted,
    )
    test_metrics.update(
        tree_metrics(model_labels(test), test_probs, fitted.labels, level_thresholds, test_admitted)
    )

    started = time.perf_counter()
    rest = data.subset(np.concatenate([split.train, split.val]))
    baseline = fit_baseline(rest.inputs.texts, top_levels(rest), seed=params.seed)
    baseline_probs = _aligned(
        baseline.predict_proba(test.inputs.texts), baseline.labels, tree.root_names
    )
    baseline_metrics = evaluate(top_levels(test), baseline_probs, tree.root_names)
    baseline_metrics["seconds"] = time.perf_counter() - started

    metrics = {
        "test": test_metrics,
        "validation": evaluate(
            top_levels(val),
            val_roots,
            tree.root_names,
            threshold,
            admitted=admitted_by(served, val.inputs.text_emb, val_roots),
        ),
        "baseline": {k: baseline_metrics[k] for k in ("accuracy", "macro_f1", "ece", "seconds")},
        "beats_baseline": test_metrics["macro_f1"] > baseline_metrics["macro_f1"],
        "onnx_parity_max_abs_diff": exported.max_abs_diff,
        "train_seconds": fitted.seconds,
        "linear_weight": fitted.linear_weight,
        "epochs": len(fitted.history["loss"]),
        "split": {
            "train": len(split.train),
            "validation": len(split.val),
            "test": len(split.test),
            "grouped": data.groups is not None,
            "seed": params.seed,
        },  # fmt: skip
    }
    log.info(
        "test macro-F1 %.4f (baseline %.4f), coverage %.1f%% at threshold %.3f",
        test_metrics["macro_f1"],
        baseline_metrics["macro_f1"],
        100 * test_metrics["coverage"],
        threshold,
    )
    serving = exported
    if params.refit_all and (fitted.linear_estimator is not None or fitted.parts is not None):
        started = time.perf_counter()
        refitted = refit_linear(fitted, data)
        serving = export_artifact(
            refitted,
            fusion_inputs(refitted.vocabulary, test.inputs),  # its own term ids
            threshold,
            text_packing=data.inputs.text_packing,
            encoders=params.encoders,
            extra_meta={
                "target_precision": params.target_precision,
                "level_thresholds": level_thresholds,
                "open_set": open_set.to_meta(),
                "linear_refit_rows": len(data.labels),
            },
        )
        metrics["served"] = {
            "linear_part_refit_on_rows": len(data.labels),
            "seconds": time.perf_counter() - started,
            "note": "test figures are of the evaluated artifact, before this refit",
        }
        log.info("linear part refit on all %d rows for serving", len(data.labels))
    if report_dir is not None:
        Path(report_dir, "metrics.json").write_text(json.dumps(metrics, indent=2))
    return TrainResult(
        artifact=serving.artifact,
        sha256=serving.sha256,
        labels=fitted.labels,
        threshold=threshold,
        metrics=metrics,
        split=split,
        history=fitted.history,
        eval_artifact=exported.artifact,
        eval_sha256=exported.sha256,
    )
