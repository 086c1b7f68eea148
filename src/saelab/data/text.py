"""Text sources: local files or a Hugging Face dataset, read as a stream of documents.

A *source* is one of

- a ``.txt`` file (the whole file is one document),
- a ``.jsonl``, ``.jsonl.xz`` or ``.jsonl.gz`` file (one JSON object a line; the document is
  the object's ``text_field``; blank lines are skipped),
- a directory: every ``.txt`` / ``.jsonl[.xz|.gz]`` file directly in it, in sorted name order (its
  subfolders are not searched),
- a Hugging Face dataset name, optionally ``name:config`` (streamed with ``datasets``, which is
  an optional dependency: ``pip install 'saelab[hub]'``).

A string is taken as a path when it exists on disk, or when it looks like one (ends with a known
suffix, starts with ``/``, ``./``, ``../`` or ``~``, or has more than one ``/``); a missing path
raises :class:`CorpusError` naming it rather than being sent to the hub. A single ``owner/name``
that is not on disk is a hub dataset name. ``split`` applies to hub datasets only.

:func:`default_corpus` finds the offline Wikipedia sample shipped in the repository's data/ folder.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

from saelab.errors import CorpusError
from saelab.utils.file_digests import file_fingerprints, files_fingerprint

JSONL_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz")
TEXT_SUFFIXES = (".txt",)
CORPUS_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
"""The files a corpus folder is read from."""
KNOWN_SUFFIXES = CORPUS_SUFFIXES + (".json", ".xz", ".gz")

DEFAULT_CORPUS_FILES = {"train": "wiki_train.jsonl.xz", "eval": "wiki_eval.jsonl.xz"}
CORPUS_DIR_ENV = "SAELAB_CORPUS_DIR"


def iter_texts(
    source: str | os.PathLike,
    *,
    text_field: str = "text",
    split: str = "train",
    limit_docs: int | None = None,
) -> Iterator[str]:
    """Iterate over the non-empty documents of ``source`` (see the module docstring).

    Problems visible up front (a missing path, ``datasets`` not installed, a hub dataset that
    cannot be opened) raise :class:`CorpusError` at call time. A malformed JSON line raises when
    the iteration reaches it, naming file and line. A source with no non-empty document raises
    when the iteration ends having found none. ``limit_docs`` stops after that many documents.
    """
    if limit_docs is not None and limit_docs < 0:
        raise ValueError(f"limit_docs must be >= 0 or None, got {limit_docs}")
    docs, label = _open_source(source, text_field=text_field, split=split)
    return _checked(docs, label, limit_docs)


class TextsReadOnce:
    """The documents of ``source``, from one stream opened on first need: checks read its first documents
    (:meth:`head`, each time from the first), then :meth:`all` streams every document once, those read
    already from memory. A hub dataset is so streamed once, not once a check and once more to harvest."""

    def __init__(self, source: str | os.PathLike) -> None:
        self.source = source
        self._docs: Iterator[str] | None = None
        self._read: list[str] | None = []

    def _stream(self) -> Iterator[str]:
        if self._docs is None:
            self._docs = iter_texts(self.source)
        return self._docs

    def head(self) -> Iterator[str]:
        """The documents from the first; each is read from the stream once, and kept for what reads next."""
        read = self._read
        if read is None:
            raise RuntimeError("TextsReadOnce.head() after all(): the documents read are no longer kept")
        i = 0
        while True:
            if i == len(read):
                doc = next(self._stream(), None)
                if doc is None:
                    return
                read.append(doc)
            yield read[i]
            i += 1

    def all(self) -> Iterator[str]:
        """Every document from the first, once: those read already (let go as they are handed out), then the
        rest of the stream."""
        read, self._read = self._read, None
        if read is None:
            raise RuntimeError("TextsReadOnce.all() streams the documents once")
        read.reverse()
        while read:
            yield read.pop()
        yield from self._stream()


def shipped_data_dir() -> Path | None:
    """``data/`` of the saelab checkout this package runs from (the corpus and tokenizer files it
    ships), or None for an install without the repository around it."""
    here = Path(__file__).resolve()
    if len(here.parents) > 3 and here.parents[2].name == "src":  # src layout: <repo>/src/saelab/data/
        folder = here.parents[3] / "data"
        if folder.is_dir():
            return folder
    return None


def default_corpus(split: str = "train") -> str | None:
    """Path of the offline Wikipedia sample for ``split`` ("train" or "eval"), or None.

    Looks in ``$SAELAB_CORPUS_DIR``, then in ``data/wiki-en/`` of the repository saelab is
    installed from (it ships there), whatever the current directory.
    """
    if split not in DEFAULT_CORPUS_FILES:
        raise ValueError(f"split must be one of {sorted(DEFAULT_CORPUS_FILES)}, got {split!r}")
    name = DEFAULT_CORPUS_FILES[split]
    candidates: list[Path] = []
    env_dir = os.environ.get(CORPUS_DIR_ENV)
    if env_dir:
        candidates.append(Path(env_dir).expanduser() / name)
    shipped = shipped_data_dir()
    if shipped is not None:
        candidates.append(shipped / "wiki-en" / name)
    for path in candidates:
        if path.is_file():
            return str(path.resolve())
    return None


def resolve_corpus(corpus: str | None, split: str) -> str:
    """``corpus`` when given, else the offline default for ``split``; a one-line error when neither exists."""
    if corpus:
        path = Path(corpus).expanduser()
        if _looks_like_path(corpus) and not path.exists():  # before any slow work
            raise CorpusError(f"corpus path {corpus!r} does not exist; expected a .txt/.jsonl[.xz|.gz] file, a "
                              "folder of such files or a Hugging Face dataset name")
        if path.is_dir():
            corpus_folder_files(path)  # a folder with none of them, before any slow work
        elif path.exists():
            _check_file_type(path)
        return corpus
    found = default_corpus(split)
    if found is None:
        raise CorpusError(f"no corpus given and the offline default (data/wiki-en/{DEFAULT_CORPUS_FILES[split]}) "
                          f"was not found; pass --corpus PATH or a Hugging Face dataset name, or set {CORPUS_DIR_ENV}")
    return found


def corpus_files_key(corpus: str | None) -> list | None:
    """What identifies a local corpus's text: each file's path, size and modification time (so an edited
    file is not taken for the one read before); None for no corpus or a Hugging Face dataset name."""
    path = Path(corpus).expanduser() if corpus else None
    if path is None or not path.exists():
        return None
    files = corpus_folder_files(path) if path.is_dir() else [path]
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def corpus_identity(corpus: str | None, split: str) -> str:
    """The text ``corpus`` (None: the offline default of ``split``) names, as two evaluations compare it: a local
    file or folder by its absolute path (the shipped corpus by what it is, wherever saelab lies), size and a hash
    of every file's name and size and of the first FINGERPRINT_BYTES read from them in order (another file of the
    same name, or an edited one, differs; a copy does not); a dataset name as given."""
    found = resolve_corpus(corpus, split)
    path = Path(found).expanduser()
    if not path.exists():
        return found
    files = corpus_folder_files(path) if path.is_dir() else [path]
    key = json.dumps(corpus_files_key(found))  # a sweep compares each run's evaluation: hashed once while unchanged
    if key not in _IDENTITIES:
        digest, left = hashlib.sha256(), FINGERPRINT_BYTES
        for f in files:
            digest.update(f"{f.relative_to(path) if f != path else ''}\0{f.stat().st_size}\0".encode())
        for f in files:
            with open(f, "rb") as text:
                head = text.read(left)
            digest.update(head)
            left -= len(head)
            if not left:
                break
        shipped = str(path.resolve()) in {default_corpus(each) for each in DEFAULT_CORPUS_FILES}
        count = f"{len(files)} files, " if len(files) > 1 else ""
        _IDENTITIES[key] = (f"{corpus_name(found, split) if shipped else path.resolve()} ({count}"
                            f"{sum(f.stat().st_size for f in files):,} bytes, sha256 {digest.hexdigest()[:12]})")
    return _IDENTITIES[key]


FINGERPRINT_BYTES = 2**24
"""How much of a corpus its identity hashes, from its start: an evaluation reads the start of its corpus."""
_IDENTITIES: dict[str, str] = {}
"""corpus_identity's answers, by the files' paths, sizes and modification times."""


FINGERPRINT_SCHEME = "scheme"
"""Where a folder's :func:`corpus_fingerprint` says how it was taken; a record without it was taken before."""
READ_AS_SCHEME = 2
"""A folder's fingerprint over each file's :func:`read_as` and sha256 (before it: their sha256s alone, so
part.jsonl renamed part.txt, the same bytes read as one plain-text document, kept the fingerprint)."""


def corpus_fingerprint(corpus: str, scheme: int | None = READ_AS_SCHEME) -> dict[str, Any] | None:
    """What a local corpus's text is, wherever it lies and whatever its name: its size in bytes and the sha256 of a
    file's bytes (as sha256sum gives it); for a folder, the sha256 of each file's :func:`read_as` and sha256 in the
    order they are read, marked ``"scheme": READ_AS_SCHEME`` (the same bytes read as other text are other text).
    ``scheme`` None: a folder's as saelab took it before (its files' sha256s alone; one file: its own), to compare
    a record of then (:func:`fingerprint_as_recorded`). None for a Hugging Face dataset name or a path that is not
    there. A file unchanged since an earlier hash (in this process, or kept in the cache folder) is not read again:
    file_fingerprints."""
    path = Path(corpus).expanduser() if corpus else None
    if path is None or not path.exists():
        return None
    files = corpus_folder_files(path) if path.is_dir() else [path]
    if not path.is_dir() or scheme is None:  # a file's sha256; a folder's as taken before
        return files_fingerprint(files)
    read = file_fingerprints(files)
    lines = [f"{read_as(f)} {digest}" for f, (_, digest) in zip(files, read)]
    return {"bytes": sum(size for size, _ in read), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
            FINGERPRINT_SCHEME: READ_AS_SCHEME}


def read_as(path: Path) -> str:
    """How a corpus file is read, by its name: the suffix of :data:`CORPUS_SUFFIXES` it ends with."""
    return next(suffix for suffix in CORPUS_SUFFIXES if path.name.endswith(suffix))


def fingerprint_as_recorded(corpus: str | None, now: Any, recorded: Any) -> Any:
    """``now``, :func:`corpus_fingerprint` of ``corpus``, as ``recorded`` was taken, for the two to be compared: a
    folder's taken the earlier way where ``recorded`` is (no scheme), so a record of then is not taken for other
    text, nor judged otherwise than it could be then."""
    if (isinstance(now, dict) and isinstance(recorded, dict) and corpus
            and now.get(FINGERPRINT_SCHEME) != recorded.get(FINGERPRINT_SCHEME)):
        return corpus_fingerprint(corpus, scheme=recorded.get(FINGERPRINT_SCHEME))
    return now


def has_fingerprint(corpus: str, fingerprint: dict[str, Any]) -> bool:
    """Whether ``corpus`` holds the text :func:`corpus_fingerprint` gave ``fingerprint`` for (taken as it was:
    :func:`fingerprint_as_recorded`); a corpus of another size is told without reading it."""
    files = corpus_files_key(corpus)  # [path, size, time] of each file; None: no local corpus
    if files is None or fingerprint.get("bytes") not in (None, sum(size for _, size, _ in files)):
        return False
    return corpus_fingerprint(corpus, scheme=fingerprint.get(FINGERPRINT_SCHEME))["sha256"] == fingerprint.get("sha256")


CORPUS_FINGERPRINT = "dataset_fingerprint"
"""Where a harvest records :func:`corpus_fingerprint` of the corpus it read (the activation cache's meta), and so an
SAE trained on it (``SAEConfig.extra``, which an export carries beside the corpus's base name, ``dataset``): an
evaluation on that text is told by it."""
CORPUS_PATH = "dataset_absolute_path"
"""Where a harvest records :func:`corpus_absolute_path` of the corpus it read, beside :data:`CORPUS_FINGERPRINT`: the
file a relative ``dataset`` named is still told as the training text once edited. A path of this disk: the run's own
records keep it, an export drops it."""


def corpus_absolute_path(corpus: str | None) -> str | None:
    """Where a local corpus lies, resolved (a relative name from the current folder, links followed); None for no
    corpus, a Hugging Face dataset name or a path that is not there."""
    path = Path(corpus).expanduser() if corpus else None
    return str(path.resolve()) if path is not None and path.exists() else None


def corpus_name(corpus: str | None, split: str) -> str:
    """A name of the text read, for files shared with others (no local path in them): a Hugging Face
    dataset's name as given, a local file's or folder's base name, the shipped sample by what it is."""
    return shared_corpus_name(resolve_corpus(corpus, split))


def shared_corpus_name(recorded: str) -> str:
    """:func:`corpus_name` of a corpus as a harvest recorded it (an SAE's ``dataset``), which may since have moved
    or gone: a path (one that exists, or looks like one) by its base name, never where it lay on this disk."""
    shipped = "English Wikipedia 2015 sample (saelab data/wiki-en/{})"
    # Path("") is the current folder; an exported SAE exported again holds the shipped sample's name already
    if not recorded or recorded in {shipped.format(name) for name in DEFAULT_CORPUS_FILES.values()}:
        return recorded
    path = Path(recorded).expanduser()
    if path.exists():
        for each, name in DEFAULT_CORPUS_FILES.items():  # the shipped sample (or the one in $SAELAB_CORPUS_DIR)
            if str(path.resolve()) == default_corpus(each):
                return shipped.format(name)
        return path.resolve().name
    if _looks_like_path(recorded):  # a corpus moved or deleted since: its name is all there is
        gone = Path(os.path.abspath(path))
        # the shipped sample of a clone since moved or removed, by the place it ships in
        if gone.name in DEFAULT_CORPUS_FILES.values() and gone.parts[-3:-1] == ("data", "wiki-en"):
            return shipped.format(gone.name)
        return gone.name
    return recorded  # a Hugging Face dataset name


# --- sources -----------------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    if source.endswith(KNOWN_SUFFIXES) or source.startswith(("/", "./", "../", "~", ".\\")):
        return True
    return source.count("/") > 1 or "\\" in source


def _check_file_type(path: Path) -> None:
    """A corpus file saelab can read, by its name: a text or JSON-lines file, compressed or not."""
    if not (path.name.endswith(JSONL_SUFFIXES) or path.name.endswith(TEXT_SUFFIXES)):
        raise CorpusError(f"corpus file {str(path)!r} has an unknown type: expected one of "
                          f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} or a directory of such files")


def _open_source(source: str | os.PathLike, *, text_field: str, split: str) -> tuple[Iterable[str], str]:
    """Return (iterable of raw documents, a label naming the source for errors)."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            return _iter_files(corpus_folder_files(path), text_field), f"directory {str(path)!r}"
        _check_file_type(path)
        return _iter_files([path], text_field), f"file {str(path)!r}"
    if isinstance(source, os.PathLike) or _looks_like_path(text):
        raise CorpusError(f"corpus path {text!r} does not exist")
    return _iter_hub(text, text_field=text_field, split=split), f"Hugging Face dataset {text!r} (split {split!r})"


def corpus_folder_files(folder: Path) -> list[Path]:
    """The files the corpus folder ``folder`` is read from, in name order; CorpusError, saying what it
    should hold, when there are none."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(CORPUS_SUFFIXES))
    if files:
        return files
    kinds = f"{', '.join(CORPUS_SUFFIXES[:-1])} or {CORPUS_SUFFIXES[-1]}"
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    inside = (f"; its subfolders ({', '.join(subfolders[:3])}{', ...' if len(subfolders) > 3 else ''}) are not "
              "searched: pass the folder or file that holds the text" if subfolders else "")
    raise CorpusError(f"corpus folder {str(folder)!r} holds no text to read: expected {kinds} files directly in "
                      f"it{inside}")


def _iter_files(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        if path.name.endswith(TEXT_SUFFIXES):
            yield _read_txt(path)
        else:
            yield from _iter_jsonl(path, text_field)


def _read_txt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus file {str(path)!r} is not valid UTF-8: {e}") from e
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {str(path)!r}: {e}") from e


def _open_text(path: Path) -> TextIO:
    opener: Callable[..., Any] = open
    if path.name.endswith(".xz"):
        opener = lzma.open
    elif path.name.endswith(".gz"):
        opener = gzip.open
    return opener(path, "rt", encoding="utf-8")


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    line_no = 0
    try:
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{str(path)!r}, line {line_no}: malformed JSON ({e.msg})") from e
                if not isinstance(obj, dict) or text_field not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise CorpusError(f"{str(path)!r}, line {line_no}: no field {text_field!r} (found {keys})")
                value = obj[text_field]
                if not isinstance(value, str):
                    raise CorpusError(
                        f"{str(path)!r}, line {line_no}: field {text_field!r} is a "
                        f"{type(value).__name__}, expected a string"
                    )
                yield value
    except (UnicodeDecodeError, lzma.LZMAError, EOFError, gzip.BadGzipFile, OSError) as e:
        raise CorpusError(f"cannot read corpus file {str(path)!r} after line {line_no}: {e}") from e


def _iter_hub(name: str, *, text_field: str, split: str) -> Iterator[str]:
    dataset_name, _, config = name.partition(":")
    label = f"Hugging Face dataset {name!r}"
    try:
        import datasets  # optional dependency, imported only when a hub dataset is asked for
    except ImportError as e:
        raise CorpusError(
            f"{label} is not a local path, and reading hub datasets needs the `datasets` package "
            "(pip install 'saelab[hub]')"
        ) from e
    try:
        ds = datasets.load_dataset(dataset_name, config or None, split=split, streaming=True)
    except Exception as e:  # hub errors come in many types; all mean "cannot open this source"
        raise CorpusError(f"cannot open {label} (split {split!r}): {type(e).__name__}: {e}") from e
    return _iter_hub_rows(ds, label, text_field)


def _iter_hub_rows(ds: Iterable[dict], label: str, text_field: str) -> Iterator[str]:
    try:
        for row in ds:
            if text_field not in row:
                raise CorpusError(f"{label} has no column {text_field!r} (columns: {sorted(row)})")
            value = row[text_field]
            if not isinstance(value, str):
                raise CorpusError(f"{label}: column {text_field!r} holds {type(value).__name__}, expected str")
            yield value
    except CorpusError:
        raise
    except Exception as e:  # network drop mid-stream
        raise CorpusError(f"error while streaming {label}: {type(e).__name__}: {e}") from e


def _checked(docs: Iterable[str], label: str, limit_docs: int | None) -> Iterator[str]:
    if limit_docs == 0:
        return
    n = 0
    for doc in docs:
        if not doc.strip():
            continue
        yield doc
        n += 1
        if limit_docs is not None and n >= limit_docs:
            return
    if n == 0:
        raise CorpusError(f"corpus {label} contains no non-empty text")
