"""The secret that keys the hashes of local paths in shared records: made once, private, and left alone when the
file there is no key saelab wrote."""

from __future__ import annotations

import os
import stat

from saelab.utils.local_key import key_path, keyed_hash, local_key, same_keyed


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
