"""Imports all of ../shared/data/pricerunner (24,842 rows) into a fresh database and times it.

Uses SHELVER_DATABASE_URL's server when set, else an embedded PostgreSQL.
Run: .venv/bin/python benchmarks/import_pricerunner.py
"""

from __future__ import annotations

import time
from pathlib import Path

from scratch_catalog import scratch_catalog

from shelver.catalog import queue
from shelver.catalog.importer import import_file

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pricerunner" / "products.csv"


def main() -> None:
    with scratch_catalog("shelver_bench_import") as engine:
        start = time.perf_counter()
        report = import_file(engine, DATA)
        elapsed = time.perf_counter() - start
        with engine.connect() as conn:
            queued = queue.stats(conn).depth
        rows = report.inserted
        print(f"import {DATA.name}: {rows} rows in {elapsed:.2f} s = {rows / elapsed:,.0f} rows/s")
        print(f"queued by the trigger: {queued}; rejected: {len(report.rejected)}")

        start = time.perf_counter()
        again = import_file(engine, DATA)
        elapsed = time.perf_counter() - start
        print(f"re-import, nothing changed: {again.unchanged} rows in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
