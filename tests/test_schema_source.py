"""Migrations are the schema's only source: autogenerate cannot propose dropping live schema."""

from __future__ import annotations

from alembic import command
from alembic.operations import ops
from alembic.util import CommandError

from shelver.catalog.migrate import MIGRATIONS_DIR, alembic_config


def proposed_operations(directives: list) -> list[ops.MigrateOperation]:
    """Every operation in autogenerate's directives, nested ones included."""
    found: list[ops.MigrateOperation] = []

    def walk(op: ops.MigrateOperation) -> None:
        found.append(op)
        for child in getattr(op, "ops", []):
            walk(child)

    for script in directives:
        for upgrade in script.upgrade_ops_list:
            walk(upgrade)
    return found


def test_autogenerate_against_the_migrated_database_proposes_no_drop(database_url: str) -> None:
    before = sorted(p.name for p in (MIGRATIONS_DIR / "versions").iterdir())
    proposed: list = []

    def keep_and_write_nothing(context, revision, directives) -> None:  # noqa: ANN001
        proposed.extend(directives)
        directives[:] = []

    try:
        command.revision(
            alembic_config(database_url),
            message="probe",
            autogenerate=True,
            process_revision_directives=keep_and_write_nothing,
        )
    except CommandError as exc:
        # No metadata to compare with (migrations/env.py): autogenerate refuses outright.
        assert "MetaData" in str(exc)
    drops = [
        type(op).__name__ + str(getattr(op, "to_diff_tuple", lambda: ())())
        for op in proposed_operations(proposed)
        if type(op).__name__.startswith("Drop")
    ]
    assert drops == []
    assert sorted(p.name for p in (MIGRATIONS_DIR / "versions").iterdir()) == before
