"""Server time of the review page with 100,000 products waiting for review.

Builds a catalog in a PostgreSQL database of its own (dropped and re-created):
N products in ``needs_review`` across 40 predicted categories and two import
batches, each with its prediction history (top-3 suggestions), plus 20,000
auto-accepted ones. Then requests the review page through the real ASGI
application in this process (routing, session check, SQL, template) as a
signed-in reviewer, unfiltered and with each filter, and prints p50/p95/max.
The goal is p95 <= 200 ms.

    .venv/bin/python benchmarks/review_page.py --n 100000 \\
        --database-url postgresql://postgres@127.0.0.1:5432/shelver_bench_review
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text
from starlette.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from web_seed import PASSWORD, sign_in  # noqa: E402

from shelver.catalog.embedded import create_database  # noqa: E402
from shelver.catalog.migrate import upgrade  # noqa: E402
from shelver.catalog.settings import Settings, sqlalchemy_url  # noqa: E402
from shelver.web.app import create_app  # noqa: E402
from shelver.web.auth import add_user  # noqa: E402

CATEGORIES = 40

SEED_SQL = [
    "INSERT INTO categories (name) SELECT 'Category ' || g FROM generate_series(1, 40) g",
    """
    INSERT INTO model_versions (version, status, artifact, sha256, labels, encoders, threshold,
                                promoted_at)
    VALUES ('bench', 'champion', 'x', 'x', '[]', '{}', 0.7, now())
    """,
    "INSERT INTO import_batches (source) VALUES ('bench-a.csv'), ('bench-b.csv')",
    """
    INSERT INTO products (sku, name, description, import_batch_id)
    SELECT 'bench-' || g, 'Product ' || g || ' ' || md5(g::text),
           repeat('A plausible product description. ', 12), 1 + g % 2
    FROM generate_series(1, :total) g
    """,
    # As if the worker had been through them all: nothing left in the queue.
    "DELETE FROM classification_queue",
    """
    UPDATE products SET
        predicted_id = 1 + id % 40,
        confidence = CASE WHEN id <= :waiting THEN random() * 0.7 ELSE 0.7 + random() * 0.3 END,
        status = CASE WHEN id <= :waiting THEN 'needs_review' ELSE 'classified' END,
        model_version_id = (SELECT id FROM model_versions WHERE version = 'bench'),
        classified_at = now()
    """,
    """
    INSERT INTO predictions (product_id, model_version_id, content_hash, predicted_id,
                             confidence, top_k)
    SELECT id, model_version_id, content_hash, predicted_id, confidence,
           jsonb_build_array(
               jsonb_build_object('category', 'Category ' || predicted_id, 'p', confidence),
               jsonb_build_object('category', 'Category ' || (1 + (id + 7) % 40), 'p', 0.2),
               jsonb_build_object('category', 'Category ' || (1 + (id + 13) % 40), 'p', 0.1))
    FROM products
    """,
]


def build(database_url: str, waiting: int, accepted: int) -> None:
    server, _, name = database_url.rpartition("/")
    create_database(f"{server}/postgres", name, recreate=True)
    upgrade(database_url)
    engine = create_engine(sqlalchemy_url(database_url))
    started = time.perf_counter()
    with engine.begin() as conn:
        for sql in SEED_SQL:
            conn.execute(text(sql), {"total": waiting + accepted, "waiting": waiting})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    print(
        f"built {waiting:,} waiting + {accepted:,} auto-accepted in "
        f"{time.perf_counter() - started:.1f} s"
    )


def measure(client: TestClient, path: str, requests: int) -> list[float]:
    client.get(path)  # warm: template compiled, connection pooled
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.status_code
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="products in needs_review")
    parser.add_argument("--accepted", type=int, default=20_000, help="auto-accepted products")
    parser.add_argument("--requests", type=int, default=300, help="requests per page variant")
    parser.add_argument(
        "--database-url", default="postgresql://postgres@127.0.0.1:5432/shelver_bench_review"
    )
    args = parser.parse_args()

    build(args.database_url, args.n, args.accepted)
    engine = create_engine(sqlalchemy_url(args.database_url), pool_size=5)
    add_user(engine, "bench", "reviewer", PASSWORD)
    client = TestClient(
        create_app(engine, Settings(audit_rate=0.05, audit_rate_new_model=0.05)),
        follow_redirects=False,
    )
    assert sign_in(client, "bench").status_code == 303
    print(f"{'page':<28} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    worst = 0.0
    for label, path in [
        ("review, unfiltered", "/review"),
        ("review, one category", "/review?category=17"),
        ("review, one import batch", "/review?batch=2"),
        ("review, category and batch", "/review?category=17&batch=2"),
        ("audit (5% sample)", "/audit"),
    ]:
        times = measure(client, path, args.requests)
        p95 = statistics.quantiles(times, n=20)[-1]
        worst = max(worst, p95) if path.startswith("/review") else worst
        print(f"{label:<28} {statistics.median(times):8.1f} {p95:8.1f} {max(times):8.1f}")
    verdict = "meets" if worst <= 200 else "MISSES"
    print(f"worst review-page p95: {worst:.1f} ms ({verdict} the 200 ms goal)")


if __name__ == "__main__":
    main()
