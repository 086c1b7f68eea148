"""A local corpus's fingerprint (size, sha256) is kept in the cache folder for later calls while the file is
unchanged: real files, fresh processes, bytes read counted by the kernel (/proc/self/io)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saelab.data.text import corpus_fingerprint, iter_texts
from saelab.utils import file_digests
from saelab.utils.file_digests import DIGESTS_FILE, RACY_NS

SRC = Path(__file__).resolve().parents[1] / "src"
IN_A_LATER_CALL = """
import json, sys
from saelab.data.text import corpus_fingerprint

def read_so_far():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])

before = read_so_far()
fingerprint = corpus_fingerprint(sys.argv[1])
print(json.dumps({"fingerprint": fingerprint, "read": read_so_far() - before}))
"""
MIB = 2**20
counts_reads = pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io")


def later_call(corpus: Path, cache: Path) -> tuple[dict, int, str]:
    """corpus_fingerprint of ``corpus`` in a fresh process: the fingerprint, the bytes it read, its stderr."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "SAELAB_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", IN_A_LATER_CALL, str(corpus)], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    return answer["fingerprint"], answer["read"], done.stderr


def settled(*paths: Path) -> None:
    """Wait until every file's stamps are RACY_NS old: stamps of a file written in the last clock tick are not kept."""
    newest = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in paths)
    time.sleep(max(0.0, (newest + RACY_NS - time.time_ns()) / 1e9) + 0.05)


def text_file(path: Path, size: int, fill: bytes = b"some text ") -> Path:
    path.write_bytes((fill * (size // len(fill) + 1))[:size])
    return path


def sha256sum(path: Path) -> dict:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@counts_reads
def test_an_unchanged_corpus_is_not_read_again_by_a_later_call(tmp_path, monkeypatch):
    """Every writing harvest hashed its whole corpus again (~1 GB/s: minutes a call for hundreds of GB); a later
    call now takes the fingerprint kept in $SAELAB_CACHE_DIR and reads nothing of the file. A file written in the
    last RACY_NS is not kept: a write in the same clock tick may leave its stamps as they were."""
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    corpus = text_file(tmp_path / "corpus.txt", 8 * MIB)
    assert corpus_fingerprint(str(corpus)) == sha256sum(corpus) and not (tmp_path / "cache").exists()
    settled(corpus)
    first, read, _ = later_call(corpus, tmp_path / "cache")
    assert first == sha256sum(corpus) and read >= 8 * MIB
    again, read, err = later_call(corpus, tmp_path / "cache")
    assert again == first and read < MIB and err == ""
    kept = json.loads((tmp_path / "cache" / DIGESTS_FILE).read_text())["files"]
    assert list(kept) == [str(corpus.resolve())] and kept[str(corpus)][5] == first["sha256"]


@counts_reads
@pytest.mark.parametrize("how", ["edited in place", "replaced by a rename"])
def test_a_same_size_change_with_its_modification_time_set_back_is_hashed_again(tmp_path, monkeypatch, how):
    """Kept by path, size and modification time, a corpus edited to the same size with its mtime set back (os.utime,
    touch -d) gave the old fingerprint. Its change time (which no user sets back) and inode are kept too now."""
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    corpus = text_file(tmp_path / "corpus.txt", 4 * MIB)
    settled(corpus)
    old = sha256sum(corpus)
    assert corpus_fingerprint(str(corpus)) == old and later_call(corpus, tmp_path / "cache")[0] == old
    st = corpus.stat()
    if how == "edited in place":
        with open(corpus, "r+b") as f:
            f.seek(MIB)
            f.write(b"X")
    else:
        os.replace(text_file(tmp_path / "new.txt", 4 * MIB, b"other text"), corpus)
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (corpus.stat().st_size, corpus.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    new = sha256sum(corpus)
    assert new != old and corpus_fingerprint(str(corpus)) == new
    settled(corpus)
    assert later_call(corpus, tmp_path / "cache")[0] == new
    fingerprint, read, _ = later_call(corpus, tmp_path / "cache")  # the new text's kept in turn
    assert fingerprint == new and read < MIB


@counts_reads
def test_an_unwritable_or_unreadable_cache_folder_only_means_hashing_again(tmp_path, monkeypatch, capsys):
    """$SAELAB_CACHE_DIR under a regular file: each call hashes the corpus, with one note a process; a record that
    is not one (a torn or foreign file) is taken for none and written anew."""
    corpus, other = text_file(tmp_path / "corpus.txt", 2 * MIB), text_file(tmp_path / "other.txt", MIB)
    settled(corpus, other)
    (tmp_path / "afile").write_text("")
    cache = tmp_path / "afile" / "cache"
    for _ in range(2):
        fingerprint, read, err = later_call(corpus, cache)
        assert fingerprint == sha256sum(corpus) and read >= 2 * MIB
        assert err == (f"saelab: note: {cache / DIGESTS_FILE} cannot be written (Not a directory): a local corpus is "
                       "hashed again by each call; set SAELAB_CACHE_DIR to a writable folder to keep its fingerprint\n")
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(cache))
    assert corpus_fingerprint(str(corpus)) == sha256sum(corpus) and corpus_fingerprint(str(other)) == sha256sum(other)
    assert capsys.readouterr().err.count("saelab: note:") == 1
    record = tmp_path / "cache" / DIGESTS_FILE
    record.parent.mkdir()
    record.write_text('{"format": "saelab-file-digests", "files": {')
    fingerprint, read, err = later_call(corpus, tmp_path / "cache")
    assert fingerprint == sha256sum(corpus) and read >= 2 * MIB and err == ""
    assert list(json.loads(record.read_text())["files"]) == [str(corpus.resolve())]
    assert later_call(corpus, tmp_path / "cache")[1] < MIB


def test_the_record_keeps_the_files_hashed_or_found_unchanged_last(tmp_path, monkeypatch):
    """A folder of more files than the record keeps: its last MAX_ENTRIES, hashed last, stay. A corpus found
    unchanged near the record's oldest end is moved to its newest: kept entries were never moved, so a corpus in
    daily use was dropped after MAX_ENTRIES files hashed since its first hash, and a folder of more files than that
    was partly hashed again on every call. The record names corpora by path: private, as the local key."""
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(file_digests, "MAX_ENTRIES", 64)
    record = tmp_path / "cache" / DIGESTS_FILE

    def folder(name: str, n: int) -> list[Path]:
        (tmp_path / name).mkdir()
        return [text_file(tmp_path / name / f"{i:05d}.txt", 16, f"{name} {i} ".encode()) for i in range(n)]

    def kept() -> list[str]:
        return list(json.loads(record.read_text())["files"])

    texts, daily, more, later = folder("texts", 67), folder("daily", 20), folder("more", 40), folder("later", 40)
    settled(*texts, *daily, *more, *later)
    assert corpus_fingerprint(str(tmp_path / "texts"))["bytes"] == 16 * len(texts)
    assert kept() == [str(f.resolve()) for f in texts[3:]]
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    record.unlink()
    for name in ("daily", "more"):
        corpus_fingerprint(str(tmp_path / name))
    file_digests._KEPT.clear()  # as a later process finds them: by the record
    corpus_fingerprint(str(tmp_path / "daily"))
    corpus_fingerprint(str(tmp_path / "later"))
    assert kept() == [str(f.resolve()) for f in more[36:] + daily + later]


def test_a_record_nested_past_what_json_reads_is_taken_for_none(tmp_path):
    """A record of deep brackets made every command that fingerprints a corpus fail with a RecursionError."""
    corpus = text_file(tmp_path / "corpus.txt", MIB)
    settled(corpus)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / DIGESTS_FILE).write_text("[" * 100_000 + "]" * 100_000)
    fingerprint, read, err = later_call(corpus, tmp_path / "cache")
    assert fingerprint == sha256sum(corpus) and read >= MIB and err == ""
    assert later_call(corpus, tmp_path / "cache")[1] < MIB // 2


def test_a_writing_harvest_keeps_the_fingerprint_it_records(tiny_gpt2, data_dir, tmp_path, monkeypatch):
    """The harvest's fingerprint goes through the kept record: the cache's meta and the record hold the same one."""
    from saelab.data import ActivationCache
    from saelab.pipeline import HarvestConfig, harvest

    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.jsonl"
    docs = iter_texts(data_dir / "wiki-en" / "wiki_eval.jsonl.xz", limit_docs=3)
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    settled(corpus)
    cfg = HarvestConfig(model="tiny-gpt2", hook="blocks.1.hook_resid_post", corpus=str(corpus), n_tokens=1024,
                        context_size=32, lm_batch_size=16, buffer_tokens=8192)
    harvest(cfg, tmp_path / "acts", lm=tiny_gpt2, progress=False)
    assert ActivationCache(tmp_path / "acts").meta["dataset_fingerprint"] == sha256sum(corpus)
    kept = json.loads((tmp_path / "cache" / DIGESTS_FILE).read_text())["files"]
    st = corpus.stat()
    assert kept[str(corpus.resolve())] == [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                           sha256sum(corpus)["sha256"]]


def test_a_folders_fingerprint_tells_how_each_file_is_read(tmp_path, monkeypatch):
    """A folder's fingerprint hashed its files' bytes alone, in name order: part.jsonl renamed part.txt (one
    plain-text document of JSON lines, not its texts) kept it, so results of the text before were reused. It marks
    how each file is read now; a rename that reads the same text keeps it. A fingerprint taken the earlier way (no
    scheme) is still the folder's while its files' bytes are: has_fingerprint compares it as it was taken."""
    from saelab.data.text import has_fingerprint

    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    fold = tmp_path / "fold"
    fold.mkdir()
    part = text_file(fold / "part.jsonl", 1000, b'{"text": "some text"}\n')
    first = corpus_fingerprint(str(fold))
    earlier = sha256sum(part)  # the earlier fingerprint of a folder of one file: that file's
    assert first["bytes"] == 1000 and first != earlier and has_fingerprint(str(fold), first)
    assert has_fingerprint(str(fold), earlier)
    part.rename(fold / "part.txt")
    assert corpus_fingerprint(str(fold)) != first and not has_fingerprint(str(fold), first)
    (fold / "part.txt").rename(fold / "renamed.jsonl")  # read as it was: the same text
    assert corpus_fingerprint(str(fold)) == first
    second = text_file(fold / "second.txt", 10, b"more text ")
    both = hashlib.sha256(f"{earlier['sha256']}\n{sha256sum(second)['sha256']}".encode()).hexdigest()
    assert has_fingerprint(str(fold), {"bytes": 1010, "sha256": both})  # the earlier way, of two files
    assert corpus_fingerprint(str(part.parent / "renamed.jsonl")) == earlier  # a file's: its sha256, as before


def test_an_export_holding_a_folders_earlier_fingerprint_is_still_this_export(tmp_path, monkeypatch, capsys):
    """An SAE of an earlier saelab records no fingerprint of its training text: its export takes one where the
    corpus's absolute path is there, now marking how a folder's files are read. An export written before, with the
    folder's fingerprint taken the earlier way, is still this export: reused, not refused as another SAE."""
    import dataclasses

    from saelab.cli import main
    from saelab.cli.share import _shared_config
    from saelab.sae import SAEConfig, TopKSAE, load_sae, save_sae

    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    fold = tmp_path / "fold"
    fold.mkdir()
    part = text_file(fold / "part.jsonl", 100, b'{"text": "a"}\n')
    sae = TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2, hook_name="blocks.0.hook_resid_post", model_name="gpt2",
                            dataset=str(fold)))
    save_sae(sae, tmp_path / "sae")
    export = tmp_path / "export"
    assert main(["export", str(tmp_path / "sae"), str(export), "--format", "saelens"]) == 0
    assert load_sae(export).cfg.extra["dataset_fingerprint"]["scheme"] == 2
    shared = _shared_config(load_sae(tmp_path / "sae").cfg)
    then = {**shared.extra, "dataset_fingerprint": sha256sum(part)}  # a folder of one file: that file's, then
    earlier = TopKSAE(dataclasses.replace(shared, extra=then))
    earlier.load_state_dict(load_sae(tmp_path / "sae").state_dict())
    save_sae(earlier, tmp_path / "earlier", format="saelens")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "sae"), str(tmp_path / "earlier"), "--format", "saelens"]) == 0
    assert "already holds this export" in capsys.readouterr().err
