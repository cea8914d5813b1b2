"""Every test that README.md and docs/*.md name as the backing of a claim exists, and runs in CI.

The docs cite tests as `tests/test_x.py::test_name`, `tests/test_x.py`, or, after a file has been
named, `::test_name` alone (a test of the file named last before it). A test renamed or removed
without its citation would leave a claim backed by nothing; one marked slow (deselected by the
default `-m 'not slow'` that CI runs) would leave it backed by a test CI never runs.
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


@cache
def slow_in(path: Path) -> frozenset[str]:
    """The test functions of `path` that carry the `slow` mark, themselves or by the module's
    `pytestmark`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def marks_slow(node: ast.expr) -> bool:
        return any(
            isinstance(n, ast.Attribute) and n.attr == "slow" and "mark" in ast.unparse(n.value)
            for n in ast.walk(node)
        )

    module_slow = any(
        isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
        and marks_slow(node.value)
        for node in tree.body
    )
    tests = [
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
    ]
    return frozenset(
        n.name for n in tests if module_slow or any(marks_slow(d) for d in n.decorator_list)
    )


def not_in_ci(cited: list[tuple[str | None, str | None]], root: Path) -> list[str]:
    """The cited tests that are marked slow (a whole file: when every test of it is)."""
    problems = []
    for file, name in cited:
        if file is None or not (root / file).is_file():
            continue  # dangling(): reported there
        slow = slow_in(root / file)
        tests = {n for n in functions_in(root / file) if n.startswith("test_")}
        if (name in slow) or (name is None and tests and tests <= slow):
            problems.append(f"{file}::{name}" if name else file)
    return problems


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


def test_no_cited_test_is_marked_slow() -> None:
    problems = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        found = citations(doc.read_text(encoding="utf-8"))
        problems += [f"{doc.name}: {problem}" for problem in not_in_ci(found, REPO)]
    assert problems == []


def test_a_slow_citation_is_found(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text(
        "import pytest\n\n"
        "def test_one():\n    pass\n\n"
        "@pytest.mark.slow\ndef test_two():\n    pass\n\n"
        "@pytest.mark.parametrize('x', [1])\n@pytest.mark.slow\ndef test_three(x):\n    pass\n"
    )
    (tmp_path / "tests" / "test_b.py").write_text(
        "import pytest\n\npytestmark = [pytest.mark.slow]\n\ndef test_four():\n    pass\n"
    )
    text = "tests/test_a.py::test_one, ::test_two, ::test_three, tests/test_a.py, tests/test_b.py"
    assert not_in_ci(citations(text), tmp_path) == [
        "tests/test_a.py::test_two",
        "tests/test_a.py::test_three",
        "tests/test_b.py",
    ]


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
