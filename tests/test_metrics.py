"""Each metric moves when its event happens, scraped over HTTP from real processes.

`shelver dispatch`, `shelver worker` (prefork, two pool processes summed through
the multiprocess directory) and `shelver beat` run against the test PostgreSQL
and Redis, each serving /metrics on its --metrics-port.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from sqlalchemy import Engine, text
from support import (
    SHELVER,
    centroid_artifact,
    free_port,
    insert,
    register_champion,
    running,
    sample_products,
    scalar,
    scrape,
    training_titles,
    worker_env,
)

from shelver.worker.encoders import load_encoders
from shelver.worker.metrics import failure_reason

pytestmark = pytest.mark.slow

Labels = tuple[tuple[str, str], ...]


def value(port: int, name: str, **labels: str) -> float:
    return scrape(port).get((name, tuple(sorted(labels.items()))), 0.0)


def total(port: int, name: str) -> float:
    """A metric summed over all its label values."""
    return sum(v for (n, _), v in scrape(port).items() if n == name)


def wait_metric(
    port: int, read: Callable[[int], float], check: Callable[[float], bool], what: str, logs: Path
) -> float:
    deadline = time.monotonic() + 90
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = read(port)
        except OSError:
            seen = None  # not serving yet
        if seen is not None and check(seen):
            return seen
        time.sleep(0.25)
    tails = "\n".join(
        f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in logs.glob("*.log")
    )
    pytest.fail(f"{what}: last seen {seen}\n{tails}")


@pytest.fixture(scope="module")
def artifact(encoder_dir: Path, fixture_data: Path) -> bytes:
    return centroid_artifact(*load_encoders(encoder_dir), training_titles(fixture_data))


@pytest.fixture
def env(
    database_url: str, broker_url: str, encoder_dir: Path, fixture_data: Path, tmp_path: Path
) -> dict[str, str]:
    return worker_env(
        database_url,
        broker_url,
        encoder_dir,
        fixture_data,
        SHELVER_RETRY_BACKOFF_S="0.5",
        # The worker's multiprocess directory goes under here.
        TMPDIR=str(tmp_path),
    )


FAIL_ONCE = """
CREATE SEQUENCE metrics_test_fail_once;
CREATE FUNCTION metrics_test_fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A sequence, not a table: its increment survives the rollback the error causes.
    IF (SELECT sku FROM products WHERE id = NEW.product_id) = 'retry-me'
       AND nextval('metrics_test_fail_once') = 1 THEN
        RAISE EXCEPTION 'injected failure writing retry-me';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER metrics_test_fail_once BEFORE INSERT ON predictions
    FOR EACH ROW EXECUTE FUNCTION metrics_test_fail_once();
"""


def drop_fail_once(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "DROP TRIGGER IF EXISTS metrics_test_fail_once ON predictions;"
            "DROP FUNCTION IF EXISTS metrics_test_fail_once();"
            "DROP SEQUENCE IF EXISTS metrics_test_fail_once;"
        )


def test_dispatcher_and_worker_metrics_move_with_their_events(
    engine: Engine,
    env: dict[str, str],
    artifact: bytes,
    fixture_data: Path,
    tmp_path: Path,
) -> None:
    register_champion(engine, artifact, "metrics-a", threshold=0.0)
    dispatch_port, worker_port = free_port(), free_port()
    stale_tree = tmp_path / "shelver-metrics" / "worker-999999999"
    stale_tree.mkdir(parents=True)
    (stale_tree / "counter_1.db").write_bytes(b"left by a dead worker")

    def dispatcher_value(name: str, **labels: str) -> Callable[[int], float]:
        return lambda port: value(port, name, **labels)

    with running(
        ["dispatch", "--metrics-port", str(dispatch_port)], env, tmp_path / "dispatch.log"
    ):
        # Queue depth per lane: rows enqueued, no worker yet.
        insert(engine, sample_products(fixture_data, 4))
        wait_metric(
            dispatch_port, dispatcher_value("shelver_queue_depth", lane="classify"),
            lambda v: v == 4, "classify depth 4 after inserting 4", tmp_path,
        )  # fmt: skip
        assert value(dispatch_port, "shelver_queue_depth", lane="backfill") == 0
        assert value(dispatch_port, "shelver_queue_oldest_age_seconds", lane="classify") > 0
        wait_metric(
            dispatch_port, dispatcher_value("shelver_products_dispatched_total", lane="classify"),
            lambda v: v == 4, "4 products dispatched", tmp_path,
        )  # fmt: skip

        with running(
            ["worker", "-c", "2", "--metrics-port", str(worker_port)], env, tmp_path / "worker.log"
        ) as worker:
            # Classified, per-stage and batch latency, the champion and its load.
            wait_metric(
                worker_port, lambda p: value(p, "shelver_products_total", outcome="classified"),
                lambda v: v == 4, "4 products classified", tmp_path,
            )  # fmt: skip
            wait_metric(
                dispatch_port, dispatcher_value("shelver_queue_depth", lane="classify"),
                lambda v: v == 0, "an empty queue", tmp_path,
            )  # fmt: skip
            for stage in ("load", "encode_text", "decode_image", "encode_image", "model", "write"):
                assert value(worker_port, "shelver_stage_duration_seconds_count", stage=stage) > 0
            wait_metric(
                worker_port,
                lambda p: value(
                    p, "shelver_batch_duration_seconds_count", lane="classify", outcome="ok"
                ),
                lambda v: v >= 1, "a batch timed", tmp_path,
            )  # fmt: skip
            assert value(worker_port, "shelver_champion_info", version="metrics-a") == 1
            assert value(dispatch_port, "shelver_workers_alive") == 2
            reloads = value(worker_port, "shelver_model_reloads_total")
            assert reloads >= 1

            # The multiprocess directory: this tree's own, a dead tree's removed.
            trees = sorted(p.name for p in (tmp_path / "shelver-metrics").iterdir())
            assert trees == [f"worker-{worker.pid}"]

            # Failed, by reason.
            insert(engine, [{"sku": "empty", "name": "", "description": "", "image_uri": None}])
            reason = failure_reason("no usable text and no usable image")
            wait_metric(
                worker_port,
                lambda p: value(p, "shelver_products_failed_total", reason=reason),
                lambda v: v == 1, "one product failed for want of input", tmp_path,
            )  # fmt: skip
            assert value(worker_port, "shelver_products_total", outcome="failed") == 1

            # A retry: the batch's write fails once (a trigger), its rows come back later.
            with engine.begin() as conn:
                conn.exec_driver_sql(FAIL_ONCE)
            try:
                insert(engine, [{"sku": "retry-me", "name": "USB-C cable, 2 m",
                                 "description": "", "image_uri": None}])  # fmt: skip
                wait_metric(
                    worker_port, lambda p: total(p, "shelver_retries_total"),
                    lambda v: v >= 1, "a retry counted", tmp_path,
                )  # fmt: skip
                wait_metric(
                    worker_port, lambda p: value(p, "shelver_products_total", outcome="classified"),
                    lambda v: v == 5, "the retried product classified", tmp_path,
                )  # fmt: skip
            finally:
                drop_fail_once(engine)
            assert value(worker_port, "shelver_retries_total", error="InternalError") == 1

            # A lease that ran out: the row was claimed an hour ago and never finished.
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO products (sku, name, description) "
                        "VALUES ('lost', 'Wireless mouse', '')"
                    )
                )
                conn.execute(
                    text(
                        "UPDATE classification_queue SET claimed_at = now() - interval '1 hour', "
                        "attempts = 1 "
                        "WHERE product_id = (SELECT id FROM products WHERE sku = 'lost')"
                    )
                )
            wait_metric(
                dispatch_port, dispatcher_value("shelver_leases_expired_total", lane="classify"),
                lambda v: v == 1, "one expired lease reclaimed", tmp_path,
            )  # fmt: skip

            # A promotion: the workers load the new champion, which sends everything to review.
            register_champion(engine, artifact, "metrics-b", threshold=1.5)
            time.sleep(1.5)  # past SHELVER_MODEL_POLL_SECONDS
            insert(engine, [
                {"sku": f"review-{i}", "name": "Noise-cancelling headphones",
                 "description": "", "image_uri": None} for i in range(3)
            ])  # fmt: skip
            wait_metric(
                worker_port, lambda p: value(p, "shelver_products_total", outcome="needs_review"),
                lambda v: v == 3, "3 products sent to review", tmp_path,
            )  # fmt: skip
            assert value(worker_port, "shelver_model_reloads_total") > reloads
            assert value(worker_port, "shelver_champion_info", version="metrics-b") == 1

            # A pool process killed: its live gauges leave the sum at the next scrape.
            directory = tmp_path / "shelver-metrics" / f"worker-{worker.pid}"
            child = psutil.Process(worker.pid).children()[0]
            assert (directory / f"gauge_livemax_{child.pid}.db").exists()
            child.kill()
            child.wait(timeout=30)
            scrape(worker_port)
            assert not (directory / f"gauge_livemax_{child.pid}.db").exists()
    assert scalar(engine, "SELECT count(*) FROM classification_queue") == 0
    # A worker that stopped cleanly took its metrics directory with it.
    assert list((tmp_path / "shelver-metrics").iterdir()) == []


def test_beat_counts_its_retraining_checks(env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    beat_env = {**env, "SHELVER_RETRAIN_CRON": "* * * * * */2"}
    with running(["beat", "--metrics-port", str(port)], beat_env, tmp_path / "beat.log"):
        wait_metric(
            port, lambda p: value(p, "shelver_retrain_checks_total", result="skipped"),
            lambda v: v >= 2, "two skipped retraining checks", tmp_path,
        )  # fmt: skip
        assert value(port, "shelver_retrain_last_check_timestamp_seconds") > time.time() - 60


def test_a_metrics_port_in_use_is_a_user_error(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*SHELVER, "dispatch", "--metrics-port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2, result.stderr
    assert f"cannot serve metrics on port {port}" in result.stderr
    assert "--metrics-port" in result.stderr
