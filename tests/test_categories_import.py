"""`shelver import` labels products with category paths at any depth."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import Engine, text

from shelver.catalog.importer import import_file


def labels(engine: Engine) -> dict[str, str | None]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT p.sku, c.path FROM products p LEFT JOIN categories c ON c.id = p.label_id")
        ).all()
    return dict(rows)


def test_category_path_is_the_label_when_present_else_category(
    engine: Engine, tmp_path: Path
) -> None:
    path = tmp_path / "products.csv"
    path.write_text(
        "id,name,description,category,category_path,image,source\n"
        "1,Case,,Cell Phones,Cell Phones > Accessories > Cases,,x\n"  # line 2
        "2,Phone,,Cell Phones,,,x\n"  # line 3: no path, the top level stands
        "3,Charger,,Cell Phones, Cell Phones >Accessories > Chargers ,,x\n"  # line 4
        "4,Broken,,Cell Phones,Cell Phones >  > Cases,,x\n"  # line 5: an empty level
        "5,Cable,,,Cell Phones > Accessories,,x\n",  # line 6: a coarse label is a label
        encoding="utf-8",
    )
    report = import_file(engine, path)
    assert [(r.line, r.reason) for r in report.rejected] == [
        (5, "category path 'Cell Phones >  > Cases' has an empty level; join names with ' > '")
    ]
    assert labels(engine) == {
        "1": "Cell Phones > Accessories > Cases",
        "2": "Cell Phones",
        # Spaces around a name are trimmed, and ">" needs none.
        "3": "Cell Phones > Accessories > Chargers",
        "5": "Cell Phones > Accessories",
    }
    # Cell Phones, its Accessories, and their Cases and Chargers.
    assert report.categories_created == 4


def test_bestbuy_json_labels_with_the_whole_category_path(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "products.json"
    path.write_text(
        json.dumps(
            [
                {
                    "sku": 1,
                    "name": "Sling TV remote",
                    "categoryPath": [
                        {"id": "abcat0100000", "name": "TV & Home Theater"},
                        {"id": "abcat0107000", "name": "TV & Home Theater Accessories"},
                        {"id": "abcat0107020", "name": "Remote Controls "},
                    ],
                },
                {
                    "sku": 2,
                    "name": "Nameless step",
                    "categoryPath": [{"id": "a", "name": "TV & Home Theater"}, {"id": "b"}],
                },
            ]
        )
    )
    report = import_file(engine, path)
    assert [(r.line, r.reason.split(";")[0]) for r in report.rejected] == [
        (2, "category path 'TV & Home Theater > ' has an empty level")
    ]
    assert labels(engine) == {
        "1": "TV & Home Theater > TV & Home Theater Accessories > Remote Controls"
    }


def test_shared_bestbuy_rows_keep_their_mixed_depths(engine: Engine, fixture_data: Path) -> None:
    report = import_file(engine, fixture_data / "bestbuy" / "products.csv", image_roots=[])
    assert not report.rejected
    with engine.connect() as conn:
        depths = dict(
            conn.execute(
                text(
                    "SELECT array_length(string_to_array(c.path, ' > '), 1) AS depth, count(*) "
                    "FROM products p JOIN categories c ON c.id = p.label_id GROUP BY depth"
                )
            ).all()
        )
    assert sum(depths.values()) == report.inserted
    assert depths[1] > 0 and max(depths) >= 4
