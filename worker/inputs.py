"""What the fusion model reads: a product's content, how it becomes text, a batch of inputs.

``ProductContent`` is a product as the model sees it. ``ModelInputs`` is a batch of what
the model is fed, one row per product: the worker, training, evaluation and the ONNX
runtime all pass this one type. ``text_packing`` names how name and description become
the one text that the text encoder and the lexical features read; a model records the
packing it was trained with in its artifact and is served with the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from shelver.worker.encoders import product_text

NAME_DOT_DESCRIPTION = "name. description"
# meta.json's ``text_packing`` names one of these. The embedding cache keys text vectors
# by encoder and content hash, not by packing: a second packing here must join that key.
TEXT_PACKINGS: dict[str, Callable[[str, str | None], str]] = {
    NAME_DOT_DESCRIPTION: product_text,
}
DEFAULT_TEXT_PACKING = NAME_DOT_DESCRIPTION
# What artifacts recorded before packings had names (the bundled default model among
# them) for the text ``product_text`` made: "name. description".
_UNNAMED_NAME_DOT_DESCRIPTION = {"template": "{name}. {description}", "max_tokens": 256}


class UnknownTextPacking(ValueError):
    """A model or a caller names a text packing this code does not know."""


def text_packing_name(value: object) -> str:
    """The packing ``value`` (a meta.json ``text_packing``) names; raises if it is unknown."""
    if isinstance(value, str) and value in TEXT_PACKINGS:
        return value
    if value == _UNNAMED_NAME_DOT_DESCRIPTION:
        return NAME_DOT_DESCRIPTION
    raise UnknownTextPacking(
        f"text packing {value!r} is not one this version knows ({sorted(TEXT_PACKINGS)}); "
        "serve the model with the version that trained it, or retrain it with this one"
    )


def pack_texts(products: Sequence[ProductContent], packing: str) -> list[str]:
    """Each product's name and description as the one text ``packing`` makes of them."""
    pack = TEXT_PACKINGS[text_packing_name(packing)]
    return [pack(p.name, p.description) for p in products]


@dataclass(frozen=True)
class ProductContent:
    """A product as the model sees it, and the content hash its vectors are cached under.

    Rows that are not in the catalog (a file being evaluated) have no hash: "".
    """

    product_id: int
    content_hash: str
    name: str
    description: str | None
    image_uri: str | None


@dataclass
class ModelInputs:
    """A batch of fusion-model inputs, one row per product, in one order."""

    texts: list[str]  # packed by ``text_packing``; the lexical features read them
    names: list[str]  # product names, read by a lexical vocabulary with a name block
    text_emb: np.ndarray  # (n, text dim) float32: the embedding of ``texts``
    image_emb: np.ndarray  # (n, image dim) float32: ignored where image_present is 0
    image_present: np.ndarray  # (n,) float32, 1.0 where the image was usable
    text_packing: str = DEFAULT_TEXT_PACKING

    def __post_init__(self) -> None:
        self.text_emb = np.asarray(self.text_emb, dtype=np.float32)
        self.image_emb = np.asarray(self.image_emb, dtype=np.float32)
        self.image_present = np.asarray(self.image_present, dtype=np.float32).reshape(-1)
        self.text_packing = text_packing_name(self.text_packing)
        if self.text_emb.ndim != 2 or self.image_emb.ndim != 2:
            raise ValueError(
                f"model inputs: embeddings must be 2-d, got text {self.text_emb.shape} "
                f"and image {self.image_emb.shape}"
            )
        sizes = {
            "texts": len(self.texts),
            "names": len(self.names),
            "text_emb": len(self.text_emb),
            "image_emb": len(self.image_emb),
            "image_present": len(self.image_present),
        }
        if len(set(sizes.values())) > 1:
            raise ValueError(f"model inputs: every field needs the same rows, got {sizes}")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows: Sequence[int] | np.ndarray | slice) -> ModelInputs:
        """These rows, in the order given (a slice keeps its order)."""
        index = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows)
        index = index.astype(np.intp, copy=False)
        return ModelInputs(
            texts=[self.texts[i] for i in index],
            names=[self.names[i] for i in index],
            text_emb=self.text_emb[index],
            image_emb=self.image_emb[index],
            image_present=self.image_present[index],
            text_packing=self.text_packing,
        )

    @staticmethod
    def concat(parts: Sequence[ModelInputs]) -> ModelInputs:
        """The rows of ``parts`` one after the other; they must share one text packing."""
        if not parts:
            raise ValueError("model inputs: nothing to concatenate")
        packings = {p.text_packing for p in parts}
        if len(packings) > 1:
            raise ValueError(f"model inputs packed differently cannot be joined: {packings}")
        return ModelInputs(
            texts=[t for p in parts for t in p.texts],
            names=[n for p in parts for n in p.names],
            text_emb=np.concatenate([p.text_emb for p in parts]),
            image_emb=np.concatenate([p.image_emb for p in parts]),
            image_present=np.concatenate([p.image_present for p in parts]),
            text_packing=parts[0].text_packing,
        )
