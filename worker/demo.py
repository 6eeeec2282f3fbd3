"""``shelver demo``: the whole event path on this machine, from nothing to categorized products.

Each step is a function the CLI calls and reports on: bring up PostgreSQL and
Redis (embedded ones when no URLs are configured), migrate, make sure the
encoders exist, make sure a champion exists (the bundled default model, or one
trained on ``--data``), start a real dispatcher and worker, insert products
with plain SQL, and watch them being classified.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2

from shelver.catalog.embedded import create_database, embedded_services
from shelver.catalog.settings import Settings, libpq_url

DEMO_PRODUCTS = Path(__file__).resolve().parent / "demo_data" / "products.csv"
DEMO_SKU_PREFIX = "demo-"
TERMINAL = ("classified", "needs_review", "failed")


@contextlib.contextmanager
def services(settings: Settings) -> Iterator[tuple[str, str, bool]]:
    """(database URL, broker URL, embedded?) — the configured ones, or embedded servers."""
    if settings.database_url and settings.broker_url:
        yield libpq_url(settings.database_url), settings.broker_url, False
        return
    with embedded_services(Path(settings.data_dir).resolve() / "demo", fresh=True) as (
        server,
        broker,
    ):
        yield create_database(server, "shelver"), broker, True


def encoders_ready(model_dir: Path) -> bool:
    from shelver.worker.encoders import EncoderUnavailable, load_encoders

    try:
        load_encoders(model_dir)
    except EncoderUnavailable:
        return False
    return True


def process_env(database_url: str, broker_url: str, settings: Settings, image_root: Path | None):
    env = {
        **os.environ,
        "SHELVER_DATABASE_URL": database_url,
        "SHELVER_BROKER_URL": broker_url,
        "SHELVER_MODEL_DIR": str(Path(settings.model_dir).resolve()),
        "SHELVER_DATA_DIR": str(Path(settings.data_dir).resolve()),
    }
    if image_root is not None:
        env["SHELVER_IMAGE_ROOTS"] = f'["{image_root}"]'
    return env


@dataclass
class RunningProcesses:
    dispatcher: subprocess.Popen
    worker: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.dispatcher.poll() is None and self.worker.poll() is None


@contextlib.contextmanager
def event_path(env: dict[str, str], log_dir: Path) -> Iterator[RunningProcesses]:
    """A real ``shelver dispatch`` and ``shelver worker``; stopped (SIGTERM, then kill) on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "demo-processes.log"
    with open(log_path, "w") as log:
        command = [sys.executable, "-m", "shelver.worker"]
        dispatcher = subprocess.Popen(
            [*command, "dispatch"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        worker = subprocess.Popen(
            [*command, "worker", "-Q", "classify,backfill", "-c", "1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        running = RunningProcesses(dispatcher, worker, log_path)
        try:
            yield running
        finally:
            for process in (dispatcher, worker):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in (dispatcher, worker):
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def insert_demo_products(database_url: str, path: Path = DEMO_PRODUCTS) -> list[str]:
    """Insert the example products with a plain INSERT, as any other system would.

    Earlier demo rows (sku ``demo-*``) are deleted first, so every run shows
    the whole path: the trigger queues them, the dispatcher sends them, the
    worker writes the results.
    """
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(r["id"], r["name"], r["description"]) for r in csv.DictReader(f)]
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("DELETE FROM products WHERE sku LIKE %s", (DEMO_SKU_PREFIX + "%",))
            cur.executemany(
                "INSERT INTO products (sku, name, description) VALUES (%s, %s, %s)", rows
            )
    finally:
        conn.close()
    return [sku for sku, _, _ in rows]


@dataclass(frozen=True)
class ProductView:
    sku: str
    name: str
    status: str
    category: str | None
    confidence: float | None
    error: str | None


def snapshot(database_url: str, skus: list[str]) -> list[ProductView]:
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                """
                SELECT p.sku, p.name, p.status, c.name, p.confidence, p.error
                FROM products p LEFT JOIN categories c ON c.id = p.predicted_id
                WHERE p.sku = ANY(%s) ORDER BY p.sku
                """,
                (skus,),
            )
            return [ProductView(*row) for row in cur.fetchall()]
    finally:
        conn.close()


def queue_depth(database_url: str) -> tuple[int, dict[str, int]]:
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM classification_queue")
            depth = cur.fetchone()[0]
            cur.execute("SELECT status, count(*) FROM products GROUP BY status")
            return depth, dict(cur.fetchall())
    finally:
        conn.close()


def wait_until(predicate, timeout_s: float, interval_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
