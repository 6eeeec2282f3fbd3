"""``shelver demo``: the whole event path on this machine, from nothing to categorized products.

``run_demo`` brings up PostgreSQL and Redis (embedded ones when no URLs are
configured), migrates, makes sure the encoders exist, makes sure a champion
exists (the bundled default model, or one trained on ``--data``), starts a real
dispatcher and worker, inserts products with plain SQL, and watches them being
classified. It tells a ``DemoObserver`` what happens; the CLI's observer prints.

With the bundled model the demo also loads a small taxonomy (a cut of Best Buy's 2016
category tree, ``demo_data/README.md``) and turns on ``SHELVER_ZERO_LABEL_MERGE`` for
its own worker: the tree has two top-level categories the bundled model never learned
("Wearable Technology", "Best Buy Gift Cards"), and the demo's products of those get
the taxonomy node as a suggestion and wait for review, where the model alone would
name a category it knows (a smartwatch auto-accepted as "Cell Phones").
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psycopg2
from sqlalchemy import Engine

from shelver.catalog import queue
from shelver.catalog.categories import SEPARATOR
from shelver.catalog.db import engine_for
from shelver.catalog.embedded import create_database, embedded_services
from shelver.catalog.importer import import_file
from shelver.catalog.settings import Settings, libpq_url, sqlalchemy_url
from shelver.worker.errors import EncoderUnavailable

if TYPE_CHECKING:
    from shelver.training.pipeline import TrainOutcome
    from shelver.web.demo import DemoSite

DEMO_PRODUCTS = Path(__file__).resolve().parent / "demo_data" / "products.csv"
DEMO_TAXONOMY = Path(__file__).resolve().parent / "demo_data" / "bestbuy-categories-2016-demo.json"
DEMO_SKU_PREFIX = "demo-"
TERMINAL = ("classified", "needs_review", "failed")


class DemoError(RuntimeError):
    """The demo could not finish; the message says where to look."""


class DemoObserver(Protocol):
    """What the demo reports while it runs; each call returns at once."""

    def step(self, message: str) -> None:
        """A numbered step is done."""

    def note(self, message: str) -> None:
        """A detail of the step under way."""

    def trained(self, outcome: TrainOutcome) -> None:
        """``--data``: the model trained on it, now the champion."""

    def classifying(self, done: int, total: int) -> None:
        """``--data``: imported rows that left the queue, at each poll."""

    def products(self, rows: list[ProductView]) -> None:
        """The demo products as they are now, at each poll."""


@dataclass(frozen=True)
class DemoOutcome:
    finished: bool  # every watched product reached a terminal status in time
    by_status: dict[str, int]  # the watched products: the demo's own, or all with ``--data``
    log_path: Path
    # The demo's own products waiting for review with a suggested category the champion
    # was never trained on (a taxonomy node); None with ``--data`` (no taxonomy loaded).
    taxonomy_suggestions: int | None = None


def run_demo(
    settings: Settings,
    observer: DemoObserver,
    data: Path | None = None,
    timeout_s: float = 300.0,
    *,
    serve_until_interrupted: bool = False,
) -> DemoOutcome:
    """The whole event path, from services to classified products; everything started is stopped.

    With ``data`` (a labeled CSV) its rows are imported, a model is trained on them and made
    champion, and the demo waits for them; otherwise the bundled default model classifies the
    demo products, inserted with plain SQL. The web application runs beside them; with
    ``serve_until_interrupted`` it stays up after the products are done, until Ctrl-C.
    """
    if data is not None and not data.exists():
        raise DemoError(f"{data}: no such file")
    with services(settings) as (database_url, broker_url, embedded):
        where = "embedded, stopped when the demo ends" if embedded else "from your settings"
        observer.step(f"PostgreSQL and Redis are up ({where})")
        prepare_catalog(settings, observer, database_url)
        engine = engine_for(sqlalchemy_url(database_url))
        image_root = data.resolve().parent if data is not None else None
        merge = data is None
        suggested: int | None = None
        if data is not None:
            train_on(engine, settings, observer, data, database_url)
        else:
            # The bundle's artifact is checked with onnxruntime, from the worker extra.
            from shelver.training.bundle import register_bundled

            record = register_bundled(engine)
            observer.step(
                f"champion: {record.version} (the bundled default model)"
                if record
                else "the catalog already has a champion; using it"
            )
            load_demo_taxonomy(engine, observer)
        env = process_env(database_url, broker_url, settings, image_root, zero_label_merge=merge)
        with (
            event_path(env, Path(settings.data_dir)) as running,
            web_app(engine, env, Path(settings.data_dir), observer) as site,
        ):
            observer.step("dispatcher and worker started")
            if data is not None:
                finished, by_status = _watch_queue(database_url, running, observer, timeout_s)
            else:
                skus = insert_demo_products(database_url)
                observer.step(f"inserted {len(skus)} products with plain SQL")
                finished, by_status = _watch_products(
                    database_url, skus, running, observer, timeout_s
                )
                suggested = taxonomy_suggestions(engine, snapshot(database_url, skus))
            if site is not None and serve_until_interrupted:
                observer.step(f"the web application stays up at {site.url}; Ctrl-C stops the demo")
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        time.sleep(3600)
    return DemoOutcome(finished, by_status, running.log_path, suggested)


def load_demo_taxonomy(engine: Engine, observer: DemoObserver, path: Path = DEMO_TAXONOMY) -> None:
    """Import the demo's taxonomy and say how much of it the champion never learned."""
    from shelver.catalog.taxonomy import import_taxonomy
    from shelver.worker.zero_label import category_paths

    report = import_taxonomy(engine, path)
    with engine.connect() as conn:
        paths = category_paths(conn)
    unseen = unlearned_paths(engine, paths)
    roots = sorted(p for p in unseen if SEPARATOR not in p)
    observer.step(
        f"taxonomy loaded: {report.nodes} categories of Best Buy's 2016 tree ({report.added} new); "
        f"{len(unseen)} the champion never learned, under {', '.join(roots) or 'none'}"
    )
    observer.note(
        "the worker also suggests those from their names (SHELVER_ZERO_LABEL_MERGE=1 for the "
        "demo's worker); such suggestions always wait for review"
    )


def unlearned_paths(engine: Engine, paths: list[str]) -> set[str]:
    """Those of ``paths`` the champion cannot answer even coarsely (``zero_label``)."""
    from shelver.training import registry
    from shelver.worker.zero_label import unlabeled_categories

    with engine.connect() as conn:
        champion = registry.champion(conn)
    if champion is None:
        return set(paths)
    return {paths[k] for k in unlabeled_categories(champion.labels, paths)}


def taxonomy_suggestions(engine: Engine, rows: list[ProductView]) -> int:
    """Products waiting for review whose suggestion is a category the champion never learned."""
    waiting = [r.category for r in rows if r.status == "needs_review" and r.category]
    unseen = unlearned_paths(engine, sorted(set(waiting)))
    return sum(1 for category in waiting if category in unseen)


def prepare_catalog(settings: Settings, observer: DemoObserver, database_url: str) -> None:
    """Migrate the schema and export the encoders when they are missing."""
    # Alembic is imported here, not with the CLI that lists this command.
    from shelver.catalog.migrate import upgrade

    upgrade(database_url)
    observer.step("catalog schema migrated (tables, trigger, queue)")
    if not encoders_ready(settings.model_dir):
        observer.note("exporting the encoders to ONNX, once (about a minute)")
        from shelver.training.encoder_export import export_encoders

        export_encoders(settings.model_dir)
    observer.step(f"encoders ready in {settings.model_dir}")


def train_on(
    engine: Engine, settings: Settings, observer: DemoObserver, data: Path, database_url: str
) -> None:
    """Import ``data`` and make a model trained on it the champion, whatever the gate says."""
    # TensorFlow comes with the train extra and takes seconds to import.
    from shelver.training.pipeline import train_and_register

    report = import_file(engine, data, progress=True)
    observer.note(f"imported {report.inserted + report.updated} rows from {data}")
    run_settings = settings.model_copy(
        update={"database_url": database_url, "image_roots": [data.resolve().parent]}
    )
    outcome = train_and_register(engine, run_settings, promote="force")
    observer.step(f"trained {outcome.model.version} on {data}; champion")
    observer.trained(outcome)


def _watch_queue(
    database_url: str, running: RunningProcesses, observer: DemoObserver, timeout_s: float
) -> tuple[bool, dict[str, int]]:
    total, _ = queue_depth(database_url)

    def drained() -> bool:
        depth, _ = queue_depth(database_url)
        observer.classifying(total - depth, total)
        running.check()
        return depth == 0

    finished = wait_until(drained, timeout_s)
    return finished, queue_depth(database_url)[1]


def _watch_products(
    database_url: str,
    skus: list[str],
    running: RunningProcesses,
    observer: DemoObserver,
    timeout_s: float,
) -> tuple[bool, dict[str, int]]:
    def all_terminal() -> bool:
        rows = snapshot(database_url, skus)
        observer.products(rows)
        running.check()
        return all(r.status in TERMINAL for r in rows)

    finished = wait_until(all_terminal, timeout_s)
    return finished, dict(Counter(r.status for r in snapshot(database_url, skus)))


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


@contextlib.contextmanager
def web_app(
    engine: Engine, env: dict[str, str], log_dir: Path, observer: DemoObserver
) -> Iterator[DemoSite | None]:
    """``shelver serve`` beside the event path, when the [web] extra is installed."""
    try:
        from shelver.web.demo import DemoWebError, demo_site
    except ImportError as exc:
        observer.note(f"web application not started: the [web] extra is missing ({exc.name})")
        yield None
        return
    try:
        with demo_site(engine, env, log_dir / "demo-web.log") as site:
            observer.step(
                f"web application at {site.url} (sign in as {site.user} / {site.password})"
            )
            yield site
    except DemoWebError as exc:
        raise DemoError(str(exc)) from exc


def encoders_ready(model_dir: Path) -> bool:
    from shelver.worker.encoders import load_encoders

    try:
        load_encoders(model_dir)
    except EncoderUnavailable:
        return False
    return True


def process_env(
    database_url: str,
    broker_url: str,
    settings: Settings,
    image_root: Path | None,
    *,
    zero_label_merge: bool = False,
):
    env = {
        **os.environ,
        "SHELVER_DATABASE_URL": database_url,
        "SHELVER_BROKER_URL": broker_url,
        "SHELVER_MODEL_DIR": str(Path(settings.model_dir).resolve()),
        "SHELVER_DATA_DIR": str(Path(settings.data_dir).resolve()),
    }
    if image_root is not None:
        env["SHELVER_IMAGE_ROOTS"] = f'["{image_root}"]'
    if zero_label_merge:
        env["SHELVER_ZERO_LABEL_MERGE"] = "1"
    return env


@dataclass
class RunningProcesses:
    dispatcher: subprocess.Popen
    worker: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.dispatcher.poll() is None and self.worker.poll() is None

    def check(self) -> None:
        """Raise DemoError when the dispatcher or the worker has exited."""
        if not self.alive():
            raise DemoError(f"a demo process died; see {self.log_path}")


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
                SELECT p.sku, p.name, p.status, c.path, p.confidence, p.error
                FROM products p LEFT JOIN categories c ON c.id = p.predicted_id
                WHERE p.sku = ANY(%s) ORDER BY p.sku
                """,
                (skus,),
            )
            return [ProductView(*row) for row in cur.fetchall()]
    finally:
        conn.close()


def queue_depth(database_url: str) -> tuple[int, dict[str, int]]:
    with engine_for(sqlalchemy_url(database_url)).connect() as db:
        depth = queue.stats(db).depth
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
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
