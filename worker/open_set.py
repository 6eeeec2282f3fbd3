"""An open-set gate: no auto-accept for a product the model cannot tell from the runner-up.

The champion's threshold says how sure the model is *among the classes it knows*; a
product of a category it never saw can still clear it. The gate adds a second test,
applied only to answers the threshold would auto-accept: a statistic of the product
must reach a floor, or the row waits for review with the same suggestion.

- ``margin`` (the default): the top-level probability's lead over the runner-up.
- ``text_prototypes``: the largest cosine of the product's text vector to up to 8
  spherical k-means centres of its predicted class's training rows.

The floor is the 5th percentile of the statistic over the validation rows the
threshold accepts, so known categories alone choose it. On Best Buy with three
categories held out of training (benchmarks/open_set.py, three splits) the margin gate
took the share of absent-category rows auto-accepted from 0.12-0.41 to 0.003-0.065, at
5.6-10.8 points of coverage of the known rows (docs/cold_start.md).

Stored in the artifact's ``meta.json`` under ``open_set`` (``to_meta``), read back by
``OpenSetGate.from_meta`` when a model loads (``FusionModel.open_set``; None when an
artifact has none: older artifacts serve as before). ``training.open_set.fit_open_set_gate``
fits it where training picks the threshold; ``gated`` applies it to a batch's
``worker.tree`` decisions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from shelver.worker.tree import Decision

META_KEY = "open_set"
MARGIN = "margin"
PROTOTYPES = "text_prototypes"
# Chosen on benchmarks/open_set.py's three splits (docs/cold_start.md).
DEFAULT_KIND = MARGIN
PER_CLASS = 8
QUANTILE = 0.05
_ITERATIONS = 20


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _kmeans(vectors: np.ndarray, k: int) -> np.ndarray:
    """Spherical k-means, deterministic: farthest-point start from the mean's nearest row."""
    v = _unit(vectors)
    if len(v) <= k:
        return v
    first = int(np.argmax(v @ _unit(v.mean(axis=0))))
    centres = [v[first]]
    closest = v @ v[first]
    for _ in range(1, k):
        nxt = int(np.argmin(closest))
        centres.append(v[nxt])
        closest = np.maximum(closest, v @ v[nxt])
    c = np.stack(centres)
    for _ in range(_ITERATIONS):
        assign = (v @ c.T).argmax(axis=1)
        for j in range(k):
            members = v[assign == j]
            if len(members):
                c[j] = _unit(members.mean(axis=0))
    return c


def class_prototypes(
    text_emb: np.ndarray, classes: np.ndarray, num_classes: int, per_class: int = PER_CLASS
) -> tuple[np.ndarray, np.ndarray]:
    """(prototypes (m, d), owner class of each (m,)): up to ``per_class`` per class."""
    protos, owner = [], []
    for k in range(num_classes):
        rows = np.asarray(text_emb)[np.asarray(classes) == k]
        if len(rows):
            c = _kmeans(rows, per_class) if per_class > 1 else _unit(rows.mean(axis=0))[None]
            protos.append(c)
            owner.extend([k] * len(c))
    return np.vstack(protos).astype(np.float32), np.asarray(owner, dtype=np.int64)


def prototype_similarity(
    text_emb: np.ndarray, predicted: np.ndarray, prototypes: np.ndarray, owner: np.ndarray
) -> np.ndarray:
    """Each row's largest cosine to the prototypes of its predicted class (-1 if none)."""
    sims = _unit(text_emb) @ prototypes.T
    mine = owner[None, :] == np.asarray(predicted)[:, None]
    return np.where(mine, sims, -1.0).max(axis=1)


def margins(root_probs: np.ndarray) -> np.ndarray:
    """Top-level probability of the first class minus the second's, per row."""
    top2 = np.sort(np.asarray(root_probs), axis=1)[:, -2:]
    return top2[:, 1] - (top2[:, 0] if top2.shape[1] > 1 else 0.0)


@dataclass(frozen=True)
class OpenSetGate:
    """A statistic of the product and its floor. ``kind``: ``margin`` (the top-level
    probability's lead over the runner-up) or ``text_prototypes`` (the text vector's
    largest cosine to the predicted class's prototypes, named by ``roots``)."""

    kind: str
    floor: float
    roots: list[str] = field(default_factory=list)
    prototypes: np.ndarray | None = None
    owner: np.ndarray | None = None

    @classmethod
    def fit(
        cls,
        kind: str,
        roots: Sequence[str],
        fit_text_emb: np.ndarray,
        fit_roots: Sequence[str],
        val_text_emb: np.ndarray,
        val_root_probs: np.ndarray,
        threshold: float,
        quantile: float = QUANTILE,
    ) -> OpenSetGate:
        """The floor is the ``quantile`` of the statistic over the validation rows that
        ``threshold`` accepts (all of them if it accepts none); prototypes come from the
        training rows."""
        roots = list(roots)
        if kind == MARGIN:
            gate = cls(MARGIN, 0.0, roots)
        elif kind == PROTOTYPES:
            y = np.array([roots.index(r) for r in fit_roots])
            prototypes, owner = class_prototypes(fit_text_emb, y, len(roots))
            gate = cls(PROTOTYPES, 0.0, roots, prototypes, owner)
        else:
            raise ValueError(f"unknown open-set gate {kind!r}")
        stat = gate.statistic(val_text_emb, val_root_probs)
        accepted = val_root_probs.max(axis=1) >= threshold
        floor = float(np.quantile(stat[accepted] if accepted.any() else stat, quantile))
        return dataclasses.replace(gate, floor=floor)

    def statistic(
        self, text_emb: np.ndarray, root_probs: np.ndarray, root_names: Sequence[str] | None = None
    ) -> np.ndarray:
        """Per row. ``root_names`` names ``root_probs``' columns when they are not the
        gate's roots (a merged model's); a top level the gate does not know scores -1."""
        root_probs = np.atleast_2d(root_probs)
        if self.kind == MARGIN:
            return margins(root_probs)
        predicted = root_probs.argmax(axis=1)
        if root_names is not None:
            index = {root: k for k, root in enumerate(self.roots)}
            predicted = np.array([index.get(root_names[k], -1) for k in predicted])
        return prototype_similarity(np.atleast_2d(text_emb), predicted, self.prototypes, self.owner)

    def admits(
        self, text_emb: np.ndarray, root_probs: np.ndarray, root_names: Sequence[str] | None = None
    ) -> np.ndarray:
        """Per row: may an auto-accept stand (True), or must the row wait for review."""
        return self.statistic(text_emb, root_probs, root_names) >= self.floor

    def to_meta(self) -> dict:
        meta = {"kind": self.kind, "floor": self.floor, "roots": self.roots}
        if self.kind == PROTOTYPES:
            meta["owner"] = self.owner.tolist()
            # Four decimals are plenty for a cosine floor, and keep meta.json small.
            meta["prototypes"] = np.round(self.prototypes.astype(np.float64), 4).tolist()
        return meta

    @classmethod
    def from_meta(cls, meta: dict) -> OpenSetGate | None:
        gate = meta.get(META_KEY)
        if not gate:
            return None
        kind = gate.get("kind")
        if kind == MARGIN:
            return cls(MARGIN, float(gate["floor"]), list(gate.get("roots", [])))
        if kind == PROTOTYPES:
            return cls(
                PROTOTYPES,
                float(gate["floor"]),
                list(gate["roots"]),
                _unit(np.asarray(gate["prototypes"], dtype=np.float32)),
                np.asarray(gate["owner"], dtype=np.int64),
            )
        raise ValueError(f"unknown open-set gate {kind!r} in the artifact")


def gated(
    decisions: Sequence[Decision],
    gate: OpenSetGate | None,
    text_emb: np.ndarray,
    root_probs: np.ndarray,
    root_names: Sequence[str],
) -> list[Decision]:
    """``decisions`` (one per row) with the auto-accepts ``gate`` refuses withdrawn; the
    candidate stays: it is what the reviewer sees suggested. ``text_emb`` and
    ``root_probs`` (the rows' top-level probabilities, named by ``root_names``) are the
    same rows', so the gate judges the whole batch at once."""
    if gate is None:
        return list(decisions)
    return withdrawn(decisions, gate.admits(text_emb, root_probs, root_names))


def withdrawn(decisions: Sequence[Decision], admitted: np.ndarray) -> list[Decision]:
    """``decisions`` with the auto-accept of every row not ``admitted`` withdrawn."""
    return [
        d if d.accepted is None or ok else Decision(d.candidate, None, d.path_probs)
        for d, ok in zip(decisions, admitted, strict=True)
    ]
