"""Bad input end to end: hostile or broken images, odd text, bad import and label rows.

Rows go in with plain SQL (or `shelver import` / `shelver label`), a real
dispatcher and worker take them, and each kind must end in a status with a
reason a person can read. The worker process must survive all of it and still
classify the next good product.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from support import (
    centroid_artifact,
    register_champion,
    training_titles,
)
from test_chaos import SHELVER, Procs, drained, insert, scalar, wait_until

from shelver.worker.encoders import load_encoders

pytestmark = pytest.mark.slow

MAX_IMAGE_BYTES = 1_000_000
GOOD_NAME = "Samsung Galaxy S7 32GB unlocked smartphone"
USED = ("classified", "needs_review")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with almost no data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def make_images(root: Path, outside: Path) -> dict[str, str]:
    """Image files of every sort in ``root``; returns kind -> image_uri to give a product."""
    root.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    photo = Image.linear_gradient("L").resize((320, 240)).convert("RGB")
    jpeg = _encoded(photo, "JPEG", quality=90)
    files = {
        "good.jpg": jpeg,
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        # Fixed bytes: random garbage fails in Pillow's header parse for most draws and
        # in the decoder for some, and each has its own reason.
        "corrupt.jpg": jpeg[:200] + random.Random(20261127).randbytes(4000),
        "empty.jpg": b"",
        "huge.jpg": jpeg + b"\x00" * (MAX_IMAGE_BYTES + 10),
        # Past Pillow's own limit, and past ours (SHELVER_MAX_IMAGE_PIXELS, 40 M) only.
        "bomb.png": _png_header_only(30_000, 30_000),
        "bomb_midsize.png": _png_header_only(8_000, 8_000),
        "text.jpg": b"this is a plain text file, not a picture\n" * 20,
        "page.png": b"<!doctype html><html><body>404 not found</body></html>",
        "vector.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "icon.ico": _encoded(photo.resize((32, 32)), "ICO"),
        "photoshop.tga": _encoded(photo, "TGA"),
        "cmyk.jpg": _encoded(photo.convert("CMYK"), "JPEG"),
        "deep.png": _encoded(Image.linear_gradient("L").convert("I;16"), "PNG"),
        "animated.gif": _encoded(
            photo.convert("P"), "GIF", save_all=True, append_images=[photo.convert("P")] * 2
        ),
        "transparent.png": _encoded(photo.convert("RGBA"), "PNG"),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "folder.jpg").mkdir(exist_ok=True)
    fifo = root / "pipe.jpg"
    if not fifo.exists():
        os.mkfifo(fifo)
    secret = outside / "secret.jpg"
    secret.write_bytes(jpeg)
    link = root / "link.jpg"
    if not link.is_symlink():
        link.symlink_to(secret)
    uris = {name.split(".")[0]: str(root / name) for name in files}
    uris.update(
        {
            "directory": str(root / "folder.jpg"),
            "fifo": str(fifo),
            "missing": str(root / "no-such-file.jpg"),
            "outside_root": str(secret),
            "dotdot": str(root / ".." / outside.name / "secret.jpg"),
            "symlink_out": str(link),
            "url_fetch_off": "http://127.0.0.1:9/photo.jpg",
            "ftp": "ftp://example.com/photo.jpg",
            "data_uri": "data:image/png;base64,iVBORw0KGgo=",
            "file_other_host": "file://fileserver/share/photo.jpg",
            "blank_uri": "   ",
        }
    )
    return uris


# kind -> (image uri key, statuses allowed, text the error must hold; None: no error at all)
IMAGE_CASES: dict[str, tuple[str, set[str], str | None]] = {
    "good": ("good", set(USED), None),
    "cmyk": ("cmyk", set(USED), None),
    "deep": ("deep", set(USED), None),
    "animated": ("animated", set(USED), None),
    "transparent": ("transparent", set(USED), None),
    "truncated": ("truncated", set(USED), "image not used: truncated"),
    "corrupt": ("corrupt", set(USED), "image not used: not_an_image"),
    "empty": ("empty", set(USED), "image not used: empty"),
    "huge": ("huge", set(USED), "image not used: too_large"),
    "bomb": ("bomb", set(USED), "image not used: decompression_bomb"),
    "bomb_midsize": ("bomb_midsize", set(USED), "image not used: decompression_bomb: 8000x8000"),
    "text": ("text", set(USED), "image not used: not_an_image"),
    "page": ("page", set(USED), "image not used: not_an_image"),
    "vector": ("vector", set(USED), "image not used: not_an_image"),
    "icon": ("icon", set(USED), "image not used: not_an_image"),
    "photoshop": ("photoshop", set(USED), "image not used: not_an_image"),
    "directory": ("directory", set(USED), "image not used: not_a_file"),
    "fifo": ("fifo", set(USED), "image not used: not_a_file"),
    "missing": ("missing", set(USED), "image not used: not_found"),
    "outside_root": ("outside_root", set(USED), "image not used: outside_root"),
    "dotdot": ("dotdot", set(USED), "image not used: outside_root"),
    "symlink_out": ("symlink_out", set(USED), "image not used: outside_root"),
    "url_fetch_off": ("url_fetch_off", set(USED), "image not used: url_fetch_disabled"),
    "ftp": ("ftp", set(USED), "image not used: unsupported_scheme"),
    "data_uri": ("data_uri", set(USED), "image not used: unsupported_scheme"),
    "file_other_host": ("file_other_host", set(USED), "image not used: invalid_uri"),
    "blank_uri": ("blank_uri", set(USED), "image not used: invalid_uri"),
}

# kind -> (name, description, image key or None, statuses allowed, text the error must hold)
TEXT_CASES: dict[str, tuple[str, str, str | None, set[str], str | None]] = {
    "empty_text": ("", "", None, {"failed"}, "no usable text and no usable image"),
    "whitespace_text": (" \t\n ", "\u00a0 \u2003", None, {"failed"}, "no usable text"),
    "empty_text_bad_image": ("", "", "corrupt", {"failed"}, "no usable text and no usable image ("),
    "empty_text_good_image": ("", "", "good", set(USED), None),
    "megabyte_description": (GOOD_NAME, "unlocked phone " * 70_000, None, set(USED), None),
    "rtl": ("هاتف سامسونج جالكسي ذكي", "טלפון חכם עם מסך גדול", None, set(USED), None),
    "emoji": ("📱🔥 Galaxy phone 💯", "👍" * 500, None, set(USED), None),
    "sql": (
        "'; DROP TABLE products; --",
        "1' OR '1'='1'; SELECT pg_sleep(10); --",
        None,
        set(USED),
        None,
    ),  # fmt: skip
    "control_chars": ("Phone\x01\x02\x1b[31m red\x7f", "\u200b\u200e\ufeff", None, set(USED), None),
    "one_long_word": ("x" * 20_000, "", None, set(USED), None),
    "combining": ("Z\u0336\u0335a\u0337\u0334l\u0338go phone" * 50, "", None, set(USED), None),
}


@pytest.fixture(scope="module")
def artifact(encoder_dir: Path, fixture_data: Path) -> bytes:
    return centroid_artifact(*load_encoders(encoder_dir), training_titles(fixture_data))


@pytest.fixture
def env(database_url: str, broker_url: str, encoder_dir: Path, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SHELVER_DATABASE_URL": database_url,
        "SHELVER_BROKER_URL": broker_url,
        "SHELVER_MODEL_DIR": str(encoder_dir),
        "SHELVER_IMAGE_ROOTS": json.dumps([str(tmp_path / "images")]),
        "SHELVER_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        "SHELVER_MODEL_POLL_SECONDS": "1",
        "SHELVER_POLL_SECONDS": "1",
        "SHELVER_LEASE_SECONDS": "60",
        "SHELVER_RETRY_BACKOFF_S": "0.5",
    }


@pytest.fixture
def procs(env: dict[str, str], engine: Engine, artifact: bytes, tmp_path: Path) -> Procs:
    register_champion(engine, artifact, "bad-input-1")
    logs = tmp_path / "logs"
    logs.mkdir()
    running = Procs(env, logs)
    yield running
    running.stop_all()


def outcomes(engine: Engine) -> dict[str, tuple[str, str | None]]:
    with engine.connect() as conn:
        return {
            sku: (status, error)
            for sku, status, error in conn.execute(text("SELECT sku, status, error FROM products"))
        }


def test_every_kind_of_bad_input_ends_with_a_status_and_a_reason_and_the_worker_lives(
    engine: Engine, procs: Procs, tmp_path: Path
) -> None:
    uris = make_images(tmp_path / "images", tmp_path / "elsewhere")
    rows = [
        {"sku": f"img-{kind}", "name": GOOD_NAME, "description": "", "image_uri": uris[key]}
        for kind, (key, _, _) in IMAGE_CASES.items()
    ]
    rows += [
        {
            "sku": f"txt-{kind}",
            "name": name,
            "description": description,
            "image_uri": uris[key] if key else None,
        }
        for kind, (name, description, key, _, _) in TEXT_CASES.items()
    ]
    expected = {f"img-{k}": (s, r) for k, (_, s, r) in IMAGE_CASES.items()}
    expected |= {f"txt-{k}": (s, r) for k, (_, _, _, s, r) in TEXT_CASES.items()}
    assert len(expected) >= 30

    worker = procs.worker()
    procs.dispatcher()
    insert(engine, rows)
    wait_until(lambda: drained(engine), 240, "every bad row to reach a terminal state")

    got = outcomes(engine)
    wrong = {
        sku: got[sku]
        for sku, (statuses, reason) in expected.items()
        if got[sku][0] not in statuses
        or (reason is None and got[sku][1] is not None)
        or (reason is not None and reason not in (got[sku][1] or ""))
    }
    assert not wrong, f"unexpected outcomes: {json.dumps(wrong, indent=1)}\n{procs.tails()}"
    assert scalar(engine, "SELECT count(*) FROM products") == len(rows), "the SQL string did harm"

    # Still alive, and still classifying.
    assert worker.poll() is None
    insert(engine, [{"sku": "after", "name": GOOD_NAME, "description": "", "image_uri": None}])
    wait_until(lambda: drained(engine), 60, "a good product after the bad ones")
    assert outcomes(engine)["after"] == ("classified", None)
    assert worker.poll() is None


def test_nul_bytes_never_reach_the_catalog_and_queue_nothing(engine: Engine) -> None:
    # The driver refuses a NUL in a bound parameter before anything is sent ...
    with pytest.raises(ValueError, match="NUL"):
        insert(
            engine, [{"sku": "nul-1", "name": "Phone\x00", "description": "", "image_uri": None}]
        )
    # ... and PostgreSQL refuses one built in SQL (SQLSTATE 54000): text cannot hold \x00.
    with pytest.raises(DBAPIError, match="null character not permitted"), engine.begin() as conn:
        conn.execute(text("INSERT INTO products (sku, name) VALUES ('nul-2', 'a' || chr(0))"))
    assert scalar(engine, "SELECT count(*) FROM products") == 0
    assert scalar(engine, "SELECT count(*) FROM classification_queue") == 0


def test_invalid_utf8_is_refused_by_the_database_and_queues_nothing(engine: Engine) -> None:
    with pytest.raises(DBAPIError, match="invalid byte sequence"), engine.begin() as conn:
        conn.execute(
            text("INSERT INTO products (sku, name) VALUES ('utf', convert_from(:raw, 'UTF8'))"),
            {"raw": b"\xc3\x28"},
        )
    assert scalar(engine, "SELECT count(*) FROM classification_queue") == 0


def test_import_rejects_bad_rows_by_line_and_lands_the_good_ones(
    engine: Engine, env: dict[str, str], tmp_path: Path
) -> None:
    lines = [
        b"id,name,description,category,image,source",
        b"ok-1,Apple iPhone 7,,Cell Phones,,t",
        b"dup,First of a pair,,Cell Phones,,t",
        b"dup,Second of a pair,,Cell Phones,,t",
        b"nul,Phone\x00X,,Cell Phones,,t",
        b"utf,Phone \xff\xfe,,Cell Phones,,t",
        b"long,Phone," + b"d" * 200_001 + b",Cell Phones,,t",
        b"noname,,,Cell Phones,,t",
        b",No id,,Cell Phones,,t",
        # Longer than the csv module's own field limit, shorter than ours: it lands.
        b"mid,Phone," + b"d" * 150_000 + b",Cell Phones,,t",
        b'quote,"unterminated,,Cell Phones,,t',
    ]
    path = tmp_path / "bad.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = subprocess.run(
        [*SHELVER, "import", str(path)], env=env, capture_output=True, text=True, timeout=120
    )
    report = result.stdout + result.stderr
    assert result.returncode == 1, report
    for line, reason in (
        (4, "dup"),
        (5, "NUL byte in name"),
        (6, "invalid UTF-8 in name"),
        (7, "description is 200001 characters long"),
        (8, "no name"),
        (9, "no id"),
    ):
        assert f":{line}:" in report and reason in report, (line, reason, report)
    with engine.connect() as conn:
        skus = set(conn.execute(text("SELECT sku FROM products")).scalars())
    assert {"ok-1", "dup", "mid"} <= skus and not skus & {"nul", "utf", "long", "noname"}


def test_label_file_reports_unknown_categories_and_skus_by_line(
    engine: Engine, env: dict[str, str], tmp_path: Path
) -> None:
    insert(engine, [{"sku": "l1", "name": "iPhone", "description": "", "image_uri": None}])
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO categories (name) VALUES ('Cell Phones')"))
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "sku,category\nl1,Cell Phones\nl1,Smartphones\nghost,Cell Phones\nl1,'; DROP TABLE x; --\n"
    )
    result = subprocess.run(
        [*SHELVER, "label", str(labels)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert f"{labels}:3: unknown category 'Smartphones'" in result.stderr
    assert f"{labels}:4: unknown sku 'ghost'" in result.stderr
    assert f"{labels}:5: unknown category" in result.stderr
    assert scalar(engine, "SELECT count(*) FROM categories") == 1
