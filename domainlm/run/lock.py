"""One run per output folder: `.domainlm.lock` holds the pid and host of the run that owns it.

A second run on the same folder refuses while the owner lives. The lock of a process that is gone
(same host, pid no longer running) is stale and taken over. A lock from another host cannot be
checked, so it is never taken over silently: the message says which file to remove.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from domainlm.errors import UserError

LOCK_FILE = ".domainlm.lock"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Held while a run uses `output_dir`. Creates the folder if needed; `release` undoes both."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self.created_dir = False
        self.held = False

    def acquire(self) -> RunLock:
        if not self.output_dir.exists():
            self.output_dir.mkdir(parents=True)
            self.created_dir = True
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_owner()  # raises unless the lock is stale (then removed)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise UserError(f"--output-dir {self.output_dir}: could not take the lock {self.path}")

    def _check_owner(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError):
            # Written by a process killed between create and write (or garbage): a lock
            # younger than a few seconds may still be being written, so only older ones are stale.
            if time.time() - self.path.stat().st_mtime < 5:
                raise UserError(
                    f"--output-dir {self.output_dir} is being locked by another run right now"
                ) from None
            self.path.unlink(missing_ok=True)
            return
        if host != socket.gethostname():
            raise UserError(
                f"--output-dir {self.output_dir} is locked by process {pid} on host {host}; if that "
                f"run is over, remove {self.path}"
            )
        if pid != os.getpid() and pid_alive(pid):
            raise UserError(
                f"--output-dir {self.output_dir} is in use by another run (process {pid} on "
                f"{host}); wait for it to end or choose another folder"
            )
        self.path.unlink(missing_ok=True)  # stale: its process is gone

    def release(self) -> None:
        """Remove the lock; also the folder when this run created it and left nothing in it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        if self.created_dir:
            with contextlib.suppress(OSError):
                self.output_dir.rmdir()  # only succeeds when empty

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
