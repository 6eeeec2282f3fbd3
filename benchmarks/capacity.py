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
- worker RSS and PSS: the Celery parent and each pool process, after the burst, and the
  highest total PSS sampled during it.

``--designs`` runs the burst once per worker design, each on a fresh database (no
embedding cached by the one before), to compare them in one run:

- ``lean``: `shelver worker` as shipped: the encoders and the champion loaded once in the
  main process before the pool forks (shared pages), 4 images and (one thread) 512 padded
  tokens per encoder run;
- ``per-process``: `--no-preload`, 32 images and 2048 tokens per run: the worker before
  issue #15;
- ``threads-pool``: one process, `-P threads`, its threads sharing one runtime.

``--photo-share`` makes that share of the burst rows ones with a photo (the plain sample
has about one in ten), since the image encoder's activations dominate a process's memory.

    .venv/bin/python benchmarks/capacity.py --n 600 --concurrency 2 --threads 1 \
        --artifact worker/default_model/fusion.zip \
        --designs per-process,lean,threads-pool,per-process,lean --steady-seconds 0

(add ``--photo-share 0.5`` for the photo-heavy mix; without ``--steady-seconds 0`` each
design also gets the idle and loaded latency runs; docs/operations.md, "Memory").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
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
    pipeline_env,
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


# Marks this run's worker processes (several runs may share a machine).
BENCH_TAG = f"capacity-{os.getpid()}"


def worker_rss(tag: str = BENCH_TAG) -> dict:
    """RSS and PSS (shared pages split between processes) of the `shelver worker` tree whose
    environment carries SHELVER_BENCH_TAG ``tag`` (this run's); {} when there is none."""
    found = {}

    def is_worker(proc: psutil.Process) -> bool:
        return "-m shelver.worker worker" in " ".join(proc.cmdline() or [])

    for proc in psutil.process_iter(["pid", "environ"]):
        if (proc.info["environ"] or {}).get("SHELVER_BENCH_TAG") != tag or not is_worker(proc):
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


class PeakPss:
    """The highest total PSS of the worker tree, sampled every ``every`` seconds in a thread."""

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.peak_mb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                total = worker_rss().get("pss_total_mb", 0)
            except psutil.Error:  # a process came or went between listing and reading
                continue
            self.peak_mb = max(self.peak_mb, total)

    def __enter__(self) -> PeakPss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


# Rows of the three shared data sets (Best Buy, Flipkart, PriceRunner).
ALL_ROWS = 29625

# Worker designs --designs can compare: Celery pool, extra `shelver worker` arguments and
# environment.
DESIGNS: dict[str, tuple[str, list[str], dict[str, str]]] = {
    "lean": ("prefork", [], {}),
    "per-process": (
        "prefork",
        ["--no-preload"],
        {"SHELVER_IMAGE_BATCH_SIZE": "32", "SHELVER_TEXT_BATCH_TOKENS": "2048"},
    ),
    "threads-pool": ("threads", [], {}),
}


def burst_rows(n: int, photo_share: float | None) -> list[dict]:
    """The burst: the plain sample, or one where ``photo_share`` of the rows have a photo."""
    if photo_share is None:
        return products(n)
    everything = products(ALL_ROWS)  # every row, in a fixed random order
    photos = [r for r in everything if r["image_uri"]]
    plain = [r for r in everything if not r["image_uri"]]
    k = round(n * photo_share)
    rows = photos[:k] + plain[: n - k]
    random.Random(20261202).shuffle(rows)  # photo rows spread over the batches
    return rows


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


def measure_design(
    design: str,
    run: int,
    args: argparse.Namespace,
    postgres: EmbeddedPostgres,
    broker: EmbeddedRedis,
    model_dir: Path,
    artifact: bytes,
    rows: list[dict],
    bare_result: dict,
) -> dict:
    """One worker design on a fresh database of its own (``run`` numbers it): burst, memory,
    then the steady rates."""
    pool, worker_args, worker_env = DESIGNS[design]
    report: dict = {
        "design": design,
        "worker": f"-P {pool} -c {args.concurrency} --threads {args.threads}",
        "worker_args": worker_args,
        "worker_env": worker_env,
    }
    url, engine = bench_database(postgres, f"shelver_capacity_{run}")
    register_champion(engine, artifact, "capacity-1")
    logs = args.out.parent / "capacity-logs" / f"{run}-{design}"
    logs.mkdir(parents=True, exist_ok=True)
    env = pipeline_env(url, broker.url(0), model_dir, SHELVER_BENCH_TAG=BENCH_TAG, **worker_env)
    with pipeline(env, pool, args.concurrency, args.threads, logs, worker_args=worker_args):
        insert(engine, products(5, offset=99))
        wait_terminal(engine, timeout=180)
        report["rss_after_warm_up"] = worker_rss()

        before = db_counters(engine)
        reset_statements(engine)
        with PeakPss() as peak:
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
            report["burst"]["rows_per_s"] / bare_result["rows_per_s"], 2
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
        report["pss_total_peak_in_burst_mb"] = peak.peak_mb
        print(
            f"{design} burst:",
            report["burst"],
            report["rss_after_burst"],
            "peak PSS",
            peak.peak_mb,
            flush=True,
        )
        if args.steady_seconds > 0:
            report["idle"] = steady(engine, args.idle_rate, args.steady_seconds, "idle", 1)
            print(f"{design} idle:", report["idle"], flush=True)
            load_rate = round(report["burst"]["rows_per_s"] * args.load_fraction, 1)
            report["loaded"] = steady(engine, load_rate, args.steady_seconds, "load", 2)
            print(f"{design} loaded:", report["loaded"], flush=True)
            report["rss_end"] = worker_rss()
    engine.dispose()
    return report


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
    parser.add_argument(
        "--photo-share",
        type=float,
        default=None,
        help="share of burst rows with a photo (default: the plain sample, about 1 in 10)",
    )
    parser.add_argument(
        "--designs",
        default="lean",
        help=f"comma-separated worker designs to measure in turn: {', '.join(DESIGNS)}",
    )
    parser.add_argument("--out", type=Path, default=Path("var/bench/capacity.json"))
    args = parser.parse_args()
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    if unknown := set(designs) - set(DESIGNS):
        parser.error(f"unknown designs {sorted(unknown)}; known: {', '.join(DESIGNS)}")

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
        "photo_share": args.photo_share,
        "model": str(args.artifact) if args.artifact else "centroid (tests)",
    }
    rows = burst_rows(args.n, args.photo_share)
    report["burst_rows_with_photo"] = sum(1 for r in rows if r["image_uri"])
    report["bare"] = bare(model_dir, rows, artifact)
    print(
        "bare:", report["bare"], "rows with a photo:", report["burst_rows_with_photo"], flush=True
    )

    # A list: a design may be named again (a, b, a, b) to see how much the machine drifts.
    report["designs"] = []
    with tempfile.TemporaryDirectory(prefix="shelver-capacity-") as tmp:
        postgres, broker = start_servers(Path(tmp))
        try:
            for run, design in enumerate(designs):
                report["designs"].append(
                    measure_design(
                        design, run, args, postgres, broker, model_dir, artifact, rows,
                        report["bare"],
                    )
                )  # fmt: skip
        finally:
            broker.stop()
            postgres.stop()
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
