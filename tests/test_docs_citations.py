"""Every test that README.md and docs/*.md name as the backing of a claim exists.

The docs cite tests as `tests/test_x.py::test_name`, `tests/test_x.py`, or, after a file has been
named, `::test_name` alone (a test of the file named last before it). A test renamed or removed
without its citation would leave a claim backed by nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"(?P<file>tests/test_\w+\.py)?(?:::(?P<name>test_\w+))?")


def functions_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def dangling_citations(text: str, tests_dir: Path) -> list[str]:
    """The citations in `text` that name no test file, or no test function of their file."""
    dangling, current = [], None
    for match in CITATION.finditer(text):
        file, name = match.group("file"), match.group("name")
        if file:
            current = file
            if not (tests_dir.parent / file).is_file():
                dangling.append(file)
                continue
        if name:
            if current is None:
                dangling.append(f"::{name} (no file named before it)")
            elif (tests_dir.parent / current).is_file() and name not in functions_in(
                tests_dir.parent / current
            ):
                dangling.append(f"{current}::{name}")
    return dangling


def test_every_cited_test_exists() -> None:
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    cited = 0
    problems = []
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        cited += len(re.findall(r"tests/test_\w+\.py|::test_\w+", text))
        problems += [f"{doc.name}: {c}" for c in dangling_citations(text, REPO / "tests")]
    assert cited > 50  # the docs do cite their tests
    assert problems == []


def test_a_dangling_citation_is_found(tmp_path: Path) -> None:
    tests_dir = tmp_path / "tests"
    tests_dir.mkdir()
    (tests_dir / "test_a.py").write_text("def test_one():\n    pass\n")
    text = (
        "backed by tests/test_a.py::test_one and ::test_one; "
        "not by tests/test_a.py::test_two, ::test_three, or tests/test_b.py"
    )
    assert dangling_citations(text, tests_dir) == [
        "tests/test_a.py::test_two",
        "tests/test_a.py::test_three",
        "tests/test_b.py",
    ]
