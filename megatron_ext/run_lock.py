"""One writer per run directory: an exclusive ``flock`` on ``run.dir/.run.lock``.

The lock file holds the holder's host and PID, for the message that refuses a second start.
The kernel drops a ``flock`` when its holder dies (SIGKILL included), so the lock of a dead
run is simply taken over; its stale host/PID line is named in the log. On NFS, Linux maps
``flock`` to POSIX locks, which the server releases when the holder's lease ends.

Who holds it: the process started by the user. When it starts torchrun it keeps the lock
for the run's lifetime and tells its ranks so through :data:`HELD_BY_LAUNCHER`; ranks started
by something else (srun, a user's own torchrun) lock on global rank 0. Under Slurm a requeued
job starts after the old one's processes are gone, so its rank 0 takes the freed lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
HELD_BY_LAUNCHER = "STAR_ELASTIC_RUN_LOCK"
"""Environment variable a launcher sets for its ranks: the lock file it holds for them."""


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory; the message names its host and PID."""


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


class RunLock:
    """The exclusive lock on ``run_dir``; a context manager. Creates ``run_dir`` if needed."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunDirLocked` naming the live holder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or "a process that has not written its name yet"
            os.close(fd)
            raise RunDirLocked(
                f"run.dir {self.run_dir} is in use by {holder} ({self.path}); wait for that "
                "run to end or stop it, or choose another run.dir"
            ) from None
        stale = _read(fd)
        if stale:
            logger.warning("took over the lock of %s, which no longer runs", stale)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder line and drop the lock (the file stays: unlinking would race)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def needs_own_lock() -> bool:
    """Whether this process must lock its run dir: not a rank whose launcher holds it, and
    not a rank other than global rank 0."""
    if os.environ.get(HELD_BY_LAUNCHER):
        return False
    return os.environ.get("RANK", "0") == "0"
