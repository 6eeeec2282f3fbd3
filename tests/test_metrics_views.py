"""The SQL views for people without Prometheus, against real PostgreSQL."""

from __future__ import annotations

from sqlalchemy import Engine, text
from test_queue import claim, insert_products

from shelver.catalog import queue


def test_queue_status_per_lane_and_recent_errors_grouped_by_reason(engine: Engine) -> None:
    ids = insert_products(engine, 5)
    claim(engine, 4)
    with engine.begin() as conn:
        queue.fail(
            conn,
            {
                ids[0]: "no usable text and no usable image (image not used: missing: x.jpg)",
                ids[1]: "no usable text and no usable image",
            },
        )
        queue.retry_later(
            conn, [ids[2]], error="OperationalError: server closed", backoff_seconds=60
        )
    with engine.connect() as conn:
        lanes = {s.lane: s for s in queue.lane_status(conn)}
        errors = conn.execute(
            text("SELECT kind, reason, products FROM recent_errors ORDER BY kind, reason")
        ).all()
    assert set(lanes) == {"classify", "backfill"}
    assert (lanes["classify"].depth, lanes["classify"].claimed) == (3, 1)
    assert (lanes["classify"].retrying, lanes["classify"].ready) == (1, 1)
    assert lanes["classify"].oldest_age_s is not None
    assert (lanes["backfill"].depth, lanes["backfill"].oldest_age_s) == (0, None)
    assert [tuple(e) for e in errors] == [
        ("failed", "no usable text and no usable image", 2),
        ("retrying", "OperationalError", 1),
    ]


def test_status_reports_lanes_live_workers_and_recent_errors(engine: Engine) -> None:
    from shelver.catalog.status import catalog_status

    ids = insert_products(engine, 2)
    with engine.begin() as conn:
        queue.fail(conn, {ids[0]: "no usable text and no usable image"})
        queue.register_worker(conn, "w1", hostname="test", pid=1)
    report = catalog_status(engine)
    lanes = {lane["lane"]: lane for lane in report["queue"]["lanes"]}
    assert (lanes["classify"]["depth"], lanes["backfill"]["depth"]) == (1, 0)
    assert report["workers_alive"] == 1
    (error,) = report["recent_errors"]
    assert (error["kind"], error["reason"], error["products"]) == (
        "failed",
        "no usable text and no usable image",
        1,
    )
    assert error["example_sku"] == "q-1"
