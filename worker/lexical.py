"""Lexical features for the fusion classifier: TF-IDF weighted word and char n-grams.

This module owns the one featurizer that both training and the worker run, so the
features a model was trained on are, bit for bit, the ones it is served. It is pure
Python + numpy (no scikit-learn, no pickle): the vocabulary and idf weights travel in
the model artifact's ``meta.json`` as plain lists.

The model consumes a row as a bag of (term id, weight) pairs, padded to the longest row
of the batch with id 0 and weight 0, which an embedding-bag layer turns into a dense
vector. That keeps the ONNX graph small (a Gather and a weighted sum) whatever the
vocabulary size, and costs O(terms in the row) instead of O(vocabulary).

API:
    vocab = fit_vocabulary(texts, LexicalParams())      # at training time
    ids, weights = vocab.transform(texts)                # (n, L) int64, (n, L) float32
    LexicalVocabulary.from_json(vocab.to_json())         # round trip through meta.json
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

# Unicode word characters; product titles mix digits and letters ("32gb", "mn8x2b")
# and those tokens are among the most telling, so they are kept whole.
_WORD = re.compile(r"\w+", re.UNICODE)

# Id 0 is reserved for padding, so a padded slot (id 0, weight 0) adds nothing.
PAD_ID = 0


@dataclass(frozen=True)
class LexicalParams:
    """How text becomes terms and how many terms the vocabulary keeps."""

    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (3, 5)
    # Long descriptions (Flipkart) repeat themselves; the first characters carry the
    # product type, and a cap keeps rows and training time bounded.
    max_chars: int = 1500
    max_terms: int = 60000
    min_df: int = 2
    # Only a row's highest-weighted terms are kept: the model's cost grows with terms
    # per row, and past a few hundred the tail adds little beyond what is kept.
    max_row_terms: int = 256


def _char_ngrams(word: str, lo: int, hi: int) -> Iterable[str]:
    # Padded per word (like scikit-learn's "char_wb"): n-grams never span two words,
    # and the padding marks prefixes and suffixes.
    padded = f" {word} "
    for n in range(lo, hi + 1):
        if n > len(padded):
            break
        for i in range(len(padded) - n + 1):
            yield padded[i : i + n]


def analyze(text: str, params: LexicalParams) -> list[str]:
    """The terms of one text, with repeats; word terms start "w:", char terms "c:"."""
    words = _WORD.findall(text[: params.max_chars].lower())
    terms: list[str] = []
    wlo, whi = params.word_ngrams
    for n in range(wlo, whi + 1):
        for i in range(len(words) - n + 1):
            terms.append("w:" + " ".join(words[i : i + n]))
    clo, chi = params.char_ngrams
    for word in words:
        terms.extend("c:" + g for g in _char_ngrams(word, clo, chi))
    return terms


@dataclass(frozen=True)
class LexicalVocabulary:
    """Terms (id = position + 1; 0 is padding) and their smoothed idf weights."""

    params: LexicalParams
    terms: tuple[str, ...]
    idf: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.terms) != len(self.idf):
            raise ValueError("lexical vocabulary: terms and idf differ in length")
        # A lookup table, derived, not part of the identity of the vocabulary.
        object.__setattr__(self, "_index", {t: i + 1 for i, t in enumerate(self.terms)})
        object.__setattr__(self, "_idf", np.asarray((0.0, *self.idf), dtype=np.float32))

    @property
    def size(self) -> int:
        """Rows of the embedding table the model needs, padding included."""
        return len(self.terms) + 1

    def transform(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Padded (ids, weights) of sublinear-tf x idf, L2-normalized per row.

        Unknown terms are dropped. A row with no known term is all padding, which the
        model sees as "no lexical evidence" rather than an error.
        """
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        idf: np.ndarray = self._idf  # type: ignore[attr-defined]
        rows: list[tuple[np.ndarray, np.ndarray]] = []
        for text in texts:
            counts = Counter(t for t in analyze(text, self.params) if t in index)
            ids = np.fromiter((index[t] for t in counts), dtype=np.int64, count=len(counts))
            tf = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
            w = (1.0 + np.log(tf)) * idf[ids]
            if len(w) > self.params.max_row_terms:
                # Stable sort on -w: equal weights keep first-seen order, deterministic.
                top = np.argsort(-w, kind="stable")[: self.params.max_row_terms]
                ids, w = ids[top], w[top]
            norm = float(np.sqrt(np.dot(w, w)))
            rows.append((ids, w / norm if norm > 0 else w))
        width = max([1, *(len(ids) for ids, _ in rows)])
        out_ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
        out_w = np.zeros((len(rows), width), dtype=np.float32)
        for r, (ids, w) in enumerate(rows):
            out_ids[r, : len(ids)] = ids
            out_w[r, : len(w)] = w
        return out_ids, out_w

    def to_json(self) -> dict:
        return {
            "params": {
                k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.params).items()
            },
            "terms": list(self.terms),
            # Rounded: float32 precision is all the model sees, and it halves meta.json.
            "idf": [round(float(x), 6) for x in self.idf],
        }

    @classmethod
    def from_json(cls, data: dict) -> LexicalVocabulary:
        raw = dict(data["params"])
        for key in ("word_ngrams", "char_ngrams"):
            raw[key] = tuple(raw[key])
        return cls(params=LexicalParams(**raw), terms=tuple(data["terms"]), idf=tuple(data["idf"]))


def fit_vocabulary(texts: Sequence[str], params: LexicalParams) -> LexicalVocabulary:
    """Keep the ``max_terms`` most frequent terms seen in at least ``min_df`` texts.

    Ties in document frequency are broken by the term itself so the vocabulary is the
    same on every run, which keeps artifacts reproducible.
    """
    df: Counter[str] = Counter()
    for text in texts:
        df.update(set(analyze(text, params)))
    kept = [(t, c) for t, c in df.items() if c >= params.min_df]
    kept.sort(key=lambda tc: (-tc[1], tc[0]))
    kept = kept[: params.max_terms]
    n = len(texts)
    # Smoothed idf, as if one extra document held every term: never zero, never inf.
    idf = tuple(math.log((1 + n) / (1 + c)) + 1.0 for _, c in kept)
    return LexicalVocabulary(params=params, terms=tuple(t for t, _ in kept), idf=idf)
