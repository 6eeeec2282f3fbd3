"""The README's promises that code can check."""

from __future__ import annotations

import re
from pathlib import Path

from shelver.catalog.settings_doc import settings_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_settings_table_matches_the_settings_class() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- settings-table -->\n(.*?)\n<!-- /settings-table -->", readme, re.S)
    assert block, "README.md lost its settings-table markers"
    assert block.group(1) == settings_table(), (
        "README settings table is stale: regenerate it with "
        "`python -m shelver.catalog.settings_doc`"
    )


def test_readme_quickstart_has_exactly_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^make (\w+)", quickstart, re.M)
    assert commands == ["demo", "test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
