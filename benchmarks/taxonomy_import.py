"""Loads both full shared taxonomies into a fresh database, twice, and checks the counts.

A one-off check, not a test: the test suite reads only tests/fixtures/taxonomies. Loads
Google's taxonomy (5,595 categories) and Best Buy's tree (4,584 entries) from
../shared/data/taxonomies, prints what each load added and how long it took, then loads
both again and checks that nothing was added.

Uses SHELVER_DATABASE_URL's server when set, else an embedded PostgreSQL.
Run: .venv/bin/python benchmarks/taxonomy_import.py
"""

from __future__ import annotations

import time
from pathlib import Path

from scratch_catalog import scratch_catalog
from sqlalchemy import text

from shelver.catalog.taxonomy import import_taxonomy

TAXONOMIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "taxonomies"
FILES = ("google-product-taxonomy-2021-09-21.txt", "bestbuy-categories-2016.json")


def main() -> None:
    with scratch_catalog("shelver_bench_taxonomy") as engine:
        for round_ in ("first load", "second load"):
            for name in FILES:
                start = time.perf_counter()
                report = import_taxonomy(engine, TAXONOMIES / name)
                elapsed = time.perf_counter() - start
                levels = " ".join(f"L{k}={v}" for k, v in report.per_level.items())
                print(
                    f"{round_} {name}: {report.entries + len(report.skipped)} entries, "
                    f"{len(report.skipped)} skipped, {report.duplicates} repeated, "
                    f"{report.implied} implied ancestors -> {report.nodes} nodes, depth "
                    f"{report.depth} ({levels}); {report.added} added, {report.existing} "
                    f"existing, {elapsed:.2f} s"
                )
                if round_ == "second load":
                    assert report.added == 0, "a second load added categories"
        with engine.connect() as conn:
            total = conn.execute(text("SELECT count(*) FROM categories")).scalar_one()
        print(f"categories in the catalog: {total}")


if __name__ == "__main__":
    main()
