"""A secret of this user on this machine, that hashes where local files lie for records shared with others.

A site or export records whether the corpus it read lies where a later build's does (so that a refusal can say
"changed since" rather than "another corpus of that name"). A plain hash of the path let anyone confirm a guessed
path from a published site; a hash keyed by this secret (HMAC-SHA256) cannot be checked without it. The secret is
32 random bytes in ``local-key`` in saelab's cache folder (``$SAELAB_CACHE_DIR``, :func:`saelab.utils.cache_dir.cache_dir`), made on first use;
without it (deleted, another machine or user) earlier records cannot be compared, and say so by the key's id.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from saelab.utils.cache_dir import cache_dir

KEY_FILE = "local-key"
KEY_BYTES = 32


def key_path() -> Path:
    """``local-key`` in :func:`saelab.utils.cache_dir.cache_dir` (beside the downloads)."""
    return cache_dir() / KEY_FILE


def _read_or_make(path: Path) -> bytes:
    """What ``path`` holds, made (32 random bytes, private) first if there is nothing; OSError where it cannot be
    read or made."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # a random name: one left by a killed process of the same id (a container's PID 1), or another
        # thread's, is no obstacle to O_EXCL
        tmp = path.with_name(f".{KEY_FILE}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_BYTES))
            with contextlib.suppress(FileExistsError):  # another process made one first: that one holds
                os.link(tmp, path)  # whole or not there, never half written
        finally:
            tmp.unlink()
    return path.read_bytes()


def local_key() -> bytes | None:
    """The secret, made now if there is none; None where it cannot be read or made (a read-only home), or the
    file is no key saelab wrote (it is left as it is): :func:`why_no_key` says which."""
    try:
        key = _read_or_make(key_path())
    except OSError:
        return None
    return key if len(key) == KEY_BYTES else None


def why_no_key() -> str | None:
    """Why there is no local key, naming its path ("PATH cannot be read or made (Not a directory)"), for a line
    that says what a record without one cannot do; None where there is one."""
    path = key_path()
    try:
        key = _read_or_make(path)
    except OSError as e:
        return f"{path} cannot be read or made ({e.strerror or e})"
    if len(key) != KEY_BYTES:
        return f"{path} is no key saelab wrote ({len(key)} bytes, not {KEY_BYTES}; it is left as it is)"
    return None


def keyed_hash(text: str) -> str | None:
    """``"ID:HASH"``: the key's id (8 hex digits of its sha256: which key hashed it) and 16 hex digits of
    HMAC-SHA256(key, text); None without a key. ``text`` is hashed by its bytes as the file system takes them
    (``os.fsencode``): a path whose name is not UTF-8 (surrogate escapes) too."""
    key = local_key()
    if key is None:
        return None
    return f"{hashlib.sha256(key).hexdigest()[:8]}:{hmac.new(key, os.fsencode(text), hashlib.sha256).hexdigest()[:16]}"


def same_keyed(then: object, now: object) -> bool | None:
    """Whether two :func:`keyed_hash` values hash the same text; None where that cannot be told (either is
    missing, or they were made with different keys)."""
    if not (isinstance(then, str) and isinstance(now, str)) or then.split(":")[0] != now.split(":")[0]:
        return None
    return then == now
