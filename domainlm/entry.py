"""The command's entry point (`domainlm`, `python -m domainlm`): light, so that Ctrl-C works at once.

The command line imports PyTorch, transformers and the rest for a second or more before it parses
anything (domainlm/cli.py). An interrupt there would print a KeyboardInterrupt traceback and kill
the process by signal; here it is one line and exit code 130, as it is later (cli.main). This
module imports nothing heavy itself, and domainlm/__init__.py imports its names lazily.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

INTERRUPTED = 130  # 128 + SIGINT, the shell's code for a command stopped by Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    """Import the command line and run it; a Ctrl-C at any point is one line and exit code 130."""
    try:
        from domainlm.cli import main as cli_main

        return cli_main(argv)
    except KeyboardInterrupt:
        print("domainlm: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
