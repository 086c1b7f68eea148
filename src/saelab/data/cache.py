"""On-disk activation cache: harvest once, train many SAEs from the same rows.

Layout of a cache folder::

    manifest.json        {"format", "version", "d", "dtype", "shard_rows", "n_rows", "complete",
                          "shards": [{"file", "rows"}, ...], "meta": {...},
                          "seconds": the writing's time so far, an interrupted call's counted}
    shard_00000.npy      [rows, d] raw .npy arrays, rows = shard_rows except the last shard
    shard_00001.npy      ...
    partial.npy, stream_state.safetensors   only while an interrupted write waits for its resume

``dtype`` is "float16", "bfloat16" or "float32". NumPy has no bfloat16, so bfloat16 shards hold
the raw bit patterns as uint16 (``tensor.view(torch.int16)``); readers must reinterpret them as
bfloat16 (as :class:`ActivationCache` does), not convert them numerically.

Writing is crash-safe: each shard is written atomically, then the manifest is rewritten to list
it, so the manifest only ever names complete shards. An interruption (Ctrl-C) also saves the rows
gathered toward the next shard (``partial.npy``, counted by the manifest's ``partial_rows``), so a
harvest smaller than one shard keeps its work too. After an interruption,
``write_activation_cache(..., resume=True)`` keeps the shards already listed, takes the partial rows
back and continues, writing the same shards an uninterrupted write would have written. By
default it expects the *same* input again from the start and discards its first
``cache_rows_written(folder)`` rows (right for a deterministic stream with a fixed seed); pass
``skip_written=False`` when the caller has already positioned its input after those rows. An input
with ``state()`` and ``restore(state)`` (an :class:`~saelab.data.harvest.ActivationStream`) also saves
where it stood at the interruption (``stream_state.safetensors``: tensors, settings and counters under
checksums, no pickle; not saved when it does not lead to the rows kept, nor when the disk refuses it),
and the resume restores it, so a harvest does not run the model again over the text before the rows
written; a state file that is damaged or belongs to other settings or rows is not used (the input is
then read again from its start, as for any other input). Such an input interrupted before any row
reached the cache (a shuffled harvest writes its first rows once its shuffle buffer is full) keeps
its state too, beside a manifest of 0 rows (``d`` the width of its rows), and the resume continues
from there; without a state to save, it keeps nothing (the folder is removed: the same call starts over).

One process writes a cache folder at a time (a lock, saelab.utils.folder_lock). An overwrite writes
the new cache in ``.overwrite/`` inside the folder and moves it in only once complete, so an
interrupted overwrite leaves the old cache whole (and the same call again resumes the new one); a
write without overwrite that then finishes the old cache discards that unfinished overwrite (one note),
and one that reuses the finished old cache keeps it, with one note saying so.
Messages name the folder the caller gave, "(its overwrite)" for the staged write.

Reading (:meth:`ActivationCache.batches`) defines, per epoch, a row stream: shards in a random
order (seeded by ``seed`` and the epoch), taken ``mix_shards`` at a time as a *chunk*, each chunk
read with one contiguous read and its rows permuted (seeded by ``seed``, epoch and chunk index).
Batch ``b`` is rows ``[b * batch_size, (b + 1) * batch_size)`` of the concatenation of the
epochs' streams, so batches may straddle chunks and epochs, and ``start_batch`` resumes exactly
where a trainer stopped while skipping the chunks before it without reading them. For good
mixing, write the cache from a shuffled :class:`~saelab.data.harvest.ActivationStream`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import tokenize
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.data.text import CORPUS_FINGERPRINT, CORPUS_PATH
from saelab.errors import ConfigError, CorpusError, InterruptedBeforeAnyResult, NonFiniteError, RunExistsError
from saelab.utils.atomic import write_json, write_with
from saelab.utils.cache_manifest import FORMAT, MANIFEST, OVERWRITE_STAGE, is_cache_manifest
from saelab.utils.device import resolve_device
from saelab.utils.differences import visible_difference
from saelab.utils.folder_lock import RunLock, remove_stale_temp_files
from saelab.utils.tensors import all_finite
from saelab.utils.words import plural

VERSION = 1
PARTIAL_SHARD = "partial.npy"  # rows toward the next shard, saved by an interrupted write
STREAM_STATE = "stream_state.safetensors"  # where an interrupted harvest's input stopped (see _save_stream_state)
STREAM_STATE_FORMAT = "saelab-stream-state"
STREAM_STATE_VERSION = 2  # 2: one checksum over the metadata too
"""Where an overwrite writes its cache until it is complete (inside the cache folder)."""
SHARD_ROWS = 262_144
"""Rows per shard file unless the writer asks for another size."""
# storage dtype name -> (torch dtype, numpy dtype of the stored bits)
DTYPES = {
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<u2")),
    "float32": (torch.float32, np.dtype("<f4")),
}


class ActivationCacheError(CorpusError):
    """An activation cache that is missing, incomplete, corrupt or does not match the request."""


class IncompleteCacheError(ActivationCacheError):
    """An unfinished activation cache (an interrupted write) opened for reading; ``rows``: the rows it keeps,
    for a caller that words the advice its own way (the command line names the harvest that finishes it)."""

    def __init__(self, message: str, rows: int = 0) -> None:
        super().__init__(message)
        self.rows = rows


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.npy"


def _json_roundtrip(meta: dict, folder: Path) -> dict:
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        return json.loads(json.dumps(meta))
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta for activation cache {str(folder)!r} is not JSON-serializable: {e}") from e


def _read_manifest(folder: Path) -> dict | None:
    """The parsed manifest, None if there is none, ActivationCacheError if it is corrupt."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ActivationCacheError(f"activation cache {str(folder)!r}: unreadable {MANIFEST}: {e}") from e
    ok = (
        is_cache_manifest(m)
        and isinstance(m.get("dtype"), str) and m["dtype"] in DTYPES
        and isinstance(m.get("d"), int) and m["d"] > 0
        and isinstance(m.get("shard_rows"), int) and m["shard_rows"] > 0
        and isinstance(m.get("n_rows"), int)
        and isinstance(m.get("complete"), bool)
        and isinstance(m.get("meta"), dict)
        and isinstance(m.get("shards"), list)
        and all(isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("rows"), int)
                and s["rows"] > 0 and "/" not in s["file"] and "\\" not in s["file"] for s in m["shards"])
    )
    if not ok:
        raise ActivationCacheError(
            f"activation cache {str(folder)!r}: {MANIFEST} is not a valid {FORMAT} manifest"
        )
    if m.get("version") != VERSION:
        raise ActivationCacheError(
            f"activation cache {str(folder)!r}: manifest version {m.get('version')!r}, this saelab reads {VERSION}"
        )
    partial = m.get("partial_rows", 0)
    if not isinstance(partial, int) or not 0 <= partial < m["shard_rows"] or (partial and m["complete"]):
        raise ActivationCacheError(f"activation cache {str(folder)!r}: partial_rows {partial!r} is not a count of "
                                   "rows toward an unfinished shard")
    if sum(s["rows"] for s in m["shards"]) != m["n_rows"]:
        raise ActivationCacheError(f"activation cache {str(folder)!r}: n_rows disagrees with the shard list")
    return m


def cache_rows_written(folder: str | os.PathLike) -> int:
    """Rows durably written to the cache at ``folder`` (0 if it has no manifest yet)."""
    m = _read_manifest(Path(folder))
    return 0 if m is None else m["n_rows"]


def cache_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of the cache at ``folder``: None when it has none or it is unreadable (the write refuses
    that one with its own message)."""
    try:
        return _read_manifest(Path(folder))
    except ActivationCacheError:
        return None


def cache_is_complete(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a finished activation cache (False when missing, unfinished or unreadable)."""
    m = cache_manifest(folder)
    return m is not None and m["complete"]


def check_disk_room(folder: str | os.PathLike, n_rows: int, d: int, dtype: str, *, overwrite: bool = False) -> None:
    """Refuse, before a harvest starts, a cache that cannot fit in the free space where it goes: the
    rows still to write (an interrupted write keeps its shards) at ``d`` values of ``dtype`` each. An
    overwrite writes beside the old cache, whose space is therefore not free. The stream state an
    interruption saves is not counted: it is written only then, and a failure to write it loses nothing."""
    folder = Path(folder)
    if not overwrite and cache_is_complete(folder):
        return  # reused or refused as it is, nothing written
    target = folder / OVERWRITE_STAGE if overwrite and (folder / MANIFEST).exists() else folder
    try:
        written = cache_rows_written(target)
    except ActivationCacheError:
        written = 0  # refused with its own message when the write opens it
    need = max(n_rows - written, 0) * d * DTYPES[dtype][1].itemsize
    where = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    free = shutil.disk_usage(where).free
    if need > free:
        raise ConfigError(f"activation cache {folder}: {n_rows - written:,} {plural(n_rows - written, 'row')} of {d} "
                          f"{dtype} values need {need / 2**30:,.1f} GiB, and {where} has {free / 2**30:,.1f} GiB free; "
                          "free some space, pick another --out or harvest fewer --n-tokens")


def reusable_cache(folder: str | os.PathLike, *, meta: dict[str, Any], dtype: str,
                   shard_rows: int = SHARD_ROWS) -> "ActivationCache | None":
    """The finished cache in ``folder`` when it holds these settings (``write_activation_cache`` with
    ``resume=True`` returns it as it is); None when there is none yet or it is unfinished. One of other
    settings is refused as that call refuses it. Only reads, so a harvest decides before its model loads."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        return None  # nothing to decide; an overwrite's stage is finished under the writer's lock
    existing = _open_existing(folder, _json_roundtrip(meta, folder), dtype, shard_rows, resume=True, overwrite=False)
    return ActivationCache(folder) if existing is not None and existing["complete"] else None


def write_activation_cache(
    batches: Iterable[torch.Tensor],
    folder: str | os.PathLike,
    *,
    meta: dict[str, Any],
    dtype: str = "float16",
    shard_rows: int = SHARD_ROWS,
    resume: bool = False,
    overwrite: bool = False,
    skip_written: bool = True,
    progress: bool = True,
) -> "ActivationCache":
    """Write activation batches [B, D] (e.g. an ActivationStream) to a cache at ``folder``.

    ``meta`` (JSON-serializable; e.g. model, hook, context_size, dataset) is stored in the
    manifest. A complete cache is never overwritten unless ``overwrite=True`` (RunExistsError);
    an incomplete one is continued with ``resume=True`` (see the module docstring for what the
    input must then be) or replaced with ``overwrite=True``. ``resume=True`` on a complete cache
    with the same settings returns it without reading ``batches``.

    ``overwrite=True`` writes the new cache beside the old one (``.overwrite/``; room for both is
    needed) and replaces the old one once it is complete; the same call after an interruption
    continues that write (from its start again with ``skip_written=False``, whose input the caller
    cannot position inside a write it does not see). A call without ``overwrite`` that finishes the
    old cache instead discards that unfinished overwrite, with one note.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    folder = Path(folder)
    meta = _json_roundtrip(meta, folder)
    args = dict(meta=meta, dtype=dtype, shard_rows=shard_rows, skip_written=skip_written, progress=progress)
    lock = RunLock(folder, "activation cache").acquire()
    ok = False
    try:
        stage = folder / OVERWRITE_STAGE
        remove_stale_temp_files(folder, stage)
        if not (folder / MANIFEST).exists() and cache_is_complete(stage):
            _finish_overwrite(folder, stage)  # an overwrite interrupted while moving its cache in
            if overwrite and _matches(folder, args):  # it is the cache this call asks for: done
                overwrite, resume = False, True
        if overwrite and (folder / MANIFEST).exists():
            cache = _overwrite_via_stage(batches, folder, stage, args)
        else:
            finished_before = cache_is_complete(folder)
            cache = _write(batches, folder, resume=resume, overwrite=overwrite, shown=folder, **args)
            if stage.exists() and not finished_before:
                # This call finished the cache in the folder, so an overwrite left unfinished beside it was
                # given up: kept, it would only hold its disk space, unseen (a hidden folder).
                shutil.rmtree(stage)
                print(f"saelab: activation cache {folder}: discarded the unfinished overwrite in {stage} (this call "
                      "finished the cache it was to replace)", file=sys.stderr)
            elif finished_before:  # returned as it is: the overwrite beside it stays its own call's to resume
                note_unfinished_overwrite(folder)
        ok = True
        return cache
    finally:
        lock.release(remove_created_dir=not ok)


def note_unfinished_overwrite(folder: str | os.PathLike, option: str = "overwrite=True") -> None:
    """One note when an overwrite left unfinished lies beside the finished cache in ``folder`` that is reused
    as it is: it is kept for the call that started it (``option``: how that call asked to overwrite), and
    unmentioned it would hold its disk space in a hidden folder."""
    stage = Path(folder) / OVERWRITE_STAGE
    if stage.is_dir():
        print(f"saelab: note: activation cache {folder} (its overwrite) is unfinished; run the {option} call that "
              f"started it again to resume it, or delete {stage} to discard it", file=sys.stderr)


def _write(batches: Iterable[torch.Tensor], folder: Path, *, shown: Path, meta: dict[str, Any], dtype: str,
           shard_rows: int, resume: bool, overwrite: bool, skip_written: bool, progress: bool) -> "ActivationCache":
    """write_activation_cache's work, in a folder this process holds the lock of. ``shown``: the folder the
    caller gave, which messages name (an overwrite writes in its stage inside it, not a folder the user knows)."""
    suffix = "" if shown == folder else " (its overwrite)"
    name, quoted = f"{shown}{suffix}", f"{str(shown)!r}{suffix}"
    existing = _open_existing(folder, meta, dtype, shard_rows, resume=resume, overwrite=overwrite)
    if existing is not None and existing["complete"]:
        return ActivationCache(folder)
    manifest: dict[str, Any] = existing or {
        "format": FORMAT, "version": VERSION, "d": None, "dtype": dtype, "shard_rows": shard_rows,
        "n_rows": 0, "complete": False, "shards": [], "meta": meta,
    }
    writer = _ShardWriter(folder, manifest, quoted)
    resuming = existing is not None and skip_written  # the caller's input starts over
    # rows saved toward the next shard are taken back, not written again
    partial = writer.restore_partial() if resuming else writer.drop_partial()
    to_skip = manifest["n_rows"] + partial if resuming else 0
    # Where an interrupted harvest's input stopped (also before its first row: a shuffled harvest writes none until
    # its buffer is full), so the model need not run again over the text it read. restored: how many of the
    # restored input's next rows were written before the interruption, and the number of its next batch within
    # the whole input (messages count batches as an uninterrupted write would)
    restored = _restore_stream_state(batches, folder, meta, dtype, to_skip) if resuming else None
    (folder / STREAM_STATE).unlink(missing_ok=True)  # used once: an interruption of this call saves its own
    first_batch = 0
    if restored is not None:
        after = f" after the {to_skip:,} {plural(to_skip, 'row')} already written" if to_skip else \
            ", which holds no rows yet"
        print(f"saelab: resuming activation cache {name}{after}: the input continues where it stopped (a harvest does "
              f"not run the model again over the text {'before them' if to_skip else 'it read'})", file=sys.stderr)
        to_skip, first_batch = restored
    elif to_skip:  # the input is read again from its start: say why nothing is written for a while
        print(f"saelab: resuming activation cache {name}: re-reading the input up to the {to_skip:,} "
              f"{plural(to_skip, 'row')} already written (a harvest reruns the model over that text to restore its "
              "shuffle), then writing", file=sys.stderr)
    bar = tqdm(total=None, unit="row", unit_scale=True, desc=f"cache {shown.name}{suffix}", disable=not progress,
               initial=manifest["n_rows"] + partial)
    try:
        to_skip = _write_batches(batches, writer, to_skip, bar, first_batch)
    except KeyboardInterrupt:
        if not _keep_at_interruption(batches, writer, meta, name):
            raise InterruptedBeforeAnyResult from None
        raise
    finally:
        bar.close()
    if to_skip:
        raise ActivationCacheError(
            f"resumed activation cache {quoted} has {manifest['n_rows']} {plural(manifest['n_rows'], 'row')}, but the "
            f"input ended {to_skip} {plural(to_skip, 'row')} short of them; resume with the same input, or "
            "skip_written=False"
        )
    writer.flush()
    if manifest["n_rows"] == 0:  # (a manifest kept at an interruption before any row has its d already)
        raise CorpusError(f"no activations to write to activation cache {quoted}: the input was empty")
    manifest["complete"] = True
    write_json(folder / MANIFEST, writer.stamped(manifest))
    (folder / STREAM_STATE).unlink(missing_ok=True)  # one an interruption left after its restore
    return ActivationCache(folder)


def _keep_at_interruption(batches: Any, writer: _ShardWriter, meta: dict, name: str) -> bool:
    """Keep what an interrupted write has: its rows, those toward the next shard too (none is written twice), and
    where its input stopped; says so in one line. False when nothing is kept (the same call starts over)."""
    folder, manifest = writer.folder, writer.manifest
    saved = writer.save_partial()  # may first finish a shard the interruption cut into (n_rows then counts it)
    kept = manifest["n_rows"] + saved
    state = _stream_state(batches, kept)
    if not kept:
        return _keep_state_alone(state, writer, meta, name)
    if state is not None and _save_stream_state(state, folder, meta, manifest["dtype"], kept):
        print(f"saelab: activation cache {name} keeps the {kept:,} {plural(kept, 'row')} written so far and where "
              "its input stopped; the same call continues from there (a harvest does not run the model again "
              "over the text before them), then writes the rest", file=sys.stderr)
    else:
        print(f"saelab: activation cache {name} keeps the {kept:,} {plural(kept, 'row')} written so far; the same "
              "call reads the input again up to there without writing those rows again (a harvest reruns the "
              "model over that text: its shuffle needs the same stream), then writes the rest", file=sys.stderr)
    return True


def _keep_state_alone(state: dict[str, Any] | None, writer: _ShardWriter, meta: dict, name: str) -> bool:
    """An interruption before any row reached the cache (a shuffled harvest writes its first rows once its buffer
    is full): where the input stopped, then a manifest of 0 rows (``d``: the width of the stream's rows), so the
    same call does not run the model again over the text it read. Nothing is kept (False) when the input has no
    state, has read nothing yet or its state cannot be saved: a manifest of no rows alone would only refuse other
    settings."""
    folder, manifest = writer.folder, writer.manifest
    width = _rows_width(state) if state is not None and state["counters"].get("tokens_seen") else None
    if width is not None and manifest["d"] in (None, width):
        manifest["d"] = width
        # The state first: cut off before the manifest, it is removed unused by the next call, which starts over;
        # a manifest of no rows without its state would only refuse that call's other settings.
        if _save_stream_state(state, folder, meta, manifest["dtype"], 0):
            write_json(folder / MANIFEST, writer.stamped(manifest))
            print(f"saelab: activation cache {name} holds no rows yet (a shuffled harvest writes its first rows once "
                  "its shuffle buffer is full) and keeps where its input stopped; the same call continues from there "
                  "(a harvest does not run the model again over the text it read)", file=sys.stderr)
            return True
    (folder / MANIFEST).unlink(missing_ok=True)  # one of 0 rows an earlier interruption left
    with contextlib.suppress(OSError):  # an overwrite's stage left empty (a cache folder holds its lock file)
        folder.rmdir()
    print(f"saelab: activation cache {name} holds no rows yet (a shuffled harvest writes its first rows once "
          "its shuffle buffer is full); the same call starts over", file=sys.stderr)
    return False


def _rows_width(state: dict[str, Any]) -> int | None:
    """The width of the rows a stream state holds (its shuffle buffer's; None when it does not tell)."""
    buf = state["tensors"].get("buffer")
    return int(buf.shape[1]) if isinstance(buf, torch.Tensor) and buf.dim() == 2 and buf.shape[1] > 0 else None


def _meta_sha256(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode("utf-8")).hexdigest()


RECORDED_ONLY = (CORPUS_FINGERPRINT, CORPUS_PATH)
"""``meta`` keys that record the input as the write found it, not a setting: a cache is reused or resumed whatever
they hold (an earlier saelab's records none, and the call that started the cache keeps its record)."""


def _settings(meta: dict) -> dict:
    """``meta`` as a reuse or resume compares it: less :data:`RECORDED_ONLY`."""
    return {k: v for k, v in meta.items() if k not in RECORDED_ONLY}


def _tensor_sha256(t: torch.Tensor) -> str:
    # The tensor's own bytes through a buffer view: a copy (tobytes) would double a GBs-large shuffle buffer.
    # As uint8 first: NumPy has no bfloat16.
    return hashlib.sha256(t.contiguous().view(torch.uint8).reshape(-1).numpy()).hexdigest()


def _state_checksum(metadata: dict[str, str]) -> str:
    """One checksum over a saved stream state's metadata (settings, counters, rows written, the tensors'
    checksums...), so an edited or damaged entry is refused like a damaged tensor."""
    return _meta_sha256({k: v for k, v in metadata.items() if k != "checksum"})


def _check_leads_to(counters: dict[str, Any], tensors: dict[str, torch.Tensor], rows_written: int) -> None:
    """ValueError unless a stream in this state has handed out at most ``rows_written`` rows and holds the rest:
    its next rows then continue the cache exactly."""
    emitted = counters.get("rows_emitted")
    held = sum(int(tensors[k].shape[0]) for k in ("buffer", "pending") if k in tensors)
    if not isinstance(emitted, int) or not emitted <= rows_written <= emitted + held:
        raise ValueError(f"its {emitted!r} rows handed out do not lead to the {rows_written} rows written")


def _stream_state(batches: Any, rows_written: int) -> dict[str, Any] | None:
    """Where an interrupted input stands (an ActivationStream's :meth:`state`); None when it has no state, or its
    state does not lead to the ``rows_written`` (a re-read interrupted while still skipping the rows written)."""
    if not callable(getattr(batches, "state", None)):
        return None
    state = batches.state()
    try:
        _check_leads_to(state["counters"], state["tensors"], rows_written)
    except ValueError:  # the resume would refuse it: it reads the input again, as said without a state
        return None
    return state


def _save_stream_state(state: dict[str, Any], folder: Path, meta: dict, dtype: str, rows_written: int) -> bool:
    """Save ``state`` (:func:`_stream_state`), so the resume restores it instead of reading the input again from
    its start; written after the manifest that counts the ``rows_written`` it goes with (before it, for 0 rows:
    ``_keep_state_alone``: a state met without its manifest is dropped unused). Tensors in safetensors
    (reading it runs no code). False when it could not be written (the resume then reads the input again)."""
    from safetensors import SafetensorError  # lazy: only an interrupted harvest needs it
    from safetensors.torch import save_file

    try:
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in state["tensors"].items()}
        metadata = {"format": STREAM_STATE_FORMAT, "version": str(STREAM_STATE_VERSION),
                    "rows_written": str(rows_written), "cache_dtype": dtype,
                    "meta_sha256": _meta_sha256(_settings(meta)),
                    "settings": json.dumps(state["settings"], sort_keys=True),
                    "counters": json.dumps(state["counters"], sort_keys=True),
                    "sha256": json.dumps({name: _tensor_sha256(t) for name, t in tensors.items()}, sort_keys=True)}
        metadata["checksum"] = _state_checksum(metadata)
        write_with(folder / STREAM_STATE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    except (OSError, SafetensorError) as e:  # a full disk, a file-size limit: the rows written are kept all the same
        print(f"saelab: note: could not save {folder / STREAM_STATE} ({e}); the resume reads the input again",
              file=sys.stderr)
        return False
    return True


def _restore_stream_state(batches: Any, folder: Path, meta: dict, dtype: str,
                          rows_written: int) -> tuple[int, int] | None:
    """Restore ``batches`` to where the interrupted write's input stopped (:func:`_save_stream_state`); returns
    how many of its next rows were already written and the number of its next batch within the whole input, or
    None (the input is then read again from its start) when there is no state, or it does not belong to this
    cache, these settings or these rows (one note)."""
    path = folder / STREAM_STATE
    if not path.exists() or not callable(getattr(batches, "restore", None)):
        return None
    try:
        from safetensors import safe_open  # lazy: as _save_stream_state

        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            for key in ("format", "version"):  # an older file is named as such, not as a checksum mismatch
                want = {"format": STREAM_STATE_FORMAT, "version": str(STREAM_STATE_VERSION)}[key]
                if metadata.get(key) != want:
                    raise ValueError(f"its {key} is {metadata.get(key)!r}, not {want!r}")
            if metadata.get("checksum") != _state_checksum(metadata):
                raise ValueError("its settings or counters do not match its checksum")
            names = set(f.keys())
            if names != set(json.loads(metadata.get("sha256", "{}"))):
                raise ValueError(f"it holds tensors {sorted(names)}")
            tensors = {name: f.get_tensor(name) for name in sorted(names)}
        expected = {"rows_written": str(rows_written), "cache_dtype": dtype,
                    "meta_sha256": _meta_sha256(_settings(meta))}
        for key, want in expected.items():
            if metadata.get(key) != want:
                raise ValueError(f"its {key} is {metadata.get(key)!r}, not {want!r}")
        sums = json.loads(metadata["sha256"])
        for name, t in tensors.items():
            if _tensor_sha256(t) != sums[name]:
                raise ValueError(f"its {name} does not match its checksum")
        state = {"settings": json.loads(metadata["settings"]), "counters": json.loads(metadata["counters"]),
                 "tensors": tensors}
        _check_leads_to(state["counters"], tensors, rows_written)
        batches.restore(state)  # checks the stream's own settings and the tensors' shapes
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        print(f"saelab: note: {path} is not used ({type(e).__name__}: {e}); the input is read again from its start",
              file=sys.stderr)
        return None
    emitted = state["counters"]["rows_emitted"]
    # a stream hands out whole batches until its end, so the rows emitted are a count of batches
    return rows_written - emitted, emitted // state["settings"]["batch_size"]


def _overwrite_via_stage(batches: Iterable[torch.Tensor], folder: Path, stage: Path,
                         args: dict[str, Any]) -> "ActivationCache":
    """Replace the cache in ``folder`` by writing the new one in ``stage`` first, so the old cache
    stays whole until the new one is complete. An interrupted overwrite with the same settings
    resumes its stage; a stage of other settings (or a damaged one) is started over."""
    if stage.exists() and not (args["skip_written"] and _matches(stage, args, allow_incomplete=True)):
        shutil.rmtree(stage)
    _write(batches, stage, resume=True, overwrite=False, shown=folder, **args)
    _finish_overwrite(folder, stage)
    return ActivationCache(folder)


def _matches(folder: Path, args: dict[str, Any], allow_incomplete: bool = False) -> bool:
    """Whether ``folder`` holds an intact cache (or, ``allow_incomplete``, part of one) of these settings."""
    try:
        if _open_existing(folder, args["meta"], args["dtype"], args["shard_rows"], resume=True, overwrite=False):
            ActivationCache(folder, allow_incomplete=allow_incomplete)  # every listed shard intact
            return True
    except ActivationCacheError:
        pass
    return False


def _finish_overwrite(folder: Path, stage: Path) -> None:
    """Move a complete staged cache over the one in ``folder``. Every step can be repeated, so an
    interruption part-way is finished by the next write to the folder."""
    listed = {s["file"] for s in _read_manifest(stage)["shards"]}
    (folder / MANIFEST).unlink(missing_ok=True)  # from here the folder's shards are being replaced
    for name in sorted(listed):
        if (stage / name).exists():
            os.replace(stage / name, folder / name)
    for old in folder.glob("shard_*.npy"):
        if old.name not in listed:
            old.unlink()
    (folder / PARTIAL_SHARD).unlink(missing_ok=True)  # an interrupted write of the old cache's
    (folder / STREAM_STATE).unlink(missing_ok=True)  # as the partial rows
    os.replace(stage / MANIFEST, folder / MANIFEST)
    shutil.rmtree(stage)


def _open_existing(folder: Path, meta: dict, dtype: str, shard_rows: int, *, resume: bool,
                   overwrite: bool) -> dict[str, Any] | None:
    """The manifest of a cache to continue (or a complete one to return), None to start afresh; refuses
    a cache that may not be replaced or continued with these settings."""
    try:
        existing = _read_manifest(folder)
    except ActivationCacheError:
        if not overwrite:
            raise
        existing = {"shards": []}
    if existing is not None and overwrite:
        for p in folder.glob("shard_*.npy"):
            p.unlink()
        (folder / STREAM_STATE).unlink(missing_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)
        return None
    if existing is None:
        return None
    state = "complete" if existing["complete"] else "incomplete"
    if not resume:
        hint = "pass overwrite=True to replace it" if existing["complete"] else \
            "pass resume=True to continue it or overwrite=True to start over"
        raise RunExistsError(f"{str(folder)!r} already holds a {state} activation cache; {hint}")
    for key, have, want in (("meta", _settings(existing["meta"]), _settings(meta)),  # meta: the options given
                            ("dtype", existing["dtype"], dtype), ("shard_rows", existing["shard_rows"], shard_rows)):
        if have != want and not (key == "shard_rows" and existing["complete"]):
            verb = "reuse" if existing["complete"] else "resume"
            difference = _difference(key, have, want)
            if existing["n_rows"] + existing.get("partial_rows", 0) == 0:  # cut off before its first row
                raise ActivationCacheError(f"cannot resume activation cache {str(folder)!r}: {NO_ROWS_STARTED} "
                                           f"{difference}; pass overwrite=True (--overwrite) to start it over with "
                                           "these settings (it has no rows to lose)")
            raise ActivationCacheError(f"cannot {verb} activation cache {str(folder)!r}: {WRITTEN} {difference}; "
                                       "pass overwrite=True (--overwrite) to replace it")
    if not existing["complete"]:
        ActivationCache(folder, allow_incomplete=True)  # the listed shards must be intact
    return existing


WRITTEN = "it was written with"
NO_ROWS_STARTED = "it holds no rows yet, from a harvest started with"
"""How a cache of other settings is said: one with rows, or one a harvest left before its first row."""


def _difference(key: str, have: Any, want: Any) -> str:
    """'meta.seed 5, not 0': the first setting that differs, not two whole dicts."""
    if isinstance(have, dict) and isinstance(want, dict):
        # a group of settings (meta.harvest: the options given) names a difference better than the
        # values derived from it (meta.context_size), so it comes first
        for sub in sorted(set(have) | set(want), key=lambda k: (not isinstance(have.get(k), dict), str(k))):
            if have.get(sub) != want.get(sub):
                return _difference(f"{key}.{sub}", have.get(sub), want.get(sub))
    shown_have, shown_want = visible_difference(_shown(have), _shown(want))
    return f"{key} {shown_have}, not {shown_want}"


def _shown(value: Any) -> str:
    return "unset (the default)" if value is None else repr(value)


class _ShardWriter:
    """Fills one shard-sized buffer and writes it (atomically, then the manifest) whenever it is full."""

    def __init__(self, folder: Path, manifest: dict[str, Any], name: str):
        self.folder, self.manifest = folder, manifest
        self.name = name  # the cache as messages name it (quoted), see _write
        self.dtype = manifest["dtype"]
        self.torch_dtype = DTYPES[self.dtype][0]
        self.buf: torch.Tensor | None = None
        self.n_buf = 0
        self.underflow = 0
        # the seconds writing this cache took, every call counted (an interrupted one's kept): its harvest's time
        self.started, self.seconds_before = time.perf_counter(), float(manifest.get("seconds", 0.0))

    def stamped(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """``manifest`` with the seconds written so far, in this call and the earlier ones."""
        return {**manifest, "seconds": round(self.seconds_before + time.perf_counter() - self.started, 1)}

    def add(self, acts_BD: torch.Tensor, what: str) -> int:
        """Append finite rows [B, d] (any device and dtype); returns how many were added."""
        rows_BD = acts_BD.detach().to("cpu", self.torch_dtype)
        if not all_finite(rows_BD):
            raise NonFiniteError(f"{what} overflows {self.dtype} in activation cache {self.name}; "
                                 "use dtype='bfloat16' or 'float32'")
        self._count_underflow(acts_BD, rows_BD, what)
        if self.manifest["d"] is None:
            self.manifest["d"] = int(rows_BD.shape[1])
        if self.buf is None:
            self.buf = torch.empty(self.manifest["shard_rows"], self.manifest["d"], dtype=self.torch_dtype)
        added = rows_BD.shape[0]
        while rows_BD.shape[0]:
            take = min(self.buf.shape[0] - self.n_buf, rows_BD.shape[0])
            self.buf[self.n_buf:self.n_buf + take] = rows_BD[:take]
            rows_BD, self.n_buf = rows_BD[take:], self.n_buf + take
            if self.n_buf == self.buf.shape[0]:
                self.flush()
        return added

    def _count_underflow(self, acts_BD: torch.Tensor, rows_BD: torch.Tensor, what: str) -> None:
        """Warn once when nonzero values become 0 in the storage dtype (they are lost, not rounded)."""
        if self.dtype == "float32" or self.underflow:
            return
        lost = int(((acts_BD.detach().cpu() != 0) & (rows_BD == 0)).sum())
        if lost:
            self.underflow = lost
            # one line on stderr, as saelab's other warnings (not Python's, with a source line)
            print(f"saelab: warning: {what}: {lost:,} nonzero activations underflow to 0 in {self.dtype} in "
                  f"activation cache {self.name}; the dtype bfloat16 or float32 keeps them (harvest "
                  "--dtype, quickstart --harvest-dtype)", file=sys.stderr)

    def flush(self) -> None:
        if not self.n_buf:
            return
        name = _shard_name(len(self.manifest["shards"]))
        self._save(self.folder / name)
        listed = {**self.manifest, "shards": [*self.manifest["shards"], {"file": name, "rows": self.n_buf}],
                  "n_rows": self.manifest["n_rows"] + self.n_buf}
        listed.pop("partial_rows", None)  # its rows are in the shard now
        listed = self.stamped(listed)
        write_json(self.folder / MANIFEST, listed)
        # An interruption anywhere above leaves the buffer whole (save_partial finishes this flush); from
        # here on it finds nothing left to save, and the manifest on disk already lists the shard.
        self.n_buf = 0
        self.manifest.pop("partial_rows", None)
        self.manifest.update(listed)
        (self.folder / PARTIAL_SHARD).unlink(missing_ok=True)

    def _save(self, path: Path) -> None:
        """The buffered rows as one .npy file, written atomically."""
        rows = self.buf[:self.n_buf]
        arr = rows.view(torch.int16).numpy().view(np.uint16) if self.dtype == "bfloat16" else rows.numpy()

        def save(tmp: Path) -> None:
            # The bytes np.save writes, but the data goes through f.write: np.save's tofile reports a failed
            # write (full disk) as an OSError without errno ("N requested and M written").
            with open(tmp, "wb") as f:
                np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(arr))
                f.write(np.ascontiguousarray(arr).data)

        write_with(path, save)

    def save_partial(self) -> int:
        """Save the rows gathered toward the next shard (an interruption); returns how many."""
        if self.n_buf == self.manifest["shard_rows"]:  # interrupted while writing its shard: finish that
            self.flush()
        if self.n_buf:
            self._save(self.folder / PARTIAL_SHARD)
            self.manifest["partial_rows"] = self.n_buf
            self.manifest.update(self.stamped(self.manifest))
            write_json(self.folder / MANIFEST, self.manifest)
        return self.n_buf

    def restore_partial(self) -> int:
        """Take back the rows an interrupted write saved toward the next shard; returns how many (0 when
        the file is missing or does not match: those rows are then harvested again)."""
        rows = self.manifest.get("partial_rows", 0)
        if not rows:
            return 0
        try:
            arr = np.load(self.folder / PARTIAL_SHARD, allow_pickle=False)  # never unpickle a file on disk
        except (OSError, ValueError) as e:
            arr = e
        if not isinstance(arr, np.ndarray) or arr.shape != (rows, self.manifest["d"]) or \
                arr.dtype != DTYPES[self.dtype][1]:
            return self.drop_partial()
        data = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16) if self.dtype == "bfloat16" \
            else torch.from_numpy(arr)
        self.buf = torch.empty(self.manifest["shard_rows"], self.manifest["d"], dtype=self.torch_dtype)
        self.buf[:rows] = data
        self.n_buf = rows
        return rows

    def drop_partial(self) -> int:
        """Forget saved partial rows (manifest first, then the file); returns 0."""
        if self.manifest.pop("partial_rows", None) is not None:
            write_json(self.folder / MANIFEST, self.manifest)
        (self.folder / PARTIAL_SHARD).unlink(missing_ok=True)
        return 0


def _write_batches(batches: Iterable[torch.Tensor], writer: _ShardWriter, to_skip: int, bar,
                   first_batch: int = 0) -> int:
    """Feed the batches to the writer, first skipping ``to_skip`` rows (already written by a run that
    was interrupted); returns how many rows were left to skip when the input ended. ``first_batch``: the
    number of the first batch within the whole input, which messages name (a restored input's is not 0)."""
    for i, acts_BD in enumerate(batches, start=first_batch):
        d = writer.manifest["d"]
        if acts_BD.dim() != 2 or (d is not None and acts_BD.shape[1] != d):
            want = f"[B, {d}]" if d is not None else "[B, D]"
            raise ValueError(f"batch {i} for activation cache {writer.name} has shape "
                             f"{tuple(acts_BD.shape)}, expected {want}")
        if to_skip:
            n = min(to_skip, acts_BD.shape[0])
            acts_BD, to_skip = acts_BD[n:], to_skip - n
        if acts_BD.shape[0] == 0:
            continue
        if not all_finite(acts_BD):
            raise NonFiniteError(f"NaN or inf in batch {i} written to activation cache {writer.name}")
        bar.update(writer.add(acts_BD, f"batch {i}"))
    return to_skip


class ActivationCache:
    """Read an activation cache written by :func:`write_activation_cache`.

    The manifest and every shard header and size are checked on opening; problems raise
    :class:`ActivationCacheError` (a CorpusError) naming the folder and shard. An incomplete cache
    (an interrupted write) is refused unless ``allow_incomplete=True``.
    """

    def __init__(self, folder: str | os.PathLike, *, allow_incomplete: bool = False) -> None:
        self.folder = Path(folder)
        m = _read_manifest(self.folder)
        if m is None:
            if self.folder.is_file():
                raise ActivationCacheError(f"{str(self.folder)!r} is a file; expected an activation cache's folder "
                                           f"(holding {MANIFEST}, as saelab harvest writes it)")
            inner = sorted(self.folder.glob(f"*/{MANIFEST}")) if self.folder.is_dir() else []
            hint = f"; the cache inside it is {str(inner[0].parent)!r}" if len(inner) == 1 else ""  # a run folder's
            raise ActivationCacheError(f"no activation cache at {str(self.folder)!r} ({MANIFEST} not found){hint}")
        if not m["complete"] and not allow_incomplete:
            kept = m["n_rows"] + m.get("partial_rows", 0)  # the count an interrupted write reports keeping
            raise IncompleteCacheError(f"activation cache {str(self.folder)!r} is incomplete ({kept:,} "
                                       f"{plural(kept, 'row')} written); finish it with "
                                       "write_activation_cache(..., resume=True)", kept)
        self.manifest = m
        self.d: int = m["d"]
        self.dtype: str = m["dtype"]
        self.n_rows: int = m["n_rows"]
        self.meta: dict[str, Any] = m["meta"]
        self.complete: bool = m["complete"]
        self.shard_rows: list[int] = [s["rows"] for s in m["shards"]]
        self.torch_dtype, self._np_dtype = DTYPES[self.dtype]  # the rows' dtype as stored
        self._paths = [self.folder / s["file"] for s in m["shards"]]
        self._offsets = [self._check_shard(p, r) for p, r in zip(self._paths, self.shard_rows)]

    def __repr__(self) -> str:
        return f"ActivationCache({str(self.folder)!r}, n_rows={self.n_rows}, d={self.d}, dtype={self.dtype})"

    def __len__(self) -> int:
        return self.n_rows

    def _check_shard(self, path: Path, rows: int) -> int:
        """Validate a shard's header and size; return the byte offset of its data."""
        where = f"activation cache {str(self.folder)!r}: shard {path.name!r}"
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                offset = f.tell()
            size = path.stat().st_size
        except FileNotFoundError as e:
            raise ActivationCacheError(f"{where} is missing") from e
        except (OSError, ValueError, SyntaxError, tokenize.TokenError) as e:  # numpy parses the header as Python
            raise ActivationCacheError(f"{where} is not a valid .npy file: {e}") from e
        if shape != (rows, self.d) or fortran or dtype != self._np_dtype:
            raise ActivationCacheError(
                f"{where} holds {dtype} {shape}, the manifest says {self._np_dtype} {(rows, self.d)}"
            )
        expected = offset + rows * self.d * self._np_dtype.itemsize
        if size != expected:
            raise ActivationCacheError(f"{where} has {size} bytes, expected {expected} (truncated or corrupt)")
        return offset

    def _read_rows(self, shard: int, rows: slice | np.ndarray, out: np.ndarray) -> None:
        """Rows of a shard into ``out``: a slice in one contiguous read, or the rows an index array names."""
        try:
            mm = np.memmap(self._paths[shard], dtype=self._np_dtype, mode="r", offset=self._offsets[shard],
                           shape=(self.shard_rows[shard], self.d))
            out[...] = mm[rows]
            del mm
        except (OSError, ValueError) as e:
            raise ActivationCacheError(
                f"activation cache {str(self.folder)!r}: cannot read shard {self._paths[shard].name!r}: {e}"
            ) from e

    def _to_torch(self, arr: np.ndarray) -> torch.Tensor:
        if self.dtype == "bfloat16":
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)

    def _read_shards(self, shards: list[int]) -> torch.Tensor:
        out = np.empty((sum(self.shard_rows[s] for s in shards), self.d), dtype=self._np_dtype)
        pos = 0
        for s in shards:
            self._read_rows(s, slice(0, self.shard_rows[s]), out[pos : pos + self.shard_rows[s]])
            pos += self.shard_rows[s]
        return self._to_torch(out)

    def _read_rows_of(self, shards: list[int], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows ``rows`` (distinct, any order) of the shards' concatenation, alone, read in file order:
        (those rows in that order, where each of ``rows`` lies in it)."""
        order = rows.argsort()
        sorted_rows = rows[order].numpy()
        out = np.empty((len(sorted_rows), self.d), dtype=self._np_dtype)
        first = 0  # the shard's first row in the concatenation
        for s in shards:
            lo, hi = np.searchsorted(sorted_rows, [first, first + self.shard_rows[s]])
            self._read_rows(s, sorted_rows[lo:hi] - first, out[lo:hi])
            first += self.shard_rows[s]
        where = torch.empty_like(order)
        where[order] = torch.arange(len(order))
        return self._to_torch(out), where

    def read(self, start: int = 0, stop: int | None = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``[start, stop)`` in stored order as a [rows, d] tensor (e.g. a sample for b_pre)."""
        stop = self.n_rows if stop is None else min(stop, self.n_rows)
        if not 0 <= start <= stop:
            raise ValueError(f"bad row range [{start}, {stop}) for a cache of {self.n_rows} "
                             f"{plural(self.n_rows, 'row')}")
        out = np.empty((stop - start, self.d), dtype=self._np_dtype)
        pos, shard_start = 0, 0
        for s, rows in enumerate(self.shard_rows):
            lo, hi = max(start, shard_start), min(stop, shard_start + rows)
            if lo < hi:
                self._read_rows(s, slice(lo - shard_start, hi - shard_start), out[pos : pos + hi - lo])
                pos += hi - lo
            shard_start += rows
        return self._to_torch(out).to(dtype)

    def n_batches(self, batch_size: int, *, epochs: int = 1, drop_last: bool = True) -> int:
        """How many batches :meth:`batches` yields from ``start_batch=0``."""
        total = self.n_rows * epochs
        return total // batch_size if drop_last else -(-total // batch_size)

    def _plan(self, shuffle: bool, seed: int, epochs: int, mix_shards: int) -> Iterator[tuple[int, int, list[int]]]:
        """(epoch, chunk index, shard indices) in stream order."""
        n = len(self.shard_rows)
        for epoch in range(epochs):
            order = torch.randperm(n, generator=_generator(seed, epoch)).tolist() if shuffle else list(range(n))
            for c, lo in enumerate(range(0, n, mix_shards)):
                yield epoch, c, order[lo : lo + mix_shards]

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        epochs: int = 1,
        start_batch: int = 0,
        drop_last: bool = True,
        mix_shards: int = 1,
        device: torch.device | str | None = None,
        pin_memory: bool | None = None,
        part: tuple[int, int] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield [batch_size, d] tensors of ``dtype`` (scheme in the module docstring).

        Deterministic for a given ``seed``; ``start_batch`` skips that many batches (a resumed
        trainer passes the number of batches it has consumed). ``mix_shards`` shards are read
        and shuffled together (more mixing, ``mix_shards`` times the memory).

        ``device``: None yields CPU tensors; otherwise each batch is copied there. ``pin_memory``
        (default: when ``device`` is CUDA) assembles each batch in page-locked memory, so the copy to
        the GPU is asynchronous (``non_blocking``); with ``device=None`` it yields pinned CPU
        batches for the caller to copy.

        ``part`` (i, n): only rows [i * batch_size / n, (i + 1) * batch_size / n) of each batch, the
        share of process i of n under data parallelism: those rows alone are read, assembled, pinned
        and copied (the n parts of a batch, concatenated in order, are the batch). batch_size must
        split evenly into n, and drop_last be True.
        """
        if batch_size < 1 or epochs < 0 or start_batch < 0 or mix_shards < 1:
            raise ValueError(f"bad arguments: batch_size={batch_size}, epochs={epochs}, "
                             f"start_batch={start_batch}, mix_shards={mix_shards}")
        lo, hi = _rows_of_part(part, batch_size, drop_last)
        dev = resolve_device(device) if device is not None else None
        pin = (dev is not None and dev.type == "cuda") if pin_memory is None else bool(pin_memory)
        if pin and not torch.cuda.is_available():
            raise ConfigError("pin_memory=True needs CUDA, which is not available on this machine; "
                              "expected pin_memory=False or None")
        start_row = start_batch * batch_size
        # A part of the short last batch is never yielded, however many of its rows there are.
        end_row = self.n_batches(batch_size, epochs=epochs) * batch_size if drop_last else self.n_rows * epochs
        pos = 0  # stream position of the current chunk's first row
        out: torch.Tensor | None = None  # the batch (or its part) being assembled
        n_out = 0
        for epoch, c, shards in self._plan(shuffle, seed, epochs, mix_shards):
            rows = sum(self.shard_rows[s] for s in shards)
            runs = [(a - pos, z - pos) for a, z in _runs_of_part(max(pos, start_row), min(pos + rows, end_row),
                                                                 batch_size, lo, hi)]
            if not runs:  # nothing of the chunk taken: skipped unread
                pos += rows
                continue
            perm = torch.randperm(rows, generator=_generator(seed, epoch, c + 1)) if shuffle else None
            data_RD, where = self._chunk_rows(shards, rows, perm, runs, whole=hi - lo == batch_size)
            pos += rows
            for i, stop in runs:
                while i < stop:
                    if out is None:
                        out = torch.empty(hi - lo, self.d, dtype=dtype, pin_memory=pin)
                    take = min(hi - lo - n_out, stop - i)
                    # Gathered in the stored dtype, converted while written into the batch.
                    out[n_out : n_out + take] = (data_RD.index_select(0, where[i : i + take]) if where is not None
                                                 else data_RD[i : i + take])
                    n_out += take
                    i += take
                    if n_out == hi - lo:
                        yield _deliver(out, dev, pin)
                        out, n_out = None, 0
        if n_out and not drop_last:
            yield _deliver(out[:n_out], dev, pin)

    def _chunk_rows(self, shards: list[int], rows: int, perm: torch.Tensor | None, runs: list[tuple[int, int]],
                    whole: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows of a chunk (``rows`` rows, shuffled by ``perm``) that batches take from it, and where the row
        at each stream position of the chunk lies in them (None: at that position). ``whole``: the chunk in one
        contiguous read; else only the rows at the positions ``runs`` cover (a part of each batch)."""
        if whole:
            return self._read_shards(shards), perm
        taken = torch.cat([torch.arange(i, stop) for i, stop in runs]) if runs else torch.empty(0, dtype=torch.long)
        data_RD, at = self._read_rows_of(shards, perm[taken] if perm is not None else taken)
        where = torch.zeros(rows, dtype=torch.long)
        where[taken] = at
        return data_RD, where


def _rows_of_part(part: tuple[int, int] | None, batch_size: int, drop_last: bool) -> tuple[int, int]:
    """The rows [lo, hi) of each batch that ``part`` (i, n) takes: the i-th of n equal slices (None: all)."""
    if part is None:
        return 0, batch_size
    i, n = part
    if not 0 <= i < n or batch_size % n:
        raise ValueError(f"part={part} of batch_size={batch_size}: expected (i, n) with 0 <= i < n and n "
                         "dividing batch_size")
    if not drop_last:
        raise ValueError(f"part={part} with drop_last=False: a short last batch does not split evenly; "
                         "expected drop_last=True")
    per = batch_size // n
    return i * per, (i + 1) * per


def _runs_of_part(first: int, stop: int, batch_size: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """The [start, stop) runs of stream positions in [first, stop) at rows [lo, hi) of their batch (the whole
    batch: one run)."""
    if (lo, hi) == (0, batch_size):
        return [(first, stop)] if first < stop else []
    runs: list[tuple[int, int]] = []
    for b in range(first // batch_size, -(-stop // batch_size)):
        a, z = max(first, b * batch_size + lo), min(stop, b * batch_size + hi)
        if a < z:
            runs.append((a, z))
    return runs


def _deliver(batch: torch.Tensor, device: torch.device | None, pinned: bool) -> torch.Tensor:
    # From pinned memory the copy is asynchronous: the caching host allocator keeps the pinned
    # block from reuse until the copy has completed, so dropping it here is safe.
    return batch if device is None else batch.to(device, non_blocking=pinned)


def _generator(*keys: int) -> torch.Generator:
    """A torch generator seeded from several integers without collisions between key tuples."""
    state = np.random.SeedSequence([int(k) % 2**64 for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))
