"""Export a trained fusion model to ONNX and package it as a registry artifact.

The ONNX graph is checked against the Keras model on the rows given (the test split in
``training.fit.train``): if any probability differs by more than ``PARITY_TOLERANCE``
the export is refused, because the worker would then serve a different model from the
one that was evaluated.

API:
    onnx_bytes = to_onnx(keras_model)
    diff = check_parity(onnx_bytes, keras_model, feeds)         # raises ExportMismatch
    artifact, sha256 = export_artifact(fitted, feeds, threshold, text_packing, encoders)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from shelver.worker.fusion import build_artifact, sha256_hex

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
OPSET = 17


class ExportMismatch(RuntimeError):
    """ONNX and Keras disagree beyond the tolerance."""


@dataclass(frozen=True)
class ExportedModel:
    artifact: bytes
    sha256: str
    max_abs_diff: float
    meta: dict


def to_onnx(model) -> bytes:
    """The Keras model's inference graph as ONNX bytes (dynamic batch and bag length)."""
    import tensorflow as tf
    import tf2onnx

    signature = [
        tf.TensorSpec((None, *tuple(t.shape[1:])), t.dtype, name=t.name) for t in model.inputs
    ]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=OPSET)
    return proto.SerializeToString()


def check_parity(onnx_bytes: bytes, model, feeds: dict[str, np.ndarray]) -> float:
    """Max |ONNX - Keras| over ``feeds``; raises ``ExportMismatch`` above tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    onnx_probs = session.run(None, {n: feeds[n] for n in names})[0]
    keras_probs = np.asarray(model.predict(feeds, batch_size=1024, verbose=0))
    diff = float(np.abs(onnx_probs - keras_probs).max()) if len(keras_probs) else 0.0
    if not diff <= PARITY_TOLERANCE:  # written so that NaN fails too
        raise ExportMismatch(
            f"ONNX differs from Keras by {diff:.3g} (> {PARITY_TOLERANCE}) on "
            f"{len(keras_probs)} rows; the export is not the evaluated model"
        )
    log.info("ONNX parity: max abs diff %.2e over %d rows", diff, len(keras_probs))
    return diff


def export_artifact(
    fitted,
    feeds: dict[str, np.ndarray],
    threshold: float,
    text_packing: str,
    encoders: dict,
    extra_meta: dict | None = None,
) -> ExportedModel:
    """ONNX-export ``fitted`` (a ``training.fit.FittedModel``), check it, package it."""
    onnx_bytes = to_onnx(fitted.model)
    diff = check_parity(onnx_bytes, fitted.model, feeds)
    meta = {
        "labels": list(fitted.labels),
        "threshold": float(threshold),
        "encoders": encoders,
        "text_packing": text_packing,
        "text_dim": int(feeds["text_emb"].shape[1]),
        "image_dim": int(feeds["image_emb"].shape[1]),
        "inputs": [t.name for t in fitted.model.inputs],
        "lexical": fitted.vocabulary.to_json() if fitted.vocabulary else None,
        "onnx_parity_max_abs_diff": diff,
        **(extra_meta or {}),
    }
    artifact = build_artifact(onnx_bytes, meta)
    return ExportedModel(
        artifact=artifact, sha256=sha256_hex(artifact), max_abs_diff=diff, meta=meta
    )
