"""The README's Python snippets run as written (the API tour and the spconv example)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def test_readme_has_snippets():
    assert len(BLOCKS) >= 2, "the README should show the API tour and the spconv example"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, capsys):
    code = BLOCKS[index]
    if "spconv" in code:
        pytest.importorskip("spconv", reason="the spconv extra is not installed")
    exec(compile(code, f"README.md[python block {index}]", "exec"), {"__name__": "readme"})
