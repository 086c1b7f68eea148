"""The secret that keys the hashes of local paths in shared records: made once, private, and left alone when the
file there is no key saelab wrote."""

from __future__ import annotations

import os
import stat

from saelab.utils.local_key import key_path, keyed_hash, local_key, same_keyed, why_no_key


def test_the_key_is_made_once_private_and_keys_the_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    first = keyed_hash("/data/corpus.txt")
    assert key_path() == tmp_path / "cache" / "local-key" and len(local_key()) == 32
    assert stat.S_IMODE(os.stat(key_path()).st_mode) == 0o600 and os.listdir(tmp_path / "cache") == ["local-key"]
    assert keyed_hash("/data/corpus.txt") == first and same_keyed(first, keyed_hash("/data/corpus.txt")) is True
    assert same_keyed(first, keyed_hash("/data/other.txt")) is False
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "elsewhere"))  # another machine's or user's key
    assert keyed_hash("/data/corpus.txt") != first and same_keyed(first, keyed_hash("/data/corpus.txt")) is None
    assert same_keyed(None, first) is None


def test_a_file_that_is_no_key_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path))
    (tmp_path / "local-key").write_text("mine")
    assert keyed_hash("/data/corpus.txt") is None and (tmp_path / "local-key").read_text() == "mine"
    assert why_no_key() == f"{tmp_path / 'local-key'} is no key saelab wrote (4 bytes, not 32; it is left as it is)"
    (tmp_path / "local-key").unlink()
    assert why_no_key() is None and len(local_key()) == 32


def test_a_stale_temporary_file_of_this_process_id_is_no_obstacle(tmp_path, monkeypatch):
    """The key was first written to ``.local-key.<pid>.tmp`` opened with O_EXCL: one left by a killed process of
    the same id (saelab as a container's PID 1 is always 1) made every later call fail, and no key was ever made.
    The temporary name is random now; the stale file is not saelab's to delete and is left as it is."""
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path))
    stale = tmp_path / f".local-key.{os.getpid()}.tmp"
    stale.write_bytes(b"")
    assert len(local_key()) == 32 and keyed_hash("/data/corpus.txt") is not None
    assert sorted(os.listdir(tmp_path)) == sorted(["local-key", stale.name])


def test_a_path_whose_name_is_not_utf8_is_hashed_by_its_bytes(tmp_path, monkeypatch):
    """Linux names are bytes; Python gives those that are not UTF-8 as surrogate escapes, which ``str.encode``
    refuses: a corpus of such a name was a UnicodeEncodeError traceback. It is hashed by the bytes of its name,
    apart from the UTF-8 name that reads alike."""
    import hashlib
    import hmac

    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path))
    latin1 = os.fsdecode(b"/data/caf\xe9.txt")
    mine = keyed_hash(latin1)
    assert mine.split(":")[1] == hmac.new(local_key(), b"/data/caf\xe9.txt", hashlib.sha256).hexdigest()[:16]
    assert same_keyed(mine, keyed_hash("/data/caf\u00e9.txt")) is False


def test_every_cache_follows_one_folder_and_the_user_s_cache_home(tmp_path, monkeypatch):
    """Dequantized models, downloads and the local key (and corpus fingerprints beside it) sit in one folder: with
    $XDG_CACHE_HOME set and no $SAELAB_CACHE_DIR, models went there and the rest to ~/.cache/saelab."""
    from saelab.models import cache_root
    from saelab.sae.io import download_dir

    monkeypatch.delenv("SAELAB_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    home = tmp_path / "xdg" / "saelab"
    assert (cache_root(), download_dir(), key_path()) == (home / "models", home / "downloads", home / "local-key")
    assert len(local_key()) == 32 and os.listdir(home) == ["local-key"]
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "own"))
    assert (cache_root(), download_dir(), key_path()) == (tmp_path / "own" / "models", tmp_path / "own" / "downloads",
                                                          tmp_path / "own" / "local-key")
