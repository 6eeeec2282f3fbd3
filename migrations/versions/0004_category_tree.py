"""Categories form a tree: a parent and a unique full path.

``path`` is the names from the root joined by `` > `` and is kept by the database:
a trigger derives it from the parent's path and the name on every write, and a
renamed or moved category carries its descendants' paths along. Names need no
longer be unique ("Accessories" sits under many parents); paths are.

Today's flat categories become roots under their own name, keeping their ids, so
no label, prediction or audit changes. A flat name that already spelled a path
(``Cell Phones > Cases``, given by a label file or psql) becomes that node of the
tree, its missing ancestors created, still under its own id. ``>`` separates levels:
no name holds one.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from alembic import op
from sqlalchemy import text

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SEPARATOR = " > "

PATH_TRIGGERS = """
-- BEFORE: the path is derived, never trusted from the writer, so it cannot disagree
-- with the names above it. Moving a category under itself would make the path
-- recursion endless; it is refused instead.
CREATE FUNCTION shelver_category_path() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    parent_path text;
BEGIN
    IF NEW.parent_id IS NULL THEN
        NEW.path := NEW.name;
        RETURN NEW;
    END IF;
    SELECT path INTO parent_path FROM categories WHERE id = NEW.parent_id;
    IF parent_path IS NULL THEN
        RAISE EXCEPTION 'category %: parent % does not exist', NEW.name, NEW.parent_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF TG_OP = 'UPDATE'
       AND (parent_path = OLD.path OR starts_with(parent_path, OLD.path || ' > ')) THEN
        RAISE EXCEPTION 'category % cannot be moved under itself', OLD.path;
    END IF;
    NEW.path := parent_path || ' > ' || NEW.name;
    RETURN NEW;
END
$$;

CREATE TRIGGER categories_path
    BEFORE INSERT OR UPDATE ON categories
    FOR EACH ROW EXECUTE FUNCTION shelver_category_path();

-- AFTER: a renamed or moved category touches its children, whose BEFORE trigger
-- recomputes their paths, and so on down the subtree.
CREATE FUNCTION shelver_category_moved() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE categories SET path = path WHERE parent_id = NEW.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER categories_moved
    AFTER UPDATE ON categories
    FOR EACH ROW WHEN (NEW.path IS DISTINCT FROM OLD.path)
    EXECUTE FUNCTION shelver_category_moved();
"""


def upgrade() -> None:
    conn = op.get_bind()
    op.execute(
        """
        ALTER TABLE categories DROP CONSTRAINT categories_name_key;
        ALTER TABLE categories ADD COLUMN path text;
        UPDATE categories SET path = name, parent_id = NULL;
        ALTER TABLE categories ALTER COLUMN path SET NOT NULL;
        ALTER TABLE categories ADD CONSTRAINT categories_path_key UNIQUE (path);
        CREATE INDEX categories_parent ON categories (parent_id);
        """
    )
    op.execute(PATH_TRIGGERS)
    # Shallow first, so a spelled-out ancestor is placed before its descendants.
    spelled = conn.execute(
        text(
            "SELECT id, name FROM categories WHERE position('>' IN name) > 0 "
            "ORDER BY array_length(string_to_array(name, '>'), 1), id"
        )
    ).all()
    for category_id, name in spelled:
        _place(conn, category_id, name)
    op.execute(
        """
        ALTER TABLE categories ADD CONSTRAINT categories_name_is_one_level
            CHECK (name <> '' AND position('>' IN name) = 0)
        """
    )


def _place(conn, category_id: int, spelled_path: str) -> None:  # noqa: ANN001
    """Make the flat category named ``spelled_path`` the tree node at that path, same id."""
    parts = [part.strip() for part in spelled_path.split(">")]
    if not all(parts):
        raise RuntimeError(
            f"category {category_id} is named {spelled_path!r}, which has an empty level; "
            "rename it (UPDATE categories SET name = ...) and run the migration again"
        )
    parent_id = None
    for name in parts[:-1]:
        parent_id = conn.execute(
            text(
                "INSERT INTO categories (name, parent_id) VALUES (:name, :parent_id) "
                "ON CONFLICT (path) DO UPDATE SET name = EXCLUDED.name RETURNING id"
            ),
            {"name": name, "parent_id": parent_id},
        ).scalar_one()
    taken = conn.execute(
        text("SELECT id FROM categories WHERE path = :path AND id <> :id"),
        {"path": SEPARATOR.join(parts), "id": category_id},
    ).scalar_one_or_none()
    if taken is not None:
        raise RuntimeError(
            f"category {category_id} ({spelled_path!r}) and category {taken} name the same "
            "path; move one's labels and predictions to the other, delete it, and run the "
            "migration again"
        )
    conn.execute(
        text("UPDATE categories SET name = :name, parent_id = :parent_id WHERE id = :id"),
        {"name": parts[-1], "parent_id": parent_id, "id": category_id},
    )


def downgrade() -> None:
    # Back to flat names: every category is named by its full path, so labels at any
    # depth survive as distinct flat categories.
    op.execute(
        """
        ALTER TABLE categories DROP CONSTRAINT categories_name_is_one_level;
        DROP TRIGGER categories_moved ON categories;
        DROP TRIGGER categories_path ON categories;
        DROP FUNCTION shelver_category_moved, shelver_category_path;
        UPDATE categories SET name = path, parent_id = NULL;
        DROP INDEX categories_parent;
        ALTER TABLE categories DROP COLUMN path;
        ALTER TABLE categories ADD CONSTRAINT categories_name_key UNIQUE (name);
        """
    )
