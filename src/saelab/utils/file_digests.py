"""The sha256 of files' bytes, kept for a later call while a file is unchanged.

A local corpus is told by the sha256 of its content (``saelab.data.text.corpus_fingerprint``), which reads every
byte, about 1 GB/s: minutes for a corpus of hundreds of GB, on every harvest. :func:`file_fingerprints` keeps each
file's digest in ``$SAELAB_CACHE_DIR/file-digests.json`` with the stamps the file had when it was read, under its
resolved path: device and inode, size, modification and change times (ns). Every write moves the change time,
which no user can set back (``touch`` and ``os.utime`` set the modification time and move it to now), and a file
replaced by a rename is another inode: a file whose stamps are all as kept holds the bytes hashed, as git's index
trusts them. Only stamps older than :data:`RACY_NS` when the hash started are kept: a write in the same clock tick
as the last one may leave every stamp as it was. Without a writable cache folder every call hashes again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saelab.utils.atomic import write_with
from saelab.utils.cache_dir import CACHE_DIR_ENV, cache_dir

DIGESTS_FILE = "file-digests.json"
FORMAT = "saelab-file-digests"
MAX_ENTRIES = 32_768
"""Files the record keeps, the most recently hashed or found unchanged (about 7 MB of record at most): a folder
corpus of more files is partly hashed again on each call."""
RACY_NS = 2 * 10**9
"""How much older than the hash's start a file's stamps must be to be kept: more than a file system's clock tick
(FAT's modification times have 2 s steps; others a few ms)."""

_KEPT: dict[tuple, tuple[int, str]] = {}
"""This process's answers, by resolved path and stamps: one call hashes a file once, kept record or not."""
_NOTED: list[str] = []
"""The record that could not be written, once said."""


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex): a download's check, a browser site's record of its files."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_fingerprints(files: Sequence[str | os.PathLike]) -> list[tuple[int, str]]:
    """Each file's size and :func:`file_sha256`, as one read of it gave them; a file is read only where no
    earlier hash of it in this process or in the kept record has its stamps (see the module's docstring)."""
    record: dict[str, list] | None = None  # read once needed: an unchanged file hashed in this process needs none
    new: dict[str, list] = {}  # for the record's newest end: files hashed now, and kept ones found near its oldest
    out = []
    try:
        for path in (Path(f).resolve() for f in files):
            key = (str(path), *_stamps(path.stat()))
            if key not in _KEPT:
                if record is None:
                    record = _read_record()
                    # the entries the next MAX_ENTRIES // 2 new ones would drop first
                    older = set(list(record)[:max(0, len(record) - MAX_ENTRIES // 2)])
                kept = record.get(str(path))
                if _valid(kept) and kept[:5] == list(key[1:]):
                    _KEPT[key] = (kept[2], kept[5])
                    if str(path) in older:  # moved up, so a corpus in use is not the one dropped
                        new[str(path)] = kept
                else:
                    key = _hash_into_kept(path, new)
            out.append(_KEPT[key])
    finally:  # an interrupted folder keeps the files it finished
        if new:
            _write_record(new)
    return out


def files_fingerprint(files: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """What ``files`` (not empty) hold, read in this order as one: their size in bytes and the sha256 of a file's
    bytes (as sha256sum gives it), for several the sha256 of their sha256s (:func:`file_fingerprints`: a file
    unchanged since an earlier hash is not read again)."""
    read = file_fingerprints(files)
    digests = [digest for _, digest in read]
    digest = digests[0] if len(digests) == 1 else hashlib.sha256("\n".join(digests).encode()).hexdigest()
    return {"bytes": sum(size for size, _ in read), "sha256": digest}


def _stamps(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _hash_into_kept(path: Path, new: dict[str, list]) -> tuple:
    """Hash ``path``; kept in this process where it did not change while read, and in ``new`` (for the record)
    where its stamps were also older than RACY_NS. Returns the key its answer is kept under."""
    started = time.time_ns()
    with open(path, "rb") as f:
        before = _stamps(os.fstat(f.fileno()))
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        changed = _stamps(os.fstat(f.fileno())) != before
    key = (str(path), *before) if not changed else (str(path), "changed while read", started)
    _KEPT[key] = (before[2], digest)  # a file changed while read: kept only to answer this call
    if not changed and max(before[3], before[4]) < started - RACY_NS:
        new[str(path)] = [*before, digest]
    return key


def _valid(entry: object) -> bool:
    return (isinstance(entry, list) and len(entry) == 6 and all(type(v) is int for v in entry[:5])
            and isinstance(entry[5], str) and len(entry[5]) == 64)


def _record_path() -> Path:
    return cache_dir() / DIGESTS_FILE


def _read_record() -> dict[str, list]:
    """The kept record, oldest entry first; empty where there is none, it cannot be read or is not one."""
    try:
        record = json.loads(_record_path().read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested deeper than json reads
        return {}
    ok = isinstance(record, dict) and record.get("format") == FORMAT and isinstance(record.get("files"), dict)
    return record["files"] if ok else {}


def _write_record(new: dict[str, list]) -> None:
    """Add ``new`` to the record as read now (another process may have added to it), keeping the newest
    MAX_ENTRIES; a record that cannot be written is said once a process."""
    files = {path: entry for path, entry in _read_record().items() if path not in new}
    files = dict(list({**files, **new}.items())[-MAX_ENTRIES:])
    path = _record_path()
    try:
        write_with(path, lambda tmp: _write_private(tmp, json.dumps({"format": FORMAT, "files": files}) + "\n"))
    except OSError as e:
        if str(path) not in _NOTED:
            _NOTED.append(str(path))
            print(f"saelab: note: {path} cannot be written ({e.strerror or e}): a local corpus is hashed again by "
                  f"each call; set {CACHE_DIR_ENV} to a writable folder to keep its fingerprint", file=sys.stderr)


def _write_private(tmp: Path, text: str) -> None:
    """The record names local corpora by path: readable by this user only, as the local key is."""
    os.chmod(tmp, 0o600)
    tmp.write_text(text, encoding="utf-8")
