"""What one worker sustains, what it costs PostgreSQL, and how much memory it holds.

Starts its own PostgreSQL (embedded, with ``pg_stat_statements`` preloaded) and
its own Valkey, runs real `shelver dispatch` + `shelver worker` processes, and
measures on rows from the shared data:

- bare: encoders + fusion model in this process, no queue, no database (rows/s);
- burst: N products inserted at once until all are terminal (rows/s, and the ratio to bare);
- PostgreSQL load per classify batch during the burst: statements, transactions,
  rows written, from ``pg_stat_statements`` and ``pg_stat_database`` deltas;
- latency (classified_at - created_at, both PostgreSQL clocks) p50/p99 at an idle
  rate and under load (a rate near the measured burst throughput);
- worker RSS: the Celery parent and each pool process, after the burst.

    .venv/bin/python benchmarks/capacity.py --n 600 --concurrency 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import psutil
from sqlalchemy import Engine, create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import (  # noqa: E402
    DATA,
    bare,
    insert,
    latencies,
    pipeline,
    products,
    register_champion,
    wait_terminal,
)
from support import centroid_artifact, training_titles  # noqa: E402

from shelver.catalog.embedded import EmbeddedPostgres, EmbeddedRedis, create_database  # noqa: E402
from shelver.catalog.migrate import upgrade  # noqa: E402
from shelver.catalog.settings import sqlalchemy_url  # noqa: E402
from shelver.worker.encoders import load_encoders  # noqa: E402


def start_servers(root: Path) -> tuple[EmbeddedPostgres, EmbeddedRedis]:
    """PostgreSQL with pg_stat_statements loaded, and a Valkey; both private to this run."""
    postgres = EmbeddedPostgres(root / "postgres")
    postgres._prepare()  # initdb, so the configuration file exists
    with (postgres.pgdata / "postgresql.conf").open("a") as conf:
        conf.write(
            "\nshared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.track = all\n"
        )
    postgres.start()
    broker = EmbeddedRedis(root / "valkey")
    broker.start()
    return postgres, broker


def bench_database(postgres: EmbeddedPostgres, name: str) -> tuple[str, Engine]:
    url = create_database(postgres.url(), name, recreate=True)
    upgrade(url)
    engine = create_engine(sqlalchemy_url(url))
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return url, engine


DB_COUNTERS = (
    "xact_commit",
    "xact_rollback",
    "tup_returned",
    "tup_fetched",
    "tup_inserted",
    "tup_updated",
    "tup_deleted",
    "blks_read",
    "blks_hit",
)


def db_counters(engine: Engine) -> dict[str, int]:
    time.sleep(1.5)  # backends flush their statistics at most once a second
    with engine.connect() as conn:
        row = conn.execute(
            text(
                f"SELECT {', '.join(DB_COUNTERS)} FROM pg_stat_database "
                "WHERE datname = current_database()"
            )
        ).one()
    return dict(zip(DB_COUNTERS, (int(v) for v in row), strict=True))


def reset_statements(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("SELECT pg_stat_statements_reset()")


def statements(engine: Engine, skip: tuple[str, ...]) -> list[dict]:
    """Statements run against this database since the reset, ours (``skip``) left out."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                """
                SELECT calls, rows, round(total_exec_time::numeric, 1),
                       regexp_replace(left(query, 90), '\\s+', ' ', 'g')
                FROM pg_stat_statements
                WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                ORDER BY calls DESC
                """
            )
        ).all()
    return [
        {"calls": c, "rows": r, "ms": float(ms), "query": q}
        for c, r, ms, q in rows
        if not any(s in q for s in skip)
    ]


def worker_rss() -> dict:
    """RSS and PSS (shared pages split between processes) of this run's `shelver worker` tree."""
    found = {}

    def is_worker(proc: psutil.Process) -> bool:
        return "-m shelver.worker worker" in " ".join(proc.cmdline() or [])

    for proc in psutil.process_iter(["pid", "environ"]):
        if not (proc.info["environ"] or {}).get("SHELVER_BENCH_TAG") or not is_worker(proc):
            continue
        # Pool processes are forks with the parent's command line; start from the parent.
        if proc.parent() is not None and is_worker(proc.parent()):
            continue
        tree = [proc, *proc.children(recursive=True)]
        found = {
            "rss_mb": [round(p.memory_info().rss / 2**20) for p in tree],
            "pss_mb": [round(p.memory_full_info().pss / 2**20) for p in tree],
        }
        found["pss_total_mb"] = sum(found["pss_mb"])
    return found


def steady(engine: Engine, rate: float, seconds: float, tag: str, offset: int) -> dict:
    rows = products(max(1, int(rate * seconds)), offset=offset)
    for row in rows:
        row["sku"] = f"{tag}-{row['sku']}"
    started = time.perf_counter()
    for i, row in enumerate(rows):
        insert(engine, [row])
        # Paced against the clock, so slow inserts do not lower the rate.
        time.sleep(max(0.0, started + (i + 1) / rate - time.perf_counter()))
    wait_terminal(engine)
    return {"rate_per_s": rate, **latencies(engine, f"{tag}-")}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=600, help="products in the burst")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--idle-rate", type=float, default=2.0)
    parser.add_argument(
        "--load-fraction", type=float, default=0.7, help="steady rate under load, share of burst"
    )
    parser.add_argument("--steady-seconds", type=float, default=30)
    parser.add_argument("--model-dir", type=Path, default=Path("var/models"))
    parser.add_argument(
        "--artifact",
        type=Path,
        default=None,
        help="a trained fusion artifact (zip) to serve; default: the tests' small model",
    )
    parser.add_argument("--out", type=Path, default=Path("var/bench/capacity.json"))
    args = parser.parse_args()

    model_dir = args.model_dir.resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    encoders = load_encoders(model_dir)
    artifact = (
        args.artifact.read_bytes()
        if args.artifact
        else centroid_artifact(*encoders, training_titles(DATA))
    )
    del encoders
    report: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "load_avg_at_start": os.getloadavg(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "n": args.n,
        "worker": f"prefork -c {args.concurrency} --threads {args.threads}",
        "model": str(args.artifact) if args.artifact else "centroid (tests)",
    }
    report["bare"] = bare(model_dir, products(args.n), artifact)
    print("bare:", report["bare"], flush=True)

    with tempfile.TemporaryDirectory(prefix="shelver-capacity-") as tmp:
        postgres, broker = start_servers(Path(tmp))
        try:
            url, engine = bench_database(postgres, "shelver_capacity")
            register_champion(engine, artifact, "capacity-1")
            logs = args.out.parent / "capacity-logs"
            logs.mkdir(exist_ok=True)
            env = {
                **os.environ,
                "SHELVER_DATABASE_URL": url,
                "SHELVER_BROKER_URL": broker.url(0),
                "SHELVER_MODEL_DIR": str(model_dir),
                "SHELVER_IMAGE_ROOTS": json.dumps([str(DATA)]),
                "SHELVER_MODEL_POLL_SECONDS": "1",
                "SHELVER_BENCH_TAG": "capacity",
            }
            with pipeline(env, "prefork", args.concurrency, args.threads, logs):
                insert(engine, products(5, offset=99))
                wait_terminal(engine, timeout=180)

                before = db_counters(engine)
                reset_statements(engine)
                rows = products(args.n)
                started = time.perf_counter()
                insert(engine, rows)
                wait_terminal(engine)
                elapsed = time.perf_counter() - started
                after = db_counters(engine)
                ours = ("pg_stat_statements", "pg_stat_database", "FROM classification_queue)",
                        "INSERT INTO products (sku")  # fmt: skip
                stmts = statements(engine, ours)
                report["burst"] = {
                    "rows": len(rows),
                    "seconds": round(elapsed, 1),
                    "rows_per_s": round(len(rows) / elapsed, 1),
                }
                report["ratio_to_bare"] = round(
                    report["burst"]["rows_per_s"] / report["bare"]["rows_per_s"], 2
                )
                batches = next(
                    (s["calls"] for s in stmts if s["query"].startswith("INSERT INTO predictions")),
                    0,
                )
                report["postgres_burst"] = {
                    "batches_written": batches,
                    "counters_delta": {k: after[k] - before[k] for k in DB_COUNTERS},
                    "statements": stmts[:25],
                    "statement_calls_total": sum(s["calls"] for s in stmts),
                }
                report["rss_after_burst"] = worker_rss()
                print("burst:", report["burst"], report["rss_after_burst"], flush=True)

                report["idle"] = steady(engine, args.idle_rate, args.steady_seconds, "idle", 1)
                print("idle:", report["idle"], flush=True)
                load_rate = round(report["burst"]["rows_per_s"] * args.load_fraction, 1)
                report["loaded"] = steady(engine, load_rate, args.steady_seconds, "load", 2)
                print("loaded:", report["loaded"], flush=True)
                report["rss_end"] = worker_rss()
            engine.dispose()
        finally:
            broker.stop()
            postgres.stop()
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
