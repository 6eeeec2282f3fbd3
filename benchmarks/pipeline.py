"""End-to-end throughput and insert-to-result latency of the event path, against bare encoders.

Runs real `shelver dispatch` and `shelver worker` processes against a scratch
database (recreated on each run) and measures:

- bare: text + image encoding and the fusion model in this process, no queue, no DB;
- burst: N products inserted in one statement, time until all are terminal (rows/s);
- steady: products inserted one per transaction at a fixed rate below capacity,
  latency = classified_at - created_at, both stamped by PostgreSQL (p50/p99);
- rescore: a `--stale` backfill after a promotion, all embeddings cached (rows/s).

Products come from the shared data bundle, read in place (never copied):

    SHELVER_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
    SHELVER_BROKER_URL=redis://127.0.0.1:6379/3 SHELVER_MODEL_DIR=var/models \\
    .venv/bin/python benchmarks/pipeline.py --n 600 --configs prefork:1:2 prefork:2:1
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import redis
from sqlalchemy import Engine, create_engine, text

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "tests"))  # the small real champion the tests register

from support import (  # noqa: E402
    centroid_artifact,
    register_champion,
    shelver_env,
    training_titles,
)

from shelver.catalog.embedded import create_database  # noqa: E402
from shelver.catalog.migrate import upgrade  # noqa: E402
from shelver.catalog.settings import Settings, libpq_url, sqlalchemy_url  # noqa: E402
from shelver.worker.encoders import load_encoders, product_text  # noqa: E402
from shelver.worker.fusion import FusionModel, sha256_hex  # noqa: E402
from shelver.worker.images import ImageRejected, load_image  # noqa: E402
from shelver.worker.inputs import ModelInputs  # noqa: E402


def products(n: int, offset: int = 0) -> list[dict]:
    """Best Buy rows with their photo where they have one (about 60% do), then PriceRunner."""
    rows = []
    for dataset in ("bestbuy", "flipkart", "pricerunner"):
        with (DATA / dataset / "products.csv").open(newline="", encoding="utf-8") as fh:
            rows += [
                {
                    "sku": f"bench-{dataset}-{r['id']}-{offset}",
                    "name": r["name"],
                    "description": r["description"],
                    "image_uri": f"{dataset}/{r['image']}" if r["image"] else None,
                }
                for r in csv.DictReader(fh)
            ]
    rng = np.random.default_rng(20261127 + offset)
    return [rows[i] for i in rng.choice(len(rows), size=n, replace=False)]


def bare(model_dir: Path, rows: list[dict], artifact: bytes) -> dict:
    """What one process does with the same rows and no pipeline around it."""
    text_encoder, image_encoder = load_encoders(model_dir)
    model = FusionModel.from_artifact(artifact, sha256_hex(artifact))
    settings = Settings(image_roots=[DATA])
    started = time.perf_counter()
    for start in range(0, len(rows), 32):
        batch = rows[start : start + 32]
        texts = [product_text(r["name"], r["description"]) for r in batch]
        text_emb = text_encoder.encode(texts)
        image_emb = np.zeros((len(batch), image_encoder.dim), dtype=np.float32)
        present = np.zeros(len(batch), dtype=np.float32)
        images, where = [], []
        for i, r in enumerate(batch):
            if r["image_uri"]:
                with contextlib.suppress(ImageRejected):
                    images.append(load_image(r["image_uri"], settings))
                    where.append(i)
        if images:
            image_emb[where] = image_encoder.encode(images)
            present[where] = 1
        model.predict(ModelInputs(texts, [r["name"] for r in batch], text_emb, image_emb, present))
    elapsed = time.perf_counter() - started
    return {
        "rows": len(rows),
        "seconds": round(elapsed, 2),
        "rows_per_s": round(len(rows) / elapsed, 1),
    }


def pipeline_env(database_url: str, broker_url: str, model_dir: Path, **extra: str) -> dict:
    """The environment of a run's dispatcher and worker: the run's own servers and
    encoders, with photos read from the shared data (every set's lie under DATA)."""
    return shelver_env(database_url, broker_url, model_dir, DATA, **extra)


@contextlib.contextmanager
def pipeline(
    env: dict[str, str],
    pool: str,
    concurrency: int,
    threads: int,
    logs: Path,
    *,
    worker_args: Sequence[str] = (),
) -> Iterator[None]:
    """Real `shelver dispatch` and `shelver worker` processes for the duration of the block;
    ``worker_args`` are appended to the worker's command line (e.g. ``--metrics-port``)."""
    procs = []
    worker = ["worker", "-P", pool, "-c", str(concurrency), "--threads", str(threads)]
    with contextlib.ExitStack() as stack:
        for name, args in (("dispatch", ["dispatch"]), ("worker", [*worker, *worker_args])):
            out = stack.enter_context(
                (logs / f"{name}-{pool}-{concurrency}-{threads}.log").open("wb")
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "shelver.worker", *args],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            )
        try:
            yield
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


def insert(engine: Engine, rows: list[dict], *, one_transaction: bool = True) -> None:
    sql = text(
        "INSERT INTO products (sku, name, description, image_uri) "
        "VALUES (:sku, :name, :description, :image_uri)"
    )
    if one_transaction:
        with engine.begin() as conn:
            conn.execute(sql, rows)
        return
    for row in rows:
        with engine.begin() as conn:
            conn.execute(sql, row)


def wait_terminal(engine: Engine, timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(text("SELECT count(*) FROM classification_queue")).scalar_one() == 0:
                return
        time.sleep(0.2)
    raise TimeoutError("the pipeline did not drain")


def latencies(engine: Engine, prefix: str) -> dict:
    with engine.connect() as conn:
        values = (
            conn.execute(
                text(
                    "SELECT extract(epoch FROM classified_at - created_at) FROM products "
                    "WHERE sku LIKE :p AND classified_at IS NOT NULL"
                ),
                {"p": prefix + "%"},
            )
            .scalars()
            .all()
        )
    ms = np.asarray(values, dtype=float) * 1000
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50))),
        "p99_ms": round(float(np.percentile(ms, 99))),
    }


def reset(engine: Engine, database_url: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    upgrade(database_url)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=600, help="products per burst")
    parser.add_argument("--rate", type=float, default=4.0, help="steady inserts per second")
    parser.add_argument("--steady-seconds", type=float, default=30)
    parser.add_argument("--configs", nargs="+", default=["prefork:1:2", "prefork:2:1", "solo:1:2"],
                        help="pool:concurrency:onnxruntime-threads per worker process")  # fmt: skip
    parser.add_argument("--logs", type=Path, default=Path("var/bench"))
    args = parser.parse_args()

    settings = Settings()
    server = settings.database_url or "postgresql://postgres@127.0.0.1:5432/postgres"
    database_url = create_database(
        server.rsplit("/", 1)[0] + "/postgres", "shelver_bench", recreate=True
    )
    engine = create_engine(sqlalchemy_url(database_url))
    broker_url = settings.require_broker_url()
    model_dir = settings.model_dir.resolve()
    args.logs.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "SHELVER_DATABASE_URL": libpq_url(database_url),
        "SHELVER_BROKER_URL": broker_url,
        "SHELVER_MODEL_DIR": str(model_dir),
        "SHELVER_IMAGE_ROOTS": json.dumps([str(DATA)]),
        "SHELVER_MODEL_POLL_SECONDS": "1",
    }
    encoders = load_encoders(model_dir)
    examples = training_titles(DATA)
    artifact = centroid_artifact(*encoders, examples)
    rescore_artifact = centroid_artifact(*encoders, examples, scale=30)
    del encoders
    report: dict = {"cpus": os.cpu_count(), "n": args.n}
    report["bare"] = bare(model_dir, products(args.n), artifact)
    print("bare encoders:", report["bare"], flush=True)

    for spec in args.configs:
        pool, concurrency, threads = spec.split(":")
        reset(engine, database_url)
        redis.Redis.from_url(broker_url).flushdb()
        register_champion(engine, artifact, "bench-1")
        result: dict = {}
        with pipeline(env, pool, int(concurrency), int(threads), args.logs):
            insert(engine, products(5, offset=99))  # warm-up: processes up, models loaded
            wait_terminal(engine, timeout=120)
            rows = products(args.n)
            started = time.perf_counter()
            insert(engine, rows)
            wait_terminal(engine)
            elapsed = time.perf_counter() - started
            result["burst"] = {"rows": len(rows), "seconds": round(elapsed, 1),
                               "rows_per_s": round(len(rows) / elapsed, 1)}  # fmt: skip
            steady = products(int(args.rate * args.steady_seconds), offset=1)
            for row in steady:
                row["sku"] = "steady-" + row["sku"]
            for row in steady:
                insert(engine, [row])
                time.sleep(1 / args.rate)
            wait_terminal(engine)
            result["steady"] = {"rate_per_s": args.rate, **latencies(engine, "steady-")}
            register_champion(engine, rescore_artifact, "bench-2")
            time.sleep(1.5)
            started = time.perf_counter()
            backfill = subprocess.run(
                [sys.executable, "-m", "shelver.worker", "backfill", "--stale"],
                env=env, capture_output=True, text=True, timeout=1800,
            )  # fmt: skip
            elapsed = time.perf_counter() - started
            with engine.connect() as conn:
                rescored = conn.execute(
                    text("SELECT count(*) FROM products WHERE model_version_id = "
                         "(SELECT id FROM model_versions WHERE version = 'bench-2')")
                ).scalar_one()  # fmt: skip
            result["rescore"] = {"rows": rescored, "seconds": round(elapsed, 1),
                                 "rows_per_s": round(rescored / elapsed, 1),
                                 "ok": backfill.returncode == 0}  # fmt: skip
        report[spec] = result
        print(spec, result, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
