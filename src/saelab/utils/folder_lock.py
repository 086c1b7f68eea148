"""One writer per output folder (a training run, an activation cache).

:class:`RunLock` holds an advisory lock (``flock``) on ``.saelab.lock`` in the folder for as long as a
process writes there, and a second writer is refused with the holder's pid. The kernel drops the
lock when its process dies (even by SIGKILL), so a crashed writer never blocks its resumption.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from saelab.errors import RunExistsError

LOCK = ".saelab.lock"


class RunFolderBusyError(RunExistsError):
    """Another process is writing this folder."""


class RunLock:
    """The advisory lock that makes this process the only writer of a folder (``what`` names it in
    the refusal, e.g. "run folder", "activation cache").

    The lock file holds the holder's pid while it is held (for the refusal message) and is emptied
    on release, so a folder's files read the same before and after a write that failed to start.
    """

    def __init__(self, run_dir: Path, what: str = "run folder"):
        self.run_dir, self.what = Path(run_dir), what
        self.path = self.run_dir / LOCK
        self.created_dir = not self.run_dir.exists()
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _flock_soon(fd)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusyError(
                f"{self.what} {self.run_dir} is being written by another process ({self.holder()}); "
                "wait for it to end, or pick another folder"
            ) from None
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:  # e.g. a full disk: give the lock back rather than hold it for the process's life
            self.release()
            raise
        return self

    def holder(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            return f"pid {int(self.path.read_text().strip())}"
        return "pid unknown"

    def release(self, *, remove_created_dir: bool = False) -> None:
        """Give the folder up; ``remove_created_dir`` also removes the folder if this lock created it
        and nothing else was written there (a write that failed to start leaves no trace)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            if remove_created_dir and self.created_dir:
                self.path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # not empty: something else lives there
                    self.run_dir.rmdir()
        finally:
            _flock(fd, "unlock")
            os.close(fd)


def held_by(folder: str | Path) -> str | None:
    """Which other process holds ``folder``'s lock ("pid 123"), or None when no writer holds it or this
    process does (an evaluation writing the run's report holds it). Only looks: a folder without a lock
    file gets none, and a free lock keeps its (empty) file as it was."""
    try:
        fd = os.open(Path(folder) / LOCK, os.O_RDONLY)
    except OSError:  # no lock file: never written by a process that locks
        return None
    try:  # a reader's lock (LOCK_SH): two looks at once do not see each other as a writer
        _flock(fd, "look")
    except BlockingIOError:  # flock refuses a second lock of this process's own too
        holder = RunLock(Path(folder)).holder()
        return None if holder == f"pid {os.getpid()}" else holder
    else:
        _flock(fd, "unlock")
        return None
    finally:
        os.close(fd)


LOOK_SECONDS = 0.2
"""How long acquire waits for a lock held only for a look: held_by locks a free folder for an instant (a
reader's lock, so looks do not block each other, but a writer must wait it out)."""


def _flock_soon(fd: int) -> None:
    """The exclusive lock, tried again for up to LOOK_SECONDS: a writer holds it for its whole run, so one
    that is still held then is a writer's, not a look's."""
    deadline = time.monotonic() + LOOK_SECONDS
    while True:
        try:
            return _flock(fd, "exclusive")
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _flock(fd: int, how: str) -> None:
    """flock without waiting: "exclusive" (a writer), "look" (a reader's lock, LOCK_SH) or "unlock"."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform (Windows): one writer is then the user's care
        return
    ops = {"exclusive": fcntl.LOCK_EX | fcntl.LOCK_NB, "look": fcntl.LOCK_SH | fcntl.LOCK_NB, "unlock": fcntl.LOCK_UN}
    fcntl.flock(fd, ops[how])


def remove_stale_temp_files(*folders: Path) -> list[Path]:
    """Delete the temporary files (``.NAME.XXXX.tmp``, saelab.utils.atomic) that killed writers left in
    these folders. Only the lock holder may call this: a live writer's are in use."""
    removed = []
    for folder in folders:
        for path in folder.glob(".*.tmp") if folder.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed
