"""docs/compatibility.md and the README's "Compatibility" section: every cell names tests that exist.

A cell that claims support must point at a test (``test_file.py::test_name``) that checks it, so a
renamed or deleted test shows up here; the README's table must be the same as the docs page's.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "compatibility.md"
README = ROOT / "README.md"
REFERENCE = re.compile(r"`(test_\w+\.py)::(test_\w+)`")


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the markdown table whose header row starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_every_named_test_exists():
    text = DOC.read_text()
    references = REFERENCE.findall(text)
    assert len(references) >= 30, f"expected the tables to name their tests, found {len(references)}"
    missing = []
    for file, name in sorted(set(references)):
        paths = list((ROOT / "tests").rglob(file))  # test file names are unique across the folders
        if len(paths) != 1 or not re.search(rf"^def {name}\(", paths[0].read_text(), re.MULTILINE):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/compatibility.md names tests that do not exist: {missing}"


def test_every_feature_cell_is_backed():
    rows = table_rows(DOC.read_text(), "| Feature | masked")
    assert len(rows) >= 15, f"the feature x form table has {len(rows)} rows"
    for feature, masked, sparse, _tolerance in rows:
        for form, cell in (("masked", masked), ("sparse", sparse)):
            assert REFERENCE.search(cell), f"'{feature}' ({form}) names no test: {cell!r}"


def test_readme_table_is_the_docs_table():
    readme = table_rows(README.read_text(), "| Feature | masked")
    assert readme == table_rows(DOC.read_text(), "| Feature | masked"), \
        "README's Compatibility table differs from docs/compatibility.md; copy it over"
