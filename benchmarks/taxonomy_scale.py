"""Cost against the number of categories (issue #12, item 4): 16, 500 and 5,000 labels.

**The synthetic catalog** (``synthetic_catalog``; deterministic for a seed). K labels
are drawn from the Google product taxonomy (``../shared/data/taxonomies``): its leaves
in a seeded shuffle, and when K exceeds the leaves (4,709 of 5,595 nodes), inner nodes
as coarse labels for the rest (real catalogs mix both). ``--rows`` rows are shared
evenly among the labels (50,000 at K = 5,000 is 10 per label). A row is
- name: 2-4 real product-name words (sampled by frequency from the names of the
  shared Best Buy, Flipkart and PriceRunner sets), then each word of the label's own
  node name kept with probability 0.8 (at least one) in shuffled order, one word of
  its parent's name half the time, and a model-number-like token half the time; in
  5% of rows one word gets two adjacent letters swapped (a typo);
- description: 8 real product-name words, plus one word of the label's name half
  the time;
- text embedding: **not MiniLM** (encoding 3 x 50,000 titles would take ~20 min of the
  two shared cores). Each word gets a fixed random 384-d vector (seeded by its crc32),
  and a row's embedding is the L2-normalized mean of its name words' vectors plus half
  the mean of its description words'. Same shape and dtype as MiniLM's, so the cost of
  the network is the real one; its quality is not comparable;
- no image (image_present 0, a zero 1,280-d image embedding: EfficientNet-Lite0's
  width, so the image branch costs what it does in production).

**Training** is ``training.fit.train`` with ``TrainParams()`` (the production path
recipe: split, the flat top-level fit and the path fit, per-level thresholds, ONNX
export with parity check, the baseline, and the serving refit on all rows), timed as
one call.

**Serving** runs in a fresh process pinned to one core (``serve``): RSS and PSS
(``/proc/self/smaps_rollup``) after the worker's imports, after
``FusionModel.from_artifact`` (which builds the ``LabelTree``), and after scoring
held-out rows in batches of 32 (the dispatcher's batch size) the way
``FusionClassifier.score`` does after the embeddings: ``model.predict`` (lexical
transform + onnxruntime, one intra-op thread), ``tree.node_probs``, ``tree.decide``
and ``classify.top_k`` per row. Time per product is given for each of these.

**Quality** is the evaluated artifact's on the held-out test rows (``train``'s test
split): hierarchical F1, path accuracy and leaf accuracy (the leaf candidate is the
exact label), so a degenerate model cannot pass.

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/taxonomy_scale.py --ks 16,500,5000

JSON goes to var/bench/taxonomy_scale.json (one entry per K, merged with earlier runs).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TAXONOMY = DATA / "taxonomies" / "google-product-taxonomy-2021-09-21.txt"
OUT = ROOT / "var" / "bench"
TEXT_DIM, IMAGE_DIM = 384, 1280
BATCH = 32
_WORD = re.compile(r"[a-z][a-z0-9]+")


def taxonomy_nodes() -> list[tuple[str, ...]]:
    nodes = []
    for line in TAXONOMY.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or " - " not in line:
            continue
        path = line.split(" - ", 1)[1]
        nodes.append(tuple(p.strip() for p in path.split(">")))
    return nodes


def real_words() -> tuple[list[str], np.ndarray]:
    counts: Counter[str] = Counter()
    for dataset in ("bestbuy", "flipkart", "pricerunner"):
        with open(DATA / dataset / "products.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                counts.update(_WORD.findall(row["name"].lower()))
    words = sorted(w for w, c in counts.items() if c >= 2)
    freq = np.array([counts[w] for w in words], dtype=np.float64)
    return words, freq / freq.sum()


def choose_labels(k: int, seed: int) -> list[tuple[str, ...]]:
    nodes = taxonomy_nodes()
    parents = {n[:-1] for n in nodes}
    leaves = [n for n in nodes if n not in parents]
    inner = [n for n in nodes if n in parents]
    rng = np.random.default_rng(seed)
    leaves = [leaves[i] for i in rng.permutation(len(leaves))]
    inner = [inner[i] for i in rng.permutation(len(inner))]
    if k > len(leaves) + len(inner):
        raise SystemExit(f"the taxonomy has {len(nodes)} nodes, not {k}")
    return (leaves + inner)[:k]


def _typo(word: str, rng) -> str:
    if len(word) < 4:
        return word
    i = int(rng.integers(0, len(word) - 1))
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def synthetic_catalog(k: int, rows: int, seed: int = 0):
    """(TrainingData with paths, word-vector embeddings): see the module docstring."""
    from shelver.catalog.categories import SEPARATOR
    from shelver.training.dataset import TrainingData
    from shelver.worker.inputs import DEFAULT_TEXT_PACKING, TEXT_PACKINGS, ModelInputs

    labels = choose_labels(k, seed)
    pool, freq = real_words()
    rng = np.random.default_rng(seed + 1)
    alnum = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))
    # Drawn at once: np.random.choice with p= is slow call by call.
    drawn = iter(rng.choice(len(pool), size=rows * 12, p=freq))

    def sample(n: int) -> list[str]:
        return [pool[next(drawn)] for _ in range(n)]

    names, descriptions, paths = [], [], []
    for r in range(rows):
        label = labels[r % k]
        own = _WORD.findall(label[-1].lower())
        parent = _WORD.findall(label[-2].lower()) if len(label) > 1 else []
        keep = [w for w in own if rng.random() < 0.8] or [own[int(rng.integers(len(own)))]]
        keep = [keep[i] for i in rng.permutation(len(keep))]
        words = sample(int(rng.integers(2, 5))) + keep
        if parent and rng.random() < 0.5:
            words.append(parent[int(rng.integers(len(parent)))])
        if rng.random() < 0.5:
            words.append("".join(rng.choice(alnum, size=int(rng.integers(4, 8)))))
        if rng.random() < 0.05:
            i = int(rng.integers(len(words)))
            words[i] = _typo(words[i], rng)
        desc = sample(8)
        if rng.random() < 0.5:
            desc.append(own[int(rng.integers(len(own)))])
        names.append(" ".join(words))
        descriptions.append(" ".join(desc))
        paths.append(SEPARATOR.join(label))
    pack = TEXT_PACKINGS[DEFAULT_TEXT_PACKING]
    texts = [pack(n, d) for n, d in zip(names, descriptions, strict=True)]
    text_emb = word_vector_embeddings(names, descriptions)
    inputs = ModelInputs(
        texts,
        names,
        text_emb,
        np.zeros((rows, IMAGE_DIM), dtype=np.float32),
        np.zeros(rows, dtype=np.float32),
    )
    return TrainingData(inputs, [p.split(SEPARATOR)[0] for p in paths], paths=paths)


def word_vector_embeddings(names: list[str], descriptions: list[str]) -> np.ndarray:
    import scipy.sparse as sp

    vocab: dict[str, int] = {}
    cols, rows, vals = [], [], []
    for i, (name, desc) in enumerate(zip(names, descriptions, strict=True)):
        for words, weight in ((name.split(), 1.0), (desc.split(), 0.5)):
            for w in words:
                cols.append(vocab.setdefault(w, len(vocab)))
                rows.append(i)
                vals.append(weight / len(words))
    vectors = np.stack(
        [np.random.default_rng(zlib.crc32(w.encode())).standard_normal(TEXT_DIM) for w in vocab]
    ).astype(np.float32)
    bag = sp.csr_matrix((vals, (rows, cols)), shape=(len(names), len(vocab)), dtype=np.float32)
    emb = np.asarray(bag @ vectors)
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def leaf_accuracy(true_paths: list[str], probs: np.ndarray, labels: list[str]) -> float:
    from shelver.worker.tree import LabelTree

    tree = LabelTree(labels)
    nodes = tree.node_probs(probs)
    hits = [
        tree.nodes[path[-1]] == t
        for path, t in zip(tree.candidate_paths(nodes), true_paths, strict=True)
    ]
    return float(np.mean(hits))


def pss_kb() -> tuple[int, int]:
    """(RSS, PSS) of this process in kB."""
    rss = pss = 0
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def serve(artifact_path: Path, rows_path: Path, batches: int) -> dict:
    """The worker's side, in its own process on one core (module docstring)."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    import gc

    from shelver.worker.classify import top_k  # noqa: F401 - the worker's imports
    from shelver.worker.fusion import FusionModel, fusion_inputs, sha256_hex
    from shelver.worker.inputs import ModelInputs

    held = np.load(rows_path, allow_pickle=False)
    inputs = ModelInputs(
        [str(t) for t in held["texts"]],
        [str(n) for n in held["names"]],
        held["text_emb"],
        np.zeros((len(held["names"]), IMAGE_DIM), dtype=np.float32),
        np.zeros(len(held["names"]), dtype=np.float32),
    )
    data = artifact_path.read_bytes()
    gc.collect()
    before = pss_kb()
    started = time.perf_counter()
    model = FusionModel.from_artifact(data, sha256_hex(data), intra_op_threads=1)
    load_s = time.perf_counter() - started
    loaded = pss_kb()
    thresholds = model.level_thresholds
    timing = {"transform": 0.0, "onnx": 0.0, "node_probs": 0.0, "decide": 0.0, "top_k": 0.0}
    scored = 0
    names = model._inputs  # noqa: SLF001 - timing the predict's two halves apart
    for b in range(batches):
        rows = slice(
            (b * BATCH) % (len(inputs) - BATCH), (b * BATCH) % (len(inputs) - BATCH) + BATCH
        )
        part = inputs.subset(range(rows.start, rows.stop))
        t0 = time.perf_counter()
        feeds = fusion_inputs(model.vocabulary, part)
        t1 = time.perf_counter()
        probs = model._session.run(None, {k: feeds[k] for k in names})[0]  # noqa: SLF001
        t2 = time.perf_counter()
        nodes = model.tree.node_probs(probs)
        t3 = time.perf_counter()
        decisions = model.tree.decide_rows(nodes, thresholds)
        t4 = time.perf_counter()
        for p, n, d in zip(probs, nodes, decisions, strict=True):
            top_k(p, n, model.tree, d.candidate)
        t5 = time.perf_counter()
        if b == 0:
            continue  # warm-up: first-run allocations, not steady cost
        for key, dt in zip(timing, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            timing[key] += dt
        scored += len(probs)
    after = pss_kb()
    per = {k: 1000 * v / scored for k, v in timing.items()}
    return {
        "load_s": load_s,
        "rss_mb": {
            "before": before[0] / 1024,
            "loaded": loaded[0] / 1024,
            "after": after[0] / 1024,
        },
        "pss_mb": {
            "before": before[1] / 1024,
            "loaded": loaded[1] / 1024,
            "after": after[1] / 1024,
        },
        "growth_rss_mb": (after[0] - before[0]) / 1024,
        "growth_pss_mb": (after[1] - before[1]) / 1024,
        "ms_per_product": per,
        "model_ms_per_product": per["onnx"] + per["node_probs"] + per["decide"] + per["top_k"],
        "with_transform_ms_per_product": sum(per.values()),
        "rows_scored": scored,
        "batch": BATCH,
        "cpu": sorted(os.sched_getaffinity(0)),
    }


def run_k(k: int, rows: int, seed: int, batches: int) -> dict:
    from shelver.training.fit import TrainParams, train
    from shelver.worker.fusion import FusionModel

    started = time.perf_counter()
    data = synthetic_catalog(k, rows, seed)
    made_s = time.perf_counter() - started
    print(f"K={k}: catalog of {rows} rows in {made_s:.1f}s", flush=True)
    started = time.perf_counter()
    result = train(data, TrainParams(seed=seed))
    train_s = time.perf_counter() - started
    print(f"K={k}: train() {train_s:.1f}s", flush=True)
    test = data.subset(result.split.test)
    evaluated = FusionModel.from_artifact(result.eval_artifact, result.eval_sha256)
    probs = evaluated.predict(test.inputs)
    m = result.metrics["test"]
    OUT.mkdir(parents=True, exist_ok=True)
    artifact_path = OUT / f"taxonomy_scale_{k}.zip"
    artifact_path.write_bytes(result.artifact)
    rows_path = OUT / f"taxonomy_scale_{k}_rows.npz"
    np.savez(
        rows_path,
        texts=np.array(test.inputs.texts),
        names=np.array(test.inputs.names),
        text_emb=test.inputs.text_emb,
    )
    served = subprocess.run(
        [sys.executable, __file__, "serve", str(artifact_path), str(rows_path), str(batches)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )
    serving = json.loads(served.stdout.strip().splitlines()[-1])
    import zipfile

    with zipfile.ZipFile(artifact_path) as z:
        members = {i.filename: {"bytes": i.file_size, "compressed": i.compress_size}
                   for i in z.infolist()}  # fmt: skip
    return {
        "k": k,
        "labels": len(result.labels),
        "rows": rows,
        "train_rows": len(result.split.train),
        "train_s": train_s,
        "fit_model_s": result.metrics["train_seconds"],
        "serving_refit_s": result.metrics.get("served", {}).get("seconds"),
        "epochs": result.metrics["epochs"],
        "vocabulary": len(json.loads(_meta(result.artifact))["lexical"]["terms"]),
        "artifact_bytes": len(result.artifact),
        "members": members,
        "serving": serving,
        "quality": {
            "test_rows": len(result.split.test),
            "hF": m["hierarchical"]["f1"],
            "path_accuracy": m["hierarchical"]["path_accuracy"],
            "leaf_accuracy": leaf_accuracy(test.paths, probs, evaluated.labels),
            "top_macro_f1": m["macro_f1"],
            "levels": {lv: v["accuracy"] for lv, v in m["levels"].items()},
            "backoff": m["backoff"],
        },
        "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _meta(artifact: bytes) -> bytes:
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(artifact)) as z:
        return z.read("meta.json")


def table(results: list[dict]) -> str:
    lines = [
        "| K | rows | train() s | artifact MB | worker growth RSS / PSS MB | model ms/product "
        "(onnx + tree + top-k) | + lexical transform | hF | leaf acc | vocabulary |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: r["k"]):
        s = r["serving"]
        lines.append(
            f"| {r['k']:,} | {r['rows']:,} | {r['train_s']:.0f} | "
            f"{r['artifact_bytes'] / 1e6:.1f} | "
            f"{s['growth_rss_mb']:.0f} / {s['growth_pss_mb']:.0f} | "
            f"{s['model_ms_per_product']:.2f} | "
            f"{s['with_transform_ms_per_product']:.2f} | {r['quality']['hF']:.3f} | "
            f"{r['quality']['leaf_accuracy']:.3f} | {r['vocabulary']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        print(json.dumps(serve(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="16,500,5000")
    parser.add_argument("--rows", type=int, default=50000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--out", type=Path, default=OUT / "taxonomy_scale.json")
    args = parser.parse_args()
    previous = json.loads(args.out.read_text()) if args.out.exists() else []
    results = []
    for k in (int(x) for x in args.ks.split(",")):
        row = run_k(k, args.rows, args.seed, args.batches)
        print(json.dumps({x: row[x] for x in row if x != "quality"}), flush=True)
        results.append(row)
        merged = [
            p for p in previous if (p["k"], p["rows"]) not in {(r["k"], r["rows"]) for r in results}
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(merged + results, indent=2))
    print(table(json.loads(args.out.read_text())))


if __name__ == "__main__":
    main()
