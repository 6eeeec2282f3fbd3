"""The fusion classifier as the worker runs it: artifact format, loading, prediction.

An artifact is a zip (stdlib ``zipfile``) of two members:

- ``model.onnx``: the exported graph; inputs ``text_emb`` (n, 384), ``image_emb``
  (n, D), ``image_present`` (n, 1) and, with a lexical branch, ``lex_ids`` /
  ``lex_weights`` (n, L); output (n, K) class probabilities;
- ``meta.json``: everything else needed to serve it — ``format_version``, ``labels``
  (column order of the output: category paths at any depth, ``worker.tree``),
  ``threshold`` (auto-accept confidence of a top-level node), ``level_thresholds``
  (optional: one per tree level, level 1 first; a model without them is accepted at
  level 1 only, as flat models always were), ``encoders``
  (identities of the text/image encoders whose embeddings it expects), ``text_packing``
  (how name and description become the encoded text: a name in
  ``worker.inputs.TEXT_PACKINGS``), ``text_dim``/``image_dim``, ``inputs`` and
  ``lexical`` (vocabulary, idf and analyzer parameters, or null).

Nothing is unpickled, and the bytes are checked against the sha256 the registry
recorded before anything inside them is parsed. A model whose text packing this
worker does not know is refused: it would be fed texts it was not trained on.

API:
    data = build_artifact(onnx_bytes, meta)                     # training side
    model = FusionModel.from_artifact(data, expected_sha256)    # worker side
    probs = model.predict(inputs)        # a worker.inputs.ModelInputs -> (n, K)
    model.labels, model.threshold, model.text_packing, model.meta
    model.tree, model.level_thresholds   # backoff over the label paths (worker.tree)
    model.open_set                       # its open-set gate (worker.open_set), or None
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from shelver.worker.inputs import ModelInputs, UnknownTextPacking, text_packing_name
from shelver.worker.lexical import PAD_ID, LexicalVocabulary
from shelver.worker.open_set import OpenSetGate
from shelver.worker.tree import LabelTree

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_MEMBER = "model.onnx"
META_MEMBER = "meta.json"
REQUIRED_META = ("labels", "threshold", "encoders", "text_packing", "text_dim", "image_dim")
# Rows per onnxruntime call: bounds the padded lexical matrix when backfill scores
# thousands of rows at once.
PREDICT_CHUNK = 1024
# Rows per onnxruntime call once a chunk is sorted by its rows' lexical term counts.
LENGTH_BUCKET = 256


class ArtifactRejected(Exception):
    """The artifact is not the one the registry vouched for, or is not a valid artifact."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_artifact(onnx_bytes: bytes, meta: dict) -> bytes:
    """Package a model and its metadata; the result's sha256 is its identity."""
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ValueError(f"artifact meta lacks {missing}")
    text_packing_name(meta["text_packing"])
    meta = {"format_version": FORMAT_VERSION, **meta}
    buffer = io.BytesIO()
    # Fixed timestamps so the same model and meta always give the same bytes and hash.
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, payload in (
            (META_MEMBER, json.dumps(meta, sort_keys=True).encode("utf-8")),
            (MODEL_MEMBER, onnx_bytes),
        ):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, payload)
    return buffer.getvalue()


def fusion_inputs(
    vocabulary: LexicalVocabulary | None, inputs: ModelInputs
) -> dict[str, np.ndarray]:
    """The named input arrays of the fusion graph; training feeds Keras with the same.

    The lexical ones (``lex_ids``, ``lex_weights``) only with a ``vocabulary``.
    """
    present = inputs.image_present.reshape(-1, 1)
    feeds = {
        "text_emb": inputs.text_emb,
        # Zeroed where absent: whatever a caller leaves in a missing image's row must
        # not matter, and this makes Keras, ONNX and the embedding cache agree.
        "image_emb": inputs.image_emb * present,
        "image_present": present,
    }
    if vocabulary is not None:
        feeds["lex_ids"], feeds["lex_weights"] = vocabulary.transform(
            inputs.texts, inputs.names, inputs.image_present
        )
    return feeds


def _session_from_file(data: bytes, options: ort.SessionOptions) -> ort.InferenceSession:
    """An onnxruntime session of the artifact's graph, loaded from a private temporary
    file rather than from bytes: a session made from bytes kept about the graph's size
    again for the life of the process (107 MB more at 5,000 categories; docs/training.md)."""
    with tempfile.TemporaryDirectory(prefix="shelver-model-") as tmp:
        path = Path(tmp) / MODEL_MEMBER
        with (
            zipfile.ZipFile(io.BytesIO(data)) as archive,
            archive.open(MODEL_MEMBER) as src,
            path.open("wb") as out,
        ):
            shutil.copyfileobj(src, out, length=1 << 20)
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )


class FusionModel:
    """A verified, loaded artifact ready to score embedding batches."""

    def __init__(self, session: ort.InferenceSession, meta: dict):
        self._session = session
        self.meta = meta
        self.labels: list[str] = list(meta["labels"])
        self.threshold: float = float(meta["threshold"])
        self.tree = LabelTree(self.labels)
        # Level 1's is ``threshold`` (which the registry row may override); the deeper
        # ones were chosen on validation with it.
        self.level_thresholds: list[float] = [
            float(t) for t in meta.get("level_thresholds") or [self.threshold]
        ]
        # How the texts this model reads were packed (worker.inputs.TEXT_PACKINGS).
        self.text_packing: str = text_packing_name(meta["text_packing"])
        lexical = meta.get("lexical")
        self.vocabulary = LexicalVocabulary.from_json(lexical) if lexical else None
        # No auto-accept for a product unlike its class's training rows (worker.open_set);
        # None for artifacts without one.
        self.open_set = OpenSetGate.from_meta(meta)
        self._inputs = [i.name for i in session.get_inputs()]

    @classmethod
    def from_artifact(
        cls, data: bytes, expected_sha256: str, intra_op_threads: int | None = None
    ) -> FusionModel:
        """Load an artifact after checking its bytes hash to ``expected_sha256``.

        One intra-op thread unless told otherwise (a worker passes SHELVER_ORT_THREADS): the
        graph is small and workers scale by process.
        """
        actual = sha256_hex(data)
        if actual != expected_sha256.lower():
            raise ArtifactRejected(
                f"artifact sha256 is {actual}, the registry expects {expected_sha256}; "
                "refusing to load it (re-export or re-register the model)"
            )
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                meta = json.loads(archive.read(META_MEMBER))
                archive.getinfo(MODEL_MEMBER)
        except (zipfile.BadZipFile, KeyError, ValueError) as exc:
            raise ArtifactRejected(f"not a fusion model artifact: {exc}") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise ArtifactRejected(
                f"artifact format {meta.get('format_version')!r}, this worker reads "
                f"{FORMAT_VERSION}; upgrade the worker or retrain"
            )
        missing = [key for key in REQUIRED_META if key not in meta]
        if missing:
            raise ArtifactRejected(f"artifact meta lacks {missing}")
        try:
            text_packing_name(meta["text_packing"])
        except UnknownTextPacking as exc:
            raise ArtifactRejected(str(exc)) from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or 1
        options.inter_op_num_threads = 1
        try:
            session = _session_from_file(data, options)
        except Exception as exc:  # onnxruntime raises its own unrelated exception types
            raise ArtifactRejected(f"model.onnx does not load: {exc}") from exc
        try:
            model = cls(session, meta)
        except ValueError as exc:  # meta.json this worker cannot read (e.g. an unknown gate)
            raise ArtifactRejected(str(exc)) from exc
        outputs = session.get_outputs()[0].shape
        if outputs[-1] != len(model.labels):
            raise ArtifactRejected(
                f"model outputs {outputs[-1]} classes, meta lists {len(model.labels)}"
            )
        log.info("fusion model loaded: %d classes, sha256 %s", len(model.labels), actual[:12])
        return model

    def predict(self, inputs: ModelInputs) -> np.ndarray:
        """Class probabilities (n, K), columns in ``self.labels`` order.

        Rows without an image need ``image_present`` 0; their ``image_emb`` is ignored.
        """
        n = len(inputs)
        if inputs.text_emb.shape[1] != self.meta["text_dim"]:
            raise ValueError(
                f"text_emb must be (n, {self.meta['text_dim']}), got {inputs.text_emb.shape}"
            )
        if inputs.image_emb.shape[1] != self.meta["image_dim"]:
            raise ValueError(
                f"image_emb must be (n, {self.meta['image_dim']}), got {inputs.image_emb.shape}"
            )
        out = np.empty((n, len(self.labels)), dtype=np.float32)
        for start in range(0, n, PREDICT_CHUNK):
            rows = slice(start, start + PREDICT_CHUNK)
            feeds = fusion_inputs(self.vocabulary, inputs.subset(rows))
            out[rows] = self._run(feeds)
        return out

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The graph over ``feeds``. With lexical inputs, rows go through in runs of
        similar term counts, each padded only to its own longest row: a batch's longest
        row otherwise sets the width every row pays for in the lexical lookup."""
        feeds = {k: feeds[k] for k in self._inputs}
        if "lex_ids" not in feeds:
            return self._session.run(None, feeds)[0]
        lengths = np.count_nonzero(feeds["lex_ids"] != PAD_ID, axis=1)
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(order), len(self.labels)), dtype=np.float32)
        for start in range(0, len(order), LENGTH_BUCKET):
            rows = order[start : start + LENGTH_BUCKET]
            width = max(1, int(lengths[rows[-1]]))
            part = {k: v[rows] for k, v in feeds.items()}
            part["lex_ids"] = part["lex_ids"][:, :width]
            part["lex_weights"] = part["lex_weights"][:, :width]
            out[rows] = self._session.run(None, part)[0]
        return out
