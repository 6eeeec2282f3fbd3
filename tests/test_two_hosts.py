"""Workers on other hosts: PostgreSQL, Redis and the images on one host, two worker hosts.

The hosts are network namespaces joined by a private bridge (tests/netns.py). Each
worker host has its own copy of the encoders, reaches the services only by their
bridge address, and fetches every image over HTTP from the allowlisted server on the
services host. Cutting one worker host's link mid-batch must lose nothing: the cut
host stops heartbeating, the dispatcher gives its claims back (seconds, not the
300 s lease, which this test leaves at its default) and the other host finishes.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import (
    NetnsUnavailable,
    Network,
    catalog_engine,
    check_available,
    image_requests,
    own_model_dir,
    private_network,
    start_services,
    wait_until,
    worker_env,
)
from support import centroid_artifact, insert, register_champion, scalar, training_titles

from shelver.worker.encoders import load_encoders

pytestmark = pytest.mark.slow

SHELVER = [sys.executable, "-m", "shelver.worker"]
# Well under the 300 s lease: the cut host's rows must come back through its missing heartbeat.
FINISH_WITHIN_S = 150


@pytest.fixture
def network() -> Iterator[Network]:
    try:
        check_available()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    # Every process in the namespaces is killed after 10 minutes even if this test is.
    with private_network(workers=2, bound_s=600) as network:
        yield network


def products_with_images(fixture_data: Path, image_base_url: str) -> list[dict]:
    """Every fixture Best Buy row that has a photo; its URL names the sku, so fetches say who."""
    with (fixture_data / "bestbuy" / "products.csv").open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["image"]]
    return [
        {
            "sku": f"two-hosts-{r['id']}",
            "name": r["name"],
            "description": r["description"],
            "image_uri": f"{image_base_url}/bestbuy/{r['image']}?sku=two-hosts-{r['id']}",
        }
        for r in rows
    ]


def skus_fetched_by(log: Path, address: str) -> list[str]:
    return [path.split("?sku=")[1] for client, path in image_requests(log)
            if client == address and "?sku=" in path]  # fmt: skip


def test_a_cut_worker_host_loses_nothing_and_the_other_host_finishes(
    network: Network,
    encoder_dir: Path,
    fixture_data: Path,
    tmp_path: Path,
) -> None:
    services = start_services(network, tmp_path / "services", fixture_data)
    engine = catalog_engine(network, services)
    champion = register_champion(
        engine, centroid_artifact(*load_encoders(encoder_dir), training_titles(fixture_data)), "1"
    )
    settings = {
        "SHELVER_POLL_SECONDS": "0.5",
        "SHELVER_BATCH_SIZE": "16",
        "SHELVER_MODEL_POLL_SECONDS": "2",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    dispatch_dir = tmp_path / "services" / "dispatch"
    dispatch_dir.mkdir()
    # Two batches in flight, one per worker host, so the cut host holds one batch at most.
    network.services.spawn(
        [*SHELVER, "dispatch", "--max-inflight-batches", "2"],
        worker_env(services, dispatch_dir / "models", dispatch_dir, **settings),
        logs / "dispatch.log",
    )
    for i, host in enumerate(network.workers, start=1):
        host_dir = tmp_path / f"host{i}"
        host_dir.mkdir()
        host.spawn(
            [*SHELVER, "worker", "-c", "1", "--threads", "1", "-n", f"host{i}@%h"],
            worker_env(services, own_model_dir(encoder_dir, host_dir), host_dir, **settings),
            logs / f"worker{i}.log",
            cwd=host_dir,
        )
    cut, other = network.workers

    def tails() -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted([*logs.glob("*.log"), services.image_log])
        )

    try:
        wait_until(
            lambda: all(" ready." in (logs / f"worker{i}.log").read_text() for i in (1, 2)),
            240,
            "both worker hosts to load their encoders and start",
        )
        rows = products_with_images(fixture_data, services.image_base_url)
        insert(engine, rows)
        wait_until(
            lambda: (
                skus_fetched_by(services.image_log, cut.address)
                and skus_fetched_by(services.image_log, other.address)
            ),
            120,
            "both worker hosts to fetch images",
        )
        # Cut right after the host fetched another image: it is in the middle of a
        # batch it claimed and will never finish.
        seen = len(skus_fetched_by(services.image_log, cut.address))
        wait_until(
            lambda: len(skus_fetched_by(services.image_log, cut.address)) > seen,
            60,
            "the host to be cut to fetch another image",
        )
        cut.cut()
        fetched_by_cut_host = set(skus_fetched_by(services.image_log, cut.address))
        wait_until(
            lambda: scalar(engine, "SELECT count(*) FROM classification_queue") == 0,
            FINISH_WITHIN_S,
            "the other host to finish every product",
        )
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{tails()}")

    n = len(rows)
    assert scalar(engine, "SELECT count(*) FROM products") == n
    assert (
        scalar(
            engine,
            "SELECT count(*) FROM products WHERE status IN ('classified', 'needs_review') "
            "AND model_version_id = :m",
            m=champion,
        )
        == n
    ), tails()
    # No duplicate history: one prediction per product, however often it was handed out.
    assert scalar(engine, "SELECT count(*) FROM predictions") == n
    # Every product was classified with its photo, fetched over the bridge.
    assert scalar(engine, "SELECT count(*) FROM products WHERE error IS NOT NULL") == 0, tails()
    fetched_by_other = set(skus_fetched_by(services.image_log, other.address))
    # Products flowed through both hosts ...
    assert fetched_by_cut_host and fetched_by_other
    # ... and the batch the cut host held came back and was done by the other host.
    assert fetched_by_cut_host & fetched_by_other, tails()
    assert "stopped heartbeating" in (logs / "dispatch.log").read_text(), tails()
    engine.dispose()
