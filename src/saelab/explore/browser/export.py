"""Export the feature browser's statistics as SAEDashboard's Neuronpedia batch files.

Neuronpedia imports feature dashboards from the files SAEDashboard's ``NeuronpediaRunner`` writes
(``sae_dashboard/neuronpedia/neuronpedia_dashboard.py``: ``NeuronpediaDashboardBatch.to_dict``),
converted to its bulk-import layout by ``sae_dashboard.neuronpedia.neuronpedia_export`` or
neuronpedia-utils' ``convert-saedashboard-to-neuronpedia-export.py``. This module writes the same
files from one pass of saelab's browser, for any model saelab reads::

    OUT/batch-0.json, batch-1.json, ...   {"model_id", "layer", "sae_set", "sae_id_suffix", "features": [...]}
    OUT/skipped_indexes.json              latents left out (never active on the text read), as SAEDashboard
    OUT/run_settings.json                 what was read and how (``contexts_drawn``: how the contexts were read
                                          from the corpus, as site.json says), and the key of it that a repeat
                                          reuses (saelab's record; not read by the importers): the SAE by its name and
                                          weights' hash, local files by their base names, never their paths;
                                          the key and the files' hashes keyed by this machine's secret
                                          (null without one)

Each feature holds, with saelab's definitions (:mod:`.build`):

- ``activations``: first the top-activating contexts (``bin_min`` = -1, ``bin_max`` = the latent's
  max activation, ``bin_contains`` = -1: SAEDashboard's marker of its top group), then the quantile
  bands, highest first (``bin_min`` / ``bin_max`` = the lowest / highest context maximum in the band,
  ``bin_contains`` = the band's share of the uniform sample of active contexts). Each entry is a
  whole context from its first scored token (without the BOS token when the SAE leaves position 0
  out; ``tokens``: token texts, ``values``: the latent's activation at each, ``qualifying_token_index``:
  where the context maximum is; ``n_tokens_in_prompt``, with each feature, is the length of these records).
  SAEDashboard's own bands are equal-width intervals of [0, max] over tokens; ours are equal-count bands
  of context maxima.
- ``pos_str`` / ``pos_values``, ``neg_str`` / ``neg_values``: the direct logit effect's most promoted
  and suppressed tokens; ``logits_hist_data_bar_values`` / ``_heights``: its histogram over the whole
  vocabulary (50 equal bins between its min and max: bin centres and counts, as SAEDashboard).
- ``frac_nonzero``: density; ``freq_hist_data_bar_values`` / ``_heights``: the exact histogram of the
  nonzero activations (equal bins over [0, 2^e), from the first to the last non-empty one: centres and counts).
- ``neuron_alignment_*``: the 3 largest decoder weights (signed), their indices and |w| / ||W_dec[i]||_1.
- ``correlated_neurons_*``, ``correlated_features_*``, ``decoder_weights_dist``, ``vector``: empty
  lists (activation correlations are not gathered; the last two are for attention-head SAEs and
  steering vectors).

No explanation: a feature of the batch files has no field for one, and the converters to Neuronpedia's
bulk-import layout write features and activations only (Neuronpedia's explanations come from its own
explainers, each with its type and explainer model). The browser's N2G settings are therefore refused, and
the explanations a run folder keeps are named on stderr as left out.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from saelab.errors import ConfigError, RunExistsError
from saelab.explore.config import BrowseConfig
from saelab.run_folder import refuse_others_files, sae_sha256
from saelab.sae.config import NEURONPEDIA_SETTINGS
from saelab.utils.atomic import atomic_folder
from saelab.utils.config import given_parts, whole_at_least
from saelab.utils.hub import local_path, public_name
from saelab.utils.local_key import keyed_hash

FORMAT = "saedashboard-neuronpedia-batches"
"""``format`` in ``run_settings.json``: marks a folder this module wrote (and may replace)."""
EXPORT_VERSION = 2
"""In the key and record of an export of an SAE that leaves position 0 out: version 1 (unmarked) wrote its
n_tokens_in_prompt with the BOS its records leave out."""
LOGIT_HIST_BINS = 50
"""Bins of the direct-logit-effect histogram (SAEDashboard's LogitsHistogramConfig default)."""
N_ALIGNMENT = 3
"""Rows of the neuron alignment table (SAEDashboard's NeuronpediaRunner uses FeatureTablesConfig(n_rows=3))."""
ROUND = 5
"""Decimals kept (SAEDashboard's FeatureProcessor.round_list)."""


def export_neuronpedia(stats, tokens_NT: torch.Tensor, lm, out: str | os.PathLike, *, dataset: str = "",
                       model_id: str | None = None, layer: int | None = None, sae_set: str | None = None,
                       sae_id_suffix: str | None = None, n_bands: int = 4, n_features_per_batch: int = 128,
                       include_dead: bool = False, overwrite: bool = False, key: str | None = None,
                       inputs: dict[str, Any] | None = None, sae_hashes: Sequence[str] | None = None,
                       contexts_drawn: str = "given as a token tensor") -> dict[str, Any]:
    """Write SAEDashboard/Neuronpedia batch files for one SAE's statistics (or several: ``out/NAME`` each).

    ``stats``: :class:`~.build.LatentStats` from :func:`~.build.collect_statistics` (after
    :func:`~.build.finish_statistics`, or the direct logit effects are computed here);
    ``tokens_NT``: the contexts that pass read; ``lm``: its language model. ``dataset``: the
    corpus name recorded with every feature (a name, not a local path: the files are for a public
    site); ``n_bands``: the browser's ``BrowseConfig.n_bands`` (how the quantile samples are cut).
    ``model_id`` (default from ``lm.name``), ``layer`` (default from the hook name ``blocks.L.*``),
    ``sae_set`` (default the SAE's name) and ``sae_id_suffix`` name the Neuronpedia source (``{layer}-{sae_set}[__{suffix}]``). Latents
    never active are listed in ``skipped_indexes.json`` instead, unless ``include_dead``. An
    earlier export at ``out`` is replaced only with ``overwrite``; any other non-empty folder is
    refused. ``key`` and ``inputs`` (:func:`export_key`) are recorded in ``run_settings.json``, so that
    the same export asked for again is reused (``key`` None, with ``inputs``: this machine has no local key); ``sae_hashes``: each SAE's :func:`sae_sha256`, in the order of
    ``stats``, where the caller has them (hashing reads every weight). ``contexts_drawn``: how ``tokens_NT`` was
    read from the corpus (:func:`~.build.contexts_drawn`), recorded in ``run_settings.json``. Returns a summary per
    SAE (a dict, or a list of them for several SAEs).
    """
    if isinstance(stats, Sequence):
        if len(stats) != 1:
            return [export_neuronpedia(s, tokens_NT, lm, Path(out) / s.source.name, dataset=dataset,
                                       model_id=model_id, layer=layer, sae_set=sae_set, sae_id_suffix=sae_id_suffix,
                                       n_bands=n_bands, n_features_per_batch=n_features_per_batch,
                                       include_dead=include_dead, overwrite=overwrite, key=key, inputs=inputs,
                                       sae_hashes=None if sae_hashes is None else [h], contexts_drawn=contexts_drawn)
                    for s, h in zip(stats, sae_hashes or [None] * len(stats))]
        stats = stats[0]
    if not isinstance(n_bands, int) or n_bands < 1:
        raise ConfigError(f"n_bands: expected a positive integer, got {n_bands!r}")
    check_export_options({"model_id": model_id, "layer": layer, "sae_set": sae_set, "sae_id_suffix": sae_id_suffix,
                          "n_features_per_batch": n_features_per_batch})
    out = Path(out)
    _check_target(out, overwrite)
    sae = stats.source.sae
    header = {"model_id": model_id or default_model_id(lm.name), "layer": _layer(sae.cfg.hook_name, layer),
              "sae_set": sae_set or _slug(stats.source.name), "sae_id_suffix": sae_id_suffix}
    alive = (stats.count_N > 0).tolist()
    exported = [i for i in range(sae.n_latents) if include_dead or alive[i]]
    skipped = [i for i in range(sae.n_latents) if not (include_dead or alive[i])]
    from saelab.explore.browser.build import first_scored

    # the tokens of each activation record (Neuronpedia's "context tokens per prompt"): BOS left out with position 0
    common = {"n_prompts_total": int(tokens_NT.shape[0]),
              "n_tokens_in_prompt": int(tokens_NT.shape[1]) - first_scored(sae), "dataset": dataset}
    features = FeatureWriter(stats, tokens_NT, lm, common, n_bands)
    written = datetime.now(timezone.utc).isoformat(timespec="seconds")
    settings = {"format": FORMAT, "generator": "saelab", "written": written, **header, "hook_name": sae.cfg.hook_name,
                "sae": public_name(stats.source.source),
                "sae_sha256": sae_hashes[0] if sae_hashes else sae_sha256(sae),
                "context_size": int(tokens_NT.shape[1]), "contexts_drawn": contexts_drawn,
                "n_latents": sae.n_latents, "n_exported": len(exported),
                "n_tokens_scored": stats.n_tokens, **common, "n_features_per_batch": n_features_per_batch}
    if inputs is not None:  # key None: this machine has no local key; a rerun then says so, not "other inputs"
        settings.update(key=key, inputs=inputs)

    def files():  # one batch in memory at a time
        for b, s in enumerate(range(0, len(exported), n_features_per_batch)):
            yield f"batch-{b}.json", {**header, "features": [features(i) for i in exported[s:s + n_features_per_batch]]}
        yield "skipped_indexes.json", {"model_id": header["model_id"], "layer": str(header["layer"]),
                                       "sae_set": header["sae_set"], "skipped_indexes": skipped}
        yield NEURONPEDIA_SETTINGS, settings

    _write_folder(out, files())
    return {"out": str(out), "batches": -(-len(exported) // n_features_per_batch), "features": len(exported),
            "skipped": len(skipped), **header}


class FeatureWriter:
    """Builds the feature dicts of one SAE (see the module docstring); ``writer(i)`` for latent i."""

    def __init__(self, stats, tokens_NT: torch.Tensor, lm, common: dict[str, Any], n_bands: int) -> None:
        from saelab.evals.probe_tasks import token_strings
        from saelab.explore.browser.build import direct_logit_effects, first_scored

        sae = stats.source.sae
        self.stats, self.common, self.n_bands = stats, common, n_bands
        self.s0 = first_scored(sae)  # an unscored first position (BOS) is left out of the records
        self.tokens = tokens_NT.numpy()
        logits = stats.logits
        if "hist_counts" not in logits:
            n_rows = logits["pos_ids"].shape[1] if "pos_ids" in logits else 10
            logits = direct_logit_effects(lm, sae, n_rows, hist_bins=LOGIT_HIST_BINS)
        self.logits = {k: v.numpy() for k, v in logits.items()}
        W = sae.W_dec.detach().float().cpu()
        top = W.topk(min(N_ALIGNMENT, W.shape[1]), dim=1)
        self.align = (top.indices.numpy(), top.values.numpy(), (top.values.abs() / W.abs().sum(1, keepdim=True)
                                                                .clamp_min(1e-30)).numpy())
        # token texts looked up by id in one array (a Python call per token would dominate the export)
        ids = np.unique(np.concatenate([self.tokens.ravel(), self.logits["pos_ids"].ravel(),
                                        self.logits["neg_ids"].ravel()]))
        self.vocab = np.empty(int(ids.max()) + 1, dtype=object)
        self.vocab[ids] = token_strings(lm.tokenizer, ids.tolist(), readable_bytes=True)
        self.top = tuple(t.numpy() for t in (stats.top_ctx_NK, stats.top_pos_NK, stats.top_rows_NKT))
        self.samples = tuple(t.numpy() for t in (stats.sample_act_NS, stats.sample_ctx_NS, stats.sample_pos_NS,
                                                 stats.sample_rows_NST))

    def text(self, ids: np.ndarray) -> list[str]:
        return self.vocab[ids].tolist()

    def __call__(self, i: int) -> dict[str, Any]:
        st, lg = self.stats, self.logits
        ai, av, al = self.align
        heights = st.hist_NH[i].numpy()
        used = np.flatnonzero(heights)
        first, last = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 0)
        width = float(st.hist_top_N[i]) / heights.shape[0]
        lo, hi, nb = float(lg["hist_lo"][i]), float(lg["hist_hi"][i]), lg["hist_counts"].shape[1]
        return {
            "feature_index": i,
            "neuron_alignment_indices": ai[i].tolist(), "neuron_alignment_values": _round(av[i]),
            "neuron_alignment_l1": _round(al[i]),
            "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
            "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
            "neg_str": self.text(lg["neg_ids"][i]), "neg_values": _round(lg["neg_vals"][i]),
            "pos_str": self.text(lg["pos_ids"][i]), "pos_values": _round(lg["pos_vals"][i]),
            "frac_nonzero": float(st.density_N[i]),
            "freq_hist_data_bar_values": _round((np.arange(first, last) + 0.5) * width),
            "freq_hist_data_bar_heights": heights[first:last].tolist(),
            "logits_hist_data_bar_heights": lg["hist_counts"][i].tolist(),
            "logits_hist_data_bar_values": _round(lo + (np.arange(nb) + 0.5) * (hi - lo) / nb),
            **self.common,
            "decoder_weights_dist": [],
            "activations": self.activations(i),
            "vector": [],
        }

    def activations(self, i: int) -> list[dict[str, Any]]:
        ctx, pos, rows = (a[i] for a in self.top)
        ok = ctx >= 0
        top_max = float(self.stats.max_N[i])
        out = [self.record(c, p, row, -1, top_max, -1) for c, p, row in zip(ctx[ok], pos[ok], rows[ok])]
        maxima, ctx, pos, rows = (a[i] for a in self.samples)
        ok = ctx >= 0
        maxima, ctx, pos, rows = maxima[ok], ctx[ok], pos[ok], rows[ok]
        order = np.argsort(maxima, kind="stable")
        bands = np.array_split(order, self.n_bands) if order.size else []
        for band in reversed(bands):  # highest first, as SAEDashboard lists its intervals
            if band.size:
                lo, hi, share = float(maxima[band].min()), float(maxima[band].max()), band.size / order.size
                out += [self.record(ctx[j], pos[j], rows[j], lo, hi, share) for j in band]
        return out

    def record(self, ctx, pos, row_T: np.ndarray, bin_min, bin_max, bin_contains) -> dict[str, Any]:
        """One context as an activation record (from the first scored position: BOS left out, as SAEDashboard)."""
        return {"bin_min": _num(bin_min), "bin_max": _num(bin_max), "bin_contains": _num(bin_contains),
                "tokens": self.text(self.tokens[int(ctx), self.s0:]), "values": _round(row_T[self.s0:]),
                "qualifying_token_index": int(pos) - self.s0}


def _round(x) -> list[float]:
    return np.round(np.asarray(x, dtype=np.float64), ROUND).tolist()


def _num(x: float) -> float | int:
    """-1 stays an integer as SAEDashboard writes it; other values are rounded floats."""
    return -1 if x == -1 else round(float(x), ROUND)


MODEL_ID_RULE = (re.compile(r"[a-z][a-z0-9.-]{0,30}[a-z0-9]"),
                 "2 to 32 lowercase letters, digits, hyphens and periods, from a letter to a letter or digit, "
                 "without '--' or '..' (as Neuronpedia's model ids: gpt2-small, gemma-2-2b)")
SAE_SET_RULE = (re.compile(r"[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?"),
                "1 to 64 lowercase letters, digits, hyphens, underscores and periods, from a letter or digit to "
                "one, without '__' (it parts the set from sae_id_suffix; as Neuronpedia's SAE sets: res-jb, "
                "res_scefr-ajt)")


def check_neuronpedia_ids(model_id: str | None, sae_set: str | None,
                          names: tuple[str, str] = ("model_id", "sae_set")) -> None:
    """Refuse a model id or SAE set Neuronpedia cannot take (they name its pages: /MODEL/LAYER-SET/INDEX),
    named as ``names`` say (the options on the command line)."""
    for value, name, rule in ((model_id, names[0], MODEL_ID_RULE), (sae_set, names[1], SAE_SET_RULE)):
        if value is not None and not _follows(value, rule):
            raise ConfigError(f"{name} {value!r}: expected {rule[1]}")


def check_export_options(options: dict[str, Any], caller: str = "export_neuronpedia") -> None:
    """The export's options (``EXPORT_OPTIONS`` and ``overwrite``, as passed to ``caller``), checked before
    any work: an unknown one is the TypeError Python raises for it, a bad value a ConfigError naming it."""
    unknown = [k for k in options if k not in (*EXPORT_OPTIONS, "overwrite")]
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    check_neuronpedia_ids(options.get("model_id"), options.get("sae_set"))
    per, layer, suffix = (options.get(k) for k in ("n_features_per_batch", "layer", "sae_id_suffix"))
    if "n_features_per_batch" in options and not whole_at_least(per, 1):  # None too: it has no default then
        raise ConfigError(f"n_features_per_batch: expected a positive integer, got {per!r}")
    if layer is not None and not whole_at_least(layer, 0):
        raise ConfigError(f"layer: expected the layer's number, an integer from 0 (or None: from the hook), "
                          f"got {layer!r}")
    if suffix is not None and not (isinstance(suffix, str) and SAE_SET_RULE[0].fullmatch(suffix)):
        raise ConfigError(f"sae_id_suffix {suffix!r}: expected 1 to 64 lowercase letters, digits, hyphens, "
                          "underscores and periods, from a letter or digit to one (or None)")


def _follows(value: Any, rule: tuple[re.Pattern, str]) -> bool:
    doubled = ("__",) if rule is SAE_SET_RULE else ("--", "..")
    return isinstance(value, str) and bool(rule[0].fullmatch(value)) and not any(d in value for d in doubled)


def default_ids(sources, lm, cfg, model_id: str | None, sae_set: str | None) -> tuple[str, str | None]:
    """The model id to write: ``model_id``, else drawn from the model's name as given (a folder by its own
    name, not by where a link to it leads) and made to follow Neuronpedia's rule; and, when that changed the
    name, a line that says so (None otherwise). A default SAE set Neuronpedia cannot take is
    refused before the model loads, with the option to pass instead."""
    from saelab.run_folder import model_for

    note = None
    if model_id is None:
        spec = getattr(lm, "name", lm) or cfg.model or model_for(sources[0].sae, sources[0].source)
        model_id = default_model_id(str(spec))
        if model_id != _base_name(str(spec)) and str(spec) != "default":  # the default's id is its hub name's
            note = (f"saelab: note: the Neuronpedia model id is {model_id!r}, made from the model's name {spec} by "
                    "Neuronpedia's rule for ids; pass model_id=ID (--model-id) for another")
    for s in sources if sae_set is None else []:
        if not _follows(_slug(s.name), SAE_SET_RULE):
            raise ConfigError(f"the default SAE set {_slug(s.name)!r}, drawn from the SAE's name {s.name}: expected "
                              f"{SAE_SET_RULE[1]}; pass one: sae_set=NAME (--sae-set)")
    return model_id, note


def default_model_id(name: str) -> str:
    """A Neuronpedia model id from ``lm.name``: the hub id's or folder's last part, lower case, made to follow
    MODEL_ID_RULE (other characters as '-', a doubled '-' or '.' single, 'model-' before a name that does not
    start with a letter or is one character long, cut to 32 characters)."""
    if name == "default":
        return "smollm2-135m-instruct"
    text = re.sub(r"([.-])\1+", r"\1", _slug(_base_name(name))).strip(".-")
    if not text[:1].isalpha() or len(text) < 2:
        text = f"model-{text}".rstrip("-")
    return text[:32].rstrip(".-")


def _base_name(name: str) -> str:
    return Path(name.rstrip("/")).name.removesuffix(".gguf")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.-]+", "-", text.lower()).strip("-")


def _layer(hook: str, layer: int | None) -> int:
    if layer is not None:
        return int(layer)
    m = re.match(r"blocks\.(\d+)\.", hook or "")
    if not m:
        raise ConfigError(f"hook {hook!r}: cannot read a layer number from it (expected 'blocks.L.*'); pass layer=")
    return int(m.group(1))


def _check_target(out: Path, overwrite: bool, key: str | None = None, inputs: dict[str, Any] | None = None,
                  corpus: str | None = None, unkeyed: dict[str, str] | None = None) -> dict[str, Any] | None:
    """None when ``out`` may be written; the earlier export's settings when it holds the export of ``key``
    (reused, unless ``overwrite``). One an earlier saelab recorded of this export (``unkeyed``: its plain key and
    hashes, from :func:`export_key`) may be written again. Anything else there is refused, naming what differs
    (``corpus``: as given now, for an earlier saelab's record of where it lay)."""
    from saelab.explore.browser.make import reusable, what_differs

    if not out.exists():
        return None
    if not out.is_dir():
        raise RunExistsError(f"{out}: exists and is not a folder; choose another export folder")
    if not any(out.iterdir()):
        return None
    try:
        earlier = json.loads((out / NEURONPEDIA_SETTINGS).read_text())
        ours = earlier.get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise RunExistsError(f"{out}: folder exists, is not empty and is not a saelab Neuronpedia export; "
                             "choose another export folder (it is never deleted)")
    if overwrite:
        refuse_others_files(out, _written_by_export, "a Neuronpedia export", "export folder")
        return None
    made_of = ""
    if inputs is not None and unkeyed is not None:  # what this export is made from is known: compared
        same = reusable(earlier, key, unkeyed, out / NEURONPEDIA_SETTINGS)
        if same is not False:  # None: this export as an earlier saelab recorded it, written again
            return earlier if same else None
        made_of = f" made from {what_differs(earlier.get('inputs'), inputs, corpus=corpus, unkeyed=unkeyed)}"
    raise RunExistsError(f"{out}: an earlier Neuronpedia export{made_of} is there; pass overwrite=True "
                         "(--overwrite) to replace it")


def export_key(sources, cfg, model_dtype: str, options: dict[str, Any],
               hashes: Sequence[str]) -> tuple[str | None, dict[str, Any], dict[str, str]]:
    """(key, inputs, unkeyed) of an export: the browser's key of its SAEs and settings (see ``make.build_key``)
    and the export's own options, at their defaults where not given. The SAEs are known by their weights
    (``hashes``: each one's :func:`sae_sha256`), not by where they lie, and the recorded settings name local
    files by their base names: the folder is shared with others. The key and the files' hashes in ``inputs`` are
    keyed by this machine's secret (a plain hash of where the corpus and a --model folder lie would confirm a
    guessed path); ``unkeyed``: the plain ones an earlier saelab recorded (``make.unkeyed_record``), to compare its
    records, never recorded now."""
    from saelab.explore.browser.build import first_scored
    from saelab.explore.browser.make import build_inputs, public_settings, unkeyed_hash, unkeyed_record

    given = inspect.signature(export_neuronpedia).parameters
    options = {name: options.get(name, given[name].default) for name in EXPORT_OPTIONS}
    by_source = {id(s): h for s, h in zip(sources, hashes)}

    def identify(source) -> str:
        return by_source[id(source)]

    # local files by where they lie, not by the path typed: the same corpus given from another folder is reused
    where = dataclasses.replace(cfg, corpus=_resolved(cfg.corpus), model=_resolved(cfg.model))
    unkeyed = unkeyed_record(sources, where, model_dtype, identify)
    parts = [FORMAT, unkeyed["key"], options]  # the browser's key as it was before it was keyed
    inputs = json.loads(json.dumps({**build_inputs(sources, cfg, model_dtype, identify), "export": options},
                                   default=str))
    if any(first_scored(s.sae) for s in sources):  # earlier exports of these counted BOS in n_tokens_in_prompt
        inputs["export_version"] = EXPORT_VERSION
        parts.append(EXPORT_VERSION)
    blob = json.dumps(parts, sort_keys=True, default=str)
    inputs["browse"] = public_settings(inputs["browse"])
    return keyed_hash(blob), inputs, {**unkeyed, "key": unkeyed_hash(blob)}


def _resolved(value: str | None) -> str | None:
    """A local file or folder by its absolute path; a URL, a hub id or a name as given."""
    local = local_path(value)
    return str(local) if local else value


EXPORT_OPTIONS = ("model_id", "layer", "sae_set", "sae_id_suffix", "n_features_per_batch", "include_dead")
"""export_neuronpedia's options that change what it writes (the rest come from the browser's settings)."""


def _reused(out: Path, earlier: dict[str, Any]) -> dict[str, Any]:
    """The summary export_neuronpedia returns, read back from an earlier export's run_settings.json."""
    n, per = int(earlier["n_exported"]), int(earlier["n_features_per_batch"])
    return {"out": str(out), "batches": -(-n // per), "features": n, "skipped": int(earlier["n_latents"]) - n,
            **{k: earlier[k] for k in ("model_id", "layer", "sae_set", "sae_id_suffix")}, "reused": True}


def _written_by_export(name: str) -> bool:
    return name in (NEURONPEDIA_SETTINGS, "skipped_indexes.json") or re.fullmatch(r"batch-\d+\.json", name) is not None


def _write_folder(out: Path, files) -> None:
    """Write every ``(name, JSON object)`` into a temporary folder beside ``out``, then put it in place."""
    with atomic_folder(out) as tmp:
        for name, obj in files:
            (tmp / name).write_text(json.dumps(obj, allow_nan=False, ensure_ascii=False), encoding="utf-8")


def export_neuronpedia_run(sae_sources, out: str | os.PathLike, cfg=None, *, lm=None, device=None,
                           model_dtype: str = "float32", progress: bool = True, allow_http: bool = False,
                           **kwargs) -> dict[str, Any] | list[dict[str, Any]]:
    """One browser pass over text for ``sae_sources`` (run folders, SAELens folders, OpenAI files) and
    their Neuronpedia export at ``out`` (see :func:`export_neuronpedia` for ``kwargs``). An export at ``out``
    of the same SAE files, settings and options is kept (its summary has ``"reused": True``) unless
    ``overwrite``; one of others is refused unless ``overwrite``, naming what differs. ``allow_http`` also
    downloads SAEs from plain http URLs."""
    from saelab.explore.browser.build import (
        SAESource,
        check_compatible,
        collect_statistics,
        contexts_drawn,
        direct_logit_effects,
        note_another_hook,
        note_another_model,
    )
    from saelab.data import corpus_name
    from saelab.explore.browser.make import (check_recorded_names, check_sizes, keyed_dtype, load_model_beside,
                                             note_no_key, open_sources)

    cfg = cfg or BrowseConfig()
    check_recorded_names(cfg)
    refuse_explanations(cfg)
    check_export_options(kwargs, "export_neuronpedia_run")  # before the SAEs and the model load
    one = isinstance(sae_sources, (str, os.PathLike, SAESource))
    sources, loaded_here = open_sources(sae_sources, allow_http=allow_http)
    for s in sources:  # a hook that names no layer: refused now, not after the pass
        _layer(s.sae.cfg.hook_name, kwargs.get("layer"))
    if kwargs.get("sae_set") is not None and len(sources) > 1:  # each SAE's pages would take the same address
        raise ConfigError(f"sae_set {kwargs['sae_set']!r} names one SAE's set, and {len(sources)} SAEs were given; "
                          "export each SAE with its own sae_set, or leave it out (each SAE's set is then its name)")
    model_id, note = default_ids(sources, lm, cfg, kwargs.get("model_id"), kwargs.get("sae_set"))
    hashes = [sae_sha256(s.sae) for s in sources]  # reads every weight: once per SAE, for the key and the record
    model_dtype = keyed_dtype(lm, model_dtype)
    key, inputs, unkeyed = export_key(sources, cfg, model_dtype, kwargs, hashes)
    targets = [Path(out)] if len(sources) == 1 else [Path(out) / s.name for s in sources]
    # before the model loads and the text is scored; an export of the same key is the same files
    earlier = [_check_target(t, kwargs.get("overwrite", False), key, inputs, cfg.corpus, unkeyed) for t in targets]
    if all(earlier):
        _say_what_was_left_out_or_made(sources, note)
        return _as_given([_reused(t, e) for t, e in zip(targets, earlier)], one)
    for t, e in zip(targets, earlier):  # the same export is rewritten with the others: its folder checked now
        if e is not None:
            refuse_others_files(t, _written_by_export, "a Neuronpedia export", "export folder")
    # after the reuse: an export built on a machine of more memory stays reusable on this one
    check_sizes(sources, cfg, site=False)  # the site's own sizes (neighbours, N2G) are not the export's
    kwargs["overwrite"] = True  # what is there now is the same export (the others were refused above)
    hook = check_compatible(sources, cfg.hook, cfg.model)
    chosen = lm or cfg.model  # None: the SAEs' own
    lm, drawn = load_model_beside(lm, cfg, sources, loaded_here, hook, device, model_dtype, progress=progress)
    tokens = drawn.tokens
    lm.check_hook(hook)
    note_another_hook(sources, hook)
    note_another_model(sources, chosen)
    stats, _, _ = collect_statistics(lm, sources, tokens, cfg, hook=hook, families=False, progress=progress)
    for st in stats:
        st.logits = direct_logit_effects(lm, st.source.sae, cfg.n_logits, hist_bins=LOGIT_HIST_BINS)
    result = export_neuronpedia(stats, tokens, lm, out, dataset=corpus_name(cfg.corpus, "eval"), n_bands=cfg.n_bands,
                                key=key, inputs=inputs, sae_hashes=hashes,
                                contexts_drawn=contexts_drawn(cfg, tokens.numel()), **{**kwargs, "model_id": model_id})
    _say_what_was_left_out_or_made(sources, note)  # once written: a refusal on the way is the one line to read
    note_no_key(key, out, "Neuronpedia export")
    return _as_given([{**r, "reused": False} for r in (result if isinstance(result, list) else [result])], one)


def _as_given(summaries: list[dict[str, Any]], one: bool) -> dict[str, Any] | list[dict[str, Any]]:
    """One summary for one SAE (or one source given), else the list."""
    return summaries[0] if one or len(summaries) == 1 else summaries


def _say_what_was_left_out_or_made(sources, model_id_note: str | None) -> None:
    """The lines an export written or reused prints on stderr: the explanations it leaves out, and the model
    id it made from the model's name (``default_ids``' note)."""
    _say_explanations_left_out(sources)
    if model_id_note:
        print(model_id_note, file=sys.stderr)


def _say_explanations_left_out(sources) -> None:
    """One line on stderr per run folder that keeps N2G explanations (those its site shows): the batch
    files have no place for them (module docstring), and they were left out without a word."""
    from saelab.explore.browser.build import run_explanations

    for source in sources:
        explained = run_explanations(source.run_dir, source.sae) if source.run_dir is not None else {}
        if explained:
            print(f"saelab: warning: the run {source.source} keeps N2G explanations of {len(explained)} latent(s); "
                  "the Neuronpedia export leaves them out (SAEDashboard's batch files have no place for them): "
                  f"browse {source.source} without --export shows them", file=sys.stderr)


def refuse_explanations(cfg, given_as: Callable[[str], str | None] = lambda setting: None) -> None:
    """Refuse the browser's N2G settings: the batch files have no place for an explanation (module
    docstring), so they would be dropped without a word. ``given_as("browse.n2g_file")``: how the user gave
    the setting (an option as typed, or a --config file's entry), named so in the refusal; None: its name."""
    default = BrowseConfig()
    for field in ("n2g_file", "n2g_n_latents", "n2g_padding_token"):
        value = getattr(cfg, field)
        if value != getattr(default, field):
            shown = repr(value) if field == "n2g_padding_token" else value
            lead, entry = given_parts(given_as(f"browse.{field}") or f"browse.{field}")
            raise ConfigError(f"{lead}{entry} {shown}: the Neuronpedia export (--export "
                              "neuronpedia) has no place for N2G explanations (SAEDashboard's batch files hold "
                              f"none); leave {entry} out, or build the site (browse without --export) to show them")
