"""Every test that README.md and docs/*.md name as the backing of a claim exists.

The docs cite tests as `tests/test_x.py::test_name`, `tests/test_x.py`, or, after a file has been
named, `::test_name` alone (a test of the file named last before it). A test renamed or removed
without its citation would leave a claim backed by nothing.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"(?P<file>tests/test_\w+\.py)(?:::(?P<name>test_\w+))?|::(?P<bare>test_\w+)")


@cache
def functions_in(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return frozenset(n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))


def citations(text: str) -> list[tuple[str | None, str | None]]:
    """(file, test name) per citation in `text`; a bare `::name` takes the file named last."""
    found, current = [], None
    for match in CITATION.finditer(text):
        current = match.group("file") or current
        found.append((current, match.group("name") or match.group("bare")))
    return found


def dangling(cited: list[tuple[str | None, str | None]], root: Path) -> list[str]:
    """The citations that name no test file under `root`, or no function of their file."""
    problems = []
    for file, name in cited:
        if file is None:
            problems.append(f"::{name} (no file named before it)")
        elif not (root / file).is_file():
            problems.append(file)
        elif name is not None and name not in functions_in(root / file):
            problems.append(f"{file}::{name}")
    return problems


def test_every_cited_test_exists() -> None:
    cited, problems = 0, []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        found = citations(doc.read_text(encoding="utf-8"))
        cited += len(found)
        problems += [f"{doc.name}: {problem}" for problem in dangling(found, REPO)]
    assert cited > 50  # the docs do cite their tests
    assert problems == []


def test_a_dangling_citation_is_found(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("def test_one():\n    pass\n")
    text = (
        "::test_zero first; backed by tests/test_a.py::test_one and ::test_one; "
        "not by tests/test_a.py::test_two, ::test_three, or tests/test_b.py"
    )
    assert dangling(citations(text), tmp_path) == [
        "::test_zero (no file named before it)",
        "tests/test_a.py::test_two",
        "tests/test_a.py::test_three",
        "tests/test_b.py",
    ]
