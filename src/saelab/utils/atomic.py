"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file saelab writes goes through here, so a crash or a full disk mid-write leaves
earlier results intact (the temporary file is removed and the error re-raised). Folders written in one
go (a browser site, an export) are filled beside their place and renamed in with :func:`atomic_folder`. Results made of several
files that a command writes over minutes (a run's training and evaluation) are replaced with
:func:`replacing_entries`: the old ones stay whole until the new ones are complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from saelab.errors import ConfigError
from saelab.utils.folder_lock import LOCK, RunLock


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def check_file_target(path: str | os.PathLike, named: str, what: str) -> Path:
    """``path`` checked as a file to write ``what`` to, before the work that makes it: not a folder, in an existing
    folder this process may write in. ``named``: how the user gave it (an option, an argument)."""
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{named} {path}: expected a file path in an existing, writable folder ({what})")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are ordinary files
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            # "[Errno 28] No space left on device" names no file: name the one being written
            # (OSError(errno, ...) picks the matching subclass, so the type is kept).
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to fill; once the block ends normally it takes the place of
    ``path`` (:func:`replace_folder`). On any error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes 0700; results are ordinary folders
        yield tmp
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the folder ``tmp`` to ``out``. A folder at ``out`` is moved aside first (a rename cannot replace
    a non-empty folder), removed after, and moved back if the rename fails: ``out`` is never left missing."""
    tmp, out = Path(tmp), Path(out)
    old = out.with_name(f".{out.name}.old-{os.getpid()}") if out.exists() else None
    if old is not None:
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Atomically write ``path`` with ``writer(tmp_path)``, for libraries that take a filename."""
    with atomic_path(path) as tmp:
        writer(tmp)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and flush it to disk (metrics logs; a torn last line is tolerated on read)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


SET_ASIDE = ".set-aside"
"""Where :func:`replacing_entries` keeps the entries being replaced until their replacement is complete."""

_FINISHED_ASIDE = SET_ASIDE + ".done"
"""The set-aside folder once its replacement is complete: removed, never put back."""

_PAUSED = ".paused"
"""Marks a set-aside folder whose replacement was paused: kept until a resume completes it."""

_REPLACING: set[Path] = set()
"""Folders a replacing_entries block of this process is replacing now (an inner block leaves them to it)."""


def _always() -> bool:
    return True


@contextlib.contextmanager
def replacing_entries(folder: str | os.PathLike, names: Iterable[str], *,
                      complete: Callable[[], bool] = _always) -> Iterator[None]:
    """Replace the entries ``names`` of ``folder`` (files or folders) with what the block writes there.

    The old entries are moved into ``folder/.set-aside`` first, so the block writes a clean folder
    (nothing stale beside the new files) while the old results still exist. A block that ends normally
    removes them, unless ``complete()`` says its replacement is unfinished (a paused training): they then
    stay set aside, marked paused, until :func:`resuming_replacement` completes it. A block that raises
    (Ctrl-C included) has what it wrote under ``names`` removed and the old entries put back. The set-aside
    folder holds its own lock for as long as its replacement runs, so a set-aside a killed process left is
    put back first, and one a live process holds is refused. Nested blocks on the same folder are one
    replacement: the outermost one decides.
    """
    folder, names = Path(folder), tuple(names)
    if is_being_replaced(folder):
        yield
        return
    put_back_set_aside(folder, names)
    lock = _set_aside(folder, names)
    if lock is None:  # nothing earlier to keep: whatever the block leaves is the only result
        yield
        return
    with _replacement(folder, lock, complete, undo=names):
        yield


@contextlib.contextmanager
def resuming_replacement(folder: str | os.PathLike, *, complete: Callable[[], bool]) -> Iterator[None]:
    """Go on with a replacement of ``folder`` that a :func:`replacing_entries` block paused (nothing to do
    when there is none). The set-aside is removed once ``complete()`` holds at the block's end, however it
    ends; else it stays set aside and paused: a resume that is interrupted or fails does not undo the
    replacement the earlier call deliberately left for it, and the next resume goes on from there."""
    folder = Path(folder)
    lock = None if is_being_replaced(folder) else _take_paused(folder)
    if lock is None:
        yield
        return
    with _replacement(folder, lock, complete, undo=None):
        yield


@contextlib.contextmanager
def _replacement(folder: Path, lock: RunLock, complete: Callable[[], bool], undo: tuple[str, ...] | None):
    """Hold a set-aside (its ``lock``) while the block replaces ``folder``'s entries; ``undo``: the names put
    back when the block raises (None: a resumed replacement, which stays paused instead)."""
    key, done = folder.resolve(), False
    _REPLACING.add(key)
    try:
        yield
    except BaseException:
        if undo is not None:
            put_back_set_aside(folder, undo, held=lock)
            print(f"saelab: {folder}: the replacement did not finish; the earlier results are back in place",
                  file=sys.stderr)
        else:
            done = _settle(folder, complete)
        raise
    else:
        done = _settle(folder, complete)
    finally:
        _REPLACING.discard(key)
        lock.release()
    if done:
        shutil.rmtree(folder / _FINISHED_ASIDE)


def _settle(folder: Path, complete: Callable[[], bool]) -> bool:
    """At a replacement's end, under the set-aside's lock: True (the set-aside renamed, to be removed) when
    ``complete()``, else the set-aside marked paused, False."""
    if complete():  # one rename: from here on nothing puts the old entries back
        os.replace(folder / SET_ASIDE, folder / _FINISHED_ASIDE)
        return True
    (folder / SET_ASIDE / _PAUSED).touch()
    print(f"saelab: {folder}: the replacement is paused; the earlier results wait in {SET_ASIDE}/ until a "
          "resume finishes it (an overwrite starts it over)", file=sys.stderr)
    return False


def _take_paused(folder: Path) -> RunLock | None:
    """The lock of ``folder``'s paused set-aside, held; None when there is none (a live holder is refused)."""
    aside = folder / SET_ASIDE
    if not (aside / _PAUSED).exists():
        return None
    lock = RunLock(aside, what=f"the replacement of {folder}").acquire()
    if (aside / _PAUSED).exists():
        return lock
    lock.release(remove_created_dir=True)  # put back by another process meanwhile
    return None


def is_paused(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a set-aside whose replacement was paused (to be resumed, not put back)."""
    return (Path(folder) / SET_ASIDE / _PAUSED).exists()


def is_being_replaced(folder: str | os.PathLike) -> bool:
    """Whether a replacing_entries block of this process is replacing ``folder`` now."""
    return Path(folder).resolve() in _REPLACING


def put_back_set_aside(folder: str | os.PathLike, names: Iterable[str], *, held: RunLock | None = None) -> bool:
    """Undo an unfinished replacement: remove what the replacement wrote under ``names`` and move the
    set-aside entries back; True if there was one. A finished replacement's leftover is only removed. The
    set-aside's lock (``held``, else taken here) keeps a live replacement in another process from being undone:
    that one is refused with its pid."""
    folder = Path(folder)
    shutil.rmtree(folder / _FINISHED_ASIDE, ignore_errors=True)
    aside = folder / SET_ASIDE
    if not aside.is_dir():
        return False
    lock = held or RunLock(aside, what=f"the replacement of {folder}").acquire()
    try:
        (aside / _PAUSED).unlink(missing_ok=True)  # a paused replacement is undone like an interrupted one
        if (aside / _ALL_SET_ASIDE).exists():  # else cut off while moving: what stands in the folder is old too
            for name in names:
                remove_entry(folder / name)
            (aside / _ALL_SET_ASIDE).unlink()
        for entry in aside.iterdir():
            if entry.name != LOCK:
                os.replace(entry, folder / entry.name)
        (aside / LOCK).unlink()  # still held through its open descriptor
        aside.rmdir()
    finally:
        lock.release()
    return True


_ALL_SET_ASIDE = ".all-set-aside"
"""Marks a set-aside folder whose entries were all moved: from then on the folder's entries may be new."""


def _set_aside(folder: Path, names: tuple[str, ...]) -> RunLock | None:
    """Move the present ``names`` into ``folder/.set-aside``; the set-aside's lock, held, or None if none is there."""
    present = [name for name in names if os.path.lexists(folder / name)]
    if not present:
        return None
    aside = folder / SET_ASIDE
    aside.mkdir()
    lock = RunLock(aside, what=f"the replacement of {folder}").acquire()
    try:
        for name in present:
            os.replace(folder / name, aside / name)
        (aside / _ALL_SET_ASIDE).touch()
    except BaseException:
        put_back_set_aside(folder, names, held=lock)
        raise
    return lock


def remove_entry(path: Path) -> None:
    """Remove a file, a link or a folder tree; nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
