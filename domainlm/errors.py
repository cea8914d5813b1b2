"""Errors a user can fix. The command line prints them as one line and exits with code 2."""


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
