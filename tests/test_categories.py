"""Categories form a tree: paths, ancestors created on demand, and the migration from flat rows."""

from __future__ import annotations

import threading

import pytest
from alembic import command
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import IntegrityError, InternalError

from shelver.catalog.categories import (
    CategoryPathError,
    category_ids,
    ensure_categories,
    normalize_path,
    with_ancestors,
)
from shelver.catalog.embedded import create_database
from shelver.catalog.migrate import alembic_config, upgrade
from shelver.catalog.settings import sqlalchemy_url


def tree(engine: Engine) -> dict[str, tuple[str, str | None]]:
    """path -> (name, parent's path) for every category."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.path, c.name, p.path FROM categories c "
                "LEFT JOIN categories p ON p.id = c.parent_id"
            )
        ).all()
    return {path: (name, parent) for path, name, parent in rows}


def test_a_path_creates_its_missing_ancestors_once(engine: Engine) -> None:
    with engine.begin() as conn:
        assert ensure_categories(conn, ["Cell Phones > Accessories > Cases", "Audio"]) == 4
        assert ensure_categories(conn, ["Cell Phones > Accessories", " Audio "]) == 0
        assert ensure_categories(conn, ["Cell Phones > Prepaid"]) == 1
    assert tree(engine) == {
        "Audio": ("Audio", None),
        "Cell Phones": ("Cell Phones", None),
        "Cell Phones > Accessories": ("Accessories", "Cell Phones"),
        "Cell Phones > Accessories > Cases": ("Cases", "Cell Phones > Accessories"),
        "Cell Phones > Prepaid": ("Prepaid", "Cell Phones"),
    }


def test_a_name_may_repeat_under_different_parents(engine: Engine) -> None:
    with engine.begin() as conn:
        ensure_categories(conn, ["Audio > Accessories", "Cameras > Accessories"])
        ids = category_ids(conn, ["Audio > Accessories", "Cameras>Accessories", "Cameras>x"])
    # ">" separates levels with or without spaces around it.
    assert set(ids) == {"Audio > Accessories", "Cameras>Accessories"}
    with engine.begin() as conn:
        ids = category_ids(conn, ["Audio > Accessories", "Cameras  >  Accessories", "Nope"])
    assert len(set(ids.values())) == 2 and "Nope" not in ids


def test_paths_with_an_empty_level_are_refused() -> None:
    for bad in ["", "A >  > B", "A > ", " > B"]:
        with pytest.raises(CategoryPathError, match="empty level"):
            normalize_path(bad)
    assert normalize_path(" A >  B ") == "A > B"
    assert with_ancestors(["A > B > C", "A > D"]) == {"A", "A > B", "A > B > C", "A > D"}


def test_the_database_derives_the_path_and_carries_it_down_a_rename(engine: Engine) -> None:
    with engine.begin() as conn:
        # A plain insert by name, as psql or an old client writes it, is a root.
        conn.execute(text("INSERT INTO categories (name, path) VALUES ('Phones', 'lies')"))
        ensure_categories(conn, ["Phones > Cases > Leather"])
        conn.execute(text("UPDATE categories SET name = 'Cell Phones' WHERE path = 'Phones'"))
    assert set(tree(engine)) == {
        "Cell Phones",
        "Cell Phones > Cases",
        "Cell Phones > Cases > Leather",
    }
    with (
        pytest.raises(InternalError, match="cannot be moved under itself"),
        engine.begin() as conn,
    ):
        conn.execute(
            text(
                "UPDATE categories SET parent_id = "
                "(SELECT id FROM categories WHERE name = 'Leather') WHERE name = 'Cases'"
            )
        )
    with (
        pytest.raises(IntegrityError, match="categories_name_is_one_level"),
        engine.begin() as conn,
    ):
        conn.execute(text("INSERT INTO categories (name) VALUES ('A > B')"))


def test_concurrent_writers_create_each_path_once(engine: Engine) -> None:
    paths = [
        f"Root {r} > Child {c} > Leaf {leaf}"
        for r in range(3)
        for c in range(4)
        for leaf in range(5)
    ]
    created: list[int] = []
    barrier = threading.Barrier(4)

    def write(order: list[str]) -> None:
        barrier.wait()
        with engine.begin() as conn:
            created.append(ensure_categories(conn, order))

    threads = [
        threading.Thread(target=write, args=(paths[::step] + paths,)) for step in (1, -1, 2, 3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(created) == 3 + 12 + 60
    assert len(tree(engine)) == 75


@pytest.fixture
def fresh_database(services: tuple[str, str]) -> str:
    """A database of its own, emptied, for migrating step by step."""
    server, _, name = services[0].rpartition("/")
    return create_database(f"{server}/postgres", f"{name}_migration", recreate=True)


def test_migration_makes_flat_categories_roots_keeping_labels_and_predictions(
    fresh_database: str,
) -> None:
    upgrade(fresh_database, "0003")
    engine = create_engine(sqlalchemy_url(fresh_database), future=True)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO categories (name) VALUES "
                    "('Audio'), ('Cell Phones'), ('Cell Phones > Cases'), ('Toys > Drones > Parts')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO model_versions (version, status, artifact, sha256, labels, "
                    "encoders, threshold) VALUES ('v1', 'champion', '', '', '[]', '{}', 0.5)"
                )
            )
            conn.execute(
                text(
                    """
                    INSERT INTO products (sku, name, label_id, label_source, predicted_id)
                    SELECT 'p' || c.id, c.name, c.id, 'import', c.id FROM categories c
                    """
                )
            )
            conn.execute(
                text(
                    """
                    INSERT INTO predictions
                        (product_id, model_version_id, content_hash, predicted_id, top_k)
                    SELECT p.id, 1, p.content_hash, p.predicted_id, '[]' FROM products p
                    """
                )
            )
            before = conn.execute(
                text(
                    "SELECT p.sku, p.label_id, p.predicted_id, r.predicted_id, c.name "
                    "FROM products p JOIN predictions r ON r.product_id = p.id "
                    "JOIN categories c ON c.id = p.label_id ORDER BY p.sku"
                )
            ).all()

        upgrade(fresh_database, "0004")

        with engine.connect() as conn:
            after = conn.execute(
                text(
                    "SELECT p.sku, p.label_id, p.predicted_id, r.predicted_id, c.path "
                    "FROM products p JOIN predictions r ON r.product_id = p.id "
                    "JOIN categories c ON c.id = p.label_id ORDER BY p.sku"
                )
            ).all()
        # Same rows, same ids; each old name is now the category's path.
        assert after == before
        assert tree(engine) == {
            "Audio": ("Audio", None),
            "Cell Phones": ("Cell Phones", None),
            # A flat name that spelled a path became that node, under an existing root...
            "Cell Phones > Cases": ("Cases", "Cell Phones"),
            # ...or under ancestors created for it.
            "Toys": ("Toys", None),
            "Toys > Drones": ("Drones", "Toys"),
            "Toys > Drones > Parts": ("Parts", "Toys > Drones"),
        }
        with engine.begin() as conn:
            assert ensure_categories(conn, ["Audio > Headphones", "Toys > Drones > Parts"]) == 1

        # Down again: flat categories named by their whole path, labels where they were.
        command.downgrade(alembic_config(fresh_database), "0003")
        with engine.connect() as conn:
            flat = conn.execute(
                text(
                    "SELECT p.sku, p.label_id, p.predicted_id, r.predicted_id, c.name "
                    "FROM products p JOIN predictions r ON r.product_id = p.id "
                    "JOIN categories c ON c.id = p.label_id ORDER BY p.sku"
                )
            ).all()
            parents = conn.execute(text("SELECT count(parent_id) FROM categories")).scalar_one()
        assert (flat, parents) == (before, 0)
    finally:
        engine.dispose()


def test_backfill_by_category_takes_its_whole_subtree(engine: Engine) -> None:
    from shelver.worker.backfill import BackfillError, Selector

    with engine.begin() as conn:
        ensure_categories(conn, ["Cell Phones > Cases", "Audio > Cases", "Cell Phonesque"])
        ids = category_ids(conn, ["Cell Phones > Cases", "Audio > Cases", "Cell Phonesque"])
        conn.execute(
            text("INSERT INTO products (sku, name, label_id) VALUES (:sku, :sku, :label)"),
            [
                {"sku": "case", "label": ids["Cell Phones > Cases"]},
                {"sku": "audio-case", "label": ids["Audio > Cases"]},
                {"sku": "lookalike", "label": ids["Cell Phonesque"]},
            ],
        )

    def selected(category: str) -> set[str]:
        selector = Selector(category=category)
        selector.validate(engine)
        where, params = selector.where()
        with engine.connect() as conn:
            return set(
                conn.execute(text(f"SELECT sku FROM products p WHERE {where}"), params).scalars()
            )

    assert selected("Cell Phones") == {"case"}
    assert selected("Audio >Cases") == {"audio-case"}
    for unknown in ("Cases", "Nope", "Audio >  > Cases"):
        with pytest.raises(BackfillError, match="no category at"):
            selected(unknown)


def test_the_review_listing_names_a_deep_prediction_by_its_path(engine: Engine) -> None:
    from shelver.worker.labels import needs_review

    with engine.begin() as conn:
        ensure_categories(conn, ["Cell Phones > Cases", "Audio > Cases"])
        conn.execute(
            text(
                "INSERT INTO model_versions (version, status, artifact, sha256, labels, encoders, "
                "threshold) VALUES ('v1', 'champion', '', '', '[]', '{}', 0.9)"
            )
        )
        conn.execute(text("INSERT INTO products (sku, name) VALUES ('case', 'Leather case')"))
        conn.execute(
            text(
                "UPDATE products SET status = 'needs_review', confidence = 0.4, "
                "model_version_id = (SELECT id FROM model_versions), predicted_id = "
                "(SELECT id FROM categories WHERE path = 'Audio > Cases')"
            )
        )
    assert [item.predicted for item in needs_review(engine)] == ["Audio > Cases"]
