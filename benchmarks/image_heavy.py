"""Throughput and latency of a catalog whose products all have a photo, next to the bare encoders.

Every product in this run has a photo: the shared Best Buy rows that have one (name,
description, 224x224 JPEG) and the unlabelled Best Buy photos (``unlabeled/bestbuy-images``,
3,000 SKUs in none of the labelled sets). Those have no text at all; a catalog still needs a
name for them (``shelver import`` refuses a row without one), and the only one the data
gives is the SKU, so their name is the SKU and their description is empty. They are the
photo-only end of a real feed (a supplier's image drop, a marketplace listing with an item
number and a picture); their text costs the text encoder almost nothing, so the photo decides
their speed.

Measured on the same rows in the same run, with the trained 14-class Best Buy champion
(``worker/default_model/fusion.zip``; its encoder identities are checked against the
exported encoders first):

- encoders alone, in this process, batches of 32: text, image decode (file read + Pillow +
  resize), image encoder (decoded images), fusion model on the computed vectors;
- bare: ``pipeline.bare`` (all of the above in one loop), rows/s;
- burst: N products inserted at once into a scratch catalog served by real `shelver dispatch`
  + `shelver worker` processes, until all are terminal (rows/s, ratio to bare), with the
  worker's own per-stage time from its Prometheus ``/metrics``;
- latency insert -> result (``classified_at - created_at``, PostgreSQL clocks) p50/p99 at an
  idle rate and at a share of the burst rate (default 70%).

PostgreSQL and Valkey are embedded and private to the run (``capacity.start_servers``).
Raw JSON goes to ``--out``; worker and dispatcher logs beside it.

    .venv/bin/python benchmarks/image_heavy.py --model-dir var/models --n 800
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from capacity import bench_database, start_servers, worker_rss  # noqa: E402
from pipeline import (  # noqa: E402
    DATA,
    bare,
    insert,
    latencies,
    pipeline,
    pipeline_env,
    register_champion,
    wait_terminal,
)
from support import free_port, scrape  # noqa: E402

from shelver.catalog.settings import Settings  # noqa: E402
from shelver.worker.encoders import (  # noqa: E402
    TextEncoder,
    _length_buckets,
    load_encoders,
    product_text,
)
from shelver.worker.fusion import FusionModel, sha256_hex  # noqa: E402
from shelver.worker.images import ImageRejected, load_image  # noqa: E402
from shelver.worker.inputs import ModelInputs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHAMPION = REPO / "worker" / "default_model" / "fusion.zip"
UNLABELED = "unlabeled/bestbuy-images"
BATCH = 32


def photo_rows() -> tuple[list[dict], list[dict]]:
    """Best Buy rows with a photo, and the unlabelled photos (name = SKU); paths under DATA."""
    with (DATA / "bestbuy" / "products.csv").open(newline="", encoding="utf-8") as fh:
        labelled = [
            {
                "id": f"bb-{r['id']}",
                "name": r["name"],
                "description": r["description"],
                "image_uri": f"bestbuy/{r['image']}",
            }
            for r in csv.DictReader(fh)
            if r["image"]
        ]
    unlabeled = [
        {
            "id": f"ul-{p.stem}",
            "name": p.stem,
            "description": "",
            "image_uri": f"{UNLABELED}/{p.name}",
        }
        for p in sorted((DATA / UNLABELED).glob("*.jpg"))
    ]
    missing = [
        r["image_uri"] for r in labelled + unlabeled if not (DATA / r["image_uri"]).is_file()
    ]
    if missing:
        raise SystemExit(f"{len(missing)} photos missing under {DATA}, e.g. {missing[:3]}")
    return labelled, unlabeled


def sample(
    labelled: list[dict], unlabeled: list[dict], n: int, share: float, tag: str, seed: int
) -> list[dict]:
    """``n`` products, ``share`` of them photo-only, drawn without replacement, SKUs tagged."""
    rng = np.random.default_rng(20261127 + seed)
    k = round(n * share)
    if k > len(unlabeled) or n - k > len(labelled):
        raise SystemExit(
            f"--n {n} with --unlabeled-share {share} needs {n - k} Best Buy photo rows "
            f"(have {len(labelled)}) and {k} unlabelled photos (have {len(unlabeled)})"
        )
    picked = [labelled[i] for i in rng.choice(len(labelled), n - k, replace=False)]
    picked += [unlabeled[i] for i in rng.choice(len(unlabeled), k, replace=False)]
    order = rng.permutation(len(picked))  # interleaved, as a mixed feed arrives
    fields = ("name", "description", "image_uri")
    return [{"sku": f"{tag}-{picked[i]['id']}", **{c: picked[i][c] for c in fields}} for i in order]


def encoders_alone(model_dir: Path, rows: list[dict], artifact: bytes) -> dict:
    """Each stage of the bare loop timed on its own, on the same rows, batches of 32."""
    text_encoder, image_encoder = load_encoders(model_dir)
    model = FusionModel.from_artifact(artifact, sha256_hex(artifact))
    settings = Settings(image_roots=[DATA])
    batches = [rows[s : s + BATCH] for s in range(0, len(rows), BATCH)]
    texts = [[product_text(r["name"], r["description"]) for r in b] for b in batches]

    started, cpu = time.perf_counter(), time.process_time()
    text_emb = [text_encoder.encode(t) for t in texts]
    text_s, text_cpu = time.perf_counter() - started, time.process_time() - cpu

    refused: dict[str, int] = {}
    started, cpu = time.perf_counter(), time.process_time()
    decoded = []
    for b in batches:
        images = []
        for r in b:
            try:
                images.append(load_image(r["image_uri"], settings))
            except ImageRejected as exc:
                refused[exc.reason] = refused.get(exc.reason, 0) + 1
                images.append(None)
        decoded.append(images)
    decode_s, decode_cpu = time.perf_counter() - started, time.process_time() - cpu
    n_images = sum(im is not None for b in decoded for im in b)

    started, cpu = time.perf_counter(), time.process_time()
    image_emb = []
    for images in decoded:
        emb = np.zeros((len(images), image_encoder.dim), dtype=np.float32)
        where = [i for i, im in enumerate(images) if im is not None]
        if where:
            emb[where] = image_encoder.encode([images[i] for i in where])
        image_emb.append(emb)
    image_s, image_cpu = time.perf_counter() - started, time.process_time() - cpu

    started, cpu = time.perf_counter(), time.process_time()
    probabilities = []
    for b, t, te, ie, images in zip(batches, texts, text_emb, image_emb, decoded, strict=True):
        present = np.array([im is not None for im in images], dtype=np.float32)
        probabilities.append(model.predict(ModelInputs(t, [r["name"] for r in b], te, ie, present)))
    model_s, model_cpu = time.perf_counter() - started, time.process_time() - cpu
    confidence = np.concatenate(probabilities).max(axis=1)

    flat = [
        (t, kind(r))
        for b, ts in zip(batches, texts, strict=True)
        for r, t in zip(b, ts, strict=True)
    ]

    def rate(count: int, seconds: float, cpu: float) -> dict:
        # CPU time (all onnxruntime threads) per item: what the stage costs, contention aside.
        return {
            "seconds": round(seconds, 2),
            "per_s": round(count / seconds, 1),
            "cpu_ms_each": round(1000 * cpu / count, 1),
        }

    tokens = {
        kind: [len(ids) for ids in text_encoder.tokenize([t for t, k in flat if k == kind])]
        for kind in ("bb", "ul")
    }
    kinds = np.array([k for _, k in flat])
    threshold = model.meta.get("threshold", 0.5)
    return {
        "rows": len(rows),
        "images": n_images,
        "text_tokens": {
            ("bestbuy" if kind == "bb" else "photo_only"): {
                "mean": round(float(np.mean(n)), 1) if n else None,
                "p90": int(np.percentile(n, 90)) if n else None,
            }
            for kind, n in tokens.items()
        },
        "text_padding": padding(text_encoder, texts),
        "confidence": {
            ("bestbuy" if kind == "bb" else "photo_only"): {
                "p50": round(float(np.median(confidence[kinds == kind])), 3),
                "max": round(float(confidence[kinds == kind].max()), 3),
                "at_or_above_threshold": int((confidence[kinds == kind] >= threshold).sum()),
                "of": int((kinds == kind).sum()),
            }
            for kind in ("bb", "ul")
            if (kinds == kind).any()
        },
        "threshold": threshold,
        "images_refused": refused,
        "text_chars_mean": round(float(np.mean([len(s) for t in texts for s in t])), 1),
        "onnxruntime_threads": text_encoder.session.get_session_options().intra_op_num_threads,
        "text_encoder": rate(len(rows), text_s, text_cpu),
        "image_decode": rate(n_images, decode_s, decode_cpu),
        "image_encoder": rate(n_images, image_s, image_cpu),
        "image_decode_and_encoder": rate(n_images, decode_s + image_s, decode_cpu + image_cpu),
        "fusion_model": rate(len(rows), model_s, model_cpu),
        "sum_of_stages_rows_per_s": round(len(rows) / (text_s + decode_s + image_s + model_s), 1),
    }


def padding(text_encoder: TextEncoder, texts: list[list[str]]) -> dict:
    """Tokens the text encoder runs, padding included, as the worker batches the texts (one
    ``encode`` per 32-product batch) and as one call over all of them would."""

    def padded(lengths: list[int]) -> int:
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        runs = _length_buckets(order, lengths, 64, text_encoder.max_batch_tokens)
        return sum(len(run) * max(lengths[i] for i in run) for run in runs)

    per_batch = [[len(ids) for ids in text_encoder.tokenize(batch)] for batch in texts]
    return {
        "real_tokens": sum(map(sum, per_batch)),
        "padded_in_32_product_batches": sum(padded(lengths) for lengths in per_batch),
        "padded_bucketed_all_together": padded([n for lengths in per_batch for n in lengths]),
    }


def kind(row: dict) -> str:
    """ "bb" for a Best Buy row with name and description, "ul" for a photo-only one."""
    return row["sku"].split("-")[1]


# Marks this run's worker processes in their environment, so memory is read off them only.
BENCH_TAG = f"image-heavy-{os.getpid()}"


def pool_memory() -> dict:
    """RSS and PSS of this run's worker and its pool processes."""
    return worker_rss(BENCH_TAG) or {"error": "no worker process of this run found"}


def stage_totals(port: int) -> dict[str, dict[str, float]]:
    """Seconds and observations per classify stage and per batch, summed over the worker's pool."""
    totals: dict[str, dict[str, float]] = {}
    for (name, labels), value in scrape(port).items():
        family, _, part = name.rpartition("_")
        if part not in ("sum", "count") or family not in (
            "shelver_stage_duration_seconds", "shelver_batch_duration_seconds"
        ):  # fmt: skip
            continue
        label = dict(labels)
        key = label.get("stage") or f"batch_{label.get('lane')}_{label.get('outcome')}"
        slot = totals.setdefault(key, {"seconds": 0.0, "count": 0.0})
        slot["seconds" if part == "sum" else "count"] += value
    return totals


def stage_delta(before: dict, after: dict, products: int) -> dict:
    delta = {}
    for key, now in after.items():
        was = before.get(key, {"seconds": 0.0, "count": 0.0})
        seconds, count = now["seconds"] - was["seconds"], now["count"] - was["count"]
        if count:
            delta[key] = {
                "seconds": round(seconds, 2),
                "count": int(count),
                "ms_per_product": round(1000 * seconds / products, 2),
            }
    return delta


def outcomes(engine: Engine, prefix: str) -> dict:
    """Status counts (Best Buy rows and photo-only rows apart), and photos not used."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT split_part(sku, '-', 2), status, count(*), "
                "       count(*) FILTER (WHERE error LIKE 'image not used%') "
                "FROM products WHERE sku LIKE :p GROUP BY 1, 2 ORDER BY 1, 2"
            ),
            {"p": prefix + "%"},
        ).all()
    status: dict[str, dict[str, int]] = {}
    for kind_, state, n, _ in rows:
        status.setdefault("bestbuy" if kind_ == "bb" else "photo_only", {})[state] = n
    return {"status": status, "image_not_used": sum(refused for *_, refused in rows)}


def paced(engine: Engine, rows: list[dict], rate: float, tag: str) -> dict:
    """Insert one product per transaction at ``rate`` per second, then latency per product."""
    started = time.perf_counter()
    for i, row in enumerate(rows):
        insert(engine, [row])
        # Paced against the clock, so slow inserts do not lower the rate.
        time.sleep(max(0.0, started + (i + 1) / rate - time.perf_counter()))
    achieved = len(rows) / (time.perf_counter() - started)
    wait_terminal(engine)
    return {
        "rate_per_s": rate,
        "achieved_rate_per_s": round(achieved, 1),
        **latencies(engine, f"{tag}-"),
        **outcomes(engine, f"{tag}-"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=800, help="products in the burst")
    parser.add_argument("--unlabeled-share", type=float, default=0.5,
                        help="share of photo-only products (unlabeled/bestbuy-images)")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--idle-rate", type=float, default=2.0)
    parser.add_argument(
        "--load-fraction", type=float, default=0.7, help="steady rate under load, share of burst"
    )
    parser.add_argument("--steady-seconds", type=float, default=30)
    parser.add_argument("--model-dir", type=Path, default=Path("var/models"))
    parser.add_argument("--artifact", type=Path, default=CHAMPION, help="fusion artifact to serve")
    parser.add_argument("--out", type=Path, default=Path("var/bench/image_heavy.json"))
    args = parser.parse_args()

    model_dir = args.model_dir.resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    artifact = args.artifact.read_bytes()
    with zipfile.ZipFile(io.BytesIO(artifact)) as archive:
        meta = json.loads(archive.read("meta.json"))
    text_encoder, image_encoder = load_encoders(model_dir)
    exported = {"text": text_encoder.identity, "image": image_encoder.identity}
    del text_encoder, image_encoder
    if meta["encoders"] != exported:
        raise SystemExit(
            f"{args.artifact} was trained on encoders {meta['encoders']}, {model_dir} exports "
            f"{exported}: the worker would refuse it. Export the encoders it names."
        )

    labelled, unlabeled = photo_rows()
    rows = sample(labelled, unlabeled, args.n, args.unlabeled_share, "burst", 0)
    report: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "load_avg_at_start": os.getloadavg(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([".venv/bin/python", "benchmarks/image_heavy.py", *sys.argv[1:]]),
        "n": args.n,
        "rows": {
            "with_photo": len(rows),
            "photo_only_name_is_sku": sum(r["sku"].startswith("burst-ul-") for r in rows),
            "pool": {"bestbuy_with_photo": len(labelled), "unlabeled_photos": len(unlabeled)},
        },
        "worker": f"prefork -c {args.concurrency} --threads {args.threads}",
        "model": {
            "artifact": str(args.artifact),
            "labels": len(meta["labels"]),
            "encoders": meta["encoders"],
            "threshold": meta.get("threshold"),
        },
    }
    report["encoders_alone"] = encoders_alone(model_dir, rows, artifact)
    print("encoders alone:", report["encoders_alone"], flush=True)
    report["bare"] = bare(model_dir, rows, artifact)
    print("bare:", report["bare"], flush=True)

    with tempfile.TemporaryDirectory(prefix="shelver-image-heavy-") as tmp:
        postgres, broker = start_servers(Path(tmp))
        try:
            url, engine = bench_database(postgres, "shelver_image_heavy")
            register_champion(
                engine, artifact, f"image-heavy-{sha256_hex(artifact)[:8]}",
                threshold=meta.get("threshold", 0.5),
            )  # fmt: skip
            logs = args.out.parent / "image-heavy-logs"
            logs.mkdir(exist_ok=True)
            port = free_port()
            env = pipeline_env(url, broker.url(0), model_dir, SHELVER_BENCH_TAG=BENCH_TAG)
            with pipeline(env, "prefork", args.concurrency, args.threads, logs,
                          worker_args=["--metrics-port", str(port)]):  # fmt: skip
                insert(engine, sample(labelled, unlabeled, 5, 0.4, "warm", 99))
                wait_terminal(engine, timeout=180)

                before = stage_totals(port)
                started = time.perf_counter()
                insert(engine, rows)
                wait_terminal(engine)
                elapsed = time.perf_counter() - started
                report["burst"] = {
                    "rows": len(rows),
                    "seconds": round(elapsed, 1),
                    "rows_per_s": round(len(rows) / elapsed, 1),
                    **outcomes(engine, "burst-"),
                    "worker_stages": stage_delta(before, stage_totals(port), len(rows)),
                }
                report["ratio_to_bare"] = round(
                    report["burst"]["rows_per_s"] / report["bare"]["rows_per_s"], 2
                )
                report["memory_after_burst"] = pool_memory()
                print("burst:", report["burst"], "ratio", report["ratio_to_bare"], flush=True)

                count = max(1, int(args.idle_rate * args.steady_seconds))
                idle = sample(labelled, unlabeled, count, args.unlabeled_share, "idle", 1)
                report["idle"] = paced(engine, idle, args.idle_rate, "idle")
                print("idle:", report["idle"], flush=True)

                load_rate = round(report["burst"]["rows_per_s"] * args.load_fraction, 1)
                count = max(1, int(load_rate * args.steady_seconds))
                loaded = sample(labelled, unlabeled, count, args.unlabeled_share, "load", 2)
                before = stage_totals(port)
                report["loaded"] = paced(engine, loaded, load_rate, "load")
                report["loaded"]["worker_stages"] = stage_delta(
                    before, stage_totals(port), len(loaded)
                )
                print("loaded:", report["loaded"], flush=True)
                report["memory_end"] = pool_memory()
            engine.dispose()
        finally:
            broker.stop()
            postgres.stop()
    report["load_avg_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    print(summary(report))


def summary(r: dict) -> str:
    a, b = r["encoders_alone"], r["burst"]
    stages = b["worker_stages"]
    split = ", ".join(
        f"{name} {stages[name]['ms_per_product']}"
        for name in ("encode_text", "decode_image", "encode_image", "model", "write", "load")
        if name in stages
    )
    status = "; ".join(
        f"{kind}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
        for kind, counts in b["status"].items()
    )
    return "\n".join(
        [
            f"image-heavy, {r['n']} products all with a photo "
            f"({r['rows']['photo_only_name_is_sku']} photo-only), {r['worker']}, "
            f"load average {r['machine']['load_avg_at_start'][0]:.1f} at start, "
            f"{r['load_avg_at_end'][0]:.1f} at end",
            f"  text encoder alone    {a['text_encoder']['per_s']:>7} rows/s "
            f"(CPU {a['text_encoder']['cpu_ms_each']} ms/row)",
            f"  image decode alone    {a['image_decode']['per_s']:>7} images/s "
            f"(CPU {a['image_decode']['cpu_ms_each']} ms/image)",
            f"  image encoder alone   {a['image_encoder']['per_s']:>7} images/s "
            f"(CPU {a['image_encoder']['cpu_ms_each']} ms/image)",
            f"  fusion model alone    {a['fusion_model']['per_s']:>7} rows/s "
            f"(CPU {a['fusion_model']['cpu_ms_each']} ms/row)",
            f"  bare, one process     {r['bare']['rows_per_s']:>7} rows/s",
            f"  end to end, burst     {b['rows_per_s']:>7} rows/s ({r['ratio_to_bare']} of bare)",
            f"  worker ms per product (pool-process time): {split}",
            f"  text tokens: {a['text_padding']}",
            f"  confidence (bare): {a['confidence']}, threshold {a['threshold']:.2f}",
            f"  burst outcomes: {status}; photos not used {b['image_not_used']}",
            f"  latency idle ({r['idle']['rate_per_s']}/s): p50 {r['idle']['p50_ms']} ms, "
            f"p99 {r['idle']['p99_ms']} ms",
            f"  latency loaded ({r['loaded']['rate_per_s']}/s): p50 {r['loaded']['p50_ms']} ms, "
            f"p99 {r['loaded']['p99_ms']} ms",
            f"  worker PSS after burst: {r['memory_after_burst'].get('pss_total_mb')} MB",
        ]
    )


if __name__ == "__main__":
    main()
