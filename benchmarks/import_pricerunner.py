"""Imports all of ../shared/data/pricerunner (24,842 rows) into a fresh database and times it.

Uses SHELVER_DATABASE_URL's server when set, else an embedded PostgreSQL.
Run: .venv/bin/python benchmarks/import_pricerunner.py
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from shelver.catalog.embedded import create_database, embedded_services
from shelver.catalog.importer import import_file
from shelver.catalog.migrate import upgrade
from shelver.catalog.settings import sqlalchemy_url

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pricerunner" / "products.csv"


def main() -> None:
    with contextlib.ExitStack() as stack:
        server = os.environ.get("SHELVER_DATABASE_URL")
        if server:
            server = server.rpartition("/")[0] + "/postgres"
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            server, _ = stack.enter_context(embedded_services(tmp))
        url = create_database(server, "shelver_bench_import", recreate=True)
        upgrade(url)
        engine = create_engine(sqlalchemy_url(url))
        start = time.perf_counter()
        report = import_file(engine, DATA)
        elapsed = time.perf_counter() - start
        with engine.connect() as conn:
            queued = conn.execute(text("SELECT count(*) FROM classification_queue")).scalar_one()
        engine.dispose()
        rows = report.inserted
        print(f"import {DATA.name}: {rows} rows in {elapsed:.2f} s = {rows / elapsed:,.0f} rows/s")
        print(f"queued by the trigger: {queued}; rejected: {len(report.rejected)}")

        start = time.perf_counter()
        again = import_file(create_engine(sqlalchemy_url(url)), DATA)
        elapsed = time.perf_counter() - start
        print(f"re-import, nothing changed: {again.unchanged} rows in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
