"""Helpers the process-level tests and benchmarks share: encoders, a small real champion, rows.

The champion is a nearest-centroid ONNX graph built from product titles of the
repository's fixture data, packaged and registered exactly as training would, so tests get a
real model in seconds instead of training one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, text

from shelver.worker.encoders import ImageEncoder, TextEncoder, product_text
from shelver.worker.fusion import build_artifact, sha256_hex

CATEGORIES = ("Cell Phones", "Appliances", "Video Games", "Musical Instruments")


def export_or_reuse_encoders(base: Path, sample_dir: Path) -> Path:
    """Exported encoders: $SHELVER_TEST_MODEL_DIR if it holds a manifest, else a fresh export.

    A fresh export checks its parity on the products in ``sample_dir``.
    """
    reuse = os.environ.get("SHELVER_TEST_MODEL_DIR")
    if reuse and (Path(reuse) / "manifest.json").is_file():
        return Path(reuse)
    from shelver.training.encoder_export import export_encoders

    path = base / "encoders"
    if not (path / "manifest.json").is_file():
        export_encoders(path, sample_dir=sample_dir)
    return path


def training_titles(data: Path, per_class: int = 25) -> dict[str, list[str]]:
    """A few product texts per category, from the far end of the Best Buy file in ``data``."""
    with (data / "bestbuy" / "products.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    picked: dict[str, list[str]] = defaultdict(list)
    for row in reversed(rows):
        if row["category"] in CATEGORIES and len(picked[row["category"]]) < per_class:
            picked[row["category"]].append(product_text(row["name"], row["description"]))
    return dict(picked)


def centroid_artifact(
    text_encoder: TextEncoder,
    image_encoder: ImageEncoder,
    examples: dict[str, list[str]],
    *,
    threshold: float = 0.5,
    scale: float = 25.0,
    extra_meta: dict | None = None,
) -> bytes:
    """A real fusion artifact: softmax(scale * cosine to each class's mean text embedding).

    The ``examples`` keys are its labels (category paths, of any depth); ``extra_meta``
    adds to its meta.json (e.g. ``level_thresholds``).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    labels = sorted(examples)
    centroids = np.stack([text_encoder.encode(examples[label]).mean(axis=0) for label in labels])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    k, d_img = len(labels), image_encoder.dim
    weights = {
        "w_text": (centroids.T * scale).astype(np.float32),
        # The image branch is present, as in the trained model, but given no say.
        "w_image": np.zeros((d_img, k), dtype=np.float32),
        "w_present": np.zeros((1, k), dtype=np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["text_emb", "w_text"], ["t"]),
            helper.make_node("MatMul", ["image_emb", "w_image"], ["i"]),
            helper.make_node("MatMul", ["image_present", "w_present"], ["p"]),
            helper.make_node("Add", ["t", "i"], ["ti"]),
            helper.make_node("Add", ["ti", "p"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "centroid_fusion",
        [
            helper.make_tensor_value_info("text_emb", TensorProto.FLOAT, ["n", text_encoder.dim]),
            helper.make_tensor_value_info("image_emb", TensorProto.FLOAT, ["n", d_img]),
            helper.make_tensor_value_info("image_present", TensorProto.FLOAT, ["n", 1]),
        ],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", k])],
        initializer=[numpy_helper.from_array(v, name) for name, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    meta = {
        "labels": labels,
        "threshold": threshold,
        "encoders": {"text": text_encoder.identity, "image": image_encoder.identity},
        "text_packing": "name. description",
        "text_dim": text_encoder.dim,
        "image_dim": d_img,
        "lexical": None,
        **(extra_meta or {}),
    }
    return build_artifact(model.SerializeToString(), meta)


def register_champion(
    engine: Engine, artifact: bytes, version: str, *, threshold: float = 0.5
) -> int:
    """Insert a model version and make it the champion, retiring the previous one, in one go."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(artifact)) as archive:
        meta = json.loads(archive.read("meta.json"))
    with engine.begin() as conn:
        conn.execute(text("UPDATE model_versions SET status = 'retired' WHERE status = 'champion'"))
        return conn.execute(
            text(
                """
                INSERT INTO model_versions
                    (version, status, artifact, sha256, labels, encoders, threshold, promoted_at)
                VALUES (:version, 'champion', :artifact, :sha256, CAST(:labels AS jsonb),
                        CAST(:encoders AS jsonb), :threshold, now())
                RETURNING id
                """
            ),
            {
                "version": version,
                "artifact": artifact,
                "sha256": sha256_hex(artifact),
                "labels": json.dumps(meta["labels"]),
                "encoders": json.dumps(meta["encoders"]),
                "threshold": threshold,
            },
        ).scalar_one()


def insert_products(engine: Engine, rows: list[dict]) -> list[int]:
    with engine.begin() as conn:
        return [
            conn.execute(
                text(
                    "INSERT INTO products (sku, name, description, image_uri) "
                    "VALUES (:sku, :name, :description, :image_uri) RETURNING id"
                ),
                {"description": "", "image_uri": None, **row},
            ).scalar_one()
            for row in rows
        ]


def insert(engine: Engine, rows: list[dict]) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO products (sku, name, description, image_uri) "
                "VALUES (:sku, :name, :description, :image_uri)"
            ),
            rows,
        )


def scalar(engine: Engine, sql: str, **params: object) -> int:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar_one()


def empty_catalog(engine: Engine) -> None:
    """Truncate every catalog table (not Alembic's), identities reset."""
    with engine.begin() as conn:
        tables = conn.execute(
            text(
                "SELECT string_agg(quote_ident(tablename), ', ') FROM pg_tables "
                "WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
            )
        ).scalar_one()
        conn.exec_driver_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")


def shelver_env(
    database_url: str, broker_url: str, model_dir: Path, image_root: Path, **overrides: str
) -> dict[str, str]:
    """The environment of a real shelver process: these servers, encoders and images, the
    champion looked for every second; ``overrides`` takes further SHELVER_* settings (or
    TMPDIR) by their variable names. Benchmarks start their processes with it too."""
    return {
        **os.environ,
        "SHELVER_DATABASE_URL": database_url,
        "SHELVER_BROKER_URL": broker_url,
        "SHELVER_MODEL_DIR": str(model_dir),
        "SHELVER_IMAGE_ROOTS": json.dumps([str(image_root)]),
        "SHELVER_MODEL_POLL_SECONDS": "1",
        **overrides,
    }


def worker_env(
    database_url: str, broker_url: str, model_dir: Path, image_root: Path, **overrides: str
) -> dict[str, str]:
    """``shelver_env`` for a test: the dispatcher polls every second too, so tests see a
    promotion or a queued row within a second."""
    return shelver_env(
        database_url, broker_url, model_dir, image_root,
        **{"SHELVER_POLL_SECONDS": "1", **overrides},
    )  # fmt: skip


SHELVER = [sys.executable, "-m", "shelver.worker"]
"""The command line of a shelver process, as tests start it."""


@contextlib.contextmanager
def running(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A shelver process for the duration of the block; stopped with SIGTERM, as in production."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            SHELVER + args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            stop(proc)


def stop(*procs: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, as in production, then each process's whole group is killed if it
    has not stopped within ``timeout``."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(check: Callable[[], bool], timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    tails = "\n".join(
        f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in logs.glob("*.log")
    )
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def sample_products(fixture_data: Path, n: int) -> list[dict]:
    """Best Buy rows, half with their photo; fixture rows are reused under new skus to reach n."""
    with (fixture_data / "bestbuy" / "products.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    picked = [rows[i % len(rows)] for i in range(n)]
    return [
        {
            "sku": f"e2e-{i}-{row['id']}",
            "name": row["name"],
            "description": row["description"],
            "image_uri": f"bestbuy/{row['image']}" if row["image"] and i % 2 == 0 else None,
        }
        for i, row in enumerate(picked)
    ]


def free_port() -> int:
    """A TCP port nothing listens on now, on the loopback address."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        page = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }
