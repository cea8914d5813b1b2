"""Ctrl-C in the first seconds of a command, while PyTorch is still being imported: one line,
`domainlm: interrupted`, and exit code 130, as later in the run (domainlm/entry.py).

The interrupt is timed by the child itself, not by a sleep or by reading its output (a loaded
machine lets a child run far ahead of the parent that reads it): an import hook in the child
sends it SIGINT when the first `torch.*` submodule is looked up, i.e. inside `import torch`. With
`-X importtime` Python writes a line to stderr as each module finishes importing, and the test
checks afterwards that few of torch's hundreds of submodules came (the import was cut short).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCH_SUBMODULE_DONE = re.compile(r"\|\s*torch\.\S+\s*$")  # `import time: 12 | 34 |   torch._utils`
# `import torch` imports hundreds of torch.* modules; an interrupted one, a handful.
CUT_SHORT_TORCH_SUBMODULES = 100
WATCHDOG_SECONDS = 60  # only a hung child gets near this; a run takes well under a second


def console_script_target() -> str:
    """`module:function` of the `domainlm` command, as pyproject.toml declares it (read with a
    pattern: tomllib is Python 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    found = re.search(r'^\[project\.scripts\][^\[]*?^domainlm\s*=\s*"([^"]+)"', text, re.M | re.S)
    assert found, "pyproject.toml: no [project.scripts] domainlm"
    return found.group(1)


# Run first in the child: SIGINT to itself when the first torch submodule is looked up.
INTERRUPT_INSIDE_IMPORT_TORCH = (
    "import os, signal, sys\n"
    "class InterruptInsideTorch:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.startswith('torch.'):\n"
    "            sys.meta_path.remove(self)\n"
    "            os.kill(os.getpid(), signal.SIGINT)\n"
    "        return None\n"
    "sys.meta_path.insert(0, InterruptInsideTorch())\n"
)


def console_script_command() -> list[str]:
    """What the installed `domainlm` script runs, spelled out (pip writes the script at install)."""
    module, function = console_script_target().split(":")
    code = f"import sys; from {module} import {function}; sys.exit({function}())"
    return [sys.executable, "-X", "importtime", "-c", INTERRUPT_INSIDE_IMPORT_TORCH + code]


def module_command() -> list[str]:
    """`python -m domainlm`: domainlm/__main__.py run as the main module."""
    code = "import runpy; runpy.run_module('domainlm', run_name='__main__', alter_sys=True)"
    return [sys.executable, "-X", "importtime", "-c", INTERRUPT_INSIDE_IMPORT_TORCH + code]


def interrupt_while_torch_imports(command: list[str], tmp_path: Path) -> tuple[int, str]:
    """Run `command train ...` (it interrupts itself inside `import torch`); (rc, stderr)."""
    train = ["train", "--model", "scratch:tiny", "--train-file", str(tmp_path / "train.txt")]
    done = subprocess.run(
        [*command, *train, "--output-dir", str(tmp_path / "out")],
        # as from a shell: SIGINT at its default (a child inherits an ignored SIGINT, and Python
        # then installs no KeyboardInterrupt handler; a test runner may have it ignored)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=WATCHDOG_SECONDS,
    )
    return done.returncode, done.stderr


@pytest.mark.parametrize("how", ["python -m domainlm", "console script"])
def test_ctrl_c_while_torch_imports_exits_130_without_a_traceback(how: str, tmp_path: Path) -> None:
    command = console_script_command() if how == "console script" else module_command()
    rc, stderr = interrupt_while_torch_imports(command, tmp_path)
    torch_submodules = [line for line in stderr.splitlines() if TORCH_SUBMODULE_DONE.search(line)]
    assert 0 < len(torch_submodules) < CUT_SHORT_TORCH_SUBMODULES, stderr[-2000:]
    messages = [line for line in stderr.splitlines() if not line.startswith("import time:")]
    assert "Traceback" not in stderr, "\n".join(messages)
    assert messages == ["domainlm: interrupted"]
    assert rc == 130


def test_the_console_script_is_the_light_entry_point() -> None:
    """The installed `domainlm` must go through domainlm.entry, whose try covers the imports."""
    assert console_script_target() == "domainlm.entry:main"


def test_the_package_imports_nothing_heavy_but_still_exports_its_names() -> None:
    """`import domainlm` (which every `import domainlm.x` runs first) leaves torch unimported;
    the public names still import, and are the library's own objects."""
    code = (
        "import sys, domainlm\n"
        "assert 'torch' not in sys.modules, 'import domainlm imported torch'\n"
        "from domainlm import TrainConfig, train, UserError, load_model, evaluate_perplexity\n"
        "from domainlm import PerplexityConfig, PerplexityReport, TrainResult\n"
        "import domainlm.run.train, domainlm.config\n"
        "assert train is domainlm.run.train.train and TrainConfig is domainlm.config.TrainConfig\n"
        "assert set(domainlm.__all__) <= set(dir(domainlm))\n"
        "try:\n"
        "    domainlm.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('domainlm.no_such_name did not raise AttributeError')\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr[-2000:]
