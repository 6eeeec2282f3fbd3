"""The bundled champion alone and merged with the zero-label scorer of a loaded taxonomy.

Two labeled files from the shared data, scored with ``shelver evaluate``'s code
(``training.cold_start.evaluate_served``): ``known``, 20 Best Buy rows per top-level
category (rows the bundled model was trained on, so its own figures are ceilings), and
``unknown``, 40 Flipkart rows of each of five categories Best Buy's top levels lack
(Watches, Baby Care, Home Furnishing, Home Decor & Festive Needs, Kitchen & Dining). Each
is scored by the champion alone, then with the taxonomy loaded and
SHELVER_ZERO_LABEL_MERGE on. Builds its own database (``shelver_bench_merge``) on the
server of SHELVER_DATABASE_URL.

Run: .venv/bin/python benchmarks/zero_label_merge.py [bestbuy|google] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from collections import defaultdict
from pathlib import Path

from sqlalchemy import create_engine

from shelver.catalog.embedded import create_database
from shelver.catalog.migrate import upgrade
from shelver.catalog.settings import get_settings, sqlalchemy_url
from shelver.catalog.taxonomy import import_taxonomy
from shelver.training.bundle import register_bundled
from shelver.training.cold_start import evaluate_served

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TAXONOMIES = {
    "bestbuy": SHARED / "taxonomies" / "bestbuy-categories-2016.json",
    "google": SHARED / "taxonomies" / "google-product-taxonomy-2021-09-21.txt",
}
ABSENT = [
    "Watches",
    "Baby Care",
    "Home Furnishing",
    "Home Decor & Festive Needs",
    "Kitchen & Dining",
]
FIELDS = ["id", "name", "description", "category", "category_path", "image"]
KEEP = ["scorer", "n", "accuracy", "macro_f1", "coverage", "precision_at_threshold",
        "unknown_auto_accepted", "unlabeled_categories"]  # fmt: skip


def read(dataset: str) -> list[dict]:
    with (SHARED / dataset / "products.csv").open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def write(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**row, "image": ""} for row in rows)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("taxonomy", choices=sorted(TAXONOMIES))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path, default=Path("var/bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    flipkart = read("flipkart")
    unknown = [row for c in ABSENT for row in [r for r in flipkart if r["category"] == c][:40]]
    by_category: dict[str, list[dict]] = defaultdict(list)
    for row in read("bestbuy"):
        by_category[row["category"]].append(row)
    draw = random.Random(1)
    known = [
        r for _, rows in sorted(by_category.items()) for r in draw.sample(rows, min(20, len(rows)))
    ]
    files = {
        "known": write(args.workdir / "merge-known.csv", known),
        "unknown": write(args.workdir / "merge-unknown.csv", unknown),
    }

    settings = get_settings()
    server = (settings.database_url or "postgresql://postgres@127.0.0.1:5432/x").rpartition("/")[0]
    url = create_database(server + "/postgres", "shelver_bench_merge", recreate=True)
    upgrade(url)
    engine = create_engine(sqlalchemy_url(url))
    register_bundled(engine)
    merging = settings.model_copy(update={"zero_label_merge": True})
    results: dict[str, dict] = {}
    for stage in ("champion", f"merged with {args.taxonomy}"):
        if stage != "champion":
            import_taxonomy(engine, TAXONOMIES[args.taxonomy])
        for name, path in files.items():
            metrics, _, _ = evaluate_served(engine, path, merging)
            results[f"{stage} / {name}"] = {k: metrics.get(k) for k in KEEP}
            print(f"{stage} / {name}: {results[f'{stage} / {name}']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
