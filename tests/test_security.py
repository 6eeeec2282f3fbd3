"""Security properties of the running system: where images may come from, what models may be,
and where credentials live.

The image and model tests run a real `shelver dispatch` and `shelver worker`; the
credentials test runs them against a PostgreSQL of its own where the application
role needs a password, and checks that the password appears in no log, no
output and no command line.
"""

from __future__ import annotations

import ast
import http.server
import io
import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg2
import pytest
from PIL import Image
from sqlalchemy import Engine, create_engine, text
from support import (
    CATEGORIES,
    centroid_artifact,
    register_champion,
    training_titles,
)
from test_chaos import (
    SHELVER,
    Procs,
    Stack,
    assert_all_done,
    drained,
    insert,
    sample_products,
    scalar,
    wait_until,
)

from shelver.catalog.settings import Settings, sqlalchemy_url
from shelver.worker.encoders import load_encoders

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NAME = "Yamaha digital piano with 88 weighted keys"


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.linear_gradient("L").resize((200, 150)).convert("RGB").save(out, "JPEG")
    return out.getvalue()


class ImageServer:
    """A local HTTP server with one photo and one redirect, recording every request it gets."""

    def __init__(self) -> None:
        photo = _jpeg()
        seen: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                seen.append(self.path)
                if self.path == "/photo.jpg":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(photo)))
                    self.end_headers()
                    self.wfile.write(photo)
                elif self.path == "/bounce.jpg":
                    # Off the allowlist: "localhost" is the same machine under another name.
                    self.send_response(302)
                    self.send_header("Location", f"http://localhost:{port}/secret.jpg")
                    self.end_headers()
                else:
                    self.send_response(404)
                    self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        port = self.server.server_address[1]
        self.port = port
        self.seen = seen
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def artifacts(encoder_dir: Path, fixture_data: Path) -> tuple[bytes, bytes]:
    encoders = load_encoders(encoder_dir)
    examples = training_titles(fixture_data)
    first = centroid_artifact(*encoders, examples)
    second = centroid_artifact(*encoders, {k: examples[k] for k in CATEGORIES[:2]})
    return first, second


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.close()


def base_env(encoder_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "SHELVER_MODEL_DIR": str(encoder_dir),
        "SHELVER_MODEL_POLL_SECONDS": "1",
        "SHELVER_POLL_SECONDS": "1",
        "SHELVER_LEASE_SECONDS": "60",
        **extra,
    }


@pytest.fixture
def procs(
    database_url: str,
    broker_url: str,
    encoder_dir: Path,
    image_server: ImageServer,
    tmp_path: Path,
) -> Iterator[Procs]:
    env = base_env(
        encoder_dir,
        SHELVER_DATABASE_URL=database_url,
        SHELVER_BROKER_URL=broker_url,
        SHELVER_IMAGE_ROOTS=json.dumps([str(tmp_path / "images")]),
        SHELVER_ALLOW_URL_FETCH="true",
        SHELVER_URL_ALLOWLIST=json.dumps(["127.0.0.1"]),
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    running = Procs(env, logs)
    yield running
    running.stop_all()


def results(engine: Engine) -> dict[str, tuple[str, str | None, int | None]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT sku, status, error, model_version_id FROM products"))
        return {sku: (status, error, model) for sku, status, error, model in rows}


def test_running_worker_reads_only_inside_image_roots_and_fetches_only_allowlisted_hosts(
    engine: Engine,
    procs: Procs,
    artifacts: tuple[bytes, bytes],
    image_server: ImageServer,
    fixture_data: Path,
    tmp_path: Path,
) -> None:
    register_champion(engine, artifacts[0], "sec-1")
    root = tmp_path / "images"
    root.mkdir()
    (root / "inside.jpg").write_bytes(_jpeg())
    outside = next((fixture_data / "bestbuy" / "images").glob("*.jpg"))
    (root / "escape.jpg").symlink_to(outside)
    port = image_server.port
    images = {
        "inside": str(root / "inside.jpg"),
        "relative-inside": "inside.jpg",
        "outside": str(outside),
        "dotdot": "../../../../etc/passwd",
        "symlink": str(root / "escape.jpg"),
        "file-url-outside": "file:///etc/hostname",
        "allowed-url": f"http://127.0.0.1:{port}/photo.jpg",
        "other-host": f"http://localhost:{port}/photo.jpg",
        "redirect-off-list": f"http://127.0.0.1:{port}/bounce.jpg",
        "metadata-service": "http://169.254.169.254/latest/meta-data/",
    }
    insert(
        engine,
        [{"sku": k, "name": NAME, "description": "", "image_uri": v} for k, v in images.items()],
    )
    worker = procs.worker()
    procs.dispatcher()
    wait_until(lambda: drained(engine), 180, "every product to be classified")

    got = results(engine)
    assert got["inside"][1] is None and got["relative-inside"][1] is None
    assert got["allowed-url"][1] is None
    for sku in ("outside", "dotdot", "symlink", "file-url-outside"):
        assert got[sku][1].startswith("image not used: outside_root"), (sku, got[sku])
    for sku in ("other-host", "metadata-service"):
        assert got[sku][1].startswith("image not used: host_not_allowed"), (sku, got[sku])
    assert "redirect to http://localhost" in got["redirect-off-list"][1]
    # Refused hosts were never contacted; the redirect's target was never requested.
    assert sorted(image_server.seen) == ["/bounce.jpg", "/photo.jpg"]
    assert all(status in ("classified", "needs_review") for status, _, _ in got.values())
    assert worker.poll() is None


def test_a_tampered_champion_is_refused_by_the_running_worker_and_the_old_one_keeps_serving(
    engine: Engine, procs: Procs, artifacts: tuple[bytes, bytes]
) -> None:
    first = register_champion(engine, artifacts[0], "sec-1")
    worker = procs.worker()
    procs.dispatcher()
    insert(engine, [{"sku": "before", "name": NAME, "description": "", "image_uri": None}])
    wait_until(lambda: drained(engine), 120, "the first champion to classify")
    assert results(engine)["before"][2] == first

    # A new champion whose bytes were altered after registration (sha256 no longer matches) ...
    second = register_champion(engine, artifacts[1], "sec-2-tampered")
    tampered = bytearray(artifacts[1])
    tampered[len(tampered) // 2] ^= 0xFF
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE model_versions SET artifact = :a WHERE id = :id"),
            {"a": bytes(tampered), "id": second},
        )
    # Workers look at the registry when a batch starts, at most once a model poll.
    time.sleep(1.5)
    insert(engine, [{"sku": "after", "name": NAME, "description": "", "image_uri": None}])
    wait_until(lambda: drained(engine), 120, "classification after the tampering")

    # ... is refused, and the old champion keeps serving without a restart.
    assert results(engine)["after"][2] == first
    log = (procs.logs / "worker.log").read_text(errors="replace")
    assert "refusing champion sec-2-tampered" in log and "sha256" in log, log[-3000:]
    assert worker.poll() is None


UNPICKLING_MODULES = {"pickle", "cPickle", "joblib", "dill", "cloudpickle", "shelve", "marshal"}


def _unsafe_loads(path: Path) -> list[str]:
    """Imports of unpickling modules, and loader calls that would unpickle, in one source file."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            if {n.split(".")[0] for n in names} & UNPICKLING_MODULES:
                found.append(f"{path}:{node.lineno}: imports {names}")
        if not isinstance(node, ast.Call):
            continue
        callee = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if keywords.get("allow_pickle") == "True":
            found.append(f"{path}:{node.lineno}: {callee}(allow_pickle=True)")
        if callee.endswith("torch.load") and keywords.get("weights_only") != "True":
            found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
        if callee.endswith("load_model") and keywords.get("safe_mode") == "False":
            found.append(f"{path}:{node.lineno}: {callee}(safe_mode=False)")
    return found


def test_no_code_path_that_loads_models_or_artifacts_can_unpickle() -> None:
    sources = [p for d in ("worker", "training", "catalog") for p in (REPO / d).rglob("*.py")]
    assert len(sources) > 20
    assert [problem for path in sources for problem in _unsafe_loads(path)] == []


# --- credentials --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str, str]]:
    """Our own PostgreSQL where role ``shelver_app`` must give a password; yields its URL."""
    stack = Stack(tmp_path_factory.mktemp("guarded")).start()
    password = "pw-" + secrets.token_urlsafe(18)
    try:
        with stack.engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE ROLE shelver_app LOGIN PASSWORD '{password}'")
            conn.exec_driver_sql(
                "GRANT ALL ON ALL TABLES IN SCHEMA public TO shelver_app;"
                "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO shelver_app;"
                "GRANT USAGE ON SCHEMA public TO shelver_app"
            )
        hba = stack.postgres.pgdata / "pg_hba.conf"
        # First matching line wins: this role, over TCP, must authenticate.
        hba.write_text(
            "host all shelver_app 127.0.0.1/32 scram-sha-256\n"
            "host all shelver_app ::1/128 scram-sha-256\n" + hba.read_text()
        )
        stack.postgres._run("pg_ctl", "-D", str(stack.postgres.pgdata), "reload")
        port = stack.postgres.port
        url = f"postgresql://shelver_app:{password}@127.0.0.1:{port}/shelver_chaos"
        yield stack, url, password
    finally:
        stack.stop()


def test_credentials_come_from_the_environment_only_and_never_reach_logs_or_output(
    guarded_stack: tuple[Stack, str, str],
    encoder_dir: Path,
    artifacts: tuple[bytes, bytes],
    fixture_data: Path,
    tmp_path: Path,
) -> None:
    stack, url, password = guarded_stack
    # The role really needs its password: this is not a trust-everyone server.
    wrong = url.replace(password, "not-the-password")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(wrong).close()
    app_engine = create_engine(sqlalchemy_url(url))
    register_champion(app_engine, artifacts[0], "cred-1")
    # Settings are read from the environment, never from a file that could be committed.
    assert Settings.model_config.get("env_file") is None

    env = base_env(
        encoder_dir,
        SHELVER_DATABASE_URL=url,
        SHELVER_BROKER_URL=stack.broker_url,
        SHELVER_IMAGE_ROOTS=json.dumps([str(fixture_data)]),
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Procs(env, logs)
    try:
        worker, dispatcher = procs.worker(), procs.dispatcher()
        insert(app_engine, sample_products(fixture_data, 40, "cred"))
        wait_until(lambda: drained(app_engine), 180, "classification as the password role")
        assert_all_done(app_engine, 40)
        command_lines = [
            " ".join(p.cmdline())
            for proc in (worker, dispatcher)
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)]
        ]
    finally:
        procs.stop_all()

    outputs = [
        subprocess.run([*SHELVER, *args], env=e, capture_output=True, text=True, timeout=120)
        for args, e in (
            (["status"], env),
            (["status", "--json"], env),
            (["models", "list"], env),
            # Failures are where URLs get printed: a refused login, and a server that is down.
            (["status"], {**env, "SHELVER_DATABASE_URL": url.replace(password, password + "x")}),
            (
                ["dispatch"],
                {**env, "SHELVER_DATABASE_URL": url.replace(str(stack.postgres.port), "9")},
            ),  # fmt: skip
        )
    ]
    assert outputs[0].returncode == 0 and "classified" in outputs[0].stdout
    assert outputs[4].returncode != 0
    texts = {p.name: p.read_text(errors="replace") for p in logs.glob("*.log")}
    texts |= {f"cli-{i}": o.stdout + o.stderr for i, o in enumerate(outputs)}
    texts |= {f"argv-{i}": line for i, line in enumerate(command_lines)}
    assert "shelver_app" in texts["cli-4"] or "127.0.0.1" in texts["cli-4"]
    leaked = [name for name, body in texts.items() if password in body]
    assert leaked == [], f"the password appears in {leaked}"
    assert scalar(app_engine, "SELECT count(*) FROM products") == 40
    app_engine.dispose()
