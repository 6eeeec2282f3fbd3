"""What `shelver worker` is told reaches the worker: its onnxruntime threads and its node name."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from sqlalchemy import Engine
from support import insert, scalar, stop, worker_env

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


def test_one_thread_workers_run_small_encoder_batches_and_others_keep_the_large_ones(
    engine: Engine, encoder_dir: Path
) -> None:
    """onnxruntime keeps each session's largest run's activations: one-thread workers keep
    their runs small, where that measured as fast; with more threads the old sizes stay."""
    one = Runtime.load(engine, Settings(model_dir=encoder_dir, ort_threads=1))
    assert (one.image_encoder.batch_size, one.text_encoder.max_batch_tokens) == (4, 512)
    more = Runtime.load(engine, Settings(model_dir=encoder_dir, ort_threads=THREADS))
    assert (more.image_encoder.batch_size, more.text_encoder.max_batch_tokens) == (32, 2048)
    asked = Settings(model_dir=encoder_dir, ort_threads=1, image_batch_size=8, text_batch_tokens=99)
    chosen = Runtime.load(engine, asked)
    assert (chosen.image_encoder.batch_size, chosen.text_encoder.max_batch_tokens) == (8, 99)


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
        stop(worker)


def shared_anonymous_bytes(pid: int) -> int:
    """Bytes of a process's anonymous memory (heap, malloc'd) also mapped by another process.

    For a forked pool process these are pages it still shares with the main process:
    written there before the fork, only read since. Libraries' file pages are left out,
    every process running Python and onnxruntime shares those anyway.
    """
    shared = 0
    anonymous = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            path = fields[5] if len(fields) > 5 else ""
            anonymous = path in ("", "[heap]") or path.startswith("[anon")
        elif anonymous and fields[0] in ("Shared_Clean:", "Shared_Dirty:"):
            shared += int(fields[1]) * 1024
    return shared


def test_prefork_pool_processes_share_the_encoders_the_main_process_loaded(
    engine: Engine,
    database_url: str,
    broker_url: str,
    encoder_dir: Path,
    fixture_data: Path,
    tmp_path: Path,
) -> None:
    """`shelver worker -c 2 --threads 1` loads the encoders once, before the pool forks.

    Each pool process then holds the weights as pages shared with the main process, at
    least as many bytes as the ONNX files; a pool process that loaded its own copy shares
    only the interpreter's pre-fork heap. Classifying photos and texts keeps them shared.
    """
    register_bundled(engine)
    rows = [
        {
            "sku": f"share-{r['id']}",
            "name": r["name"],
            "description": r["description"],
            "image_uri": f"bestbuy/{r['image']}",
        }
        for r in csv.DictReader((fixture_data / "bestbuy" / "products.csv").open(encoding="utf-8"))
        if r["image"]
    ][:48]
    env = worker_env(database_url, broker_url, encoder_dir, fixture_data)
    shelver = [sys.executable, "-m", "shelver.worker"]
    procs = []
    logs = {name: tmp_path / f"{name}.log" for name in ("dispatch", "worker")}
    try:
        for name, args in (
            ("dispatch", ["dispatch"]),
            ("worker", ["worker", "-c", "2", "--threads", "1"]),
        ):
            with logs[name].open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        shelver + args,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        worker = psutil.Process(procs[1].pid)
        insert(engine, rows)
        deadline = time.monotonic() + 300
        while scalar(engine, "SELECT count(*) FROM classification_queue") and (
            time.monotonic() < deadline and all(p.poll() is None for p in procs)
        ):
            time.sleep(0.5)
        log = "\n".join(p.read_text(errors="replace")[-4000:] for p in logs.values())
        assert scalar(engine, "SELECT count(*) FROM classification_queue") == 0, log
        classified = scalar(
            engine,
            "SELECT count(*) FROM products WHERE status IN ('classified', 'needs_review')",
        )
        assert classified == len(rows), log
        manifest = json.loads((encoder_dir / "manifest.json").read_text())
        image_dim = manifest["encoders"][manifest["default_image"]]["dim"]
        photos = scalar(engine, "SELECT count(*) FROM embeddings WHERE dim = :d", d=image_dim)
        assert photos == len(rows), log  # every photo went through the image encoder

        pool = worker.children()
        assert len(pool) == 2, log
        weights = sum(
            (encoder_dir / manifest["encoders"][manifest[key]]["file"]).stat().st_size
            for key in ("default_text", "default_image")
        )
        shared = {p.pid: shared_anonymous_bytes(p.pid) for p in pool}
        assert all(b >= weights for b in shared.values()), (
            f"pool processes share {shared} bytes of anonymous memory, the encoders are "
            f"{weights} bytes\n{log}"
        )
        assert "loaded in the main process" in log
        assert "using the encoders loaded by the main process" in log
    finally:
        stop(*procs)
