"""User mistakes get one readable line and exit status 2, never a traceback or a secret."""

from __future__ import annotations

import os
import subprocess
import sys


def shelver(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SHELVER_")}
    return subprocess.run(
        [sys.executable, "-m", "shelver.worker", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unreachable_database_is_one_line_without_the_password() -> None:
    result = shelver(
        "status", SHELVER_DATABASE_URL="postgresql://postgres:hunter2@127.0.0.1:1/shelver"
    )
    assert result.returncode == 2
    assert "cannot reach PostgreSQL" in result.stderr
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_missing_settings_say_which_variable_to_set() -> None:
    result = shelver("status")
    assert result.returncode == 2
    assert "SHELVER_DATABASE_URL is not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_without_encoders_names_the_export_command(tmp_path) -> None:  # noqa: ANN001
    result = shelver(
        "worker",
        SHELVER_DATABASE_URL="postgresql://postgres@127.0.0.1:1/shelver",
        SHELVER_BROKER_URL="redis://127.0.0.1:1/0",
        SHELVER_MODEL_DIR=str(tmp_path),
    )
    assert result.returncode == 2
    assert "shelver encoders export" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_option_values_are_refused_plainly() -> None:
    result = shelver("train", "--promote", "sometimes", SHELVER_DATABASE_URL="postgresql://x@h/d")
    assert result.returncode == 2
    assert "--promote must be auto, never or force" in result.stderr
