"""The inference-time text and image encoders: ONNX files verified against their manifest.

Only onnxruntime, tokenizers, Pillow and numpy are used here; the files are produced by
``shelver encoders export`` (training/encoder_export.py), which also writes the manifest
this module reads and trusts nothing beyond.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

from shelver.worker.errors import EncoderUnavailable

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
EXPORT_COMMAND = "shelver encoders export"


@dataclass(frozen=True)
class TextPreprocessing:
    tokenizer: str
    tokenizer_sha256: str
    max_length: int = 256
    padding: str = "longest"


@dataclass(frozen=True)
class ImagePreprocessing:
    input_size: int
    resize_shorter: int
    crop: int
    # Per-channel, in 0..255 pixel units: x = (pixel - mean) / std.
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str = "NCHW"
    channel_order: str = "RGB"
    resample: str = "bilinear"


@dataclass(frozen=True)
class EncoderSpec:
    """One exported encoder as recorded in the manifest."""

    name: str
    kind: str  # "text" or "image"
    dim: int
    file: str
    sha256: str
    source_package: str
    source_version: str
    preprocessing: TextPreprocessing | ImagePreprocessing
    source_detail: str = ""
    parity_min_cosine: float | None = None
    # sha256 of the source weights file the export read; "" in manifests written before it was.
    weights_sha256: str = ""
    # training/encoder_export.py's EXPORT_RECIPE when the file was exported.
    export_recipe: int = 0

    @property
    def identity(self) -> str:
        """``name:<16 hex digits>``, naming the embedding function rather than the file.

        The digest covers the source weights, package versions, preprocessing and export recipe,
        not the ONNX bytes: exporting the same weights on another machine gives a file that
        differs in low float bits yet computes the same vectors (docs/encoders.md), and models
        and cached embeddings recorded under the identity must stay valid there. ``sha256``
        still guards the file itself when it is loaded.
        """
        if not self.weights_sha256:
            # Exported before weights were recorded: keep the identity that models and cached
            # vectors were already stored under.
            return f"{self.name}:{self.sha256[:16]}"
        canonical = json.dumps(self._embedding_function(), sort_keys=True, separators=(",", ":"))
        return f"{self.name}:{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"

    def _embedding_function(self) -> dict[str, Any]:
        """Everything that decides which vector an input gets, and nothing about the file."""
        preprocessing = asdict(self.preprocessing)
        # Where the export put its copy of the tokenizer; tokenizer_sha256 says what it is.
        preprocessing.pop("tokenizer", None)
        return {
            "name": self.name,
            "kind": self.kind,
            "dim": self.dim,
            "source": {
                "package": self.source_package,
                "version": self.source_version,
                "detail": self.source_detail,
            },
            "preprocessing": preprocessing,
            "weights_sha256": self.weights_sha256,
            "export_recipe": self.export_recipe,
        }

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["source"] = {
            "package": record.pop("source_package"),
            "version": record.pop("source_version"),
            "detail": record.pop("source_detail"),
        }
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> EncoderSpec:
        pre = dict(record["preprocessing"])
        if record["kind"] == "text":
            preprocessing: TextPreprocessing | ImagePreprocessing = TextPreprocessing(**pre)
        else:
            pre["mean"] = tuple(pre["mean"])
            pre["std"] = tuple(pre["std"])
            preprocessing = ImagePreprocessing(**pre)
        return cls(
            name=record["name"],
            kind=record["kind"],
            dim=int(record["dim"]),
            file=record["file"],
            sha256=record["sha256"],
            source_package=record["source"]["package"],
            source_version=record["source"]["version"],
            preprocessing=preprocessing,
            source_detail=record["source"].get("detail", ""),
            parity_min_cosine=record.get("parity_min_cosine"),
            weights_sha256=record.get("weights_sha256", ""),
            export_recipe=int(record.get("export_recipe", 0)),
        )


@dataclass
class Manifest:
    """What ``shelver encoders export`` produced: every encoder and which ones are the defaults."""

    encoders: dict[str, EncoderSpec]
    default_text: str
    default_image: str
    created_at: str = ""
    format: int = MANIFEST_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "created_at": self.created_at,
            "default_text": self.default_text,
            "default_image": self.default_image,
            "encoders": {name: spec.to_json() for name, spec in self.encoders.items()},
            **self.extra,
        }

    def write(self, model_dir: Path) -> Path:
        # Write-then-rename: a reader never sees half a manifest.
        path = model_dir / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, model_dir: Path) -> Manifest:
        path = model_dir / MANIFEST_NAME
        if not path.is_file():
            raise EncoderUnavailable(
                f"No encoder manifest at {path}. Run `{EXPORT_COMMAND}` to export the encoders "
                f"into {model_dir}."
            )
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != MANIFEST_FORMAT:
                raise ValueError(
                    f"manifest format {raw.get('format')!r}, expected {MANIFEST_FORMAT}"
                )
            encoders = {name: EncoderSpec.from_json(r) for name, r in raw["encoders"].items()}
            return cls(
                encoders=encoders,
                default_text=raw["default_text"],
                default_image=raw["default_image"],
                created_at=raw.get("created_at", ""),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise EncoderUnavailable(
                f"Encoder manifest {path} is unreadable ({exc}). Run `{EXPORT_COMMAND}` again."
            ) from exc


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(model_dir: Path, file: str, expected_sha256: str) -> Path:
    """Return the path of ``file`` if its content is what the manifest recorded."""
    path = model_dir / file
    if not path.is_file():
        raise EncoderUnavailable(
            f"Encoder file {path} is missing. Run `{EXPORT_COMMAND}` to export the encoders again."
        )
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise EncoderUnavailable(
            f"Encoder file {path} was altered (sha256 {actual[:16]}…, manifest says "
            f"{expected_sha256[:16]}…). Run `{EXPORT_COMMAND}` to export the encoders again."
        )
    return path


def session_options(
    intra_op_threads: int | None = None, spinning: bool = False
) -> ort.SessionOptions:
    """Session options chosen by benchmarks/encoders.py on a 2-core machine (docs/encoders.md).

    A worker process runs one inference at a time, so parallelism goes inside the operators
    (intra-op, one thread per core) and the graph runs sequentially. Spinning pool threads
    only burn the core that image decoding and tokenizing need between runs, so it is off.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = max(1, intra_op_threads or os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return opts


def _session(path: Path, intra_op_threads: int | None) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(
            str(path),
            sess_options=session_options(intra_op_threads),
            providers=["CPUExecutionProvider"],
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors on a bad file
        raise EncoderUnavailable(
            f"onnxruntime cannot load {path} ({exc}). Run `{EXPORT_COMMAND}` again."
        ) from exc


def _length_buckets(
    order: list[int], lengths: list[int], batch_size: int, max_tokens: int
) -> Iterator[list[int]]:
    """Consecutive runs of ``order`` (sorted by length) within both the row and token budgets."""
    batch: list[int] = []
    for index in order:
        # Sorted ascending, so the newest row is the longest: it sets the padded width.
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * lengths[index] > max_tokens):
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


def product_text(name: str, description: str | None) -> str:
    """The one string a product is encoded as: "name. description" (name alone if no description).

    Training, the worker and backfill all call this, so the text the classifier was trained on
    is the text it sees in service.
    """
    name = (name or "").strip()
    description = (description or "").strip()
    if not description:
        return name
    if not name:
        return description
    separator = " " if name.endswith((".", "!", "?")) else ". "
    return f"{name}{separator}{description}"


class TextEncoder:
    """all-MiniLM-L6-v2 on onnxruntime: mean pooling and L2 normalization are inside the graph."""

    max_batch_tokens = 2048

    def __init__(
        self,
        spec: EncoderSpec,
        onnx_path: Path,
        tokenizer_path: Path,
        *,
        intra_op_threads: int | None = None,
    ) -> None:
        assert isinstance(spec.preprocessing, TextPreprocessing)
        self.spec = spec
        self.name = spec.name
        self.dim = spec.dim
        self.identity = spec.identity
        self.max_length = spec.preprocessing.max_length
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # The shipped tokenizer.json bakes in truncation at 128 and fixed padding; batches are
        # padded here per length bucket instead, so only truncation is left to the tokenizer.
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer.no_padding()
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self.session = _session(onnx_path, intra_op_threads)
        self._input_names = {i.name for i in self.session.get_inputs()}

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(list(texts))]

    def encode(
        self, texts: list[str], batch_size: int = 64, max_batch_tokens: int | None = None
    ) -> np.ndarray:
        """Embed ``texts`` as L2-normalized float32 rows, in input order.

        Identical texts are encoded once, and texts are sorted by token count before batching so
        a batch pads to the length of similar texts rather than of the longest one overall;
        padding is masked out, so neither changes any output. A batch also stops growing at
        ``max_batch_tokens`` padded tokens: attention over many long rows falls out of cache,
        and on two cores eight 256-token rows per run beat sixty-four (docs/encoders.md).
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        unique: dict[str, int] = {}
        positions = [unique.setdefault(t, len(unique)) for t in texts]
        ids = self.tokenize(list(unique))
        vectors = np.zeros((len(ids), self.dim), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        budget = max_batch_tokens or self.max_batch_tokens
        for chunk in _length_buckets(order, [len(row) for row in ids], batch_size, budget):
            vectors[chunk] = self.run_ids([ids[i] for i in chunk])
        out[:] = vectors[positions]
        return out

    def run_ids(self, batch: list[list[int]]) -> np.ndarray:
        width = max(len(row) for row in batch)
        input_ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for r, row in enumerate(batch):
            input_ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        return self.session.run(None, feeds)[0]


class ImageEncoder:
    """A pooled-feature CNN on onnxruntime; input size, scaling and layout are from the manifest."""

    # Images per onnxruntime run. onnxruntime's arena keeps the largest run's activations for
    # the life of the process (32 EfficientNet-Lite0 images: 325 MB); a worker with one
    # thread per process runs 4 (worker.runtime, SHELVER_IMAGE_BATCH_SIZE).
    batch_size = 32

    def __init__(
        self, spec: EncoderSpec, onnx_path: Path, *, intra_op_threads: int | None = None
    ) -> None:
        assert isinstance(spec.preprocessing, ImagePreprocessing)
        self.spec = spec
        self.pre = spec.preprocessing
        self.name = spec.name
        self.dim = spec.dim
        self.identity = spec.identity
        self.session = _session(onnx_path, intra_op_threads)
        self._input_name = self.session.get_inputs()[0].name
        self.input_size = self._graph_input_size() or self.pre.input_size
        if self.input_size != self.pre.crop:
            raise EncoderUnavailable(
                f"{onnx_path} takes {self.input_size}px inputs but the manifest crops to "
                f"{self.pre.crop}px. Run `{EXPORT_COMMAND}` again."
            )
        self._mean = np.asarray(self.pre.mean, dtype=np.float32)
        self._scale = 1.0 / np.asarray(self.pre.std, dtype=np.float32)

    def _graph_input_size(self) -> int | None:
        shape = self.session.get_inputs()[0].shape
        spatial = shape[2:4] if self.pre.layout == "NCHW" else shape[1:3]
        return spatial[0] if all(isinstance(s, int) for s in spatial) else None

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """Resize the shorter side, center-crop, scale: one HWC float32 array in RGB order."""
        image = image.convert("RGB") if image.mode != "RGB" else image
        width, height = image.size
        scale = self.pre.resize_shorter / min(width, height)
        size = (max(self.pre.crop, round(width * scale)), max(self.pre.crop, round(height * scale)))
        resample = Image.Resampling[self.pre.resample.upper()]
        if size != image.size:
            image = image.resize(size, resample=resample)
        left = (size[0] - self.pre.crop) // 2
        top = (size[1] - self.pre.crop) // 2
        image = image.crop((left, top, left + self.pre.crop, top + self.pre.crop))
        pixels = np.asarray(image, dtype=np.float32)
        if self.pre.channel_order == "BGR":
            pixels = pixels[..., ::-1]
        return (pixels - self._mean) * self._scale

    def batch_array(self, images: Sequence[Image.Image]) -> np.ndarray:
        batch = np.stack([self.preprocess(im) for im in images])
        if self.pre.layout == "NCHW":
            batch = batch.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(batch, dtype=np.float32)

    def encode(self, images: list[Image.Image], batch_size: int | None = None) -> np.ndarray:
        batch_size = batch_size or self.batch_size
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            batch = self.batch_array(images[start : start + batch_size])
            out[start : start + len(batch)] = self.run_array(batch)
        return out

    def run_array(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input_name: batch})[0]


def load_text_encoder(
    model_dir: Path, spec: EncoderSpec, *, intra_op_threads: int | None = None
) -> TextEncoder:
    assert isinstance(spec.preprocessing, TextPreprocessing)
    onnx_path = verify_file(model_dir, spec.file, spec.sha256)
    tokenizer_path = verify_file(
        model_dir, spec.preprocessing.tokenizer, spec.preprocessing.tokenizer_sha256
    )
    return TextEncoder(spec, onnx_path, tokenizer_path, intra_op_threads=intra_op_threads)


def load_image_encoder(
    model_dir: Path, spec: EncoderSpec, *, intra_op_threads: int | None = None
) -> ImageEncoder:
    onnx_path = verify_file(model_dir, spec.file, spec.sha256)
    return ImageEncoder(spec, onnx_path, intra_op_threads=intra_op_threads)


def load_encoders(
    model_dir: Path, image_encoder: str | None = None, *, intra_op_threads: int | None = None
) -> tuple[TextEncoder, ImageEncoder]:
    """Load the default text encoder and the default (or named) image encoder from ``model_dir``.

    Every file is checked against the manifest's sha256 first: embeddings are cached under the
    encoder's identity, so a silently swapped file would poison the cache.
    """
    model_dir = Path(model_dir)
    manifest = Manifest.read(model_dir)
    image_name = image_encoder or manifest.default_image
    for wanted, kind in ((manifest.default_text, "text"), (image_name, "image")):
        spec = manifest.encoders.get(wanted)
        if spec is None or spec.kind != kind:
            raise EncoderUnavailable(
                f"The manifest in {model_dir} has no {kind} encoder named {wanted!r} "
                f"(it has {sorted(manifest.encoders)}). Run `{EXPORT_COMMAND}`, including "
                f"{wanted!r} if it is optional."
            )
    text = load_text_encoder(
        model_dir, manifest.encoders[manifest.default_text], intra_op_threads=intra_op_threads
    )
    image = load_image_encoder(
        model_dir, manifest.encoders[image_name], intra_op_threads=intra_op_threads
    )
    log.info("loaded encoders %s and %s from %s", text.identity, image.identity, model_dir)
    return text, image
