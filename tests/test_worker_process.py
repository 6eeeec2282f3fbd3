"""What `shelver worker` is told reaches the worker: its onnxruntime threads and its node name."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import Engine

from shelver.catalog.settings import Settings
from shelver.training.bundle import register_bundled
from shelver.worker.runtime import Runtime

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Neither 1 (the fusion model's own default) nor a plausible core count (the encoders').
THREADS = 3


def test_ort_threads_setting_reaches_every_session_of_a_worker(
    engine: Engine, encoder_dir: Path
) -> None:
    register_bundled(engine)
    runtime = Runtime.load(engine, Settings(model_dir=encoder_dir, ort_threads=THREADS))
    champion = runtime.refresh()
    assert champion is not None
    sessions = {
        "text encoder": runtime.text_encoder.session,
        "image encoder": runtime.image_encoder.session,
        "fusion model": champion.model._session,
    }
    threads = {name: s.get_session_options().intra_op_num_threads for name, s in sessions.items()}
    assert threads == dict.fromkeys(sessions, THREADS)


def compose_worker() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["worker"]


def healthcheck(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # As in the container: compose turns $$ into $, the shell expands $HOSTNAME.
    return subprocess.run(
        ["sh", "-c", script.replace("$$", "$")], env=env, capture_output=True, text=True, timeout=60
    )


def test_compose_worker_answers_its_healthcheck_and_runs_the_threads_asked_for(
    engine: Engine, database_url: str, broker_url: str, encoder_dir: Path, tmp_path: Path
) -> None:
    register_bundled(engine)
    service = compose_worker()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SHELVER_")},
        "SHELVER_DATABASE_URL": database_url,
        "SHELVER_BROKER_URL": broker_url,
        "SHELVER_MODEL_DIR": str(encoder_dir),
        # The container's image has `celery` on its PATH and its host name in $HOSTNAME.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOSTNAME": socket.gethostname(),
    }
    command = [sys.executable, "-m", "shelver.worker", *service["command"][1:]]
    command += ["-c", "1", "--threads", str(THREADS)]
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        ping = healthcheck(service["healthcheck"]["test"][1], env)
        while ping.returncode != 0 and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(1)
            ping = healthcheck(service["healthcheck"]["test"][1], env)
        logs = log_path.read_text(errors="replace")
        assert ping.returncode == 0, ping.stdout + ping.stderr + logs
        assert "pong" in ping.stdout
        # The name Celery picks by default answers nothing: the old healthcheck would fail.
        default_name = "celery -A shelver.worker.celery_app inspect ping -d celery@$$HOSTNAME"
        assert healthcheck(default_name, env).returncode != 0
        while "intra-op threads per session" not in logs and time.monotonic() < deadline:
            time.sleep(1)
            logs = log_path.read_text(errors="replace")
        assert f"onnxruntime intra-op threads per session: {THREADS}" in logs, logs
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
