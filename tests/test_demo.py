"""`shelver demo`, the main job, as a newcomer runs it: real processes, real services."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

pytestmark = pytest.mark.slow

# Demo products of the two top-level categories of the demo's taxonomy that the bundled
# model never learned (worker/demo_data/README.md): a gift card, a VR headset, a pet
# tracker. The demo's smartwatch the bundled model puts under Best Buy's own
# "Cell Phones > ... > Smartwatches & Accessories", a node it learned; it is not sure of it.
UNSEEN = {"demo-024", "demo-025", "demo-026"}
# What the bundled model (default-d55dcfca: a tree model with its open-set gate) auto-
# accepts, all rightly: a phone case, a microwave, a dishwasher, batteries. Its gate sends
# the rest to review, among them the phone, the laptop and the fitness tracker, whose
# top level it has right but not by the margin it asks of products unlike its training rows.
KNOWN_ACCEPTED = {"demo-002", "demo-005", "demo-006", "demo-012"}


def run_demo(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shelver.worker", "demo", "--timeout", "240"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=420,
    )


def test_demo_classifies_its_products_on_the_configured_services(
    engine: Engine, database_url: str, broker_url: str, encoder_dir: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "SHELVER_DATABASE_URL": database_url,
        "SHELVER_BROKER_URL": broker_url,
        "SHELVER_MODEL_DIR": str(encoder_dir),
        "SHELVER_DATA_DIR": str(tmp_path / "var"),
    }
    result = run_demo(env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "from your settings" in result.stdout
    assert "the bundled default model" in result.stdout
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                """
                SELECT p.sku, p.status, c.path FROM products p
                LEFT JOIN categories c ON c.id = p.predicted_id WHERE p.sku LIKE 'demo-%'
                """
            )
        ).all()
        champion = conn.execute(
            text("SELECT version FROM model_versions WHERE status = 'champion'")
        ).scalar_one()
        loaded = set(conn.execute(text("SELECT path FROM categories")).scalars())
    assert len(rows) == 27
    assert all(status in ("classified", "needs_review") and path for _, status, path in rows)
    assert champion.startswith("default-")
    # The demo's taxonomy is in the catalog, its two top levels the model never learned too.
    assert {"Wearable Technology > Apple Watch", "Best Buy Gift Cards > Gift Cards"} <= loaded
    status = {sku: (s, path) for sku, s, path in rows}
    # Products of those categories: a taxonomy suggestion, waiting for review.
    for sku in UNSEEN:
        got, path = status[sku]
        assert got == "needs_review", (sku, status[sku])
        assert path.split(" > ")[0] in ("Wearable Technology", "Best Buy Gift Cards"), (sku, path)
    assert status["demo-027"][0] == "needs_review"
    # What the bundled model alone auto-accepts (all right) is still auto-accepted.
    assert {sku for sku, (s, _) in status.items() if s == "classified"} == KNOWN_ACCEPTED
    # The phone's suggestion is the phone's own branch, shown as a path.
    assert status["demo-001"][1] == "Cell Phones > Unlocked Cell Phones > All Unlocked Cell Phones"
    assert (
        f"{len(KNOWN_ACCEPTED)} classified automatically, {27 - len(KNOWN_ACCEPTED)} left for a "
        f"person (`shelver review`), {len(UNSEEN)} of them with a taxonomy category"
    ) in " ".join(result.stdout.split())


def test_demo_with_nothing_configured_starts_and_stops_embedded_services(
    encoder_dir: Path, tmp_path: Path
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SHELVER_DATABASE_URL", "SHELVER_BROKER_URL")
    }
    env |= {"SHELVER_MODEL_DIR": str(encoder_dir), "SHELVER_DATA_DIR": str(tmp_path / "var")}
    result = run_demo(env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedded, stopped when the demo ends" in result.stdout
    assert "everything the demo started is stopped" in result.stdout
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "var" / "demo")], capture_output=True, text=True
    )
    assert leftovers.stdout.strip() == "", "a demo server outlived the demo"
