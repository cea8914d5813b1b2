"""Errors a user can fix. The command line prints them as one line and exits with code 2."""

import sys


def say_line(message: str) -> None:
    """Write `message` and its line end to stderr in one write.

    Python's stderr is unbuffered: `print` writes the text and the line end apart, so two
    torchrun ranks sharing a terminal or pipe could glue their lines into one. One write of a
    line shorter than the pipe's atomic size (4 KiB) arrives whole.
    """
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()


class UserError(Exception):
    """Bad input: a missing file, an impossible option, an unreachable model.

    The message says what is wrong and what to do. Raised before anything is written or deleted.
    """

    exit_code = 2


class TrainingAborted(Exception):
    """A run that stopped on purpose (numerical faults, a signal, a dead rank)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
