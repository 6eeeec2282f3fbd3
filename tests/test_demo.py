"""`shelver demo`, the main job, as a newcomer runs it: real processes, real services."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

pytestmark = pytest.mark.slow


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
            text("SELECT status, predicted_id IS NOT NULL FROM products WHERE sku LIKE 'demo-%'")
        ).all()
        champion = conn.execute(
            text("SELECT version FROM model_versions WHERE status = 'champion'")
        ).scalar_one()
    assert len(rows) == 24
    assert all(status in ("classified", "needs_review") and has for status, has in rows)
    assert champion.startswith("default-")


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
