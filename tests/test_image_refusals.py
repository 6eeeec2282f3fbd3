"""Refused images are counted by reason and shown wherever images are read, never silently.

The trap these pin: images that lie outside SHELVER_IMAGE_ROOTS (by default the current
directory) are refused one by one, and a fusion model trained or scored on them quietly
becomes a text model. Import, train, evaluate, the worker and status each say so, with
counts by reason and the setting that would let the images in.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from support import centroid_artifact, insert_products, register_champion, training_titles

from shelver.catalog.db import session_scope
from shelver.catalog.images import RootCheck
from shelver.catalog.queue import claim_batch
from shelver.catalog.settings import Settings
from shelver.worker.classify import FusionClassifier, classify_products
from shelver.worker.encoders import load_encoders
from shelver.worker.runtime import Runtime

SHELVER = [sys.executable, "-m", "shelver.worker"]


def shelver(env: dict, *args: str, cwd: Path | None = None, timeout: float = 600):
    return subprocess.run(
        [*SHELVER, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def roots_from(output: str) -> list[str]:
    """The SHELVER_IMAGE_ROOTS value a message suggests, parsed as a shell would."""
    match = re.search(r"SHELVER_IMAGE_ROOTS=('[^']*'|\S+)", output)
    assert match, output
    (assignment,) = shlex.split(match.group(0))
    return json.loads(assignment.partition("=")[2])


def settings_from(roots: list[str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as catalog/settings.py reads them with SHELVER_IMAGE_ROOTS set to ``roots``."""
    monkeypatch.setenv("SHELVER_IMAGE_ROOTS", json.dumps(roots))
    return Settings()


def flipkart(fixture_data: Path) -> dict[str, list[dict[str, str]]]:
    by_class: dict[str, list[dict[str, str]]] = {}
    with (fixture_data / "flipkart" / "products.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["image"]:
                by_class.setdefault(row["category"], []).append(row)
    return by_class


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# --- import ------------------------------------------------------------------------------------


def test_import_warns_when_the_files_images_lie_outside_the_roots_and_names_the_setting(
    database_url: str, fixture_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A newcomer's first step: the shared Best Buy file, imported from another folder with
    # the default roots (the current directory).
    source = fixture_data / "bestbuy" / "products.csv"
    with source.open(newline="", encoding="utf-8") as fh:
        with_image = sum(1 for row in csv.DictReader(fh) if row["image"])
    env = {k: v for k, v in os.environ.items() if k != "SHELVER_IMAGE_ROOTS"}
    first = shelver(env, "import", str(source), cwd=tmp_path)

    assert first.returncode == 0, first.stderr
    assert (
        f"warning: {with_image} of {with_image} images lie outside SHELVER_IMAGE_ROOTS "
        f"({tmp_path.resolve()})" in first.stderr
    )
    suggested = roots_from(first.stderr)
    assert suggested == [str((fixture_data / "bestbuy" / "images").resolve())]

    # The setting it prints is one catalog/settings.py reads, and it lets every image in.
    env["SHELVER_IMAGE_ROOTS"] = json.dumps(suggested)
    assert settings_from(suggested, monkeypatch).image_roots == [Path(p) for p in suggested]
    again = shelver(env, "import", str(source), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "outside SHELVER_IMAGE_ROOTS" not in again.stderr


def test_the_suggested_roots_keep_the_roots_already_in_use(tmp_path: Path) -> None:
    inside, elsewhere = tmp_path / "photos", tmp_path / "other" / "shots"
    check = RootCheck([inside])
    for uri in (
        f"{inside}/a.jpg",
        f"{elsewhere}/b.jpg",
        f"file://{elsewhere}/c.jpg",
        "https://x/y",
    ):
        check.add(uri)
    assert (check.local, check.outside) == (3, 2)
    assert roots_from(check.setting() or "") == [str(inside.resolve()), str(elsewhere.resolve())]


# --- the worker and status ---------------------------------------------------------------------


@pytest.mark.slow
def test_worker_batches_and_status_show_refused_images_by_reason(
    engine: Engine,
    database_url: str,
    encoder_dir: Path,
    fixture_data: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    encoders = load_encoders(encoder_dir)
    register_champion(
        engine, centroid_artifact(*encoders, training_titles(fixture_data)), "centroid-1"
    )
    runtime = Runtime(engine, Settings(image_roots=[tmp_path], model_poll_seconds=0), *encoders)
    photo = next((fixture_data / "bestbuy" / "images").glob("*.jpg"))
    insert_products(
        engine,
        [
            {"sku": "far1", "name": "Yamaha digital piano", "image_uri": str(photo)},
            {"sku": "far2", "name": "Fender electric guitar", "image_uri": str(photo)},
            {"sku": "gone", "name": "Samsung front load washer", "image_uri": "gone.jpg"},
            {"sku": "plain", "name": "Halo 5: Guardians for Xbox One"},
        ],
    )
    with engine.begin() as conn:
        ids = [c.product_id for c in claim_batch(conn, limit=10, lease_seconds=60,
                                                 max_attempts=5)]  # fmt: skip
    champion = runtime.champion()
    assert champion is not None
    classifier = FusionClassifier(*encoders, champion, runtime.settings)
    with (
        caplog.at_level(logging.WARNING, logger="shelver.worker.classify"),
        session_scope(engine) as db,
    ):
        summary = classify_products(db, ids, classifier)

    assert summary.images_refused == {"outside_root": 2, "not_found": 1}
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "0 of 4 rows had a usable image; 3 refused (outside_root 2, not_found 1)" in warning
    assert roots_from(warning) == [str(tmp_path.resolve()), str(photo.parent.resolve())]

    env = {**os.environ, "SHELVER_DATABASE_URL": database_url}
    as_json = json.loads(shelver(env, "status", "--json").stdout)
    assert as_json["images_refused"] == {
        "total": 3,
        "by_reason": {"outside_root": 2, "not_found": 1},
    }
    shown = shelver(env, "status")
    assert shown.returncode == 0, shown.stderr
    assert (
        "images refused: 3 products were last classified without their image "
        "(outside_root 2, not_found 1)" in shown.stdout
    )


# --- train and evaluate ------------------------------------------------------------------------


@pytest.mark.slow
def test_train_and_evaluate_count_refused_images_and_say_when_every_one_was_refused(
    engine: Engine,
    database_url: str,
    encoder_dir: Path,
    fixture_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    by_class = flipkart(fixture_data)
    # The images are given as absolute paths, so the CSV can live anywhere.
    for rows in by_class.values():
        for row in rows:
            row["image"] = str(fixture_data / "flipkart" / row["image"])
    train_rows = [row for rows in by_class.values() for row in rows[:12]]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        **os.environ,
        "SHELVER_DATABASE_URL": database_url,
        "SHELVER_MODEL_DIR": str(encoder_dir),
        "SHELVER_DATA_DIR": str(tmp_path / "var"),
        "SHELVER_IMAGE_ROOTS": json.dumps([str(elsewhere)]),
        "HF_HUB_OFFLINE": "1",
    }
    imported = shelver(env, "import", str(write_csv(tmp_path / "train.csv", train_rows)))
    assert imported.returncode == 0, imported.stderr
    assert f"{len(train_rows)} of {len(train_rows)} images lie outside" in imported.stderr

    trained = shelver(env, "train")
    assert trained.returncode == 0, trained.stderr
    n = len(train_rows)
    assert (
        f"images: 0 of {n} rows had a usable image; {n} refused (outside_root {n})"
        in trained.stdout
    )
    expected_roots = [
        str(elsewhere.resolve()),
        str((fixture_data / "flipkart" / "images").resolve()),
    ]
    alarm = [line for line in trained.stderr.splitlines() if line.startswith("warning: ")]
    assert len(alarm) == 1, trained.stderr
    assert f"every image was refused ({n} of {n} rows: outside_root {n})" in alarm[0]
    assert "the model saw text alone" in alarm[0]
    assert roots_from(alarm[0]) == expected_roots
    assert settings_from(expected_roots, monkeypatch).image_roots == [
        Path(p) for p in expected_roots
    ]

    # The report, the run and the registered model all record it.
    report = json.loads(next((tmp_path / "var" / "reports").glob("run-*/metrics.json")).read_text())
    with engine.connect() as conn:
        registered = conn.execute(text("SELECT metrics FROM model_versions")).scalar_one()
        run = conn.execute(text("SELECT metrics FROM training_runs")).scalar_one()
    for metrics in (report, registered, run):
        assert metrics["images"]["refused"] == {"outside_root": n}
        assert metrics["images"]["usable"] == 0 and metrics["images"]["all_refused"] is True
        assert metrics["warnings"] == [alarm[0].removeprefix("warning: ")]

    # Evaluate: two held-out rows point at photos that are not there; the rest are fine.
    held = [row for rows in by_class.values() for row in rows[12:14]]
    held[0]["image"] = held[1]["image"] = str(fixture_data / "flipkart" / "images" / "gone.jpg")
    held_csv = write_csv(tmp_path / "held.csv", held)
    allowed = {**env, "SHELVER_IMAGE_ROOTS": json.dumps([str(fixture_data)])}
    scored = shelver(allowed, "evaluate", str(held_csv))
    assert scored.returncode == 0, scored.stderr
    m = len(held)
    assert f"images: {m - 2} of {m} rows had a usable image; 2 refused (not_found 2)" in (
        scored.stdout
    )
    assert "warning:" not in scored.stderr

    refused = shelver(env, "evaluate", str(held_csv), "--json")
    assert refused.returncode == 0, refused.stderr
    figures = json.loads(refused.stdout)
    # Confinement is judged before anything is read: the missing ones are outside too.
    assert figures["images"]["refused"] == {"outside_root": m}
    assert figures["images"]["all_refused"] is True
    assert f"warning: every image was refused ({m} of {m} rows: outside_root {m})" in (
        refused.stderr
    )
