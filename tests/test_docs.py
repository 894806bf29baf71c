"""The documents that promise behaviour name the tests that show it: those tests must exist."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _test_names(path: Path) -> set:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_row_of_the_bad_input_table_names_existing_tests():
    text = (REPO / "docs" / "BAD_INPUT.md").read_text()
    rows = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| Bad input")
            and not l.startswith("| Fault") and not l.startswith("|---")]
    assert len(rows) >= 40
    missing = []
    for row in rows:
        refs = REF.findall(row)
        assert refs, f"a row without a test: {row[:80]}"
        for file, name in refs:
            path = REPO / file
            if not path.is_file() or name not in _test_names(path):
                missing.append(f"{file}::{name}")
    assert not missing, f"docs/BAD_INPUT.md names tests that do not exist: {missing}"


def test_the_readme_links_the_bad_input_table():
    assert "docs/BAD_INPUT.md" in (REPO / "README.md").read_text()


def test_every_test_the_protocol_names_exists():
    text = (REPO / "docs" / "PROTOCOL.md").read_text()
    refs = REF.findall(text)
    assert len(refs) >= 5
    missing = [f"{f}::{n}" for f, n in refs if not (REPO / f).is_file() or n not in _test_names(REPO / f)]
    assert not missing, f"docs/PROTOCOL.md names tests that do not exist: {missing}"
    assert "docs/PROTOCOL.md" in (REPO / "README.md").read_text()
