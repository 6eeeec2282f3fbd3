"""Each install loads only what it needs: workers never torch or TF, catalog commands no extras."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

REPO = Path(__file__).resolve().parents[1]

# Top-level modules of the worker, train and export extras; the core install has none of them.
EXTRAS = (
    "onnxruntime", "numpy", "PIL", "tokenizers", "celery", "kombu", "redis", "croniter",
    "tensorflow", "keras", "torch", "sentence_transformers",
)  # fmt: skip

# Runs the CLI in this process, then says how it exited and which extras it loaded.
CLI_PROBE = f"""
import json, sys
from shelver.worker.cli import main
sys.argv = ["shelver", *sys.argv[1:]]
try:
    main()
    code = 0
except SystemExit as exit:
    code = exit.code
loaded = sorted(m for m in {EXTRAS!r} if m in sys.modules)
print(json.dumps({{"exit": code, "loaded": loaded}}))
"""


def test_worker_inference_modules_import_neither_torch_nor_tensorflow() -> None:
    probe = (
        "import sys\n"
        "import shelver.worker.encoders, shelver.worker.images, shelver.catalog.embeddings\n"
        "heavy = sorted(m for m in ('torch', 'tensorflow', 'keras', 'sentence_transformers')"
        " if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def run_cli_probe(database_url: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHELVER_")}
    env["SHELVER_DATABASE_URL"] = database_url
    result = subprocess.run(
        [sys.executable, "-c", CLI_PROBE, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "command", [["status"], ["status", "--json"], ["db", "upgrade"], ["import"]], ids=" ".join
)
def test_catalog_commands_run_on_the_core_install_alone(
    command: list[str], database_url: str, engine: Engine, tmp_path: Path
) -> None:
    if command == ["import"]:
        products = tmp_path / "products.csv"
        products.write_text("id,name,description,category\nlight-1,Desk lamp,LED,Lighting\n")
        command = ["import", str(products)]
    outcome = run_cli_probe(database_url, *command)
    assert outcome["exit"] == 0
    assert outcome["loaded"] == [], f"`shelver {' '.join(command)}` loaded {outcome['loaded']}"
    if command[0] == "import":
        with engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM products")).scalars().all() == ["Desk lamp"]


def test_friendly_errors_need_no_extras() -> None:
    """A misconfigured `status` still gets its one-line error without loading the worker stack."""
    outcome = run_cli_probe("postgresql://postgres@127.0.0.1:1/shelver", "status")
    assert outcome["exit"] == 2
    assert outcome["loaded"] == []
