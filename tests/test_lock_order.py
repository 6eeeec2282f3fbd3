"""One lock order (products, then queue rows): the sweep and a worker's write never deadlock.

Two real connections, interleaved by hand: the worker's transaction holds its
product locks (the write path's first statement) while the sweep runs against a
row whose lease ran out; only then does the worker delete the queue row. Had
the sweep locked the queue row first and then waited for the product, that
delete would close a cycle and PostgreSQL would abort one of the two
(DeadlockDetected).
"""

from __future__ import annotations

import threading
import time

from sqlalchemy import Engine, text

from shelver.catalog import queue
from shelver.worker.classify import LOCK_SQL


def exhausted_product(engine: Engine) -> tuple[int, str]:
    """A product whose row used up its attempts and whose lease ran out, mid-write by a worker."""
    with engine.begin() as conn:
        pid, content_hash = conn.execute(
            text(
                "INSERT INTO products (sku, name) VALUES ('slow', 'Slow') "
                "RETURNING id, content_hash"
            )
        ).one()
        conn.execute(
            text(
                "UPDATE classification_queue SET attempts = 5, last_error = 'slow', "
                "claimed_at = now() - interval '1 h'"
            )
        )
    return pid, content_hash


def blocked_or_done(engine: Engine, pid: int, done: threading.Event, timeout: float = 10) -> bool:
    """Wait until backend ``pid`` waits on a lock (True) or its thread finished (False)."""
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            if done.is_set():
                return False
            blockers = conn.execute(text("SELECT pg_blocking_pids(:pid)"), {"pid": pid}).scalar()
            if blockers:
                return True
            conn.rollback()
            time.sleep(0.02)
    raise AssertionError(f"backend {pid} neither finished nor blocked within {timeout} s")


def test_the_sweep_and_a_worker_writing_the_same_product_do_not_deadlock(engine: Engine) -> None:
    pid, content_hash = exhausted_product(engine)
    sweep: dict[str, object] = {}
    started, finished = threading.Event(), threading.Event()

    def run_sweep() -> None:
        try:
            with engine.begin() as conn:
                sweep["backend"] = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
                started.set()
                sweep["failed"] = queue.fail_exhausted(conn, max_attempts=5, lease_seconds=300)
        except Exception as exc:
            sweep["error"] = exc
        finally:
            started.set()
            finished.set()

    with engine.begin() as worker:
        # The write path's first statement: the batch's products, locked in id order.
        assert worker.execute(LOCK_SQL, {"ids": [pid]}).all() == [(pid, content_hash)]
        thread = threading.Thread(target=run_sweep)
        thread.start()
        assert started.wait(10) and "backend" in sweep, sweep
        sweep_blocked = blocked_or_done(engine, sweep["backend"], finished)
        # Then the write path's queue statement. With the old order the sweep now
        # holds this queue row and waits for our product: a deadlock.
        done = queue.complete(worker, {pid: content_hash})
    thread.join(30)

    assert "error" not in sweep, sweep.get("error")
    assert not sweep_blocked, "the sweep waited on a product a worker holds"
    assert sweep["failed"] == 0
    assert done == {pid}
    with engine.connect() as conn:
        status = conn.execute(text("SELECT status FROM products WHERE id = :id"), {"id": pid})
        assert status.scalar_one() == "pending"  # left to the worker, whose result is not failed
        assert queue.stats(conn).depth == 0


def test_the_sweep_fails_the_row_once_the_worker_let_go_of_it(engine: Engine) -> None:
    pid, content_hash = exhausted_product(engine)
    with engine.connect() as worker:
        worker.execute(LOCK_SQL, {"ids": [pid]})
        with engine.begin() as conn:
            # The sweep must not wait on the worker; if it did, fail instead of hanging.
            conn.execute(text("SET LOCAL lock_timeout = '5s'"))
            assert queue.fail_exhausted(conn, max_attempts=5, lease_seconds=300) == 0
        worker.rollback()  # the worker died without writing
    # Nobody holds the product now: the next sweep takes the row.
    with engine.begin() as conn:
        assert queue.fail_exhausted(conn, max_attempts=5, lease_seconds=300) == 1
        status, error = conn.execute(
            text("SELECT status, error FROM products WHERE id = :id"), {"id": pid}
        ).one()
    assert (status, error) == ("failed", "gave up after 5 attempts: slow")
