"""Make the feature browser site (``build_browser``) and the feature-family tree (``build_families``):
what ``saelab browse`` and ``saelab families`` run.

    from saelab.explore.browser import BrowseConfig, build_browser, build_families
    site = build_browser(["runs/n1024", "runs/n4096"], "site/", BrowseConfig(n_tokens=262_144))
    tree = build_families(["runs/n1024", "runs/n4096", "runs/n16384"], "families.json")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from saelab.data.text import corpus_files_key, corpus_name
from saelab.errors import ConfigError, RunExistsError, SaelabError
from saelab.evals._common import position_0_words
from saelab.explore.browser.build import (
    RUN_N2G_FILES,
    SAESource,
    check_compatible,
    collect_statistics,
    contexts_drawn,
    contexts_read,
    finish_statistics,
    first_scored,
    given_explanations,
    n2g_padding_id,
    name_apart,
    note_another_hook,
    note_another_model,
    open_sae_source,
    read_contexts,
    read_contexts_before_load,
    resolve_corpus,
    shared_first,
)
from saelab.explore.browser.families import FAMILIES_FORMAT, family_tree
from saelab.explore.browser.site import (FILES, SITE_FORMAT, SITE_VERSION, check_site_target, read_own_json,
                                         read_site_manifest, refuse_a_site_file, site_damage, write_site)
from saelab.explore.config import BrowseConfig
from saelab.run_folder import SAE_DIR, refuse_a_run_file
from saelab.sae.config import SAE_SOURCES, SITE_MANIFEST
from saelab.sae.relu import sparsity_of
from saelab.train.checkpoint import changed_fields
from saelab.utils.atomic import check_file_target, write_json
from saelab.utils.config import given_parts
from saelab.utils.hub import local_path, public_name
from saelab.utils.local_key import key_path, keyed_hash, same_keyed, why_no_key
from saelab.utils.memory_limit import memory_limit
from saelab.utils.words import plural

DEFINITIONS = {
    "tokens": "contexts packed from the corpus, BOS first, drawn at random from its first sample_pool_tokens tokens "
              "(0: its first contexts, in order); position 0 is not scored when the SAE leaves it out",
    "active": "the latent's TopK+ReLU value is > 0",
    "density": "active tokens / tokens scored",
    "max": "largest value over the tokens scored",
    "mean": "mean value over the tokens where the latent is active",
    "top": "contexts with the largest per-context maximum (one entry per context)",
    "fires on": "tokens at which the latent reaches at least half its max in its top contexts, with counts",
    "bands": "a uniform random sample of the contexts where the latent is active, sorted by their maximum and "
             "cut into equal bands (band 1 lowest)",
    "hist": "counts of nonzero values over all tokens scored, equal bins over [0, 2^e), 2^e the smallest power of two above the max",
    "logits": "direct logit effect W_U (g * W_dec[i]): g = final norm weight (LayerNorm centring applied, "
              "1/rms scale not), layers after the hook skipped",
    "near": "other latents with the largest cosine between decoder rows",
    "context": "the number each example's context is recorded by (the first item of its record): its place in the "
               "corpus's stream of contexts, 0 the first packed from its start",
}


CONTEXT_NUMBERS = "place in the corpus"
"""What a site's pages number each context by (``inputs.context_numbers``, also in its key where the contexts are
drawn): an earlier saelab numbered drawn contexts by their row in the draw. Read in order, a row is a place: those
sites keep their key."""


def _numbering(cfg: BrowseConfig, numbers_contexts: bool) -> dict[str, str]:
    """The key's and record's mark of how a build numbers its contexts: a site's pages number them, families files
    and exports do not (their keys stay), and only drawn contexts' numbers changed."""
    return {"context_numbers": CONTEXT_NUMBERS} if numbers_contexts and cfg.sample_pool_tokens else {}


def open_sources(sae_sources: Sequence[str | os.PathLike | SAESource], *,
                 allow_http: bool = False) -> tuple[list[SAESource], list[SAESource]]:
    """(every SAE, those loaded here from a path): the latter go to the model's device once it loads, named
    apart where their folders share a name (:func:`~.build.name_apart`); ``allow_http`` also downloads from
    plain http URLs."""
    if isinstance(sae_sources, (str, os.PathLike, SAESource)):
        sae_sources = [sae_sources]
    sae_sources = list(sae_sources)  # read twice below
    out = [s if isinstance(s, SAESource) else open_sae_source(s, several=True, allow_http=allow_http)
           for s in sae_sources]
    if not out:
        raise SaelabError(f"no SAE given; pass {SAE_SOURCES}")
    loaded_here = [s for s, given in zip(out, sae_sources) if s is not given]
    name_apart(loaded_here)  # a caller's SAESource keeps the name it was given
    return out, loaded_here


def _stat_key(source: SAESource, n2g: bool = True) -> list:
    """What identifies an SAE's files: paths, sizes and modification times. Of a run folder, its SAE and
    (with ``n2g``) its n2g.json explanations only: its metrics and report change with every evaluation."""
    path = Path(source.source).expanduser()
    if not path.exists():
        return [source.source]
    if path.is_file():
        files = [path]
    elif source.run_dir is not None:
        files = sorted((path / SAE_DIR).iterdir()) + [path / name for name in RUN_N2G_FILES if n2g]
    else:
        files = sorted(p for p in path.rglob("*.json") if p.parent == path) + sorted(path.rglob("*.safetensors"))
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def _sae_files_key(source: SAESource) -> list:
    return _stat_key(source, n2g=False)


def _settings(cfg: BrowseConfig, sources: Sequence[SAESource]) -> dict[str, Any]:
    """The settings a site or families file is keyed by and records. The N2G padding token is left out
    where it changes nothing: without N2G latents to build, and at its default, so that a site built before
    it was a setting keeps its key. The family score of SAEs that make no families (one SAE, or SAEs of one
    size) is recorded at its default, as sites built before were keyed: it changes nothing there. A sample pool of 0
    is left out: sites built before the contexts were drawn read the first contexts in order, as it does."""
    settings = dataclasses.asdict(cfg)
    if not cfg.n2g_n_latents or cfg.n2g_padding_token == BrowseConfig.n2g_padding_token:
        del settings["n2g_padding_token"]
    if not cfg.sample_pool_tokens:
        del settings["sample_pool_tokens"]
    if not makes_families(sources):
        settings["family_min_score"] = BrowseConfig.family_min_score
    return settings


KEYED_AS = {"n2g_n_latents": "n2g_latents"}
"""Settings that keys hash under the name they had before it changed (so an unchanged build stays reused);
sites, families files and exports record them under their names now, and read the old names in earlier records."""


def _keyed_as(settings: dict[str, Any]) -> dict[str, Any]:
    return {KEYED_AS.get(k, k): v for k, v in settings.items()}


PATH_SETTINGS = ("corpus", "model", "n2g_file")
"""Settings that may name a file or folder of this disk."""


def public_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as files shared with others record them: a local corpus, model or N2G file by its base name,
    not where it lies on this disk (the key, a hash, still tells files of one name apart)."""
    return {**settings, **{k: public_name(settings[k]) for k in PATH_SETTINGS if k in settings}}


def check_recorded_names(cfg: BrowseConfig) -> None:
    """Refuse, before any work, a corpus, model or N2G file whose name as a site or an export records it
    (:func:`public_settings`) is not UTF-8: file names are bytes (given as surrogate escapes), and those records are
    UTF-8 text, which cannot hold them (the write failed after the whole pass)."""
    for field, name in public_settings({k: getattr(cfg, k) for k in PATH_SETTINGS}).items():
        if isinstance(name, str) and not _utf8(name):
            raise ConfigError(f"browse.{field} {_shown_as_bytes(getattr(cfg, field))}: its name is not UTF-8, and the "
                              "site or export records it as text; rename it, or pass a link to it whose name is UTF-8")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown_as_bytes(path: str) -> str:
    """``path`` with what is not UTF-8 in it shown as the bytes of its name (``\\xe9``)."""
    try:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    except UnicodeError:  # a lone surrogate no file name gives (passed from Python)
        return path.encode("utf-8", "backslashreplace").decode()


def makes_families(sources: Sequence[SAESource]) -> bool:
    """Whether ``sources`` make feature families: two SAEs or more, each of its own size (a latent's
    parent is in the next smaller SAE)."""
    sizes = [s.sae.n_latents for s in sources]
    return len(sizes) > 1 and len(set(sizes)) == len(sizes)


def key_text(sources: Sequence[SAESource], cfg: BrowseConfig, model_dtype: str = "float32",
             identify: Callable[[SAESource], Any] = _stat_key, numbers_contexts: bool = False) -> str:
    """What a build's key hashes, as JSON: the inputs and settings, where local files lie among them.
    ``identify``: what stands for an SAE's files (default: their paths, sizes and times); ``numbers_contexts``: the
    build records its contexts' numbers (a site: :func:`_numbering`)."""
    inputs = {"saes": [[s.name, identify(s)] for s in sources], "cfg": _keyed_as(_settings(cfg, sources)),
              "version": SITE_VERSION, **_numbering(cfg, numbers_contexts)}
    if model_dtype != "float32":  # another dtype gives other numbers; float32 keys stay those of earlier builds
        inputs["model_dtype"] = model_dtype
    firsts = [first_scored(s.sae) for s in sources]
    if len(set(firsts)) > 1:  # SAEs with and without position 0: built before, all were scored from the first one's
        inputs["first_scored"] = firsts
    corpus = corpus_files_key(cfg.corpus)
    if corpus is not None:  # a local corpus edited since gives other numbers; names alone keep earlier keys
        inputs["corpus_files"] = corpus
    return json.dumps(inputs, sort_keys=True, default=str)


def keyed_dtype(lm, model_dtype: str = "float32") -> str:
    """The model dtype a build's key and record name: the one ``lm`` is in where it is given loaded, whose numbers
    the build holds whatever ``model_dtype`` asks; else ``model_dtype``, by name (as metrics.json records it:
    :func:`~saelab.models.loading.loaded_dtype`)."""
    from saelab.models.loading import loaded_dtype  # with the model code, as the load imports it

    return loaded_dtype(lm, model_dtype)


def build_key(sources: Sequence[SAESource], cfg: BrowseConfig, model_dtype: str = "float32",
              identify: Callable[[SAESource], Any] = _stat_key, numbers_contexts: bool = False) -> str | None:
    """Hash of the inputs and settings (:func:`key_text`): a site (or families file) with the same key needs no
    rebuild. Keyed by this machine's secret (:func:`~saelab.utils.local_key.keyed_hash`, ``"ID:HASH"``): it hashes
    where local files lie (the SAE files, a local corpus, a --model folder) into a record shared with others, and a
    plain hash would let anyone confirm a guessed path. None without a secret (nothing is then reused)."""
    return keyed_hash(key_text(sources, cfg, model_dtype, identify, numbers_contexts))


def unkeyed_hash(text: str) -> str:
    """16 hex digits of the sha256 of ``text``: how saelab hashed keys and files before it keyed them."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _files_texts(sources: Sequence[SAESource], cfg: BrowseConfig,
                 identify: Callable[[SAESource], Any]) -> dict[str, str]:
    """What build_inputs hashes of the SAE files (as ``identify`` gives them) and of a local corpus's files
    (their paths, sizes and times), as JSON."""
    return {"sae_files": json.dumps([[s.name, identify(s)] for s in sources], default=str),
            "corpus_files": json.dumps(corpus_files_key(cfg.corpus))}


def build_inputs(sources: Sequence[SAESource], cfg: BrowseConfig, model_dtype: str = "float32",
                 identify: Callable[[SAESource], Any] = _stat_key, numbers_contexts: bool = False) -> dict[str, Any]:
    """What build_key hashes, as a site or families file records it to name what differs on a refusal: the
    settings in full, the SAE files (as ``identify`` gives them) and a local corpus's files (their paths, sizes and
    times), and where that corpus lies, each by a hash keyed by this machine's secret
    (:func:`~saelab.utils.local_key.keyed_hash`; a record named by base names then tells a corpus of the same name
    elsewhere from one changed since, and a published record cannot confirm a guessed path)."""
    local = local_path(cfg.corpus)
    inputs = {"browse": _settings(cfg, sources), "model_dtype": model_dtype, "sae_names": [s.name for s in sources],
              **{field: keyed_hash(text) for field, text in _files_texts(sources, cfg, identify).items()},
              "corpus_place": None if local is None else keyed_hash(str(local)), **_numbering(cfg, numbers_contexts)}
    firsts = [first_scored(s.sae) for s in sources]
    if len(set(firsts)) > 1:  # as build_key: a refusal can then say what an earlier build did
        inputs["first_scored"] = firsts
    return json.loads(json.dumps(inputs, default=str))


def unkeyed_record(sources: Sequence[SAESource], cfg: BrowseConfig, model_dtype: str = "float32",
                   identify: Callable[[SAESource], Any] = _stat_key, numbers_contexts: bool = False) -> dict[str, str]:
    """The ``key``, ``sae_files`` and ``corpus_files`` an earlier saelab recorded of this build: plain hashes
    (:func:`unkeyed_hash`), which confirm a guessed path, so never recorded now; compared with its records, so that
    the same build is made again (:func:`reusable`) and another is named as before (:func:`what_differs`)."""
    texts = _files_texts(sources, cfg, identify)
    return {"key": unkeyed_hash(key_text(sources, cfg, model_dtype, identify, numbers_contexts)),
            **{field: unkeyed_hash(text) for field, text in texts.items()}}


def reusable(recorded: dict[str, Any], key: str | None, unkeyed: dict[str, str], path: Path) -> bool | None:
    """Whether ``recorded``, the record of a site, families file or export at ``path``, is of this build (``key``,
    and ``unkeyed``: :func:`unkeyed_record`): True, it is (reuse it); False, it is of another; None, it is, as an
    earlier saelab recorded it, with plain hashes that confirm where local files lie: made again to record keyed
    ones, as one line on stderr says."""
    if key is not None and recorded.get("key") == key:
        return True
    if recorded.get("key") != unkeyed["key"]:
        return False
    print(f"saelab: note: {path} records this build as an earlier saelab did, by plain hashes of where its local "
          "files lie (which confirm a guessed path to whoever reads them); building it again to record keyed ones",
          file=sys.stderr)
    return None


def corpus_path_hash(corpus: str | None) -> str:
    """Where a local corpus lies as saelab recorded it before :func:`build_inputs` keyed it (``corpus_where``): a
    hash of its absolute path alone, compared with those records, never recorded now."""
    local = local_path(corpus)
    return hashlib.sha256(json.dumps(str(local) if local is not None else None).encode()).hexdigest()[:16]


def _same_place(recorded: dict[str, Any], inputs: dict[str, Any], corpus: str | None) -> bool | None:
    """Whether the corpus read now lies where the recorded build's did; None where that cannot be told (a record
    of an earlier saelab that kept neither, or one keyed by another machine's or user's secret). ``corpus``: the
    corpus as given now (a record of an earlier saelab holds the hash of its path)."""
    if "corpus_place" in recorded:
        return same_keyed(recorded["corpus_place"], inputs.get("corpus_place"))
    if "corpus_where" in recorded and corpus is not None:
        return recorded["corpus_where"] == corpus_path_hash(corpus)
    return None


def what_differs(recorded: Any, inputs: dict[str, Any], n2g: bool = True, corpus: str | None = None,
                 unkeyed: dict[str, str] | None = None) -> str:
    """"other settings (browse.n_tokens 4096 -> 8192)", "other SAEs (a, b -> sae, b)" (by the names the pages
    show them by: another path to an SAE may give it another), "other SAE files (...)", "other corpus text (...)", or,
    for a build that recorded no inputs (an earlier saelab) or differs in saelab's format only, "other inputs
    or settings"; where the files' hashes were keyed by another secret, or none, it says so. ``corpus``: the corpus
    as given now (an earlier saelab's record tells where it lay by its path); ``unkeyed``: :func:`unkeyed_record` of
    the build now, to compare a record of an earlier saelab, whose hashes were plain."""
    if not isinstance(recorded, dict):
        return "other inputs or settings"
    # Not settings: the SAE files name these (first_scored, export_version) or are named below.
    hashed = ("sae_files", "sae_names", "corpus_files", "corpus_where", "corpus_place", "export", "first_scored",
              "export_version", "context_numbers")

    def settings(of: dict[str, Any]) -> dict[str, Any]:  # an export's options by their own names, as passed
        export = of.get("export")
        named = {k: v for k, v in of.items() if k not in hashed}
        if isinstance(named.get("browse"), dict):  # each setting by its name now, local files as sites record them
            now = {old: new for new, old in KEYED_AS.items()}
            named["browse"] = public_settings({"sample_pool_tokens": 0,  # absent: read in order (_settings)
                                               **{now.get(k, k): v for k, v in named["browse"].items()}})
        return {**named, **(export if isinstance(export, dict) else {})}

    def same(field: str) -> bool | None:  # keyed hashes by their key; an earlier saelab's plain ones as it made them
        then = recorded.get(field)
        if isinstance(then, str) and ":" not in then:
            return None if unkeyed is None else then == unkeyed[field]
        return same_keyed(then, inputs.get(field)) if field in recorded else False

    changes = changed_fields(settings(recorded), settings(inputs))
    if changes:
        return f"other settings ({', '.join(changes)})"
    files, names = same("sae_files"), recorded.get("sae_names")
    if files is not True and isinstance(names, list) and names != inputs["sae_names"]:
        return f"other SAEs ({', '.join(map(str, names))} -> {', '.join(inputs['sae_names'])})"  # or other names
    if files is False:  # n2g: whether the key holds a run's N2G files
        return ("other SAE files (other SAEs, the same ones retrained or replaced since"
                + (", or a run's N2G explanations written since)" if n2g else ")"))
    # The same SAEs and settings: only how an earlier saelab scored or exported them can differ.
    if "first_scored" in inputs and "first_scored" not in recorded:
        return ("SAEs scored by an earlier saelab, which read every SAE from the first one's first position (these "
                "differ in whether they read position 0)")
    if inputs.get("context_numbers") != recorded.get("context_numbers"):
        return "contexts an earlier saelab numbered by their row in the draw (not their place in the corpus)"
    if inputs.get("export_version") != recorded.get("export_version"):
        return ("an earlier saelab's export, whose n_tokens_in_prompt counted the BOS position its records leave "
                "out")
    text = same("corpus_files") if "corpus_files" in recorded else True
    if text is False:
        same_place = _same_place(recorded, inputs, corpus)
        corpus = inputs["browse"].get("corpus")
        if same_place is None:  # either may be the case
            return f"other corpus text (browse.corpus {corpus} changed since, or is another corpus of that name)"
        if not same_place:  # an export names the corpus by its base name
            return f"other corpus text (browse.corpus {corpus} is another corpus of that name, not the one read then)"
        return f"other corpus text (browse.corpus {corpus} changed since)"
    if None in (files, text):
        return _not_comparable(inputs)
    return "other inputs or settings"


def _not_comparable(inputs: dict[str, Any]) -> str:
    """What differs, said where the recorded files' hashes were keyed by another secret or none, or this machine
    has none: the keys differ, and nothing tells why."""
    if inputs.get("sae_files") is None:
        return f"inputs that cannot be compared without a local key ({why_no_key()})"
    return (f"inputs hashed with another local key or none (another machine's or user's, or {key_path()} made "
            "again since), which cannot be compared")


def note_no_key(key: str | None, out: str | os.PathLike, what: str) -> None:
    """One line on stderr once ``out`` (a site, families file or export: ``what``) is written without a key of its
    inputs, this machine having no local key: the same command again cannot tell it unchanged, and refuses it."""
    if key is None:
        print(f"saelab: note: no local key ({why_no_key()}): {out} records no key of its inputs, so a rerun will not "
              f"recognise this {what} as unchanged; set SAELAB_CACHE_DIR to a writable folder to keep a key",
              file=sys.stderr)


def _named_model(cfg: BrowseConfig, lm) -> str | None:
    """The model the caller chose (it overrides what the SAE configs say), if any."""
    return cfg.model or (lm if isinstance(lm, str) else getattr(lm, "name", None))


def load_model_beside(lm, cfg: BrowseConfig, sources: Sequence[SAESource], loaded_here: Sequence[SAESource],
                      hook: str, device=None, model_dtype="float32", seconds: dict[str, float] | None = None,
                      context_setting: str | None = "context_size", check_tokenizer: Callable | None = None,
                      progress: bool = True):
    """The model, with the SAEs loaded here moved beside it (the encoder then runs on its GPU; SAEs the
    caller gave stay where the caller put them), and the contexts read (:func:`read_contexts`). A missing
    corpus, a bad hook, a context longer than the model takes or a corpus too short for ``cfg.n_tokens`` is
    named first (from the config and tokenizer, a hub model's fetched alone), not after the load.
    ``seconds["tokenize"]``: the read's. ``context_setting``: as :func:`read_contexts` takes it.
    ``check_tokenizer``: the caller's own check of the tokenizer read before the load (None where it comes only
    with the load), run ahead of the corpus read; the tokenizer is then not read a second time for it."""
    from saelab.models import check_before_load, load_model, tokenizer_before_load
    from saelab.models.lm import CONTEXT_SETTING, SAE_CONTEXT
    from saelab.models.loading import RECORDED_CONTEXT
    from saelab.run_folder import model_for

    resolve_corpus(cfg)
    spec = lm or cfg.model or model_for(sources[0].sae, sources[0].source)
    recorded = RECORDED_CONTEXT if context_setting else SAE_CONTEXT
    check_before_load(spec, hook, cfg.context_size, sources[0].sae.cfg.context_size, recorded,  # as read_contexts reads
                      sae=sources[0].sae)
    tokenizer = tokenizer_before_load(spec)  # a hub model's before its weights download: for the check and the load
    if check_tokenizer is not None:
        check_tokenizer(tokenizer)
    t = time.perf_counter()
    drawn = read_contexts_before_load(tokenizer, [s.sae for s in sources], cfg, context_setting)
    took = time.perf_counter() - t
    lm = load_model(spec, device=device, dtype=model_dtype, tokenizer=tokenizer, progress=progress)
    for s in loaded_here:
        s.sae.to(lm.device)
    if drawn is None:  # the tokenizer came with the model
        t = time.perf_counter()
        drawn = read_contexts(lm, [s.sae for s in sources], cfg, context_setting)
        took = time.perf_counter() - t
    else:
        # where the config on disk did not say (or the model came loaded)
        lm.check_context_size(drawn.tokens.shape[1], CONTEXT_SETTING if cfg.context_size else recorded)
    if seconds is not None:
        seconds["tokenize"] = took
    return lm, drawn




def _families(lm, sources, coact, cfg, hook) -> dict[str, Any] | None:
    """The family tree of SAEs of different sizes (each latent linked to its parent in the next smaller SAE);
    None for one SAE, or SAEs of one size, which have no smaller SAE to hold a parent."""
    if coact is None:
        return None
    if not makes_families(sources):
        print(f"saelab: note: the SAEs share a size (n_latents {[s.sae.n_latents for s in sources]}): no feature "
              "families, which link each latent to its parent in the next smaller SAE", file=sys.stderr)
        return None
    order = sorted(range(len(sources)), key=lambda i: sources[i].sae.n_latents)
    return family_tree([sources[i].name for i in order], [sources[i].source for i in order],
                       [sources[i].sae for i in order], coact, min_score=cfg.family_min_score, hook=hook,
                       model=lm.known_as,
                       position_0=position_0_words(shared_first(s.sae for s in sources)))


def _public_tree(families: dict[str, Any] | None) -> dict[str, Any] | None:
    """The family tree as the site publishes it: its model and SAEs named as in ``site.json`` (public_name)."""
    if families is None:
        return None
    return {**families, "model": public_name(families["model"]),
            "saes": [{**s, "source": public_name(s["source"])} for s in families["saes"]]}


def _public_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """build_inputs as a site or families file records them: local files by their base names (public_settings)."""
    return {**inputs, "browse": public_settings(inputs["browse"])}


def check_sizes(sources: Sequence[SAESource], cfg: BrowseConfig, site: bool = True,
                given_as: Callable[[str], str | None] | None = None) -> None:
    """Refuse, before the model loads, sizes past what they can mean for these SAEs and this text (each is
    allocated for every latent, and failed in the allocator, or ran for minutes, only after the load): with
    ``site``, nearest latents given past an SAE's other latents and N2G latents past its latents (whose draw would
    quietly take every active latent, minutes per hundred, after the whole pass); then the pass's memory. Top and
    sampled contexts past the contexts read are cut to them (a latent lists each context once), as a short text
    always left them partly empty: a site or export of such settings stays reusable. ``given_as``: how the user
    gave a setting ("browse.n_neighbours": "--n-neighbours", a --config file's entry, or None where it is the
    default), as the CLI's ``given`` says; without it, a setting at its default value counts as not given."""
    n_contexts, T, _ = contexts_read([s.sae for s in sources], cfg)
    smallest = min(sources, key=lambda s: s.sae.n_latents)
    n = smallest.sae.n_latents
    which = "the SAE" if len(sources) == 1 else f"the SAE {smallest.name}"
    # the default is cut to a smaller SAE's other latents; a number given is the user's, refused past them
    way = (given_as("browse.n_neighbours") if given_as is not None
           else None if cfg.n_neighbours == BrowseConfig.n_neighbours else "browse.n_neighbours")
    if site and cfg.n_neighbours > n - 1 and way is not None:
        lead, entry = given_parts(way)
        raise ConfigError(f"{lead}{entry} {cfg.n_neighbours:,}: {which} has {n:,} {plural(n, 'latent')}; "
                          f"expected at most {n - 1:,}, its other latents")
    if site and cfg.n2g_n_latents > n:
        raise ConfigError(f"browse.n2g_n_latents {cfg.n2g_n_latents}: {which} has {n} {plural(n, 'latent')}; expected "
                          f"at most {n}")
    _check_pass_memory(sources, cfg, n_contexts, T, site)


NEIGHBOUR_BYTES = 12
"""Memory per nearest latent a site lists, kept for every latent until its pages are written: the ids' (int64) and
cosines' (float32) tensors."""
PAGE_NEIGHBOUR_BYTES = 200
"""Memory per nearest latent on the page being written (:data:`.site.CHUNK` latents a file, built and written one at a
time): a Python ``[id, cosine]`` list and its text. Measured (benchmarks/browse_neighbours.py; RESULTS.md, "Nearest
latents a site lists"): the whole build's peak grows by 12-14 B per entry, all latents' at once; before the pages
were written as built, by 149 B at 4.2 M entries, 161 B at 16.8 M, ~176 B at 67 M."""


def _check_pass_memory(sources: Sequence[SAESource], cfg: BrowseConfig, n_contexts: int, T: int,
                       site: bool = True) -> None:
    """The pass keeps every latent's top and sampled contexts: each an activation row of T float32 values with
    its context, position and score (``_Collector``); a site keeps every latent's nearest latents
    (``NEIGHBOUR_BYTES`` each) and lists them on its pages a file at a time (``PAGE_NEIGHBOUR_BYTES`` each). Where
    these alone take more than the memory this process may use (the machine's, or its container's limit), refused
    now: the pass would fail in the allocator, swap, or be killed, after the load."""
    limit = memory_limit()
    if limit is None:  # an OS that does not say: nothing to compare with
        return
    memory, whose = limit
    n_latents = sum(s.sae.n_latents for s in sources)
    per_context = n_latents * (4 * T + 24)
    need = (min(cfg.n_top, n_contexts) + min(cfg.n_samples, n_contexts)) * per_context
    if need > memory:
        raise ConfigError(f"browse.n_top {cfg.n_top:,} and browse.n_samples {cfg.n_samples:,}: the pass keeps each "
                          f"latent's top and sampled contexts' activations, {need / 2**30:,.1f} GiB for {n_latents:,} "
                          f"{plural(n_latents, 'latent')} in contexts of {T} tokens, past {whose} "
                          f"{memory / 2**30:,.1f} GiB of memory; expected browse.n_top + browse.n_samples <= "
                          f"{memory // per_context:,}")
    if not site:
        return
    from saelab.explore.browser.site import CHUNK

    # as finish_statistics cuts them: at most each SAE's other latents; one page of CHUNK latents' lists at a time
    listed = sum(s.sae.n_latents * min(cfg.n_neighbours, s.sae.n_latents - 1) for s in sources)
    page = CHUNK * max(min(cfg.n_neighbours, s.sae.n_latents - 1) for s in sources) * PAGE_NEIGHBOUR_BYTES
    lists = listed * NEIGHBOUR_BYTES + page
    if need + lists > memory:
        most = (memory - need) // (n_latents * NEIGHBOUR_BYTES + CHUNK * PAGE_NEIGHBOUR_BYTES)
        raise ConfigError(f"browse.n_neighbours {cfg.n_neighbours:,}: the pages list each latent's nearest latents, "
                          f"{lists / 2**30:,.1f} GiB for {n_latents:,} {plural(n_latents, 'latent')} (every "
                          f"latent's, and one page's as text) beside the {need / 2**30:,.1f} GiB of their contexts' "
                          f"activations, past {whose} {memory / 2**30:,.1f} GiB of memory; expected "
                          f"browse.n_neighbours <= {most:,}")


def build_browser(sae_sources, out: str | os.PathLike, cfg: BrowseConfig | None = None, *, lm=None,
                  device=None, model_dtype: str = "float32", overwrite: bool = False,
                  progress: bool = True, allow_http: bool = False,
                  given_as: Callable[[str], str | None] | None = None,
                  keep_uncompared: bool = False) -> dict[str, Any]:
    """Build the feature browser site for one or several SAEs (on one hook) at ``out``.

    ``sae_sources``: run folders, SAELens folders, OpenAI ``.pt`` files or URLs (or :class:`SAESource`).
    With several SAEs the site also shows their feature families (and writes ``families.json``).
    A finished site at ``out`` built from the same inputs and settings is kept as it is (returned
    with ``"reused": True``) unless ``overwrite``; one built from other inputs is kept (refused) unless
    ``overwrite``. A folder
    at ``out`` that is not a site is never replaced. Returns the site's manifest plus ``site`` and
    ``seconds`` (all phases, the site write included; a reused site: this call's total). ``allow_http`` also
    downloads SAEs from plain http URLs. ``given_as``: how the user gave each setting, as :func:`check_sizes`
    takes it. ``keep_uncompared``: a site of these settings and SAE names whose inputs cannot be compared with
    these (no local key, now or when it was built, or another's) is kept as it is, saying so on stderr, rather
    than refused (returned with ``"uncompared": True``; ``browse --serve`` serves it: its files are checked as
    they are served).
    """
    cfg = cfg or BrowseConfig()
    t_start = time.perf_counter()
    check_recorded_names(cfg)
    sources, loaded_here = open_sources(sae_sources, allow_http=allow_http)
    hook = check_compatible(sources, cfg.hook, _named_model(cfg, lm))
    out = Path(out)
    model_dtype = keyed_dtype(lm, model_dtype)
    # its pages number the contexts (_numbering)
    key, inputs = (build_key(sources, cfg, model_dtype, numbers_contexts=True),
                   build_inputs(sources, cfg, model_dtype, numbers_contexts=True))
    old = read_site_manifest(out)
    if old is not None and not overwrite:
        unkeyed = unkeyed_record(sources, cfg, model_dtype, numbers_contexts=True)
        same = reusable(old, key, unkeyed, out / SITE_MANIFEST)
        if same:
            return _reused_site(out, old, "of these inputs and settings", t_start)
        if same is False:
            shown = ", ".join(str(s.get("name")) for s in old.get("saes", []) if isinstance(s, dict)) or "other SAEs"
            differs = what_differs(old.get("inputs"), inputs, corpus=cfg.corpus, unkeyed=unkeyed)
            # all that can be told matches: only the files' hashes, keyed by no key or another, are unknown
            uncompared = differs == _not_comparable(inputs)
            if uncompared and keep_uncompared:
                reused = _reused_site(out, old, "of these settings and SAE names", t_start)
                print(f"saelab: warning: {out} holds a feature browser site of these settings and SAE names, built "
                      f"from {differs}: served as it is; should an SAE or the corpus have changed since, pass "
                      "--overwrite to build it again", file=sys.stderr)
                return {**reused, "uncompared": True}
            shown = "" if differs.startswith("other SAEs (") else f" (it shows {shown})"  # else named twice
            serve = ", --serve to serve it as it is" if uncompared else ""
            raise RunExistsError(f"{out} holds a feature browser site built from {differs}{shown}; pass --overwrite "
                                 f"to replace it{serve}, or pick another --out")
    check_site_target(out)  # before the model loads and the text is scored, not after
    # after the reuse: a site built on a machine of more memory stays reusable on this one
    check_sizes(sources, cfg, given_as=given_as)
    single = len(sources) == 1
    if cfg.n2g_file is not None and not single:  # its latents are one SAE's: it was left out without a word
        raise ConfigError(f"browse.n2g_file {cfg.n2g_file} holds the N2G explanations of one SAE, and {len(sources)} "
                          "SAEs were given; browse that SAE alone with it, or leave browse.n2g_file out")
    # An N2G file that is no N2G result, or one of another SAE: refused now, not after the pass.
    explanations = [given_explanations(s, cfg if single else dataclasses.replace(cfg, n2g_file=None))
                    for s in sources]
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    chosen = lm or cfg.model  # None: the SAEs' own
    lm, drawn = load_model_beside(lm, cfg, sources, loaded_here, hook, device, model_dtype, seconds,
                                  progress=progress)
    tokens = drawn.tokens
    lm.check_hook(hook)
    for s in sources:
        s.sae.check_input(torch.empty(0, lm.hook_width(hook)),
                          name=f"activations at {hook} of {lm.known_as} (for {s.source})")
    if cfg.n2g_n_latents:  # a padding token the tokenizer splits: refused now, not after the pass
        n2g_padding_id(lm.tokenizer, cfg)
    seconds["load"] = time.perf_counter() - t - seconds["tokenize"]
    note_another_hook(sources, hook)
    note_another_model(sources, chosen)
    stats, coact, pass_times = collect_statistics(lm, sources, tokens, cfg, hook=hook, progress=progress)
    seconds.update(pass_times)
    t = time.perf_counter()
    for st, given in zip(stats, explanations):
        finish_statistics(lm, st, tokens, hook, cfg, progress=progress, explanations=given)
    families = _families(lm, sources, coact, cfg, hook)
    seconds["finish"] = time.perf_counter() - t
    first = shared_first(s.sae for s in sources)  # the tokens every SAE reads; each SAE's own are in "saes"
    manifest = {
        "format": SITE_FORMAT, "version": SITE_VERSION, "key": key,
        "inputs": _public_inputs(inputs),
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": public_name(lm.known_as), "hook": hook, "corpus": corpus_name(cfg.corpus, "eval"),
        "contexts_drawn": contexts_drawn(cfg, tokens.numel()),  # how they were read (earlier sites: in order)
        "context_size": int(tokens.shape[1]), "n_contexts": int(tokens.shape[0]),
        "n_tokens": int(tokens.shape[0] * (tokens.shape[1] - first)), "position_0": position_0_words(first),
        "config": public_settings(dataclasses.asdict(cfg)), "definitions": DEFINITIONS,
        "has_families": families is not None,
        "saes": [{"name": s.name, "source": public_name(s.source), "n_latents": s.sae.n_latents, **sparsity_of(s.sae),
                  "input_norm": s.sae.cfg.input_norm, "alive": int((st.count_N > 0).sum()),
                  "explained": sum(bool(e["patterns"]) for e in st.explanations.values()),  # as the N2G summary
                  "n_tokens": st.n_tokens,
                  "position_0": position_0_words(first_scored(s.sae))} for s, st in zip(sources, stats)],
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    t = time.perf_counter()
    write_site(out, manifest=manifest, stats_list=stats, tokens_NT=tokens, tokenizer=lm.tokenizer, cfg=cfg,
               families=_public_tree(families), progress=progress, context_index=drawn.index)
    seconds["write"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_start
    note_no_key(key, out, "feature browser site")
    return {**manifest, "site": str(out), "reused": False, "seconds": {k: round(v, 2) for k, v in seconds.items()}}


def _reused_site(out: Path, old: dict[str, Any], of: str, t_start: float) -> dict[str, Any]:
    """The summary of the site at ``out`` (manifest ``old``, ``of`` these inputs) kept as it is; refused where its
    files differ from their record: what it was built from says nothing of whether they are whole."""
    damage = site_damage(out, old)
    if damage is not None:
        raise RunExistsError(f"{out} holds a feature browser site {of}, but {damage}; pass --overwrite to build it "
                             "again, or pick another --out")
    # its seconds are this call's: the manifest's are the phases of the build it reuses
    return {**{k: v for k, v in old.items() if k != FILES}, "site": str(out), "reused": True,
            "seconds": {"total": round(time.perf_counter() - t_start, 2)}}


def build_families(sae_sources, out: str | os.PathLike | None, cfg: BrowseConfig | None = None, *, lm=None,
                   device=None, model_dtype: str = "float32", overwrite: bool = False,
                   progress: bool = True, allow_http: bool = False) -> dict[str, Any]:
    """Feature families of several SAEs on one hook (see :mod:`.families`); written to ``out`` as JSON,
    with the key of its inputs and settings. A file at ``out`` of the same key is kept and returned (with
    ``"reused": True``); a families file of other inputs is kept (refused) unless ``overwrite``, and a file
    that is not a families file is never replaced. ``allow_http`` also downloads SAEs from plain http URLs."""
    cfg = cfg or BrowseConfig()
    if out is not None:
        _check_families_out(out)
    earlier = None if out is None else _earlier_families(Path(out))  # before the SAEs load
    earlier = None if overwrite else earlier
    sources, loaded_here = open_sources(sae_sources, allow_http=allow_http)
    if len(sources) < 2:
        raise SaelabError(f"feature families need at least two SAEs of different sizes, got {len(sources)}")
    if not makes_families(sources):
        raise SaelabError(f"feature families need SAEs of different sizes, got n_latents "
                          f"{[s.sae.n_latents for s in sources]}")
    hook = check_compatible(sources, cfg.hook, _named_model(cfg, lm))
    # The tree reads no N2G explanations and orders the SAEs by size: neither changes its key.
    by_size = sorted(sources, key=lambda s: s.sae.n_latents)
    model_dtype = keyed_dtype(lm, model_dtype)
    key, inputs = (build_key(by_size, cfg, model_dtype, _sae_files_key),
                   build_inputs(by_size, cfg, model_dtype, _sae_files_key))
    if earlier is not None:
        unkeyed = unkeyed_record(by_size, cfg, model_dtype, _sae_files_key)
        same = reusable(earlier, key, unkeyed, Path(out))
        if same:
            return {**earlier, "reused": True}
        if same is False:
            differs = what_differs(earlier.get("inputs"), inputs, n2g=False, corpus=cfg.corpus, unkeyed=unkeyed)
            raise RunExistsError(f"{out} holds feature families of {differs}; pass --overwrite to replace it, or pick "
                                 "another --out")
    chosen = lm or cfg.model  # None: the SAEs' own
    lm, drawn = load_model_beside(lm, cfg, sources, loaded_here, hook, device, model_dtype, progress=progress)
    lm.check_hook(hook)
    note_another_hook(sources, hook)
    note_another_model(sources, chosen)
    _, coact, _ = collect_statistics(lm, sources, drawn.tokens, cfg, hook=hook, latent_stats=False, progress=progress)
    # Named as the site names them: the file is shared with others, and read back only by its key and inputs.
    tree = {**_public_tree(_families(lm, sources, coact, cfg, hook)), "key": key, "inputs": _public_inputs(inputs)}
    if out is not None:
        write_json(out, tree)
        note_no_key(key, out, "families file")
    return {**tree, "reused": False}


def _check_families_out(out: str | os.PathLike) -> None:
    """``out`` (the families verb's --out, as the refusals name it) before the SAEs load: a .json file path in a
    writable folder, not a file a run or a feature browser site writes."""
    path = check_file_target(out, "--out", "the families JSON")
    refuse_a_run_file(path, "--out")
    refuse_a_site_file(path, "--out")
    if path.suffix.lower() != ".json":  # e.g. --out RUN/report.md would be replaced by JSON
        raise ConfigError(f"--out {path}: expected a .json file path (the families are written as JSON)")


def _earlier_families(out: Path) -> dict[str, Any] | None:
    """The families file saelab wrote at ``out``, or None when there is none; anything else there is refused,
    --overwrite or not (it may be a run's cfg.json or metrics.json)."""
    if not out.exists():
        return None
    earlier = read_own_json(out, FAMILIES_FORMAT)
    if earlier is None:
        raise RunExistsError(f"{out}: exists and is not a feature families file (saelab families); choose another "
                             "--out (it is never replaced)")
    return earlier
