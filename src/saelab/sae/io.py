"""Save and load SAEs: one entry point for every format saelab reads.

``save_sae`` writes a SAELens-layout folder (see :mod:`saelab.sae.saelens_format`), or with
``format="sparsify"`` a sparsify folder (:mod:`saelab.sae.sparsify_format`). ``load_sae`` takes any of:

- a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``), written by saelab or by SAELens (architecture
  ``"topk"``, or ``"standard"``: a ReLU SAE, loaded as :class:`saelab.sae.relu.ReLUSAE`);
- a sparsify SAE folder (``cfg.json`` + ``sae.safetensors``); a sparsify trainer's folder of several
  hookpoints loads with :func:`load_sparsify`;
- an OpenAI ``sparse_autoencoder`` v5 ``.pt`` file (see :mod:`saelab.sae.openai_format`);
- an ``https://`` URL of such a ``.pt`` file, e.g. ``openai_v5_url(8)``, downloaded once into
  ``downloads`` in saelab's cache folder (:func:`saelab.utils.cache_dir.cache_dir`) by :func:`download`;
- ``hf://owner/repo[@revision]/path/in/repo``: a SAELens or sparsify folder (or a ``.pt`` file) in a
  Hugging Face hub repository, fetched with ``huggingface_hub`` into its own cache (:func:`load_from_hub`).

Every failure is a :class:`CheckpointError` naming the file (or URL) and what was expected.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from saelab.errors import CheckpointError, ConfigError, NotThatKindOfFileError, first_line
from saelab.sae.config import (CHECKPOINT, HF_PREFIX, MADE_FROM_SAES, SAE_DIR, SAE_SOURCES, SAVE_FORMATS,
                               SPARSIFY_WEIGHTS_FILENAME, TRAIN_CONFIG, WEIGHTS_FILENAME, holds_a_run, run_configs,
                               run_folders_in)
from saelab.sae.openai_format import (
    OPENAI_LOCATION_TO_HOOK,
    openai_hook_name,
    openai_v5_url,
    read_openai_v5,
)
from saelab.sae.saelens_format import (
    CFG_FILENAME,
    SPARSITY_FILENAME,
    read_saelens_folder,
    read_sparsity,
    write_saelens_folder,
)
from saelab.sae.sparsify_format import (
    SAELAB_CFG_FILENAME,
    is_sparsify_folder,
    read_sparsify_folder,
    read_sparsify_hookpoints,
    sparsify_hookpoint_folders,
    write_sparsify_folder,
    write_sparsify_hookpoints,
)
from saelab.sae.relu import ReLUSAE
from saelab.sae.topk import TopKSAE
from saelab.utils.atomic import atomic_path
from saelab.utils.cache_dir import cache_dir
from saelab.utils.cache_manifest import MANIFEST, holds_an_activation_cache
from saelab.utils.file_digests import file_sha256
from saelab.utils.hub import hub_unreachable_reason
from saelab.utils.words import listed_names

DOWNLOAD_TIMEOUT_S = 60.0
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def save_sae(
    sae: TopKSAE,
    folder: str | os.PathLike,
    *,
    format: str = "saelens",
    sparsity_log10: torch.Tensor | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write ``sae`` as a SAELens folder (``format="saelens"``) or a sparsify SAE folder (``"sparsify"``).
    ``sae.cfg`` is written as it is, a local corpus or model path included; ``saelab export`` first names the
    corpus (``saelab.data.text.shared_corpus_name``, with its fingerprint) and a local model
    (``saelab.cli.share.shared_model_record``) by their base names, fit to share.

    ``sparsity_log10`` (one value per latent) goes to ``sparsity.safetensors``. ``extra_files`` maps plain file
    names to bytes, text, or JSON-able dicts/lists (e.g. a training config, not as ``train_config.json``: that
    file marks a run folder) written beside the weights; both
    exist only in the SAELens layout. Files are written atomically and ``cfg.json`` last, so a folder with
    ``cfg.json`` is complete. A run folder, any folder inside it, a sweep folder and an activation cache are
    refused (:func:`refuse_a_run_folder`).
    """
    refuse_a_run_folder(folder, str(folder))
    if TRAIN_CONFIG in (extra_files or {}):  # the file that marks a run: the SAE would read as an unfinished one
        raise ConfigError(f"extra_files name {TRAIN_CONFIG!r} marks a saelab run folder (the saved SAE would read as "
                          "a run whose training has not finished); name it otherwise, e.g. 'training.json'")
    if format not in SAVE_FORMATS:
        raise ConfigError(f"format must be one of {SAVE_FORMATS}, got {format!r}")
    if format == "sparsify":
        if sparsity_log10 is not None or extra_files:
            raise ConfigError("format='sparsify' holds only cfg.json and sae.safetensors; sparsity_log10 and "
                              "extra_files need format='saelens'")
        _check_save_folder(folder)
        _refuse_relu_in_sparsify(sae)
        return _drop_other_layout(write_sparsify_folder(sae, folder), "sparsify")
    return write_sae(sae, folder, sparsity_log10=sparsity_log10, extra_files=extra_files)


def write_sae(sae: TopKSAE, folder: str | os.PathLike, *, sparsity_log10: torch.Tensor | None = None,
              extra_files: dict[str, Any] | None = None) -> Path:
    """:func:`save_sae`'s SAELens folder without its refusal of run folders: for a run's training alone, the
    one writer of the run's ``sae/``."""
    _check_save_folder(folder)
    return _drop_other_layout(write_saelens_folder(sae, folder, sparsity_log10=sparsity_log10,
                                                   extra_files=extra_files), "saelens")


_LAYOUT_FILES = {"saelens": (WEIGHTS_FILENAME, SPARSITY_FILENAME),
                 "sparsify": (SPARSIFY_WEIGHTS_FILENAME, SAELAB_CFG_FILENAME)}


def _drop_other_layout(folder: Path, written: str) -> Path:
    """Once an SAE is written, the other layout's files of an SAE saved there before go (both share
    cfg.json), so the folder reads as the SAE just written."""
    for layout, names in _LAYOUT_FILES.items():
        if layout != written:
            for name in names:
                (folder / name).unlink(missing_ok=True)
    return folder


def refuse_a_run_folder(folder: str | os.PathLike, named: str) -> None:
    """Refuse the folders saelab writes and reads back, ``named`` as the caller's input: a run folder, its
    ``sae/`` and any folder inside it (``evals/``, ``browser/``: the run's commands are their writers, and
    another SAE there would be taken for the one the run's config, log and evaluation describe, or mixed with
    them), a sweep folder (a cfg.json beside its runs makes it read as that SAE, no longer as a sweep) and an
    activation cache (the same for its shards, and `harvest --out` then refuses it as an SAE folder).
    A run counts from its first moments, when an overwrite holds only the run it replaces in ``.set-aside/``."""
    path = Path(folder).resolve()  # "." inside a run's sae/ is that folder too
    if holds_a_run(path):
        raise ConfigError(f"{named} is a run folder ({TRAIN_CONFIG}): saving an SAE there would mix it with the "
                          "run's results; pick another folder")
    if path.name == SAE_DIR and holds_a_run(path.parent):
        raise ConfigError(f"{named} is the SAE of the run {path.parent}: saving there would make the run describe "
                          "another SAE; pick another folder")
    run = next((p for p in path.parents if holds_a_run(p)), None)
    if run is not None:
        raise ConfigError(f"{named} is inside the run folder {run}: saving an SAE there would mix it with the "
                          "run's results; pick a folder outside the run")
    if any(holds_a_run(p) for p in run_folders_in(path)):
        raise ConfigError(f"{named} is a sweep folder (a folder of runs): saving an SAE there would make it read "
                          "as that SAE instead of its runs; pick another folder")
    if holds_an_activation_cache(path):  # its cfg.json would make it read as that SAE, and refuse the next harvest
        raise ConfigError(f"{named} is an activation cache ({MANIFEST}): saving an SAE there would mix it with the "
                          "cache's files; pick another folder")


def _check_save_folder(folder: str | os.PathLike) -> None:
    if Path(folder).exists() and not Path(folder).is_dir():
        raise ConfigError(f"{folder}: exists and is not a folder; expected a folder to save the SAE in")


def _refuse_relu_in_sparsify(sae: TopKSAE) -> None:
    if isinstance(sae, ReLUSAE):  # sparsify's format has only top-k SAEs: the file would read back as one
        raise ConfigError("a ReLU SAE cannot be saved in the sparsify format (top-k SAEs only); use format='saelens'")


def save_sparsify(saes: TopKSAE | Mapping[str, TopKSAE], folder: str | os.PathLike, *,
                  family: str | None = None) -> Path:
    """Write one SAE as a sparsify SAE folder, or SAEs keyed by hook name as a sparsify trainer's folder
    (one subfolder per hookpoint, ``layers.9`` etc.; ``family`` as in ``write_sparsify_hookpoints``).
    saelab's run and sweep folders are refused, as by :func:`save_sae`."""
    refuse_a_run_folder(folder, str(folder))
    _check_save_folder(folder)
    if isinstance(saes, TopKSAE):
        _refuse_relu_in_sparsify(saes)
        return _drop_other_layout(write_sparsify_folder(saes, folder), "sparsify")
    for sae in saes.values():
        _refuse_relu_in_sparsify(sae)
    folder = write_sparsify_hookpoints(saes, folder, family=family)
    for sub in sparsify_hookpoint_folders(folder):
        _drop_other_layout(sub, "sparsify")
    return folder


def load_sparsify(folder: str | os.PathLike, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> dict[str, TopKSAE]:
    """Every SAE in a sparsify trainer's folder (or one SAE folder), keyed by TransformerLens hook name."""
    path = _existing_path(folder)
    if is_sparsify_folder(path):
        sae = read_sparsify_folder(path, device=device, dtype=dtype)
        return {sae.cfg.hook_name or path.name: sae}
    return read_sparsify_hookpoints(path, device=device, dtype=dtype)


def load_sae(
    source: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_http: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> TopKSAE:
    """Load a finished run folder's SAE, a SAELens or sparsify folder, an OpenAI v5 ``.pt`` file, an ``https://``
    URL of one, or an ``hf://owner/repo/path`` location, as a TopKSAE.

    ``allow_http`` permits plain ``http://`` URLs. ``revision``, ``cache_dir`` and ``local_files_only`` are
    passed to ``huggingface_hub`` for ``hf://`` locations.
    """
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        repo_id, sae_id, uri_revision = parse_hf_uri(source)
        return load_from_hub(repo_id, sae_id, revision=revision or uri_revision, cache_dir=cache_dir,
                             local_files_only=local_files_only, device=device, dtype=dtype)
    if isinstance(source, str) and _URL_RE.match(source):  # any scheme: only https (or allowed http) loads
        return load_url(source, device=device, dtype=dtype, allow_http=allow_http)
    return load_local(source, device=device, dtype=dtype)


def _existing_path(source: str | os.PathLike) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; expected {SAE_SOURCES}")
    return path


def load_local(source: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> TopKSAE:
    """Load a finished run folder's SAE, an SAE folder (SAELens or sparsify layout) or an OpenAI ``.pt`` file
    from disk."""
    path = _existing_path(source)
    try:  # a path could be any of SAE_SOURCES: a file that is no torch checkpoint is told so
        return _load_path(path, device, dtype, not_torch=f"an SAE: {SAE_SOURCES}")
    except CheckpointError as err:
        _refuse_a_runs_checkpoint(path)  # only once it failed: an SAE saved under that name still loads
        _name_the_sae_beside(path, err)
        raise


def _name_the_sae_beside(path: Path, err: CheckpointError) -> None:
    """Add to ``err`` the folder of ``path`` (or of where it leads) where that holds an SAE: a file beside one (a
    run's latent_frequencies.safetensors, an SAE folder's sparsity.safetensors) was given for it. Only where ``err``
    refuses the file's kind (NotThatKindOfFileError): a torch file torch could not read, or an OpenAI SAE refused for
    its settings, is an SAE file of the user's."""
    if not isinstance(err, NotThatKindOfFileError) or path.name in _MEANS_ITS_FOLDER or not path.is_file():
        return
    folder = next((place.parent for place in _places_of(path) if _holds_an_sae(place.parent)), None)
    if folder is not None:
        raise CheckpointError(f"{err}; its folder {folder} holds an SAE: pass the folder") from err


def _places_of(path: Path) -> list[Path]:
    """``path`` absolute and without '..' (which a link before it can make another file) where that is the same
    file, then where it leads (a link, or a path through one)."""
    as_given = Path(os.path.abspath(path))
    same = as_given.exists() and os.path.samefile(as_given, path)
    return list(dict.fromkeys(([as_given] if same else []) + [path.resolve()]))


def _holds_an_sae(folder: Path) -> bool:
    """Whether load_local reads an SAE from ``folder``'s layout: a finished run, or cfg.json beside its weights."""
    weights = ((folder / name).is_file() for name in (WEIGHTS_FILENAME, SPARSIFY_WEIGHTS_FILENAME))
    return _finished_run(folder) or ((folder / CFG_FILENAME).is_file() and any(weights))


def _finished_run(folder: Path) -> bool:
    """A run folder whose SAE is saved (one still training has no sae/cfg.json)."""
    return (folder / TRAIN_CONFIG).is_file() and (folder / SAE_DIR / CFG_FILENAME).is_file()


def _refuse_a_runs_checkpoint(path: Path) -> None:
    """Name the run folder of ``path`` when it is a saelab run's training checkpoint: RUN/checkpoint.pt (a link to a
    file elsewhere too) or a link to one."""
    for checkpoint in _places_of(path):
        run = checkpoint.parent
        if checkpoint.name == CHECKPOINT and checkpoint.is_file() and _trained_by_saelab(run):
            when = "" if (run / SAE_DIR / CFG_FILENAME).is_file() else " once its training has finished"
            raise CheckpointError(f"{path}: the training checkpoint of run folder {run}, not an SAE: pass the run "
                                  f"folder{when}") from None


_CONFIG_BYTES = 1 << 20
"""A train_config.json larger than this is none saelab wrote (its are a few KiB)."""


def _trained_by_saelab(run: Path) -> bool:
    """Whether ``run`` (or the run an overwrite set aside in it) has a train_config.json that saelab wrote: its
    "train" settings name n_latents. Another tool's train_config.json beside its checkpoint.pt is no run's."""
    for config in run_configs(run):
        try:  # a plain file of a config's size: not a pipe or device that would hold the read
            if not config.is_file() or config.stat().st_size > _CONFIG_BYTES:
                continue
            settings = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(settings, dict) and isinstance(settings.get("train"), dict) and "n_latents" in settings["train"]:
            return True
    return False


_MEANS_ITS_FOLDER = (CFG_FILENAME, WEIGHTS_FILENAME, SPARSIFY_WEIGHTS_FILENAME)
"""The files of an SAE folder whose path stands for the folder."""


def _load_path(path: Path, device: str | torch.device, dtype: torch.dtype, not_torch: str | None = None) -> TopKSAE:
    """load_local of an existing ``path``; ``not_torch``: as in load_untrusted_checkpoint."""
    if path.is_file() and path.name in _MEANS_ITS_FOLDER:
        path = path.parent  # pointing at a file inside the folder means the folder
    if _finished_run(path):
        path = path / SAE_DIR
    if not path.is_dir():
        return read_openai_v5(path, device=device, dtype=dtype, not_torch=not_torch)
    if is_sparsify_folder(path):
        return read_sparsify_folder(path, device=device, dtype=dtype)
    if (path / CFG_FILENAME).exists():
        return read_saelens_folder(path, device=device, dtype=dtype)
    hookpoints = [p.name for p in sparsify_hookpoint_folders(path)]
    if hookpoints:
        raise CheckpointError(
            f"{path}: a sparsify trainer's folder with SAEs for {len(hookpoints)} hookpoints ({', '.join(hookpoints[:6])}"
            f"{', ...' if len(hookpoints) > 6 else ''}); pass one of them, e.g. {path / hookpoints[0]}, or load all "
            "with saelab.sae.load_sparsify"
        )
    _refuse_another_kind_of_folder(path)
    found = listed_names(sorted(p.name for p in path.iterdir()))
    raise CheckpointError(
        f"{path}: folder has no {CFG_FILENAME} (found {found}); expected a SAELens folder with {CFG_FILENAME} and "
        f"{WEIGHTS_FILENAME} ({CFG_FILENAME} is written last, so the save may be incomplete) or a sparsify folder"
    )


def _refuse_another_kind_of_folder(path: Path) -> None:
    """Name what the folder ``path`` (no SAE in it) is, told by the files in it, when it is one that is often
    given for an SAE: an activation cache, a browser site, a Neuronpedia export or a language model's folder."""
    run = Path(os.path.abspath(path)).parent  # RUN/browser: the run's SAE is meant
    sae = f"the run folder {run}" if _finished_run(run) else "the SAE it was made from (its run folder or SAE folder)"
    if holds_an_activation_cache(path):
        raise CheckpointError(f"{path} is an activation cache ({MANIFEST}), not an SAE: train one on it (`saelab "
                              f"train --activations {path} --out RUN`) and pass RUN, or pass an SAE folder")
    for marker, what in MADE_FROM_SAES:
        if (path / marker).is_file():
            raise CheckpointError(f"{path} is {what} ({marker}), not an SAE; pass {sae}")
    weights = sorted(p.name for p in path.iterdir() if p.is_file() and p.name not in _SAE_FILES and (
        p.suffix == ".safetensors" or (p.name.startswith("pytorch_model") and p.suffix == ".bin")))
    if (path / "config.json").is_file() and weights:
        raise CheckpointError(f"{path} is a language model's folder (config.json, {weights[0]}), not an SAE; pass it "
                              f"as the model (--model) and, as the SAE, {SAE_SOURCES}")


_SAE_FILES = (WEIGHTS_FILENAME, SPARSITY_FILENAME, SPARSIFY_WEIGHTS_FILENAME)
"""An SAE's weights: beside a config.json they are an SAE's save cut short, not a model's weights."""


# ---- the Hugging Face hub --------------------------------------------------------------------------


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def parse_hf_uri(uri: str) -> tuple[str, str, str | None]:
    """``hf://owner/repo[@revision]/path/in/repo`` -> (repo_id, path in repo, revision or None)."""
    parts = uri.removeprefix(HF_PREFIX).strip("/").split("/")
    if len(parts) < 2:
        raise CheckpointError(f"{uri}: expected {HF_PREFIX}owner/repo[@revision]/path/in/repo")
    name, _, revision = parts[1].partition("@")
    repo_id = f"{parts[0]}/{name}"
    if not _REPO_ID.match(repo_id) or (revision == "" and "@" in parts[1]):
        raise CheckpointError(f"{uri}: {repo_id!r} is not a hub repository id (expected owner/name)")
    return repo_id, "/".join(parts[2:]), revision or None


def load_from_hub(
    repo_id: str,
    sae_id: str = "",
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TopKSAE:
    """Load the SAE at ``sae_id`` (a folder path inside the repository, or a ``.pt`` file) of hub repository
    ``repo_id``: only that folder is downloaded, into huggingface_hub's cache (``HF_HUB_OFFLINE=1`` or
    ``local_files_only=True`` read that cache without the network)."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise CheckpointError(f"{repo_id!r} is not a hub repository id (expected owner/name)")
    sae_id = sae_id.strip("/")
    if any(part in (".", "..") for part in sae_id.split("/")):
        raise CheckpointError(f"{repo_id}: sae_id {sae_id!r} must be a path inside the repository")
    where = f"{HF_PREFIX}{repo_id}{'@' + revision if revision else ''}/{sae_id}"
    local = _hub_fetch(repo_id, sae_id, where, revision=revision, cache_dir=cache_dir,
                       local_files_only=local_files_only or bool(hub_unreachable_reason()))
    if not local.exists():
        root = local.parents[len(Path(sae_id).parts) - 1] if sae_id else local
        found = listed_names(sorted(p.name for p in root.iterdir()) if root.is_dir() else [])
        raise CheckpointError(f"{where}: the repository has no {sae_id!r} (found {found})")
    return _load_path(local, device, dtype)  # a file there was an OpenAI .pt: named so if it is none


def _hub_fetch(repo_id: str, sae_id: str, where: str, **hub_kwargs: Any) -> Path:
    """Download (or find in the cache) one file or one folder of a hub repository; return its local path."""
    from huggingface_hub import hf_hub_download, snapshot_download  # lazy: only hub users pay the import

    try:
        if sae_id.endswith(".pt"):
            return Path(hf_hub_download(repo_id, sae_id, **hub_kwargs))
        patterns = [f"{sae_id}/*"] if sae_id else None
        return Path(snapshot_download(repo_id, allow_patterns=patterns, **hub_kwargs)) / sae_id
    except Exception as e:  # huggingface_hub raises many types (offline, not found, gated, HTTP, validation)
        first = first_line(e)
        offline = hub_unreachable_reason()
        if offline:
            raise CheckpointError(f"{where}: could not be read from the local Hugging Face cache (the hub cannot be "
                                  f"reached: {offline}): {type(e).__name__}: {first.split('. ')[0]}") from e
        raise CheckpointError(f"{where}: could not be fetched from the Hugging Face hub ({type(e).__name__}: "
                              f"{first})") from e


# ---- downloads -------------------------------------------------------------------------------------
#
# Plain urllib rather than huggingface_hub or pooch: hub downloads serve hub repositories only, and pooch's
# one check before a file enters its cache is a hash (its processors run once the file is in place), so
# without a published hash a truncated file or an HTML error page would be cached; it would also add
# requests as a dependency. What is needed here (stage, verify hash and parse, then rename into place;
# refuse scheme-changing redirects) is a few lines on top of urllib.
#
# No sha256 is pinned for the OpenAI v5 release files: OpenAI publishes none, and none could be found in
# public repositories. Every download is therefore checked by parsing it (torch.load weights_only=True and
# building the SAE) before it enters the cache, and against the server's Content-MD5 header when it sends
# one (Azure Blob Storage, which serves the OpenAI files, sends the MD5 recorded at upload when the blob
# has one); callers who know a hash pass ``sha256=``.


def download_dir() -> Path:
    """Where downloaded checkpoints are kept: ``downloads`` in :func:`saelab.utils.cache_dir.cache_dir`."""
    return cache_dir() / "downloads"


def _checked_url(url: str, allow_http: bool) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" and not (parts.scheme == "http" and allow_http):
        hint = "; plain http needs allow_http=True (--allow-http)" if parts.scheme == "http" else ""
        raise CheckpointError(f"{url}: only https:// URLs are downloaded{hint}")
    return parts


def cache_path(url: str, *, allow_http: bool = False) -> Path:
    """Where ``url`` is cached: ``download_dir()/scheme/host[_port]/path`` (an http copy never serves https)."""
    parts = _checked_url(url, allow_http)
    segments = [urllib.parse.unquote(s) for s in parts.path.split("/") if s]
    # The URL path becomes a path on disk: refuse anything that could step outside the cache.
    if not parts.hostname or not segments or any(s in (".", "..") or "/" in s or "\\" in s for s in segments):
        raise CheckpointError(f"{url}: not a downloadable checkpoint URL (expected https://host/.../name.pt)")
    if not segments[-1].endswith(".pt"):
        raise CheckpointError(f"{url}: only OpenAI sparse_autoencoder .pt files can be loaded from a URL")
    host = parts.hostname + (f"_{parts.port}" if parts.port else "")
    return download_dir() / parts.scheme / host / Path(*segments)


class _SameSchemeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the scheme of the original request (never https -> http)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlsplit(req.full_url).scheme, urllib.parse.urlsplit(newurl).scheme
        if new != old:
            raise CheckpointError(f"{req.full_url}: redirected to another scheme ({newurl}); refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, tmp: Path, timeout: float) -> None:
    opener = urllib.request.build_opener(_SameSchemeRedirects)
    md5 = hashlib.md5(usedforsecurity=False)
    with opener.open(url, timeout=timeout) as response, open(tmp, "wb") as out:
        expected = response.headers.get("Content-Length")
        announced_md5 = response.headers.get("Content-MD5")
        for block in iter(lambda: response.read(1 << 20), b""):
            md5.update(block)
            out.write(block)
    got = tmp.stat().st_size
    if expected is not None and expected.isdigit() and got != int(expected):
        raise CheckpointError(f"{url}: download stopped after {got} of {expected} bytes")
    # A flipped byte inside a weight tensor still parses; the server's own digest catches it.
    if announced_md5 is not None and base64.b64encode(md5.digest()).decode() != announced_md5.strip():
        raise CheckpointError(f"{url}: the download's MD5 does not match the server's Content-MD5 "
                              f"({announced_md5.strip()}); the file was damaged on the way")


def _verify(path: Path, url: str, sha256: str | None) -> None:
    """Raise CheckpointError unless ``path`` has the pinned hash and parses as an OpenAI v5 checkpoint."""
    if sha256 is not None and (got := file_sha256(path)) != sha256.lower():
        raise CheckpointError(f"{url}: sha256 {got} does not match the expected {sha256.lower()}")
    try:
        read_openai_v5(path)  # the whole load, so a cached file is one that loads
    except CheckpointError as e:
        raise CheckpointError(f"{url}: the downloaded file is not a readable checkpoint ({e})") from e


def download(url: str, *, timeout: float = DOWNLOAD_TIMEOUT_S, allow_http: bool = False,
             sha256: str | None = None, refresh: bool = False) -> Path:
    """Download ``url`` into the cache and return the local path; a cached copy is reused unless ``refresh``.

    The file is written beside its cache path and renamed into place only once complete (Content-Length),
    matching ``sha256`` when given, and readable as an OpenAI checkpoint: a truncated download or an HTML
    error page never enters the cache.
    """
    target = cache_path(url, allow_http=allow_http)
    if target.is_file() and not refresh:
        return target
    try:
        with atomic_path(target) as tmp:
            _fetch(url, tmp, timeout)
            _verify(tmp, url, sha256)
    except CheckpointError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise CheckpointError(
            f"{url}: download failed ({reason}); to work offline, place the file at {target}"
        ) from e
    return target


def load_url(url: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             allow_http: bool = False, sha256: str | None = None,
             timeout: float = DOWNLOAD_TIMEOUT_S) -> TopKSAE:
    """Load the OpenAI v5 checkpoint at ``url`` (downloaded once). A cached copy that no longer reads
    (damaged on disk) is downloaded again once; if that fails too, the error names the cached file."""
    was_cached = cache_path(url, allow_http=allow_http).is_file()
    path = download(url, timeout=timeout, allow_http=allow_http, sha256=sha256)
    try:
        return read_openai_v5(path, device=device, dtype=dtype, url=url)
    except CheckpointError as e:
        if not was_cached:
            raise
        first_error = e
    path = download(url, timeout=timeout, allow_http=allow_http, sha256=sha256, refresh=True)
    try:
        return read_openai_v5(path, device=device, dtype=dtype, url=url)
    except CheckpointError as e:
        raise CheckpointError(f"{url}: the cached copy {path} does not read ({first_error}) and neither does a "
                              f"fresh download ({e}); delete {path}") from e


__all__ = [
    "HF_PREFIX",
    "OPENAI_LOCATION_TO_HOOK",
    "SAVE_FORMATS",
    "cache_path",
    "download",
    "download_dir",
    "load_from_hub",
    "load_local",
    "load_sae",
    "load_sparsify",
    "load_url",
    "openai_hook_name",
    "openai_v5_url",
    "parse_hf_uri",
    "read_sparsity",
    "save_sae",
    "save_sparsify",
]
