"""The test suite cleans up after itself: a CI run failed with "No space left on device" when the
suite's model folders and checkpoints (gigabytes, kept to the end of the session and for three
sessions after) filled the machine's disk. A passing test's tmp_path and a passing module's
`module_tmp` folders are removed when they are done; a failing test's are kept to look at.

Each case runs a small test module in its own pytest session, with this project's pytest
settings (pyproject.toml) and tests/conftest.py's `module_tmp`, and lists what it left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

INNER_MODULE = """
from conftest import module_tmp  # noqa: F401  (the fixture under test)


def test_writes_shared_and_own_files(module_tmp, tmp_path):
    (module_tmp.mktemp("shared") / "weights.bin").write_bytes(bytes(1000))
    (tmp_path / "own.bin").write_bytes(bytes(10))
    assert module_tmp.mktemp("shared").name == "shared1"
    assert {outcome}
"""


def files_left(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("passes", [True, False])
def test_a_passing_module_leaves_no_files_and_a_failing_one_keeps_them(
    tmp_path: Path, passes: bool
) -> None:
    module = tmp_path / "test_inner.py"
    module.write_text(INNER_MODULE.format(outcome="True" if passes else "False"))
    base = tmp_path / "base"
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
            "--basetemp", str(base), str(module),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == (0 if passes else 1), result.stdout + result.stderr
    left = files_left(base)
    if passes:
        assert left == []
    else:
        assert "test_inner0/shared0/weights.bin" in left
        assert any(path.endswith("/own.bin") for path in left), left


SEES_OLD_SESSIONS = """
def test_sees_what_earlier_sessions_left(tmp_path):
    root = tmp_path.parents[1]  # pytest-of-USER; tmp_path is root/pytest-N/<test>0
    assert not (root / "pytest-3").exists()  # a finished session's: removed at the start
    assert (root / "pytest-4" / "live.bin").is_file()  # a live session's (locked): kept
"""


def test_a_session_starts_by_removing_what_finished_sessions_left(tmp_path: Path) -> None:
    """tests/conftest.py's pytest_sessionstart: earlier sessions' folders (kept three at a time
    by pytest's default, they filled a CI machine's disk) are gone when the tests start, not
    only when they end; a running session's folder (its .lock file fresh) is left alone."""
    import getpass

    root = tmp_path / "temproot" / f"pytest-of-{getpass.getuser()}"
    (root / "pytest-3").mkdir(parents=True)
    (root / "pytest-3" / "old.bin").write_bytes(bytes(1000))
    (root / "pytest-4").mkdir()
    (root / "pytest-4" / ".lock").write_text("4242")
    (root / "pytest-4" / "live.bin").write_bytes(bytes(1000))
    module = tmp_path / "test_inner.py"
    module.write_text(SEES_OLD_SESSIONS)
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
            "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), str(module),
        ],
        env={
            **os.environ, "PYTHONPATH": str(ROOT / "tests"),
            "PYTEST_DEBUG_TEMPROOT": str(tmp_path / "temproot"),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (root / "pytest-4" / "live.bin").is_file()
