"""A SIGKILLed worker's products come back in seconds, with the normal 5-minute lease.

Real `shelver dispatch` and `shelver worker` processes against the test PostgreSQL
and Redis. The worker marks the rows of the batch it starts with its id and
heartbeats; the dispatcher gives a silent worker's rows back (docs/operations.md).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine
from support import (
    centroid_artifact,
    free_port,
    insert,
    register_champion,
    running,
    sample_products,
    scalar,
    scrape,
    training_titles,
    wait_for,
    worker_env,
)

from shelver.worker.encoders import load_encoders

pytestmark = pytest.mark.slow

# The production default: recovery must not come from the lease running out.
LEASE_S = 300
RECOVERY_S = 30


@pytest.fixture(scope="module")
def artifact(encoder_dir: Path, fixture_data: Path) -> bytes:
    return centroid_artifact(*load_encoders(encoder_dir), training_titles(fixture_data))


@pytest.fixture
def env(
    database_url: str, broker_url: str, encoder_dir: Path, fixture_data: Path
) -> dict[str, str]:
    return worker_env(
        database_url,
        broker_url,
        encoder_dir,
        fixture_data,
        SHELVER_LEASE_SECONDS=str(LEASE_S),
        SHELVER_BATCH_SIZE="16",
    )


def test_a_sigkilled_workers_rows_are_classified_again_within_seconds_not_at_lease_expiry(
    engine: Engine,
    env: dict[str, str],
    artifact: bytes,
    fixture_data: Path,
    tmp_path: Path,
) -> None:
    champion = register_champion(engine, artifact, "recovery-1")
    rows = sample_products(fixture_data, 160)
    port = free_port()
    with running(["dispatch", "--metrics-port", str(port)], env, tmp_path / "dispatch.log"):
        with running(["worker", "-c", "1"], env, tmp_path / "worker-1.log") as first:
            wait_for(
                lambda: scalar(engine, "SELECT count(*) FROM workers") > 0,
                120,
                "the first worker to start heartbeating",
                tmp_path,
            )
            insert(engine, rows)
            # Mid-batch: rows marked with the worker's id are being classified right now.
            wait_for(
                lambda: (
                    scalar(
                        engine,
                        "SELECT count(*) FROM classification_queue WHERE worker_id IS NOT NULL",
                    )
                    > 0
                ),
                120,
                "the first worker to start a batch",
                tmp_path,
            )
            os.killpg(first.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            first.wait()
        held = scalar(
            engine,
            "SELECT count(*) FROM classification_queue "
            "WHERE worker_id IS NOT NULL AND claimed_at > now() - make_interval(secs => :lease)",
            lease=LEASE_S,
        )
        assert held > 0, "the worker died holding no batch; nothing was tested"
        with running(["worker", "-c", "1"], env, tmp_path / "worker-2.log"):
            wait_for(
                lambda: scalar(engine, "SELECT count(*) FROM classification_queue") == 0,
                RECOVERY_S - (time.monotonic() - killed_at),
                f"every product classified within {RECOVERY_S} s of the kill",
                tmp_path,
            )
            recovered_after = time.monotonic() - killed_at
            released = scrape(port).get(
                ("shelver_claims_released_total", (("reason", "worker_lost"),)), 0
            )

    assert recovered_after < RECOVERY_S
    assert released >= held
    assert scalar(
        engine, "SELECT count(*) FROM products WHERE model_version_id = :m", m=champion
    ) == len(rows)
    assert scalar(engine, "SELECT count(*) FROM products WHERE status = 'pending'") == 0
    # One history row per product: the killed batch's rows were written once, by the new worker.
    assert scalar(engine, "SELECT count(*) FROM predictions") == len(rows)
    assert (
        scalar(
            engine,
            "SELECT count(*) FROM (SELECT product_id FROM predictions GROUP BY product_id "
            "HAVING count(*) > 1) d",
        )
        == 0
    )
    assert "stopped heartbeating" in (tmp_path / "dispatch.log").read_text()


def test_a_worker_that_stops_cleanly_leaves_the_workers_table(
    engine: Engine, env: dict[str, str], artifact: bytes, tmp_path: Path
) -> None:
    register_champion(engine, artifact, "recovery-2")
    with running(["worker", "-c", "2"], env, tmp_path / "worker.log") as worker:
        wait_for(
            lambda: scalar(engine, "SELECT count(*) FROM workers") == 2,
            120,
            "both pool processes to heartbeat",
            tmp_path,
        )
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert scalar(engine, "SELECT count(*) FROM workers") == 0
