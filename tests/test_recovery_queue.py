"""The queue side of recovery, against real PostgreSQL: which rows a dead worker gives back."""

from __future__ import annotations

from sqlalchemy import Engine, text
from test_queue import claim, insert_products

from shelver.catalog import queue


def register(engine: Engine, worker_id: str, *, seconds_ago: float = 0) -> None:
    with engine.begin() as conn:
        queue.register_worker(conn, worker_id, hostname="test", pid=1)
        conn.execute(
            text(
                "UPDATE workers SET heartbeat_at = now() - make_interval(secs => :ago) "
                "WHERE id = :id"
            ),
            {"ago": seconds_ago, "id": worker_id},
        )


def mark(engine: Engine, worker_id: str, ids: list[int]) -> int:
    with engine.begin() as conn:
        return queue.mark_working(conn, worker_id, ids)


def release(engine: Engine) -> list[int]:
    with engine.begin() as conn:
        return queue.release_dead_workers(conn, dead_after_s=10)


def test_only_the_rows_of_a_silent_worker_are_given_back_and_claimed_again(
    engine: Engine,
) -> None:
    ids = insert_products(engine, 6)
    claimed = [c.product_id for c in claim(engine, 6)]
    assert sorted(claimed) == ids
    register(engine, "alive")
    register(engine, "dead", seconds_ago=60)
    assert mark(engine, "alive", ids[:2]) == 2
    assert mark(engine, "dead", ids[2:4]) == 2
    # ids[4:] are claimed but no worker started them yet: only their lease brings them back.

    assert sorted(release(engine)) == ids[2:4]
    assert sorted(c.product_id for c in claim(engine, 10)) == ids[2:4]
    assert release(engine) == []
    with engine.connect() as conn:
        workers = conn.execute(text("SELECT id FROM workers")).scalars().all()
        error = conn.execute(
            text("SELECT last_error FROM classification_queue WHERE product_id = :id"),
            {"id": ids[2]},
        ).scalar_one()
    assert workers == ["alive"]
    assert "worker dead stopped while classifying" in error


def test_a_row_being_written_is_skipped_and_given_back_on_a_later_pass(engine: Engine) -> None:
    ids = insert_products(engine, 2)
    claim(engine, 2)
    register(engine, "dead", seconds_ago=60)
    mark(engine, "dead", ids)
    with engine.begin() as writer:
        # A worker's write transaction holding the first row.
        writer.execute(
            text("SELECT 1 FROM classification_queue WHERE product_id = :id FOR UPDATE"),
            {"id": ids[0]},
        )
        assert release(engine) == [ids[1]]
    assert release(engine) == [ids[0]]


def test_a_new_claim_belongs_to_no_worker_until_one_marks_it(engine: Engine) -> None:
    ids = insert_products(engine, 1)
    claim(engine, 1)
    register(engine, "dead", seconds_ago=60)
    mark(engine, "dead", ids)
    release(engine)
    claim(engine, 1)
    with engine.connect() as conn:
        owner = conn.execute(
            text("SELECT worker_id FROM classification_queue WHERE product_id = :id"),
            {"id": ids[0]},
        ).scalar_one()
    assert owner is None
    # Released rows are not marked again by a late worker: only claimed rows are.
    release(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE classification_queue SET claimed_at = NULL"))
    assert mark(engine, "late", ids) == 0
