"""Backfill runs end ``done`` whoever watches them, and watching one writes nothing.

The worker side is the real write path (``classify_products``) against real
PostgreSQL; its classifier is a fixed rule, because what is under test is the
queue bookkeeping, not the model.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from shelver.catalog import queue
from shelver.catalog.categories import categories_md5
from shelver.catalog.db import session_scope
from shelver.training import registry
from shelver.worker import backfill as bf
from shelver.worker.classify import Outcome, ScoredBatch, classify_products
from shelver.worker.dispatcher import DispatchConfig, Dispatcher


class EverythingIsAudio:
    """A real ``Classifier`` with a trivial rule: every product is Audio, confidently."""

    def __init__(self, model_version_id: int) -> None:
        self.model_version_id = model_version_id

    def score(self, db: Session, rows: Sequence) -> ScoredBatch:
        top = [{"category": "Audio", "p": 0.99}]
        return ScoredBatch(
            [
                Outcome(
                    r.product_id,
                    r.content_hash,
                    category="Audio",
                    confidence=0.99,
                    accepted=True,
                    top_k=top,
                )
                for r in rows
            ]
        )


def catalog_of(engine: Engine, n: int) -> EverythingIsAudio:
    """``n`` products, already classified once (so the queue holds only what a backfill adds)."""
    with engine.begin() as conn:
        model = registry.register_candidate(
            conn,
            artifact=b"rule",
            sha256="0" * 64,
            labels=["Audio"],
            encoders={},
            metrics={},
            threshold=0.5,
        )
        conn.execute(
            text(
                "INSERT INTO products (sku, name) "
                "SELECT 'bf-' || g, 'Product ' || g FROM generate_series(1, :n) g"
            ),
            {"n": n},
        )
    classifier = EverythingIsAudio(model.id)
    while work(engine, classifier, bulk=False, limit=100):
        pass
    return classifier


def work(engine: Engine, classifier: EverythingIsAudio, *, bulk: bool, limit: int) -> int:
    """What a dispatcher and a worker do with one batch: claim it, then classify it."""
    with engine.begin() as conn:
        claims = queue.claim_batch(conn, limit=limit, lease_seconds=300, max_attempts=5, bulk=bulk)
    if claims:
        with session_scope(engine) as db:
            classify_products(db, [c.product_id for c in claims], classifier)
    return len(claims)


def run_row(engine: Engine, run_id: int) -> tuple:
    with engine.connect() as conn:
        return tuple(
            conn.execute(
                text("SELECT xmin::text, status, enqueued, finished_at FROM backfill_runs "
                     "WHERE id = :id"),
                {"id": run_id},
            ).one()
        )  # fmt: skip


def test_a_no_wait_backfill_ends_done_when_workers_finish_its_last_row(engine: Engine) -> None:
    classifier = catalog_of(engine, 30)
    # What `shelver backfill --all --no-wait` does: queue every chunk, then exit.
    run = bf.start(engine, bf.Selector())
    for _ in bf.enqueue(engine, run, chunk=10):
        pass
    assert run_row(engine, run.id)[1:3] == ("enqueued", 30)

    assert work(engine, classifier, bulk=True, limit=16) == 16
    assert run_row(engine, run.id)[1] == "enqueued"
    assert work(engine, classifier, bulk=True, limit=16) == 14
    _, status, _, finished_at = run_row(engine, run.id)
    assert status == "done" and finished_at is not None


def test_a_backfill_whose_rows_were_finished_while_it_queued_is_done_at_once(
    engine: Engine,
) -> None:
    classifier = catalog_of(engine, 20)
    run = bf.start(engine, bf.Selector())
    chunks = bf.enqueue(engine, run, chunk=10)
    for _ in chunks:
        # Fast workers: every queued row is finished before the next chunk.
        while work(engine, classifier, bulk=True, limit=100):
            pass
    assert run.status == "done"
    assert run_row(engine, run.id)[1] == "done"


def test_watching_a_backfill_writes_nothing(engine: Engine) -> None:
    classifier = catalog_of(engine, 12)
    run = bf.start(engine, bf.Selector())
    for _ in bf.enqueue(engine, run, chunk=5):
        pass
    assert work(engine, classifier, bulk=True, limit=4) == 4
    state = bf.progress(engine, run)
    assert (state.enqueued, state.remaining, state.finished, state.done) == (12, 8, 4, False)
    # Its last rows leave without a worker (the products are deleted): the run
    # is finished, a reader can tell, and reading still writes nothing.
    with engine.begin() as conn:
        conn.execute(
            text("DELETE FROM products WHERE id IN (SELECT product_id FROM classification_queue)")
        )
    before = run_row(engine, run.id)
    watchers = [threading.Thread(target=bf.progress, args=(engine, run)) for _ in range(3)]
    for w in watchers:
        w.start()
    for w in watchers:
        w.join()
    assert bf.progress(engine, run).done
    assert run_row(engine, run.id) == before  # same row version: xmin unchanged


def test_the_sweep_records_a_run_whose_last_rows_were_deleted(engine: Engine) -> None:
    catalog_of(engine, 6)
    run = bf.start(engine, bf.Selector())
    for _ in bf.enqueue(engine, run, chunk=100):
        pass
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM products"))
    assert run_row(engine, run.id)[1] == "enqueued"
    Dispatcher(engine, lambda *_: None, DispatchConfig(), threading.Event()).sweep()
    assert run_row(engine, run.id)[1] == "done"


def test_two_workers_finishing_the_last_two_rows_at_once_record_the_run_done(
    engine: Engine,
) -> None:
    catalog_of(engine, 2)
    run = bf.start(engine, bf.Selector())
    for _ in bf.enqueue(engine, run):
        pass
    with engine.connect() as conn:
        (a, hash_a), (b, hash_b) = conn.execute(
            text("SELECT id, content_hash FROM products ORDER BY id")
        ).all()
    second: dict[str, object] = {}
    started, finished = threading.Event(), threading.Event()

    def finish_b() -> None:
        try:
            with engine.begin() as conn:
                second["backend"] = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
                started.set()
                queue.complete(conn, {b: hash_b})
        except Exception as exc:
            second["error"] = exc
        finally:
            started.set()
            finished.set()

    with engine.begin() as first:
        # Each worker's write removes one of the two rows; neither has committed
        # when the other looks at what is left.
        assert queue.complete(first, {a: hash_a}) == {a}
        thread = threading.Thread(target=finish_b)
        thread.start()
        assert started.wait(10) and "backend" in second, second
        wait_blocked_or_done(engine, second["backend"], finished)
    thread.join(30)
    assert "error" not in second, second.get("error")
    assert run_row(engine, run.id)[1] == "done"


def wait_blocked_or_done(
    engine: Engine, backend: int, done: threading.Event, timeout: float = 10
) -> None:
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline and not done.is_set():
            if conn.execute(text("SELECT pg_blocking_pids(:p)"), {"p": backend}).scalar():
                return
            conn.rollback()
            time.sleep(0.02)


def test_a_run_is_asked_for_by_a_selection_or_a_resume_never_both(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO products (sku, name) VALUES ('a', 'Speaker')"))
    with pytest.raises(bf.BackfillError, match="say what to re-score"):
        bf.open_run(engine, bf.Selector())
    run = bf.open_run(engine, bf.Selector(), every=True)
    assert run.total == 1 and run.status == "running"
    for selector, every in ((bf.Selector(stale=True), False), (bf.Selector(), True)):
        with pytest.raises(bf.BackfillError, match="--resume continues a run with its own"):
            bf.open_run(engine, selector, every=every, resume=run.id)
    assert bf.open_run(engine, bf.Selector(), resume=run.id).id == run.id


def test_suggestions_select_unlabeled_reviews_the_served_zero_label_scorer_did_not_make(
    engine: Engine,
) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO categories (name) VALUES ('Audio')"))
        digest = categories_md5(conn)
        ids = {}
        for version, status, metrics in (
            ("zero-label-a", "zero_label", {"categories_md5": digest}),
            ("zero-label-a-adapted-old", "zero_label",
             {"adapted_from": "zero-label-a", "adapted_at": "2026-12-01T00:00:00"}),
            ("zero-label-a-adapted-new", "zero_label",
             {"adapted_from": "zero-label-a", "adapted_at": "2026-12-02T00:00:00"}),
            ("c1", "champion", {}),
        ):  # fmt: skip
            ids[version] = insert_version(conn, version, status, metrics)
        rows = {
            "base": ("zero-label-a", "needs_review", False),
            "older": ("zero-label-a-adapted-old", "needs_review", False),
            "latest": ("zero-label-a-adapted-new", "needs_review", False),
            "champion": ("c1", "needs_review", False),
            "labeled": ("zero-label-a", "needs_review", True),
            "accepted": ("zero-label-a", "classified", False),
        }
        for sku, (version, status, labeled) in rows.items():
            insert_scored(conn, sku, ids[version], status, labeled)
    where, params = bf.Selector(suggestions=True).where()

    def selected() -> set[str]:
        with engine.connect() as conn:
            return set(
                conn.execute(text(f"SELECT p.sku FROM products p WHERE {where}"), params).scalars()
            )

    assert selected() == {"base", "older"}
    # Withdrawn (`taxonomy adapt --undo`), the adaptations' suggestions are stale and the
    # taxonomy's own row is served again: its suggestions are current.
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE model_versions SET metrics = metrics || '{\"withdrawn\": \"now\"}' "
                 "WHERE version LIKE '%adapted%'")
        )  # fmt: skip
    assert selected() == {"older", "latest"}
    # The taxonomy changed and no worker has made its scorer yet: every suggestion is an
    # old scorer's, the taxonomy's own row's included.
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO categories (name) VALUES ('Cameras')"))
    assert selected() == {"base", "older", "latest"}
    # Once the new taxonomy's row exists, what it suggests is current; then an adaptation
    # of the old taxonomy made later is still not the one served.
    with engine.begin() as conn:
        b = insert_version(
            conn, "zero-label-b", "zero_label", {"categories_md5": categories_md5(conn)}
        )
        insert_scored(conn, "new-taxonomy", b, "needs_review", False)
        insert_version(
            conn,
            "zero-label-a-adapted-late",
            "zero_label",
            {"adapted_from": "zero-label-a", "adapted_at": "2026-12-03T00:00:00"},
        )
    assert selected() == {"base", "older", "latest"}
    with engine.begin() as conn:
        ab = insert_version(
            conn,
            "zero-label-b-adapted",
            "zero_label",
            {"adapted_from": "zero-label-b", "adapted_at": "2026-12-01T00:00:00"},
        )
        insert_scored(conn, "adapted-b", ab, "needs_review", False)
    assert selected() == {"base", "older", "latest", "new-taxonomy"}


def insert_version(conn: Connection, version: str, status: str, metrics: dict) -> int:
    return conn.execute(
        text(
            "INSERT INTO model_versions (version, status, artifact, sha256, labels, encoders, "
            "metrics, threshold) VALUES (:v, :s, 'x', :v, '[]', '{}', CAST(:m AS jsonb), 1.0) "
            "RETURNING id"
        ),
        {"v": version, "s": status, "m": json.dumps(metrics)},
    ).scalar_one()


def insert_scored(conn: Connection, sku: str, version_id: int, status: str, labeled: bool) -> None:
    conn.execute(
        text(
            "INSERT INTO products (sku, name, label_id) VALUES (:sku, 'p', "
            "CASE WHEN :labeled THEN (SELECT min(id) FROM categories) END)"
        ),
        {"sku": sku, "labeled": labeled},
    )
    # As the worker leaves them (an insert enters the queue as pending).
    conn.execute(
        text("UPDATE products SET status = :status, model_version_id = :m WHERE sku = :sku"),
        {"sku": sku, "status": status, "m": version_id},
    )
