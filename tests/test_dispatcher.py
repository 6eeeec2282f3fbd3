"""The dispatcher: claims, micro-batches, lanes, back-pressure, broker failure and shutdown.

Messages go through the real Celery app to a real Redis; the tests read them back
from the broker's lists to see exactly what a worker would receive.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from sqlalchemy import Engine, text

from shelver.catalog.queue import enqueue
from shelver.worker.celery_app import CLASSIFY_TASK, create_app
from shelver.worker.dispatcher import DispatchConfig, Dispatcher, celery_sender


def sent_batches(broker_url: str, queue: str) -> list[list[int]]:
    """Product ids of every classify message waiting in ``queue``, oldest first."""
    client = redis.Redis.from_url(broker_url)
    batches = []
    # kombu LPUSHes, so the oldest message is at the right end.
    for raw in reversed(client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        assert message["headers"]["task"] == CLASSIFY_TASK
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        batches.append(kwargs["product_ids"])
    return batches


def insert_products(engine: Engine, n: int, *, transactions: int = 1) -> list[int]:
    ids: list[int] = []
    per = -(-n // transactions)
    for start in range(0, n, per):
        with engine.begin() as conn:
            ids += (
                conn.execute(
                    text(
                        "INSERT INTO products (sku, name) "
                        "SELECT 'sku-' || g, 'product ' || g FROM generate_series(:a, :b) g "
                        "RETURNING id"
                    ),
                    {"a": start, "b": min(n, start + per) - 1},
                )
                .scalars()
                .all()
            )
    return ids


def config(**overrides: object) -> DispatchConfig:
    values = {"batch_size": 10, "batch_wait_s": 0.2, "poll_seconds": 0.5, "lease_seconds": 300}
    return DispatchConfig(**{**values, **overrides})


@contextmanager
def dispatching(engine: Engine, cfg: DispatchConfig, send=None) -> Iterator[Dispatcher]:  # noqa: ANN001
    stop = threading.Event()
    dispatcher = Dispatcher(engine, send or celery_sender(), cfg, stop)
    thread = threading.Thread(target=dispatcher.run, daemon=True)
    thread.start()
    try:
        yield dispatcher
    finally:
        stop.set()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the dispatcher did not stop when asked"


def wait_until(check, timeout: float = 15) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def unclaimed(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT count(*) FROM classification_queue WHERE claimed_at IS NULL")
        ).scalar_one()


def test_inserted_products_are_sent_once_in_batches_of_the_configured_size(
    engine: Engine, broker_url: str
) -> None:
    ids = insert_products(engine, 35)
    with dispatching(engine, config()):
        wait_until(lambda: sum(map(len, sent_batches(broker_url, "classify"))) == 35)
    batches = sent_batches(broker_url, "classify")
    assert sorted(len(b) for b in batches) == [5, 10, 10, 10]
    assert sorted(i for b in batches for i in b) == sorted(ids)
    assert sent_batches(broker_url, "backfill") == []


def test_a_notification_wakes_the_dispatcher_long_before_the_poll(
    engine: Engine, broker_url: str
) -> None:
    with dispatching(engine, config(poll_seconds=60)):
        time.sleep(0.5)  # let it LISTEN and go idle
        started = time.monotonic()
        insert_products(engine, 1)
        wait_until(lambda: sent_batches(broker_url, "classify"), timeout=5)
        latency = time.monotonic() - started
    # The batch wait (0.2 s) is the only deliberate delay.
    assert latency < 2


def test_two_dispatchers_never_send_the_same_product(engine: Engine, broker_url: str) -> None:
    cfg = config(batch_size=7, max_inflight_batches=1000)
    with dispatching(engine, cfg), dispatching(engine, cfg):
        ids = insert_products(engine, 300, transactions=30)
        wait_until(lambda: sum(map(len, sent_batches(broker_url, "classify"))) >= 300)
        time.sleep(0.5)
    sent = [i for b in sent_batches(broker_url, "classify") for i in b]
    assert sorted(sent) == sorted(ids)


def test_backfill_rows_go_to_the_backfill_queue_in_large_batches(
    engine: Engine, broker_url: str
) -> None:
    with engine.begin() as conn:
        ids = (
            conn.execute(
                text(
                    "INSERT INTO products (sku, name) SELECT 'b' || g, 'p' || g "
                    "FROM generate_series(1, 120) g RETURNING id"
                )
            )
            .scalars()
            .all()
        )
        # These rows were queued by the insert trigger; make them a backfill's instead.
        conn.execute(text("DELETE FROM classification_queue"))
        run = conn.execute(
            text("INSERT INTO backfill_runs (selector) VALUES ('{}') RETURNING id")
        ).scalar_one()
        enqueue(conn, ids, reason="backfill", backfill_id=run)
    fresh = insert_products(engine, 3)
    with dispatching(engine, config(backfill_batch_size=50)):
        wait_until(lambda: unclaimed(engine) == 0)
    assert sorted(len(b) for b in sent_batches(broker_url, "backfill")) == [20, 50, 50]
    assert sent_batches(broker_url, "classify") == [fresh]


def test_a_backlog_is_claimed_only_as_fast_as_batches_finish(
    engine: Engine, broker_url: str
) -> None:
    insert_products(engine, 100)
    stop = threading.Event()
    dispatcher = Dispatcher(engine, celery_sender(), config(max_inflight_batches=2), stop)
    for _ in range(5):
        dispatcher.step()
    # Two batches in flight, nobody finishing them: the rest stays unclaimed, so
    # no lease runs out while its task waits behind others in the broker.
    assert sum(map(len, sent_batches(broker_url, "classify"))) == 20
    assert unclaimed(engine) == 80


def test_an_unreachable_broker_gives_the_claims_back_unspent(
    engine: Engine, broker_url: str
) -> None:
    dead = create_app()
    dead.conf.broker_url = "redis://127.0.0.1:1/0"

    def send(queue: str, product_ids: list[int]) -> None:
        dead.send_task(CLASSIFY_TASK, kwargs={"product_ids": product_ids}, queue=queue)

    insert_products(engine, 4)
    dispatcher = Dispatcher(engine, send, config(), threading.Event())
    dispatcher.step()
    assert dispatcher.stats.send_failures == 1
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT attempts, claimed_at, last_error FROM classification_queue")
        ).all()
    assert len(rows) == 4
    for attempts, claimed_at, last_error in rows:
        assert (attempts, claimed_at) == (0, None)
        assert last_error.startswith("broker unavailable")


def test_rows_out_of_attempts_are_failed_by_the_sweep(engine: Engine, broker_url: str) -> None:
    (pid,) = insert_products(engine, 1)
    with engine.begin() as conn:
        conn.execute(text("UPDATE classification_queue SET attempts = 5, last_error = 'boom'"))
    dispatcher = Dispatcher(engine, celery_sender(), config(max_attempts=5), threading.Event())
    dispatcher.step()
    with engine.connect() as conn:
        status, error = conn.execute(
            text("SELECT status, error FROM products WHERE id = :id"), {"id": pid}
        ).one()
    assert status == "failed" and "boom" in error
    assert sent_batches(broker_url, "classify") == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_dispatch_command_stops_cleanly_on_a_signal(
    database_url: str, broker_url: str, signum: int
) -> None:
    env = {**os.environ, "SHELVER_DATABASE_URL": database_url, "SHELVER_BROKER_URL": broker_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shelver.worker", "dispatch"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Signal once it is dispatching, not after a fixed sleep: on a loaded machine
    # the interpreter may still be importing, before any handler is installed.
    watchdog = threading.Timer(60, proc.kill)  # a dispatcher that never starts fails, not hangs
    watchdog.start()
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "dispatching (batch" in line:
            break
    watchdog.cancel()
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=30)
    out = "".join(seen) + out
    assert proc.returncode == 0, out
    assert "dispatcher stopped" in out
