"""The trigger on products is the event path's first step: pinned here with raw SQL only."""

from __future__ import annotations

import select
import time

import psycopg2
from sqlalchemy import Engine, text


def queued(engine: Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT product_id, reason FROM classification_queue")).all())


def insert(engine: Engine, sku: str, name: str = "Duracell AA batteries") -> int:
    with engine.begin() as conn:
        return conn.execute(
            text("INSERT INTO products (sku, name) VALUES (:sku, :name) RETURNING id"),
            {"sku": sku, "name": name},
        ).scalar_one()


def test_plain_insert_queues_product_and_marks_it_pending(engine: Engine) -> None:
    with engine.begin() as conn:
        pid = conn.execute(
            text(
                "INSERT INTO products (sku, name, status) VALUES ('a1', 'USB cable', 'classified') "
                "RETURNING id"
            )
        ).scalar_one()
        status = conn.execute(text("SELECT status FROM products WHERE id = :id"), {"id": pid})
        assert status.scalar_one() == "pending"
    assert queued(engine) == {pid: "insert"}


def test_rolled_back_insert_leaves_nothing_behind(engine: Engine) -> None:
    with engine.connect() as conn:
        trans = conn.begin()
        conn.execute(text("INSERT INTO products (sku, name) VALUES ('r1', 'Toaster')"))
        trans.rollback()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM products")).scalar_one() == 0
    assert queued(engine) == {}


def test_content_update_requeues_and_label_update_does_not(engine: Engine) -> None:
    pid = insert(engine, "u1")
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM classification_queue"))
        conn.execute(
            text("UPDATE products SET status = 'classified', confidence = 0.9 WHERE id = :id"),
            {"id": pid},
        )
        conn.execute(text("INSERT INTO categories (name) VALUES ('Audio')"))
        conn.execute(
            text("UPDATE products SET label_id = 1, label_source = 'review' WHERE id = :id"),
            {"id": pid},
        )
    assert queued(engine) == {}
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT status, labeled_at IS NOT NULL FROM products WHERE id = :id"),
            {"id": pid},
        ).one()
    assert tuple(row) == ("classified", True)

    for column, value in [
        ("name", "Duracell AAA"),
        ("description", "4-pack"),
        ("image_uri", "x.jpg"),
    ]:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM classification_queue"))
            conn.execute(
                text(f"UPDATE products SET {column} = :v WHERE id = :id"), {"v": value, "id": pid}
            )
            status = conn.execute(text("SELECT status FROM products WHERE id = :id"), {"id": pid})
            assert status.scalar_one() == "pending"
        assert queued(engine) == {pid: "update"}, column


def test_same_value_update_does_not_requeue(engine: Engine) -> None:
    pid = insert(engine, "s1", name="Kettle")
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM classification_queue"))
        conn.execute(text("UPDATE products SET name = 'Kettle' WHERE id = :id"), {"id": pid})
    assert queued(engine) == {}


def test_update_of_a_claimed_row_makes_it_ready_again(engine: Engine) -> None:
    pid = insert(engine, "c1")
    with engine.begin() as conn:
        conn.execute(text("UPDATE classification_queue SET claimed_at = now(), attempts = 2"))
        conn.execute(text("UPDATE products SET name = 'Other' WHERE id = :id"), {"id": pid})
        row = conn.execute(
            text("SELECT claimed_at, attempts, reason FROM classification_queue")
        ).one()
    assert tuple(row) == (None, 0, "update")


def test_insert_notifies_listeners(database_url: str, engine: Engine) -> None:
    listener = psycopg2.connect(database_url)
    listener.autocommit = True
    listener.cursor().execute("LISTEN shelver_queue")
    insert(engine, "n1")
    assert select.select([listener], [], [], 5) != ([], [], [])
    listener.poll()
    assert [n.channel for n in listener.notifies] == ["shelver_queue"]
    listener.close()


def test_bulk_insert_sends_one_notification_not_one_per_row(
    database_url: str, engine: Engine
) -> None:
    listener = psycopg2.connect(database_url)
    listener.autocommit = True
    listener.cursor().execute("LISTEN shelver_queue")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO products (sku, name) "
                "SELECT 'bulk-' || g, 'Product ' || g FROM generate_series(1, 100000) g"
            )
        )
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        select.select([listener], [], [], 0.2)
        listener.poll()
    assert len(listener.notifies) == 1
    listener.close()
    with engine.connect() as conn:
        assert (
            conn.execute(text("SELECT count(*) FROM classification_queue")).scalar_one() == 100000
        )
