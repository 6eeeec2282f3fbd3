"""`shelver taxonomy import`: both formats told by content, idempotent, reported, in the catalog."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from shelver.catalog.importer import import_file
from shelver.catalog.taxonomy import (
    BESTBUY,
    CSV,
    GOOGLE,
    SkippedEntry,
    TaxonomyFormatError,
    import_taxonomy,
    read_taxonomy,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "taxonomies"
GOOGLE_FILE = FIXTURES / "google-product-taxonomy-2021-09-21-head40.txt"
BESTBUY_FILE = FIXTURES / "bestbuy-categories-2016-sample.json"


def parent_of(engine: Engine) -> dict[str, str | None]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.path, p.path FROM categories c "
                "LEFT JOIN categories p ON p.id = c.parent_id"
            )
        ).all()
    return dict(rows)


def test_google_taxonomy_loads_once_and_reports_its_levels(engine: Engine) -> None:
    first = import_taxonomy(engine, GOOGLE_FILE)
    assert (first.format, first.version) == (GOOGLE, "2021-09-21")
    assert (first.entries, first.nodes, first.added, first.existing) == (40, 40, 40, 0)
    assert first.depth == 5
    assert first.per_level == {1: 1, 2: 2, 3: 3, 4: 28, 5: 6}
    assert (first.duplicates, first.implied, first.skipped) == (0, 0, [])

    again = import_taxonomy(engine, GOOGLE_FILE)
    assert (again.added, again.existing) == (0, 40)
    tree = parent_of(engine)
    assert len(tree) == 40
    assert tree["Animals & Pet Supplies > Pet Supplies > Dog Supplies > Dog Toys"] == (
        "Animals & Pet Supplies > Pet Supplies > Dog Supplies"
    )
    assert tree["Animals & Pet Supplies"] is None


def test_bestbuy_tree_loads_with_implied_ancestors_repeats_and_a_nameless_entry(
    engine: Engine,
) -> None:
    report = import_taxonomy(engine, BESTBUY_FILE)
    assert report.format == BESTBUY
    # 34 entries: one has a null name and is skipped; two paths are listed twice; three
    # ancestors appear only inside other entries' paths.
    assert report.entries == 33
    assert report.duplicates == 2
    assert report.implied == 3
    assert (report.nodes, report.added, report.existing) == (34, 34, 0)
    assert report.per_level == {1: 4, 2: 10, 3: 14, 4: 6}
    assert report.skipped == [
        SkippedEntry(
            31,
            "pcmcat144600050035/pcmcat748300334665/pcmcat748300293073: "
            "a category on its path has no name",
        )  # fmt: skip
    ]
    tree = parent_of(engine)
    assert len(tree) == 34
    assert tree["Gift Ideas > Kids > Toys"] == "Gift Ideas > Kids"
    assert tree["Gift Ideas > Kids"] == "Gift Ideas"
    # "Mdot Recycling " in the source: names are trimmed.
    assert "More Categories > Mdot Promotions > Mdot Recycling" in tree
    assert import_taxonomy(engine, BESTBUY_FILE).added == 0


def test_format_is_told_by_content_not_by_name(tmp_path: Path) -> None:
    google = tmp_path / "categories.json"
    google.write_bytes(GOOGLE_FILE.read_bytes())
    bestbuy = tmp_path / "taxonomy.txt"
    bestbuy.write_bytes(BESTBUY_FILE.read_bytes())
    assert read_taxonomy(google).format == GOOGLE
    assert read_taxonomy(bestbuy).format == BESTBUY

    without_ids = tmp_path / "plain.txt"
    without_ids.write_text("# Google_Product_Taxonomy_Version: 2021-09-21\nA\nA > B\nA >  > C\n")
    plain = read_taxonomy(without_ids)
    assert plain.paths == ["A", "A > B"]
    assert plain.skipped == [SkippedEntry(4, "a category on its path has no name")]


def test_a_csv_taxonomy_loads_its_descriptions_and_synonyms(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "taxonomy.txt"  # told by its header, not its name
    path.write_text(
        "Path,Description,Synonyms\n"
        "Wearables > Smartwatches,Watches that pair with a phone,smart watch; fitness watch\n"
        "Wearables,,\n"
        'Gift Cards,"Store credit,  sent by mail",\n'
        "Broken >  > Path,whatever,\n"
    )
    taxonomy = read_taxonomy(path)
    assert taxonomy.format == CSV
    assert taxonomy.paths == ["Wearables > Smartwatches", "Wearables", "Gift Cards"]
    assert taxonomy.skipped == [SkippedEntry(5, "a category on its path has no name")]

    report = import_taxonomy(engine, path)
    assert (report.nodes, report.added, report.described) == (3, 3, 2)
    with engine.connect() as conn:
        stored = dict(conn.execute(text("SELECT path, description FROM categories")).all())
    assert stored == {
        "Wearables": None,
        "Wearables > Smartwatches": ("Watches that pair with a phone. smart watch, fitness watch"),
        "Gift Cards": "Store credit, sent by mail",
    }
    # Again: nothing new. A changed description replaces the stored one; a file that
    # gives none leaves it as it was.
    assert import_taxonomy(engine, path).described == 0
    path.write_text("path,description\nGift Cards,Prepaid cards\nWearables > Smartwatches,\n")
    assert import_taxonomy(engine, path).described == 1
    with engine.connect() as conn:
        stored = dict(conn.execute(text("SELECT path, description FROM categories")).all())
    assert stored["Gift Cards"] == "Prepaid cards"
    assert stored["Wearables > Smartwatches"].startswith("Watches that pair")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("path,description\n", "a CSV with a `path` column but no categories"),
        ("", "no categories found"),
        ("# only a version line\n", "no categories found"),
        ('[{"id": 1}]', "JSON array without categories"),
        ("[not json", "is not JSON"),
    ],
)
def test_a_file_that_is_no_taxonomy_is_refused_saying_what_was_expected(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "taxonomy"
    path.write_text(content)
    with pytest.raises(TaxonomyFormatError, match=message):
        read_taxonomy(path)


def test_products_imported_after_a_taxonomy_land_on_its_nodes(
    engine: Engine, tmp_path: Path
) -> None:
    import_taxonomy(engine, GOOGLE_FILE)
    products = tmp_path / "products.csv"
    products.write_text(
        "id,name,description,category,category_path,image,source\n"
        "1,Squeaky bone,,Animals & Pet Supplies,"
        "Animals & Pet Supplies > Pet Supplies > Dog Supplies > Dog Toys,,test\n"
        "2,Parrot perch,,Animals & Pet Supplies,Animals & Pet Supplies > Pet Supplies,,test\n",
        encoding="utf-8",
    )
    report = import_file(engine, products)
    assert (report.inserted, report.categories_created) == (2, 0)


def test_cli_prints_what_it_added_and_exits_1_on_skipped_entries(database_url: str) -> None:
    env = {**os.environ, "SHELVER_DATABASE_URL": database_url}

    def shelver(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "shelver.worker", "taxonomy", "import", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    google = shelver(str(GOOGLE_FILE))
    assert google.returncode == 0, google.stderr
    assert "google taxonomy 2021-09-21: 40 nodes, depth 5" in google.stdout
    assert "40 added, 0 already in the catalog, 0 skipped" in google.stdout

    bestbuy = shelver(str(BESTBUY_FILE))
    assert bestbuy.returncode == 1, bestbuy.stderr
    assert "34 added, 0 already in the catalog, 1 skipped" in bestbuy.stdout
    assert f"{BESTBUY_FILE}:31: skipped:" in bestbuy.stderr

    missing = shelver(str(FIXTURES / "nope.txt"))
    assert missing.returncode == 2
    assert "no such file" in missing.stderr
