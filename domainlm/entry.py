"""The command's entry point (`domainlm`, `python -m domainlm`): light, so that Ctrl-C works at once.

The command line imports PyTorch, transformers and the rest for a second or more before it parses
anything (domainlm/cli.py). An interrupt there would print a KeyboardInterrupt traceback and kill
the process by signal; here it is one line and exit code 130, as it is later (cli.main). This
module imports nothing heavy itself, and domainlm/__init__.py imports its names lazily.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

INTERRUPTED = 130  # 128 + SIGINT, the shell's code for a command stopped by Ctrl-C
PIPE_CLOSED = 141  # 128 + SIGPIPE: what `yes | head -1` gives `yes`


def main(argv: Sequence[str] | None = None) -> int:
    """Import the command line and run it; a Ctrl-C at any point is one line and exit code 130.

    Output piped into a reader that stops early (`domainlm perplexity ... | head -2`) ends the
    command quietly with exit code 141, as other tools end, not with a BrokenPipeError traceback.
    """
    try:
        from domainlm.cli import main as cli_main

        code = cli_main(argv)
        sys.stdout.flush()  # here, not at exit, where a closed pipe could not be caught
        return code
    except KeyboardInterrupt:
        sys.stderr.write("domainlm: interrupted\n")  # one write (domainlm/errors.py: say_line)
        return INTERRUPTED
    except BrokenPipeError:
        # Python's own exit flushes stdout again: point it at /dev/null (the Python docs' recipe
        # for SIGPIPE). What the reader took was all it wanted; nothing to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return PIPE_CLOSED


if __name__ == "__main__":
    sys.exit(main())
