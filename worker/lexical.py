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

    # With ``photo_weight`` > 0 a row with a usable photo gets one more term:
    ids, weights = vocab.transform(texts, names=names, photos=image_present)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import chain

import numpy as np

# Unicode word characters; product titles mix digits and letters ("32gb", "mn8x2b")
# and those tokens are among the most telling, so they are kept whole.
_WORD = re.compile(r"\w+", re.UNICODE)
# scikit-learn's default token pattern (words of two or more word characters).
_SKLEARN_WORD = re.compile(r"(?u)\b\w\w+\b")

# Id 0 is reserved for padding, so a padded slot (id 0, weight 0) adds nothing.
PAD_ID = 0

# Term prefix -> normalization block: text words, text chars, name words, name chars;
# and the photo term, which transform() adds after the norms.
_BLOCKS = {"w": 0, "c": 1, "nw": 2, "nc": 3, "p": 4}

# The term of a product with a usable photo (``LexicalParams.photo_weight``).
PHOTO_TERM = "p:photo"

# Distinct words whose char n-gram ids one vocabulary remembers (per block) before it
# starts over: a few tens of MB at most, and a catalog's words repeat far more often.
_CHAR_MEMO_WORDS = 200_000


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
    # > 0: a row whose product has a usable photo gets one more term, PHOTO_TERM, at
    # this weight (outside every norm). It lets the model learn where a catalog
    # shelved products with photos differently from those without (docs/training.md,
    # "Whether a product has a photo").
    photo_weight: float = 0.0


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


def _words(text: str, params: LexicalParams) -> tuple[list[str], list[str]]:
    """The words that make word n-grams, and the words that make char n-grams."""
    text = text[: params.max_chars].lower()
    if params.analyzer == "tfidf_union":
        return _SKLEARN_WORD.findall(text), text.split()
    if params.analyzer == "words":
        words = _WORD.findall(text)
        return words, words
    raise ValueError(f"lexical analyzer must be words or tfidf_union, not {params.analyzer!r}")


def _terms(text: str, params: LexicalParams) -> list[str]:
    words, char_words = _words(text, params)
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
        # word -> ids of its known char n-grams, in order, with repeats; one memo per
        # prefix ("c:" for text words, "nc:" for name words). Catalog words repeat, so
        # most rows look up whole words instead of building their n-gram strings.
        object.__setattr__(self, "_char_ids", {"c:": {}, "nc:": {}})

    @property
    def size(self) -> int:
        """Rows of the embedding table the model needs, padding included."""
        return len(self.terms) + 1

    @property
    def reads_names(self) -> bool:
        return self.params.name_weight > 0

    @property
    def reads_photos(self) -> bool:
        return self.params.photo_weight > 0

    @property
    def photo_id(self) -> int:
        """The photo term's id (its row of the model's tables); only when ``reads_photos``."""
        return self._index[PHOTO_TERM]  # type: ignore[attr-defined]

    def transform(
        self,
        texts: Sequence[str],
        names: Sequence[str] | None = None,
        photos: Sequence[float] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Padded (ids, weights) of sublinear-tf x idf, L2-normalized per row and block.

        ``names`` (the product names, one per text) are needed when the vocabulary
        reads them (``reads_names``) and ignored otherwise; ``photos`` (1 where the
        product's photo was usable, else 0: ``ModelInputs.image_present``) likewise
        when it reads photos (``reads_photos``). Unknown terms are dropped. A row with
        no known term is all padding, which the model sees as "no lexical evidence"
        rather than an error.
        """
        if self.reads_names and self.params.analyzer != "tfidf_union":
            raise ValueError("lexical name_weight needs the tfidf_union analyzer")
        has_photo = self._photo_rows(photos, len(texts))
        named = _with_names(texts, names if self.reads_names else None, self.reads_names)
        # The batch as flat arrays (row r's terms at offsets[r]:offsets[r + 1]), so the
        # weighting, normalization and padding below are a few numpy calls per batch.
        row_ids: list[list[int]] = []
        row_tf: list[list[int]] = []
        for text, name in named:
            known = self._known_ids(text, "")
            if name is not None:
                known += self._known_ids(name, "n")
            # First-seen order, as analyze() lists the terms: it decides ties below.
            counts = Counter(known)
            row_ids.append(list(counts))
            row_tf.append(list(counts.values()))
        ids, w, lengths = self._weighted(row_ids, row_tf)
        n = len(lengths)
        row = np.repeat(np.arange(n), lengths)
        w = self._normalized(ids, w, row, n)
        # The photo term, outside the norms, takes the slot after its row's last term.
        slots = lengths if has_photo is None else lengths + has_photo
        width = max(1, int(slots.max(initial=0)))
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        position = np.arange(len(ids)) - offsets[row]
        out_ids = np.full((n, width), PAD_ID, dtype=np.int64)
        out_w = np.zeros((n, width), dtype=np.float32)
        out_ids[row, position] = ids
        out_w[row, position] = w
        if has_photo is not None:
            out_ids[has_photo, lengths[has_photo]] = self.photo_id
            out_w[has_photo, lengths[has_photo]] = self.params.photo_weight
        return out_ids, out_w

    def _photo_rows(self, photos, n: int) -> np.ndarray | None:
        """The rows that get the photo term, or None when this vocabulary has none."""
        if not self.reads_photos:
            return None
        if photos is None:
            raise ValueError(
                "this lexical vocabulary reads whether a product has a photo: pass photos"
            )
        has = np.asarray(photos, dtype=np.float32).reshape(-1) > 0
        if len(has) != n:
            raise ValueError(f"lexical features: {n} texts but {len(has)} photo flags")
        return has

    def _weighted(
        self, row_ids: list[list[int]], row_tf: list[list[int]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat ids and sublinear-tf x idf weights, each row cut to its ``max_row_terms``
        highest weights; and the number of terms per row."""
        idf: np.ndarray = self._idf  # type: ignore[attr-defined]
        lengths = np.fromiter(map(len, row_ids), dtype=np.int64, count=len(row_ids))
        total = int(lengths.sum())
        ids = np.fromiter(chain.from_iterable(row_ids), dtype=np.int64, count=total)
        tf = np.fromiter(chain.from_iterable(row_tf), dtype=np.float32, count=total)
        w = (1.0 + np.log(tf)) * idf[ids]
        cap = self.params.max_row_terms
        if lengths.max(initial=0) <= cap:
            return ids, w, lengths
        kept_ids, kept_w, start = [], [], 0
        for length in lengths.tolist():
            row_w, row_id = w[start : start + length], ids[start : start + length]
            if length > cap:
                # Stable sort on -w: equal weights keep first-seen order, deterministic.
                top = np.argsort(-row_w, kind="stable")[:cap]
                row_w, row_id = row_w[top], row_id[top]
            kept_ids.append(row_id)
            kept_w.append(row_w)
            start += length
        return np.concatenate(kept_ids), np.concatenate(kept_w), np.minimum(lengths, cap)

    def _known_ids(self, text: str, prefix: str) -> list[int]:
        """Ids of the vocabulary's terms among ``analyze``'s terms of ``text``, in its order.

        The same list as ``[index[t] for t in _terms(text) if t in index]`` with every
        term prefixed by ``prefix``; char n-grams come from a per-word memo.
        """
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        params = self.params
        words, char_words = _words(text, params)
        ids: list[int] = []
        wlo, whi = params.word_ngrams
        word_prefix = prefix + "w:"
        for n in range(wlo, whi + 1):
            for i in range(len(words) - n + 1):
                found = index.get(word_prefix + " ".join(words[i : i + n]))
                if found is not None:
                    ids.append(found)
        char_prefix = prefix + "c:"
        memo: dict[str, tuple[int, ...]] = self._char_ids[char_prefix]  # type: ignore[attr-defined]
        clo, chi = params.char_ngrams
        for word in char_words:
            grams = memo.get(word)
            if grams is None:
                if len(memo) >= _CHAR_MEMO_WORDS:
                    memo.clear()
                grams = tuple(
                    index[t]
                    for t in (char_prefix + g for g in _char_ngrams(word, clo, chi))
                    if t in index
                )
                memo[word] = grams
            ids.extend(grams)
        return ids

    def _normalized(self, ids: np.ndarray, w: np.ndarray, row: np.ndarray, n: int) -> np.ndarray:
        """``w`` L2-normalized per row ("words"), or per row and block, the name blocks
        then scaled by ``name_weight`` ("tfidf_union"). An all-zero group stays zero."""
        # The photo term is never among them: transform() adds it after this.
        if self.params.analyzer == "words":
            group, groups, scale = row, n, np.ones(1, dtype=np.float32)
            block = np.zeros(len(ids), dtype=np.int64)
        else:
            block = self._block[ids]  # type: ignore[attr-defined]
            group, groups = row * 4 + block, n * 4
            name_weight = self.params.name_weight
            scale = np.asarray((1.0, 1.0, name_weight, name_weight), dtype=np.float32)
        norm = np.sqrt(np.bincount(group, weights=w * w, minlength=groups))[group]
        safe = np.where(norm > 0, norm, 1.0)
        return np.where(norm > 0, scale[block] * w / safe, w).astype(np.float32)

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
    terms = tuple(t for t, _ in kept)
    if params.photo_weight > 0:
        # Its weight is photo_weight alone (transform() does not read its idf).
        terms, idf = (*terms, PHOTO_TERM), (*idf, 1.0)
    return LexicalVocabulary(params=params, terms=terms, idf=idf)
