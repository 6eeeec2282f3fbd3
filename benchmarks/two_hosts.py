"""Throughput of workers on one host against workers on two hosts, on the same rows.

The hosts are network namespaces on a private bridge (tests/netns.py, the setup
tests/test_two_hosts.py uses): PostgreSQL, Valkey, the dispatcher and an HTTP
server for the images on the services host; each worker host has its own copy of
the encoders and fetches every photo over HTTP. For each configuration
``HOSTSxCONCURRENCY`` the catalog is recreated, the same N products are inserted
in one statement, and the time until the queue is empty gives rows/s; the CPU
time the worker processes spent meanwhile gives CPU ms per product.

All hosts share this machine's CPUs: on a 2-core machine "1x2" and "2x1" run the
same two pool processes on the same two cores, so the comparison shows what
splitting workers over hosts costs or adds (network hops, two Celery nodes, one
dispatcher feeding both), not what a second machine's cores would add. Needs root.

    sudo .venv/bin/python benchmarks/two_hosts.py --n 600 --rounds 2 --configs 1x1 1x2 2x1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import redis
from sqlalchemy import Engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import DATA, REPO, insert, products, wait_terminal  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))

from netns import (  # noqa: E402
    Network,
    Services,
    catalog_engine,
    own_model_dir,
    private_network,
    start_services,
    wait_until,
    worker_env,
)
from support import centroid_artifact, register_champion, training_titles  # noqa: E402

from shelver.worker.encoders import load_encoders  # noqa: E402

SHELVER = [sys.executable, "-m", "shelver.worker"]


def served(rows: list[dict], services: Services) -> list[dict]:
    """The rows with their photos addressed on the services host's image server."""
    return [
        {
            **r,
            "image_uri": f"{services.image_base_url}/{r['image_uri']}" if r["image_uri"] else None,
        }
        for r in rows
    ]


def run_config(
    network: Network,
    services: Services,
    spec: str,
    rows: list[dict],
    artifact: bytes,
    encoder_dir: Path,
    root: Path,
) -> dict:
    hosts, concurrency = (int(x) for x in spec.split("x"))
    engine = catalog_engine(network, services, recreate=True)
    network.services.call(lambda: redis.Redis.from_url(services.broker_url).flushdb())
    register_champion(engine, artifact, "two-hosts-bench")
    logs = root / spec
    logs.mkdir(parents=True, exist_ok=True)
    started_procs = [
        network.services.spawn(
            [*SHELVER, "dispatch"],
            worker_env(services, logs / "dispatch-models", logs),
            logs / "dispatch.log",
        )
    ]
    workers = network.workers[:hosts]
    for i, host in enumerate(workers, start=1):
        host_dir = root / f"host{i}"
        host_dir.mkdir(exist_ok=True)
        started_procs.append(
            host.spawn(
                [*SHELVER, "worker", "-c", str(concurrency), "--threads", "1", "-n", f"host{i}@%h"],
                worker_env(
                    services,
                    own_model_dir(encoder_dir, host_dir),
                    host_dir,
                    SHELVER_MODEL_POLL_SECONDS="1",
                ),
                logs / f"worker{i}.log",
                cwd=host_dir,
            )  # fmt: skip
        )
    try:
        wait_until(
            lambda: all(" ready." in (logs / f"worker{i}.log").read_text()
                        for i in range(1, hosts + 1)),
            300,
            f"{hosts} worker host(s) to start (logs in {logs})",
        )  # fmt: skip
        # Warm-up: every pool process loads its encoders and the champion.
        insert(engine, served(products(4 * hosts * concurrency, offset=99), services))
        wait_terminal(engine, timeout=300)
        trees = [psutil.Process(p.pid) for p in started_procs[1:]]
        cpu_before = cpu_seconds(trees)
        started = time.perf_counter()
        insert(engine, rows)
        wait_terminal(engine)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(trees) - cpu_before
        done = terminal(engine, [r["sku"] for r in rows])
    finally:
        for host in [network.services, *workers]:
            host.stop(only=started_procs)
        engine.dispose()
    return {
        "hosts": hosts,
        "concurrency_per_host": concurrency,
        "rows": len(rows),
        "terminal": done,
        "seconds": round(elapsed, 1),
        "rows_per_s": round(len(rows) / elapsed, 1),
        "worker_cpu_s": round(cpu, 1),
        "worker_cpu_ms_per_row": round(1000 * cpu / len(rows), 1),
    }


def cpu_seconds(roots: list[psutil.Process]) -> float:
    """User + system CPU of these processes and all their descendants (the workers' trees)."""
    total = 0.0
    for root in roots:
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
    return total


def terminal(engine: Engine, skus: list[str]) -> int:
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT count(*) FROM products WHERE sku = ANY(:skus) "
                "AND status IN ('classified', 'needs_review', 'failed')"
            ),
            {"skus": skus},
        ).scalar_one()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=600, help="products per configuration")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["1x1", "1x2", "2x1"],
        help="HOSTSxCONCURRENCY: worker hosts and pool processes on each",
    )
    parser.add_argument("--rounds", type=int, default=2, help="times each configuration runs")
    parser.add_argument("--model-dir", type=Path, default=Path("var/models"))
    parser.add_argument("--out", type=Path, default=Path("var/bench/two_hosts.json"))
    args = parser.parse_args()

    encoder_dir = args.model_dir.resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    artifact = centroid_artifact(*load_encoders(encoder_dir), training_titles(DATA))
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "n": args.n,
    }
    workers = max(int(spec.split("x")[0]) for spec in args.configs)
    with (
        tempfile.TemporaryDirectory(prefix="shelver-two-hosts-") as tmp,
        private_network(workers=workers, bound_s=3600) as network,
    ):
        root = Path(tmp)
        services = start_services(network, root / "services", DATA)
        rows = served(products(args.n), services)
        report["with_photo"] = sum(1 for r in rows if r["image_uri"])
        # Rounds interleave the configurations, so a neighbour's load on this
        # machine falls on all of them alike.
        for spec in args.configs:
            report[spec] = []
        for _ in range(args.rounds):
            for spec in args.configs:
                result = run_config(network, services, spec, rows, artifact, encoder_dir, root)
                report[spec].append(result)
                print(spec, result, flush=True)
        report["best_rows_per_s"] = {
            spec: max(r["rows_per_s"] for r in report[spec]) for spec in args.configs
        }
    report["load_avg_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
