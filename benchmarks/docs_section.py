"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections as they are."""

from __future__ import annotations

from pathlib import Path

DOCS_FILE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(heading: str, text: str, docs_file: Path = DOCS_FILE) -> None:
    """Replace the section that starts with `heading`, or append it. The section ends at the next
    `## ` or `### ` heading: the scripts write no subsections, so the `### ` ones under a
    generated section are notes written by hand (other machines, other runs), and are kept."""
    docs_file.parent.mkdir(exist_ok=True)
    old = docs_file.read_text(encoding="utf-8") if docs_file.exists() else "# Benchmarks\n"
    start = old.find(heading)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        ends = [old.find(mark, start + len(heading)) for mark in ("\n## ", "\n### ")]
        end = min((e for e in ends if e >= 0), default=-1)
        rest = old[end + 1 :] if end >= 0 else ""
        new = old[:start] + text.rstrip("\n") + "\n\n" + rest
    docs_file.write_text(new.rstrip("\n") + "\n", encoding="utf-8")
    print(f"wrote {docs_file}")
