"""Cold start: products classified into Google's taxonomy with zero labels, hierarchical figures.

The labeled set is built from the shared data (../shared/data) through a written-down
mapping of Best Buy, Flipkart and PriceRunner categories onto Google product taxonomy
nodes (benchmarks/cold_start/google_mapping.csv; ``-`` marks a category with no single
Google node, whose rows are left out). A row's true node is the mapping of the deepest
prefix of its own path that the mapping lists. At most 60 rows per (data set, Google
node) are drawn with a fixed seed, and each row falls in ``dev`` or ``test`` by a hash
of its id: choices (texts, temperature) were made on ``dev``; ``test`` is reported.

Scorers, all with only the taxonomy and the exported MiniLM text encoder, no label:
- ``nearest_path``: each node's whole path embedded as text, the closest one wins (the
  issue's baseline);
- ``zero_label``: worker/zero_label.py, what the worker serves without a champion;
- ``adapted_inductive``: the same after ``shelver taxonomy adapt`` (``adapt_vectors``) on a
  catalog of every shared row (Best Buy, Flipkart, PriceRunner: 29,625) except the half
  being scored, so no scored product moved a vector;
- ``adapted``: the same on a catalog of every shared row, the scored ones among them, as
  the command does on a real catalog (labels are never read either way).

A CSV whose ``category_path`` already uses the taxonomy's paths can be given instead of
the built set (``--csv``); then every row counts as ``test``, and the catalog of the
adapted scorers is the CSV's own rows (``adapted_inductive`` is left out).

Run: .venv/bin/python benchmarks/cold_start.py [--json OUT] [--write-set OUT.csv]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from shelver.catalog.categories import with_ancestors
from shelver.catalog.settings import get_settings
from shelver.catalog.taxonomy import read_taxonomy
from shelver.training.evaluate import expected_calibration_error
from shelver.training.hierarchy import hierarchical_metrics, split_path
from shelver.worker.encoders import TextEncoder, load_encoders
from shelver.worker.inputs import DEFAULT_TEXT_PACKING, ProductContent, pack_texts
from shelver.worker.zero_label import (
    ADAPTED_CONFIDENCE_TEMPERATURE,
    ZeroLabelScorer,
    adapt_vectors,
    category_vectors,
)

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
MAPPING = HERE / "cold_start" / "google_mapping.csv"
GOOGLE = SHARED / "taxonomies" / "google-product-taxonomy-2021-09-21.txt"
DATASETS = ("bestbuy", "flipkart", "pricerunner")
PER_NODE = 60
SEED = 20261202


def read_mapping(path: Path) -> dict[str, dict[str, str]]:
    mapping: dict[str, dict[str, str]] = defaultdict(dict)
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            mapping[row["dataset"]][row["source_path"]] = row["google_path"]
    return mapping


def mapped_node(path: str, mapping: dict[str, str]) -> str | None:
    """The mapping of the deepest listed prefix of ``path``; None when unlisted or ``-``."""
    parts = split_path(path)
    for depth in range(len(parts), 0, -1):
        target = mapping.get(" > ".join(parts[:depth]))
        if target is not None:
            return None if target == "-" else target
    return None


def build_set(shared: Path, mapping_file: Path) -> list[dict]:
    mapping = read_mapping(mapping_file)
    rows: list[dict] = []
    for dataset in DATASETS:
        with (shared / dataset / "products.csv").open(encoding="utf-8", newline="") as fh:
            source = list(csv.DictReader(fh))
        by_node: dict[str, list[dict]] = defaultdict(list)
        for row in source:
            node = mapped_node(row.get("category_path") or row["category"], mapping[dataset])
            if node:
                by_node[node].append(row)
        draw = random.Random(SEED)
        for node, members in sorted(by_node.items()):
            members = members[:]
            draw.shuffle(members)
            for row in members[:PER_NODE]:
                parity = int(hashlib.sha256(row["id"].encode()).hexdigest(), 16) % 2
                rows.append({
                    "id": row["id"], "name": row["name"], "description": row["description"],
                    "category_path": node, "dataset": dataset,
                    "split": "dev" if parity == 0 else "test",
                })  # fmt: skip
    return rows


def read_set(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as fh:
        return [
            {**row, "dataset": row.get("dataset") or path.stem, "split": "test"}
            for row in csv.DictReader(fh)
        ]


def shared_rows(shared: Path) -> list[dict]:
    """Every row of the shared sets: the catalog the adapted scorers learn from (text only)."""
    rows = []
    for dataset in DATASETS:
        with (shared / dataset / "products.csv").open(encoding="utf-8", newline="") as fh:
            rows += [{**r, "dataset": dataset} for r in csv.DictReader(fh)]
    return rows


def adapted_scorer(scorer: ZeroLabelScorer, catalog: np.ndarray) -> ZeroLabelScorer:
    """What ``shelver taxonomy adapt`` serves after reading these product vectors."""
    adaptation = adapt_vectors(scorer, catalog)
    return ZeroLabelScorer(
        scorer.paths,
        adaptation.vectors,
        confidence_temperature=ADAPTED_CONFIDENCE_TEMPERATURE,
        catalog_prior=adaptation.catalog_prior,
    )


def encode_rows(encoder: TextEncoder, rows: list[dict]) -> np.ndarray:
    products = [ProductContent(0, "", r["name"], r["description"], None) for r in rows]
    return encoder.encode(pack_texts(products, DEFAULT_TEXT_PACKING))


def nearest_path(paths: list[str], encoder: TextEncoder, products: np.ndarray) -> list[str]:
    vectors = encoder.encode(paths)
    return [paths[k] for k in (products @ vectors.T).argmax(axis=1)]


def answers(verdicts: list) -> tuple[list[str], np.ndarray]:
    return [v.category for v in verdicts], np.array([v.confidence for v in verdicts])


def adapted_answers(
    scorer: ZeroLabelScorer,
    encoder: TextEncoder,
    rows: list[dict],
    vectors: np.ndarray,
    built: bool,
) -> dict[str, tuple[list[str], np.ndarray]]:
    """The adapted scorers' answers for ``rows`` (see the module's docstring)."""
    if not built:
        return {"adapted": answers(adapted_scorer(scorer, vectors).score(vectors))}
    catalog = shared_rows(SHARED)
    started = time.perf_counter()
    catalog_vectors = encode_rows(encoder, catalog)
    print(f"{len(catalog)} shared rows encoded in {time.perf_counter() - started:.0f} s")
    position = {(r["dataset"], r["id"]): k for k, r in enumerate(catalog)}
    result = {"adapted": answers(adapted_scorer(scorer, catalog_vectors).score(vectors))}
    predicted, confidence = [""] * len(rows), np.zeros(len(rows))
    for split in ("dev", "test"):
        scored = [i for i, r in enumerate(rows) if r["split"] == split]
        held = {position[(rows[i]["dataset"], rows[i]["id"])] for i in scored}
        others = [k for k in range(len(catalog)) if k not in held]
        half = adapted_scorer(scorer, catalog_vectors[others]).score(vectors[scored])
        for i, verdict in zip(scored, half, strict=True):
            predicted[i], confidence[i] = verdict.category, verdict.confidence
    result["adapted_inductive"] = (predicted, confidence)
    return result


def figures(truth: list[str], predicted: list[str], confidence: np.ndarray | None) -> dict:
    metrics = hierarchical_metrics(truth, predicted)
    result = {
        "n": len(truth),
        "path_accuracy": metrics["hierarchical"]["path_accuracy"],
        "level1_accuracy": metrics["levels"]["1"]["accuracy"],
        "level2_accuracy": metrics["levels"].get("2", {}).get("accuracy"),
        "hierarchical_f1": metrics["hierarchical"]["f1"],
    }
    if confidence is not None:
        right = np.array(
            [split_path(p)[0] == split_path(t)[0] for t, p in zip(truth, predicted, strict=True)]
        )
        result["level1_ece"], _ = expected_calibration_error(right, confidence)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, help="labeled CSV with Google category paths")
    parser.add_argument("--taxonomy", type=Path, default=GOOGLE)
    parser.add_argument("--mapping", type=Path, default=MAPPING)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--write-set", type=Path, help="write the built labeled set here")
    parser.add_argument(
        "--no-adapt", action="store_true", help="leave out the adapted scorers (saves minutes)"
    )
    args = parser.parse_args()

    rows = read_set(args.csv) if args.csv else build_set(SHARED, args.mapping)
    if args.write_set:
        with args.write_set.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    paths = sorted(with_ancestors(read_taxonomy(args.taxonomy).paths))
    unknown = sorted({r["category_path"] for r in rows} - set(paths))
    if unknown:
        raise SystemExit(f"category paths not in the taxonomy: {unknown[:5]}")

    text_encoder, _ = load_encoders(get_settings().model_dir)
    started = time.perf_counter()
    scorer = ZeroLabelScorer(paths, category_vectors(paths, text_encoder))
    index_seconds = time.perf_counter() - started
    started = time.perf_counter()
    vectors = encode_rows(text_encoder, rows)
    verdicts = scorer.score(vectors)
    score_seconds = time.perf_counter() - started
    baseline = nearest_path(paths, text_encoder, vectors)
    scorers: dict[str, tuple[list[str], np.ndarray | None]] = {
        "nearest_path": (baseline, None),
        "zero_label": answers(verdicts),
    }
    if not args.no_adapt:
        scorers.update(adapted_answers(scorer, text_encoder, rows, vectors, built=not args.csv))

    report: dict = {
        "taxonomy": str(args.taxonomy.name),
        "nodes": len(paths),
        "rows": len(rows),
        "category_index_seconds": round(index_seconds, 1),
        "products_per_second": round(len(rows) / score_seconds, 1),
        "scorers": {},
    }
    groups = {"all": [True] * len(rows)}
    for split in ("dev", "test"):
        groups[split] = [r["split"] == split for r in rows]
    for dataset in sorted({r["dataset"] for r in rows}):
        groups[f"test/{dataset}"] = [r["split"] == "test" and r["dataset"] == dataset for r in rows]
    for name, (predicted, conf) in scorers.items():
        report["scorers"][name] = {}
        for group, mask in groups.items():
            if not any(mask):
                continue
            keep = [i for i, m in enumerate(mask) if m]
            report["scorers"][name][group] = figures(
                [rows[i]["category_path"] for i in keep],
                [predicted[i] for i in keep],
                conf[keep] if conf is not None else None,
            )

    print(f"{report['rows']} rows, {report['nodes']} nodes ({report['taxonomy']})")
    print(f"{'scorer':14s} {'rows':18s} {'n':>5s} {'path':>6s} {'L1':>6s} {'L2':>6s} {'hF':>6s}")
    for name, by_group in report["scorers"].items():
        for group, f in by_group.items():
            level2 = f"{f['level2_accuracy']:.3f}" if f["level2_accuracy"] is not None else "  -  "
            print(
                f"{name:14s} {group:18s} {f['n']:5d} {f['path_accuracy']:6.3f} "
                f"{f['level1_accuracy']:6.3f} {level2:>6s} {f['hierarchical_f1']:6.3f}"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
