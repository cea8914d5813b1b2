"""benchmarks/docs_section.py: a benchmark rewrites its own section and nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from docs_section import write_section  # noqa: E402


def test_a_section_is_replaced_and_the_notes_under_it_and_after_it_are_kept(
    tmp_path: Path,
) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text(
        "# Benchmarks\n\n## A\n\nold table\n\n### A on another machine\n\nhand notes\n\n"
        "## B\n\nb text\n"
    )
    write_section("## A", "## A\n\nnew table\n", docs)
    assert docs.read_text() == (
        "# Benchmarks\n\n## A\n\nnew table\n\n### A on another machine\n\nhand notes\n\n"
        "## B\n\nb text\n"
    )
    write_section("## C", "## C\n\nc text\n", docs)  # a new section goes at the end
    assert docs.read_text().endswith("## B\n\nb text\n\n## C\n\nc text\n")
