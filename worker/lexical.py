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

    # With ``name_weight`` > 0 the product names form blocks of their own:
    vocab = fit_vocabulary(texts, params, names=names)
    ids, weights = vocab.transform(texts, names=names)
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
# scikit-learn's default token pattern (words of two or more word characters).
_SKLEARN_WORD = re.compile(r"(?u)\b\w\w+\b")

# Id 0 is reserved for padding, so a padded slot (id 0, weight 0) adds nothing.
PAD_ID = 0

# Term prefix -> normalization block: text words, text chars, name words, name chars.
_BLOCKS = {"w": 0, "c": 1, "nw": 2, "nc": 3}


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
    # "words": word and char n-grams from runs of word characters, one L2 norm per row
    # (artifacts written before the option existed). "tfidf_union": what
    # training/baseline.py's two scikit-learn vectorizers see: word n-grams of tokens
    # of 2+ word characters, char n-grams of whitespace-separated words (punctuation
    # kept), and each of the two blocks L2-normalized on its own.
    analyzer: str = "words"
    # Document frequency a word term needs, when it differs from ``min_df``.
    word_min_df: int | None = None
    # > 0: the product name is analyzed again on its own, into a name-word and a
    # name-char block (terms "nw:" and "nc:"), each L2-normalized and then scaled by
    # this weight. Where long descriptions drown the name (Best Buy) this is the
    # single largest gain measured (docs/training.md). "tfidf_union" only.
    name_weight: float = 0.0


def _char_ngrams(word: str, lo: int, hi: int) -> Iterable[str]:
    # Padded per word (like scikit-learn's "char_wb"): n-grams never span two words,
    # and the padding marks prefixes and suffixes.
    padded = f" {word} "
    for n in range(lo, hi + 1):
        if n > len(padded):
            break
        for i in range(len(padded) - n + 1):
            yield padded[i : i + n]


def analyze(text: str, params: LexicalParams, name: str | None = None) -> list[str]:
    """The terms of one text, with repeats; word terms start "w:", char terms "c:".

    With ``params.name_weight`` > 0, the terms of ``name`` follow, prefixed "n"
    ("nw:", "nc:").
    """
    if params.name_weight > 0:
        if params.analyzer != "tfidf_union":
            raise ValueError("lexical name_weight needs the tfidf_union analyzer")
        if name is None:
            raise ValueError("this lexical vocabulary reads product names: pass names")
        return _terms(text, params) + ["n" + t for t in _terms(name, params)]
    return _terms(text, params)


def _terms(text: str, params: LexicalParams) -> list[str]:
    text = text[: params.max_chars].lower()
    if params.analyzer == "tfidf_union":
        words, char_words = _SKLEARN_WORD.findall(text), text.split()
    elif params.analyzer == "words":
        words = char_words = _WORD.findall(text)
    else:
        raise ValueError(f"lexical analyzer must be words or tfidf_union, not {params.analyzer!r}")
    terms: list[str] = []
    wlo, whi = params.word_ngrams
    for n in range(wlo, whi + 1):
        for i in range(len(words) - n + 1):
            terms.append("w:" + " ".join(words[i : i + n]))
    clo, chi = params.char_ngrams
    for word in char_words:
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
        # Each term's normalization block: the prefix before ":" (w, c, nw, nc).
        block = np.asarray((-1, *(_BLOCKS[t.split(":", 1)[0]] for t in self.terms)))
        object.__setattr__(self, "_block", block)

    @property
    def size(self) -> int:
        """Rows of the embedding table the model needs, padding included."""
        return len(self.terms) + 1

    @property
    def reads_names(self) -> bool:
        return self.params.name_weight > 0

    def transform(
        self, texts: Sequence[str], names: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Padded (ids, weights) of sublinear-tf x idf, L2-normalized per row and block.

        ``names`` (the product names, one per text) are needed when the vocabulary
        reads them (``reads_names``) and ignored otherwise. Unknown terms are dropped.
        A row with no known term is all padding, which the model sees as "no lexical
        evidence" rather than an error.
        """
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        idf: np.ndarray = self._idf  # type: ignore[attr-defined]
        named = _with_names(texts, names if self.reads_names else None, self.reads_names)
        rows: list[tuple[np.ndarray, np.ndarray]] = []
        for text, name in named:
            counts = Counter(t for t in analyze(text, self.params, name) if t in index)
            ids = np.fromiter((index[t] for t in counts), dtype=np.int64, count=len(counts))
            tf = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
            w = (1.0 + np.log(tf)) * idf[ids]
            if len(w) > self.params.max_row_terms:
                # Stable sort on -w: equal weights keep first-seen order, deterministic.
                top = np.argsort(-w, kind="stable")[: self.params.max_row_terms]
                ids, w = ids[top], w[top]
            rows.append((ids, self._normalized(ids, w)))
        width = max([1, *(len(ids) for ids, _ in rows)])
        out_ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
        out_w = np.zeros((len(rows), width), dtype=np.float32)
        for r, (ids, w) in enumerate(rows):
            out_ids[r, : len(ids)] = ids
            out_w[r, : len(w)] = w
        return out_ids, out_w

    def _normalized(self, ids: np.ndarray, w: np.ndarray) -> np.ndarray:
        if self.params.analyzer == "words":
            norm = float(np.sqrt(np.dot(w, w)))
            return w / norm if norm > 0 else w.copy()
        term_block = self._block[ids]  # type: ignore[attr-defined]
        out = w.copy()
        name_weight = self.params.name_weight
        for b, scale in ((0, 1.0), (1, 1.0), (2, name_weight), (3, name_weight)):
            block = term_block == b
            norm = float(np.sqrt(np.dot(w[block], w[block])))
            if norm > 0:
                out[block] = scale * w[block] / norm
        return out

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


def _with_names(
    texts: Sequence[str], names: Sequence[str] | None, needed: bool
) -> list[tuple[str, str | None]]:
    if not needed:
        return [(text, None) for text in texts]
    if names is None:
        raise ValueError("this lexical vocabulary reads product names: pass names")
    if len(names) != len(texts):
        raise ValueError(f"lexical features: {len(texts)} texts but {len(names)} names")
    return list(zip(texts, names, strict=True))


def fit_vocabulary(
    texts: Sequence[str], params: LexicalParams, names: Sequence[str] | None = None
) -> LexicalVocabulary:
    """Keep the ``max_terms`` most frequent terms seen in at least ``min_df`` texts.

    ``names`` are needed when ``params.name_weight`` > 0. Ties in document frequency
    are broken by the term itself so the vocabulary is the same on every run, which
    keeps artifacts reproducible.
    """
    df: Counter[str] = Counter()
    for text, name in _with_names(texts, names, params.name_weight > 0):
        df.update(set(analyze(text, params, name)))
    word_min_df = params.min_df if params.word_min_df is None else params.word_min_df
    kept = [
        (t, c)
        for t, c in df.items()
        if c >= (word_min_df if t.startswith(("w:", "nw:")) else params.min_df)
    ]
    kept.sort(key=lambda tc: (-tc[1], tc[0]))
    kept = kept[: params.max_terms]
    n = len(texts)
    # Smoothed idf, as if one extra document held every term: never zero, never inf.
    idf = tuple(math.log((1 + n) / (1 + c)) + 1.0 for _, c in kept)
    return LexicalVocabulary(params=params, terms=tuple(t for t, _ in kept), idf=idf)
