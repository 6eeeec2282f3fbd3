"""The queue's claims, leases, retries and failures, against real PostgreSQL."""

from __future__ import annotations

import threading

from sqlalchemy import Engine, text

from shelver.catalog import queue


def insert_products(engine: Engine, n: int) -> list[int]:
    with engine.begin() as conn:
        return list(
            conn.execute(
                text(
                    "INSERT INTO products (sku, name) "
                    "SELECT 'q-' || g, 'Product ' || g FROM generate_series(1, :n) g RETURNING id"
                ),
                {"n": n},
            ).scalars()
        )


def claim(engine: Engine, limit: int, lease: int = 300) -> list[queue.Claim]:
    with engine.begin() as conn:
        return queue.claim_batch(conn, limit=limit, lease_seconds=lease, max_attempts=5)


def test_two_concurrent_claimers_never_get_the_same_row(engine: Engine) -> None:
    insert_products(engine, 400)
    barrier = threading.Barrier(2)
    got: list[list[int]] = [[], []]

    def claimer(slot: int) -> None:
        barrier.wait()
        while batch := claim(engine, 7):
            got[slot].extend(c.product_id for c in batch)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not set(got[0]) & set(got[1])
    assert len(got[0]) + len(got[1]) == 400
    assert got[0] and got[1], "both claimers should have found work"


def test_held_lock_is_skipped_not_waited_on(engine: Engine) -> None:
    insert_products(engine, 3)
    with engine.begin() as first:
        held = queue.claim_batch(first, limit=2, lease_seconds=300, max_attempts=5)
        other = claim(engine, 10)
    assert {c.product_id for c in held}.isdisjoint(c.product_id for c in other)
    assert len(other) == 1


def test_expired_lease_is_claimed_again(engine: Engine) -> None:
    [pid] = insert_products(engine, 1)
    assert [c.product_id for c in claim(engine, 10)] == [pid]
    assert claim(engine, 10) == []
    with engine.begin() as conn:
        conn.execute(text("UPDATE classification_queue SET claimed_at = now() - interval '301 s'"))
    again = claim(engine, 10)
    assert [(c.product_id, c.attempts) for c in again] == [(pid, 2)]


def test_retry_later_backs_off_and_records_the_error(engine: Engine) -> None:
    [pid] = insert_products(engine, 1)
    claim(engine, 1)
    with engine.begin() as conn:
        queue.retry_later(conn, [pid], error="database restarting", backoff_seconds=2)
        row = conn.execute(
            text(
                "SELECT claimed_at, last_error, "
                "extract(epoch FROM not_before - now()) FROM classification_queue"
            )
        ).one()
    assert row[0] is None and row[1] == "database restarting"
    assert 1.5 < float(row[2]) <= 2.0
    assert claim(engine, 1) == []


def test_rows_out_of_attempts_end_failed_with_their_last_error(engine: Engine) -> None:
    [pid] = insert_products(engine, 1)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE classification_queue SET attempts = 5, "
                "claimed_at = now() - interval '1 h', last_error = 'encoder crashed'"
            )
        )
    assert claim(engine, 1) == []
    with engine.begin() as conn:
        assert queue.fail_exhausted(conn, max_attempts=5, lease_seconds=300) == 1
        status, error = conn.execute(
            text("SELECT status, error FROM products WHERE id = :id"), {"id": pid}
        ).one()
        assert conn.execute(text("SELECT count(*) FROM classification_queue")).scalar_one() == 0
    assert status == "failed"
    assert error == "gave up after 5 attempts: encoder crashed"


def test_complete_keeps_rows_whose_product_changed_since_it_was_read(engine: Engine) -> None:
    a, b = insert_products(engine, 2)
    with engine.connect() as conn:
        hashes = dict(conn.execute(text("SELECT id, content_hash FROM products")).all())
    with engine.begin() as conn:
        conn.execute(text("UPDATE products SET name = 'changed' WHERE id = :id"), {"id": b})
    with engine.begin() as conn:
        done = queue.complete(conn, {a: hashes[a], b: hashes[b]})
    assert done == {a}
    with engine.connect() as conn:
        left = conn.execute(text("SELECT product_id FROM classification_queue")).scalars().all()
    assert left == [b]


def test_bulk_rows_are_claimed_separately_from_fresh_inserts(engine: Engine) -> None:
    ids = insert_products(engine, 4)
    with engine.begin() as conn:
        run = conn.execute(
            text("INSERT INTO backfill_runs (selector) VALUES ('{}') RETURNING id")
        ).scalar_one()
        conn.execute(
            text("UPDATE classification_queue SET backfill_id = :run WHERE product_id = ANY(:ids)"),
            {"run": run, "ids": ids[:2]},
        )
    with engine.begin() as conn:
        bulk = queue.claim_batch(conn, limit=10, lease_seconds=300, max_attempts=5, bulk=True)
    assert sorted(c.product_id for c in bulk) == ids[:2]
    assert sorted(c.product_id for c in claim(engine, 10)) == ids[2:]


def test_fail_records_reason_and_dequeues(engine: Engine) -> None:
    [pid] = insert_products(engine, 1)
    with engine.begin() as conn:
        queue.fail(conn, {pid: "no usable text and no image"})
        row = conn.execute(text("SELECT status, error FROM products")).one()
        depth = queue.stats(conn).depth
    assert tuple(row) == ("failed", "no usable text and no image")
    assert depth == 0


def test_stats_count_claimed_retrying_and_backfill_rows(engine: Engine) -> None:
    ids = insert_products(engine, 5)
    with engine.begin() as conn:
        run = conn.execute(
            text("INSERT INTO backfill_runs (selector) VALUES ('{}') RETURNING id")
        ).scalar_one()
        conn.execute(
            text("UPDATE classification_queue SET backfill_id = :run WHERE product_id = :id"),
            {"run": run, "id": ids[4]},
        )
    claimed = claim(engine, 2)
    with engine.begin() as conn:
        queue.retry_later(conn, [claimed[0].product_id], error="blip", backoff_seconds=60)
    with engine.connect() as conn:
        figures = queue.stats(conn)
        fresh = queue.inflight(conn, bulk=False, lease_seconds=300)
        bulk = queue.inflight(conn, bulk=True, lease_seconds=300)
        remaining = queue.backfill_remaining(conn, run)
    assert (figures.depth, figures.claimed, figures.retrying, figures.backfill) == (5, 1, 1, 1)
    assert figures.oldest_age_s is not None and figures.oldest_age_s >= 0
    assert (fresh, bulk, remaining) == (1, 0, 1)


def test_each_lanes_claim_reads_only_its_own_lanes_index(engine: Engine) -> None:
    """A fresh-lane claim must not walk a backfill backlog (nor the reverse): the claim's
    lane condition, once bound, is the predicate of that lane's partial index."""
    params = {"limit": 32, "lease": 300, "max_attempts": 5}
    for bulk, index in ((False, "classification_queue_fresh_ready"),
                        (True, "classification_queue_backfill_ready")):  # fmt: skip
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL enable_seqscan = off"))
            conn.execute(text("SET LOCAL enable_bitmapscan = off"))
            plan = conn.execute(
                text("EXPLAIN " + queue.CLAIM_SQL.text), {**params, "bulk": bulk}
            ).scalars()
            # The rows to claim are found by the CTE's scan; the UPDATE then joins by id (q).
            scans = [line for line in plan if "Scan" in line and "classification_queue  " in line]
        assert len(scans) == 1 and f"Index Scan using {index} on" in scans[0], scans
