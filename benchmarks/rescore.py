"""Re-scoring a large catalog whose embeddings are cached: `shelver backfill --stale` end to end.

Builds a catalog of PriceRunner rows (20,000 by default) in a PostgreSQL of its
own, already classified by a first champion, with every product's MiniLM text
vector in the embedding cache (PriceRunner rows have no photos). Then a second
champion is registered and `shelver backfill --stale` re-scores everything
through real dispatcher and worker processes. Reports rows/s end to end, the
fusion model alone in this process, and PostgreSQL statements per backfill batch.

Text vectors: ``--vectors`` names a float32 .npy aligned with
pricerunner/products.csv (e.g. one written by an earlier run); without it they are
computed here with the exported ONNX encoder (a few minutes on two cores) and
saved to var/bench/pricerunner_text.npy for the next run.

    .venv/bin/python benchmarks/rescore.py --n 20000
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from capacity import bench_database, db_counters, reset_statements, start_servers  # noqa: E402
from capacity import statements as statement_stats  # noqa: E402
from pipeline import DATA, pipeline, pipeline_env, register_champion  # noqa: E402
from support import centroid_artifact, training_titles  # noqa: E402

from shelver.catalog.embeddings import CachedEmbedding, put  # noqa: E402
from shelver.worker.encoders import load_encoders, product_text  # noqa: E402
from shelver.worker.fusion import FusionModel, sha256_hex  # noqa: E402
from shelver.worker.inputs import ModelInputs  # noqa: E402


def pricerunner(n: int) -> list[dict]:
    with (DATA / "pricerunner" / "products.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return rows[:n]


def text_vectors(rows: list[dict], given: Path | None, model_dir: Path, out: Path) -> np.ndarray:
    if given is not None:
        vectors = np.load(given)  # allow_pickle stays False: plain float arrays only
        return vectors[: len(rows)].astype(np.float32)
    if out.is_file() and len(np.load(out)) >= len(rows):
        return np.load(out)[: len(rows)]
    text_encoder, _ = load_encoders(model_dir)
    texts = [product_text(r["name"], r["description"]) for r in rows]
    started = time.perf_counter()
    vectors = np.concatenate(
        [text_encoder.encode(texts[i : i + 256]) for i in range(0, len(texts), 256)]
    )
    print(f"encoded {len(texts)} texts in {time.perf_counter() - started:.0f} s", flush=True)
    np.save(out, vectors)
    return vectors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--vectors", type=Path, default=None)
    parser.add_argument(
        "--artifact",
        type=Path,
        default=None,
        help="a trained fusion artifact (zip) to re-score with; default: the tests' small model",
    )
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-dir", type=Path, default=Path("var/models"))
    parser.add_argument("--out", type=Path, default=Path("var/bench/rescore.json"))
    args = parser.parse_args()
    model_dir = args.model_dir.resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    rows = pricerunner(args.n)
    vectors = text_vectors(rows, args.vectors, model_dir, args.out.parent / "pricerunner_text.npy")
    text_encoder, image_encoder = load_encoders(model_dir)
    examples = training_titles(DATA)
    first = centroid_artifact(text_encoder, image_encoder, examples)
    second = (
        args.artifact.read_bytes()
        if args.artifact
        else centroid_artifact(text_encoder, image_encoder, examples, scale=30)
    )
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "rows": len(rows),
        "worker": f"prefork -c {args.concurrency} --threads {args.threads}",
        "model": str(args.artifact) if args.artifact else "centroid (tests)",
    }

    # The fusion model alone, on the same vectors, in batches of 256.
    model = FusionModel.from_artifact(second, sha256_hex(second))
    images = np.zeros((256, image_encoder.dim), dtype=np.float32)
    started = time.perf_counter()
    for i in range(0, len(rows), 256):
        batch = vectors[i : i + 256]
        texts = [product_text(r["name"], r["description"]) for r in rows[i : i + 256]]
        names = [r["name"] for r in rows[i : i + 256]]
        absent = np.zeros(len(batch), np.float32)
        model.predict(ModelInputs(texts, names, batch, images[: len(batch)], absent))
    elapsed = time.perf_counter() - started
    report["fusion_only_rows_per_s"] = round(len(rows) / elapsed)

    with tempfile.TemporaryDirectory(prefix="shelver-rescore-") as tmp:
        postgres, broker = start_servers(Path(tmp))
        try:
            url, engine = bench_database(postgres, "shelver_rescore")
            v1 = register_champion(engine, first, "rescore-1")
            with engine.begin() as conn:
                conn.execute(
                    text("INSERT INTO products (sku, name, description) VALUES (:s, :n, :d)"),
                    [{"s": f"pr-{r['id']}", "n": r["name"], "d": r["description"]} for r in rows],
                )
                # An existing catalog: classified by the first champion, nothing queued.
                conn.execute(text("DELETE FROM classification_queue"))
                conn.execute(
                    text(
                        "UPDATE products SET status = 'classified', model_version_id = :v, "
                        "classified_at = now()"
                    ),
                    {"v": v1},
                )
                keys = {
                    sku: (pid, content_hash)
                    for sku, pid, content_hash in conn.execute(
                        text("SELECT sku, id, content_hash FROM products")
                    )
                }
                cached = [
                    CachedEmbedding(*keys[f"pr-{r['id']}"], vector)
                    for r, vector in zip(rows, vectors, strict=True)
                ]
                put(conn, text_encoder.identity, cached)
            register_champion(engine, second, "rescore-2")
            env = pipeline_env(url, broker.url(0), model_dir)
            logs = args.out.parent / "rescore-logs"
            logs.mkdir(exist_ok=True)
            with pipeline(env, "prefork", args.concurrency, args.threads, logs):
                time.sleep(8)  # workers up and holding the new champion
                before = db_counters(engine)
                reset_statements(engine)
                started = time.perf_counter()
                result = subprocess.run(
                    [sys.executable, "-m", "shelver.worker", "backfill", "--stale"],
                    env=env, capture_output=True, text=True, timeout=3600,
                )  # fmt: skip
                elapsed = time.perf_counter() - started
                after = db_counters(engine)
            with engine.connect() as conn:
                rescored = conn.execute(
                    text(
                        "SELECT count(*) FROM products WHERE model_version_id = "
                        "(SELECT id FROM model_versions WHERE version = 'rescore-2')"
                    )
                ).scalar_one()
                new_vectors = conn.execute(text("SELECT count(*) FROM embeddings")).scalar_one()
            stmts = statement_stats(engine, ("pg_stat_statements", "pg_stat_database"))
            report["backfill"] = {
                "ok": result.returncode == 0,
                "rescored": rescored,
                "seconds": round(elapsed, 1),
                "rows_per_s": round(rescored / elapsed),
                # The command's own figure: from its selection to done, without the
                # interpreter's start-up.
                "cli_reported": (result.stdout.strip().splitlines() or [""])[-1],
                "embeddings_after": new_vectors,
                "counters_delta": {k: after[k] - before[k] for k in after},
                "statements": stmts[:20],
            }
            engine.dispose()
        finally:
            broker.stop()
            postgres.stop()
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
