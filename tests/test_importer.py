"""The importer: shared CSV schema, Best Buy JSON, bad rows reported by line, upserts by sku."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import Engine, text

from shelver.catalog.importer import import_file

HEADER = b"id,name,description,category,image,source\r\n"


def write(tmp_path: Path, body: bytes, name: str = "products.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(HEADER + body)
    return path


def products(engine: Engine) -> dict[str, tuple]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT p.sku, p.name, c.path, p.label_source, p.image_uri FROM products p "
                "LEFT JOIN categories c ON c.id = p.label_id"
            )
        )
        return {r[0]: tuple(r[1:]) for r in rows}


def test_bad_rows_are_reported_by_line_and_good_rows_land(engine: Engine, tmp_path: Path) -> None:
    body = (
        b"1,Good speaker,Loud,Audio,,x\r\n"  # line 2
        b"2,,no name here,Audio,,x\r\n"  # line 3: no name
        b"1,Same id again,,Audio,,x\r\n"  # line 4: repeated id
        b"3,Bad \xff\xfe bytes,,Audio,,x\r\n"  # line 5: invalid UTF-8
        b"4,Too many,fields,Audio,,x,extra\r\n"  # line 6
        b'5,"Multi\r\nline name",ok,Audio,,x\r\n'  # lines 7-8: fine
        b"6," + b"n" * 3000 + b",,Audio,,x\r\n"  # line 9: over-long
        b'7,"Broken "quote,,Audio,,x\r\n'  # line 10: broken quoting
        b"8,Nul \x00 byte,,Audio,,x\r\n"  # line 11
        b"9,Last good one,,Cameras,,x\r\n"  # line 12
    )
    report = import_file(engine, write(tmp_path, body))
    assert {r.line: r.reason.split(":")[0].split(" ")[0] for r in report.rejected} == {
        3: "no",
        4: "id",
        5: "invalid",
        6: "expected",
        9: "name",
        10: "broken",
        11: "NUL",
    }
    assert report.inserted == 3
    assert set(products(engine)) == {"1", "5", "9"}
    assert products(engine)["5"][0] == "Multi\r\nline name"


def test_labels_images_and_categories(engine: Engine, tmp_path: Path) -> None:
    body = b"10,Canon camera,,Cameras,images/10.jpg,x\r\n11,Unlabeled thing,,,,x\r\n"
    report = import_file(engine, write(tmp_path, body))
    assert report.categories_created == 1
    rows = products(engine)
    assert rows["10"] == ("Canon camera", "Cameras", "import", str(tmp_path / "images/10.jpg"))
    assert rows["11"] == ("Unlabeled thing", None, None, None)

    import_file(engine, write(tmp_path, b"12,Nikon camera,,Cameras,,x\r\n"), labeled=False)
    assert products(engine)["12"][1:3] == (None, None)


def test_reimport_upserts_requeues_changed_content_and_keeps_review_labels(
    engine: Engine, tmp_path: Path
) -> None:
    body = b"1,Speaker,,Audio,,x\r\n2,Camera,,Cameras,,x\r\n3,Phone,,Phones,,x\r\n"
    import_file(engine, write(tmp_path, body))
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM classification_queue"))
        conn.execute(
            text(
                "UPDATE products SET label_id = (SELECT id FROM categories WHERE name = 'Audio'), "
                "label_source = 'review' WHERE sku = '3'"
            )
        )
    again = b"1,Speaker,,Audio,,x\r\n2,Camera with lens,,Cameras,,x\r\n3,Phone,,Phones,,x\r\n"
    report = import_file(engine, write(tmp_path, again))
    assert (report.inserted, report.updated, report.unchanged) == (0, 1, 2)
    with engine.connect() as conn:
        queued = conn.execute(
            text("SELECT p.sku FROM classification_queue q JOIN products p ON p.id = q.product_id")
        ).scalars()
        assert list(queued) == ["2"]
    assert products(engine)["3"][1:3] == ("Audio", "review")


def test_bestbuy_products_json(engine: Engine, tmp_path: Path) -> None:
    items = [
        {
            "sku": 43900,
            "name": "Duracell - AAA Batteries (4-Pack)",
            "shortDescription": "Compatible with select electronic devices",
            "categoryPath": [
                {"id": "pcmcat312300050015", "name": "Connected Home & Housewares"},
                {"id": "pcmcat248700050021", "name": "Housewares"},
            ],
            "image": "https://img.example/43900_sa.jpg",
        },
        {
            "sku": 1002651,
            "name": 'Polk Audio - 12" Subwoofer',
            "description": "720W peak power handling",
            "category": [{"id": "abcat0300000", "name": "Car Electronics & GPS"}],
            "image": "1002651_sa.jpg",
        },
        {"sku": 5, "name": ""},
        "not an object",
    ]
    path = tmp_path / "products.json"
    path.write_text(json.dumps(items))
    report = import_file(engine, path)
    assert [(r.line, r.reason) for r in report.rejected] == [
        (3, "no name"),
        (4, "not a JSON object"),
    ]
    rows = products(engine)
    assert rows["43900"] == (
        "Duracell - AAA Batteries (4-Pack)",
        "Connected Home & Housewares > Housewares",  # the whole categoryPath
        "import",
        "https://img.example/43900_sa.jpg",
    )
    assert rows["1002651"][1] == "Car Electronics & GPS"
    assert rows["1002651"][3] == str(tmp_path / "1002651_sa.jpg")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shelver.worker", *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )


def test_cli_import_exit_status_and_status_json(database_url: str, tmp_path: Path) -> None:
    good = write(tmp_path, b"1,Speaker,,Audio,,x\r\n", "good.csv")
    bad = write(tmp_path, b"2,Camera,,Cameras,,x\r\n3,,,Audio,,x\r\n", "bad.csv")
    assert run_cli("import", str(good)).returncode == 0
    result = run_cli("import", str(bad))
    assert result.returncode == 1
    assert "bad.csv:3: rejected: no name" in result.stderr

    missing = run_cli("import", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2
    assert "no such file" in missing.stderr and "Traceback" not in missing.stderr

    status = json.loads(run_cli("status", "--json").stdout)
    assert status["products"]["pending"] == 2
    assert status["queue"]["depth"] == 2
    assert status["queue"]["oldest_pending_age_s"] >= 0
    assert status["champion"] is None


def test_pricerunner_imports_whole(engine: Engine, fixture_data: Path) -> None:
    report = import_file(engine, fixture_data / "pricerunner" / "products.csv")
    assert report.rejected == []
    assert report.inserted == 120  # the fixture's rows: 12 of each of the 10 categories
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM categories")).scalar_one() == 10
