"""Chaos on the event path: real dispatcher and worker processes while their servers misbehave.

Each test runs `shelver dispatch` and `shelver worker` as subprocesses against a
PostgreSQL and a Valkey (Redis protocol) started for this module alone, so
stopping and restarting them is safe on a shared machine and in CI. Workers are
SIGKILLed, the broker is stopped for a minute during ingest, PostgreSQL restarts
mid-run, a dispatcher dies, and a batch is delivered twice. After each, every
product must be terminal, none lost, none with duplicate prediction history,
and nothing left in the queue.

The helpers here (``Stack``, ``Procs``, ``sample_products``, ``assert_all_done``)
are reused by the bad-input and security tests.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from sqlalchemy import Engine, create_engine, text
from support import centroid_artifact, empty_catalog, insert, scalar, training_titles

from shelver.catalog.embedded import EmbeddedPostgres, EmbeddedRedis, create_database
from shelver.catalog.migrate import upgrade
from shelver.catalog.settings import sqlalchemy_url
from shelver.worker.encoders import load_encoders

pytestmark = pytest.mark.slow

SHELVER = [sys.executable, "-m", "shelver.worker"]
TERMINAL = ("classified", "needs_review", "failed")
# Long enough to matter: the dispatcher's send retries and the worker's reconnect
# back-off both run out several times over.
BROKER_OUTAGE_S = 60.0
# Short, so work held by a killed process comes back within the test; long enough
# that a batch waiting in the broker behind MAX_INFLIGHT others never outlives it.
LEASE_S = 15
MAX_INFLIGHT = 3


# --- servers of our own -------------------------------------------------------------------------


@dataclass
class Stack:
    """An embedded PostgreSQL and Valkey that only this test module uses, so it may stop them."""

    root: Path
    postgres: EmbeddedPostgres = field(init=False)
    broker: EmbeddedRedis = field(init=False)
    database_url: str = ""
    engine: Engine | None = None

    def start(self) -> Stack:
        self.postgres = EmbeddedPostgres(self.root / "postgres")
        self.postgres.start()
        self.broker = EmbeddedRedis(self.root / "valkey")
        self.broker.start()
        self.database_url = create_database(self.postgres.url(), "shelver_chaos", recreate=True)
        upgrade(self.database_url)
        self.engine = create_engine(sqlalchemy_url(self.database_url), pool_pre_ping=True)
        return self

    @property
    def broker_url(self) -> str:
        return self.broker.url(0)

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
        with contextlib.suppress(Exception):
            self.broker.stop()
        self.postgres.stop()

    def reset(self) -> None:
        """Empty every table and the broker, so each test starts from nothing."""
        import redis

        empty_catalog(self.engine)
        redis.Redis.from_url(self.broker_url).flushall()

    def stop_broker(self) -> None:
        self.broker.stop()

    def start_broker(self) -> None:
        # Same port: clients reconnect to the address they were configured with.
        self.broker.start()
        wait_until(lambda: _port_open(self.broker.port), 10, "the broker to come back")

    def restart_postgres(self, down_s: float) -> None:
        self.postgres.stop()
        time.sleep(down_s)
        self.postgres.start()
        self.engine.dispose()


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- processes ----------------------------------------------------------------------------------


class Procs:
    """Shelver subprocesses of one test, each in its own session, logs under ``logs``."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        out = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [*SHELVER, *args],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        self.started.append(proc)
        return proc

    def dispatcher(self, name: str = "dispatch") -> subprocess.Popen:
        return self.start(name, "dispatch", "--max-inflight-batches", str(MAX_INFLIGHT))

    def worker(self, name: str = "worker", concurrency: int = 1) -> subprocess.Popen:
        return self.start(name, "worker", "-Q", "classify,backfill", "-c", str(concurrency))

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.started:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def tails(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text(errors="replace")[-4000:]
            for p in sorted(self.logs.glob("*.log"))
        )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything it forked: no warning, no cleanup."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def pool_children(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def kill_pool_child(proc: subprocess.Popen) -> int:
    """SIGKILL one prefork pool process (as the OOM killer would); its parent stays up."""
    wait_until(lambda: bool(pool_children(proc)), 60, "a pool process")
    child = pool_children(proc)[0]
    child.send_signal(signal.SIGKILL)
    return child.pid


# --- data and checks ----------------------------------------------------------------------------


def sample_products(fixture_data: Path, n: int, prefix: str) -> list[dict]:
    """PriceRunner titles, with one Best Buy product with its photo in every ten.

    The fixture rows are reused as often as ``n`` needs, each time under a new sku.
    """
    with (fixture_data / "pricerunner" / "products.csv").open(newline="", encoding="utf-8") as fh:
        titles = list(csv.DictReader(fh))
    with (fixture_data / "bestbuy" / "products.csv").open(newline="", encoding="utf-8") as fh:
        photos = [r for r in csv.DictReader(fh) if r["image"]]
    rows = []
    for i in range(n):
        if i % 10 == 0:
            r = photos[(i // 10) % len(photos)]
            image = f"bestbuy/{r['image']}"
        else:
            r, image = titles[i % len(titles)], None
        rows.append(
            {
                "sku": f"{prefix}-{i}",
                "name": r["name"],
                "description": r["description"],
                "image_uri": image,
            }
        )
    return rows


def terminal_count(engine: Engine) -> int:
    return scalar(engine, "SELECT count(*) FROM products WHERE status = ANY(:s)", s=list(TERMINAL))


def drained(engine: Engine) -> bool:
    return (
        scalar(
            engine,
            "SELECT (SELECT count(*) FROM classification_queue)"
            " + (SELECT count(*) FROM products WHERE status = 'pending')",
        )
        == 0
    )


def assert_all_done(engine: Engine, expected: int, *, may_fail: int = 0) -> None:
    """Every product terminal and none lost, one history row each, an empty queue."""
    with engine.connect() as conn:
        statuses = dict(
            conn.execute(text("SELECT status, count(*) FROM products GROUP BY 1")).all()
        )
        history, distinct, scored = conn.execute(
            text(
                "SELECT count(*), count(DISTINCT (product_id, model_version_id, content_hash)),"
                " (SELECT count(*) FROM products WHERE status <> 'failed')"
                " FROM predictions"
            )
        ).one()
        queued = conn.execute(text("SELECT count(*) FROM classification_queue")).scalar_one()
        unscored = conn.execute(
            text(
                "SELECT count(*) FROM products p WHERE p.status <> 'failed' AND NOT EXISTS "
                "(SELECT 1 FROM predictions h WHERE h.product_id = p.id "
                " AND h.content_hash = p.content_hash AND h.model_version_id = p.model_version_id)"
            )
        ).scalar_one()
    assert sum(statuses.values()) == expected, f"products lost or added: {statuses}"
    assert statuses.get("pending", 0) == 0, f"stuck pending: {statuses}"
    assert statuses.get("failed", 0) <= may_fail, f"unexpected failures: {statuses}"
    assert queued == 0, f"{queued} rows left in the queue"
    # One content, one model: exactly one history row per scored product.
    assert history == distinct == scored, (history, distinct, scored)
    assert unscored == 0


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(encoder_dir: Path, fixture_data: Path) -> bytes:
    return centroid_artifact(*load_encoders(encoder_dir), training_titles(fixture_data))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    own = Stack(tmp_path_factory.mktemp("chaos-servers")).start()
    try:
        yield own
    finally:
        own.stop()


def stack_env(stack: Stack, encoder_dir: Path, fixture_data: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SHELVER_DATABASE_URL": stack.database_url,
        "SHELVER_BROKER_URL": stack.broker_url,
        "SHELVER_MODEL_DIR": str(encoder_dir),
        "SHELVER_IMAGE_ROOTS": json.dumps([str(fixture_data)]),
        "SHELVER_MODEL_POLL_SECONDS": "1",
        "SHELVER_POLL_SECONDS": "1",
        "SHELVER_LEASE_SECONDS": str(LEASE_S),
        "SHELVER_RETRY_BACKOFF_S": "0.5",
        "SHELVER_BATCH_SIZE": "16",
    }


@pytest.fixture
def procs(
    stack: Stack, encoder_dir: Path, fixture_data: Path, artifact: bytes, tmp_path: Path
) -> Iterator[Procs]:
    from support import register_champion

    stack.reset()
    register_champion(stack.engine, artifact, "chaos-1")
    running = Procs(stack_env(stack, encoder_dir, fixture_data), tmp_path)
    try:
        yield running
    finally:
        running.stop_all()


def wait_drained(stack: Stack, procs: Procs, timeout: float, what: str) -> None:
    try:
        wait_until(lambda: drained(stack.engine), timeout, what)
    except TimeoutError as exc:
        with stack.engine.connect() as conn:
            state = conn.execute(
                text(
                    "SELECT count(*), count(claimed_at), max(attempts), min(not_before), "
                    "max(last_error) FROM classification_queue"
                )
            ).one()
        pytest.fail(f"{exc}; queue (rows, claimed, max attempts, ...) = {state}\n{procs.tails()}")


# --- the tests ----------------------------------------------------------------------------------


def test_worker_sigkilled_three_times_during_an_ingest_of_500_loses_no_product(
    stack: Stack, procs: Procs, fixture_data: Path
) -> None:
    engine = stack.engine
    procs.dispatcher()
    first = procs.worker("worker-1")
    insert(engine, sample_products(fixture_data, 500, "kill"))

    def progress_beyond(done: int) -> Callable[[], bool]:
        return lambda: terminal_count(engine) >= done + 30

    # 1: the OOM killer takes the pool process mid-batch; Celery's parent forks a new one.
    wait_until(progress_beyond(0), 120, "the first results")
    kill_pool_child(first)
    # 2: the whole worker, parent and pool, dies without a word.
    wait_until(progress_beyond(terminal_count(engine)), 120, "results after the first kill")
    kill_group(first)
    second = procs.worker("worker-2")
    # 3: the new worker's pool process, again mid-batch.
    wait_until(progress_beyond(terminal_count(engine)), 120, "results from the second worker")
    kill_pool_child(second)
    assert terminal_count(engine) < 500, "everything finished before the last kill"

    wait_drained(stack, procs, 240, "the queue to drain after three kills")
    assert second.poll() is None, "the surviving worker died"
    assert_all_done(engine, 500)


def test_broker_down_for_a_minute_during_ingest_loses_nothing(
    stack: Stack, procs: Procs, fixture_data: Path
) -> None:
    engine = stack.engine
    dispatcher, worker = procs.dispatcher(), procs.worker()
    rows = sample_products(fixture_data, 400, "outage")
    insert(engine, rows[:100])
    wait_until(lambda: terminal_count(engine) >= 20, 120, "the first results")

    stack.stop_broker()
    down_at = time.monotonic()
    # Inserts do not need the broker: the trigger queues them in PostgreSQL.
    for start in range(100, 400, 50):
        insert(engine, rows[start : start + 50])
        time.sleep(BROKER_OUTAGE_S / 8)
    time.sleep(max(0.0, BROKER_OUTAGE_S - (time.monotonic() - down_at)))
    assert scalar(engine, "SELECT count(*) FROM products") == 400
    assert scalar(engine, "SELECT count(*) FROM products WHERE status = 'pending'") > 0
    stack.start_broker()

    wait_drained(stack, procs, 240, "the queue to drain after the broker came back")
    assert dispatcher.poll() is None and worker.poll() is None, "a process died in the outage"
    assert_all_done(engine, 400)


def test_postgres_restart_mid_run_loses_nothing(
    stack: Stack, procs: Procs, fixture_data: Path
) -> None:
    engine = stack.engine
    dispatcher, worker = procs.dispatcher(), procs.worker()
    insert(engine, sample_products(fixture_data, 500, "pg"))
    wait_until(lambda: terminal_count(engine) >= 40, 120, "the first results")

    stack.restart_postgres(down_s=5)
    assert terminal_count(engine) < 500, "everything finished before the restart"

    wait_drained(stack, procs, 240, "the queue to drain after the restart")
    assert dispatcher.poll() is None and worker.poll() is None, "a process died in the restart"
    assert_all_done(engine, 500)
    # The worker still classifies new rows on fresh connections.
    insert(engine, sample_products(fixture_data, 5, "pg-after"))
    wait_drained(stack, procs, 60, "rows inserted after the restart")
    assert_all_done(engine, 505)


def test_killed_dispatcher_is_replaced_and_its_claims_come_back(
    stack: Stack, procs: Procs, fixture_data: Path
) -> None:
    engine = stack.engine
    first = procs.dispatcher("dispatch-1")
    worker = procs.worker()
    insert(engine, sample_products(fixture_data, 500, "disp"))

    def claimed() -> int:
        return scalar(
            engine, "SELECT count(*) FROM classification_queue WHERE claimed_at IS NOT NULL"
        )

    # Killed while it holds claims: rows it sent, or claimed and had yet to send.
    wait_until(
        lambda: terminal_count(engine) >= 40 and claimed() > 0, 120, "results and live claims"
    )
    kill_group(first)
    procs.dispatcher("dispatch-2")

    wait_drained(stack, procs, 240, "the replacement dispatcher to finish")
    assert worker.poll() is None
    assert_all_done(engine, 500)


def test_the_same_batch_delivered_twice_writes_one_history_row_per_product(
    stack: Stack, procs: Procs, fixture_data: Path
) -> None:
    import celery
    from kombu import Exchange, Queue

    from shelver.catalog.queue import claim_batch
    from shelver.worker.celery_app import CLASSIFY_QUEUE, CLASSIFY_TASK, QUEUES

    engine = stack.engine
    # Two pool processes, so the two copies run at the same time and meet at the row locks.
    worker = procs.worker(concurrency=2)
    insert(engine, sample_products(fixture_data, 48, "dup"))
    with engine.begin() as conn:
        ids = [c.product_id for c in claim_batch(conn, limit=48, lease_seconds=300, max_attempts=5)]
    assert len(ids) == 48

    sender = celery.Celery("chaos-sender", broker=stack.broker_url)
    sender.conf.task_queues = [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES]
    for task_id in ("dup-a", "dup-a", "dup-b"):
        # The same message twice (a redelivery) and the same batch under another id.
        sender.send_task(
            CLASSIFY_TASK, kwargs={"product_ids": ids}, queue=CLASSIFY_QUEUE, task_id=task_id
        )

    log = procs.logs / "worker.log"
    wait_until(
        # ShelverTask's own line, lower-case "task", once per finished run.
        lambda: log.read_text(errors="replace").count("task shelver.classify_batch[dup-") >= 3,
        180,
        "three deliveries to run",
    )
    assert log.read_text().count("] ok in") >= 3, procs.tails()
    wait_drained(stack, procs, 30, "the queue to drain")
    assert worker.poll() is None
    assert_all_done(engine, 48)
    assert scalar(engine, "SELECT count(*) FROM predictions") == 48
