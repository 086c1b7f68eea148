"""Top-activating contexts of chosen latents, and a latent's largest activation, over real text.

    from saelab.explore import top_activations, latent_max_activation
    top = top_activations("runs/quickstart", "default", None, latent=123, k=10)   # None: offline eval text
    top.max_acts[0], "".join(top.str_tokens[0]), top.acts[0]
    scale = latent_max_activation(sae, lm, None, 123)      # steer with e.g. 2 x this value

The numbers are the feature browser's (:mod:`saelab.explore.browser.build`) and come from the same
one-pass code (:func:`~saelab.explore.browser.build.encoded_batches`, the running top-k of
:mod:`saelab.explore.browser.stats`), restricted to the latents asked for:

- contexts of ``context_size`` tokens packed from the corpus, BOS first, drawn at random (seed 0) from its
  first ``sample_pool_tokens`` tokens as ``saelab eval`` draws its contexts, so that they come from many
  documents (0: the first contexts, in order); position 0 is not scored when the SAE left it out of training
  (its activation reads 0);
- one entry per context, ranked by the latent's largest activation in that context (ties go to the
  context read first); contexts where the latent never fires are not listed, so fewer than ``k``
  entries come back for a rare latent;
- ``acts`` holds the latent's TopK+ReLU value at every position of the context;
- each context is numbered by its place in the corpus's stream of contexts (``context_idx``, "ctx N" in the text:
  0 is the first context packed from the corpus's start), not by its row among those drawn; contexts given as a
  token tensor by their row.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from saelab.errors import ConfigError, ShapeMismatchError
from saelab.data import DrawnContexts, resolve_corpus
from saelab.explore.browser.build import (
    SAESource,
    check_compatible,
    context_payload,
    contexts_drawn,
    contexts_read,
    contexts_read_words,
    encoded_batches,
    first_scored,
    open_sae_source,
    top_contexts_state,
)
from saelab.explore.browser.stats import context_maxima, select_latents
from saelab.explore.config import BrowseConfig
from saelab.sae.config import check_latents_once
from saelab.sae.topk import TopKSAE
from saelab.utils.config import given_parts
from saelab.utils.words import ESCAPED, plural


@dataclass
class TopActivations:
    """The top-activating contexts of one latent, best first (``K <= k`` entries)."""

    latent: int
    max_acts: torch.Tensor
    """``[K]`` the latent's largest activation in each context, descending."""
    context_idx: torch.Tensor
    """``[K]`` each context's place in the corpus's stream of contexts (0: the first packed from its start), where
    its text can be found again; of contexts given as a token tensor, its row there."""
    max_pos: torch.Tensor
    """``[K]`` first position of the context where the latent reaches that maximum."""
    tokens: torch.Tensor
    """``[K, T]`` token ids of each context (BOS first)."""
    acts: torch.Tensor
    """``[K, T]`` the latent's activation at every position (0 where inactive or unscored)."""
    str_tokens: list[list[str]]
    """Text of every token of each context (joined, they spell the context)."""
    n_tokens: int
    """Tokens scored over all contexts read."""
    contexts_drawn: str = "given as a token tensor"
    """How the contexts were read from a text corpus (:func:`~saelab.explore.browser.build.contexts_drawn`)."""

    def __len__(self) -> int:
        return int(self.max_acts.numel())

    @property
    def max_activation(self) -> float:
        """The latent's largest activation over all tokens scored (0.0 if it never fired)."""
        return float(self.max_acts[0]) if len(self) else 0.0

    def to_text(self, before: int = 16, after: int = 8) -> str:
        """One line per context: rank, max, "ctx" and the context's place in the corpus (``context_idx``), and the
        tokens around the max, the max token in [[ ]]."""
        lines = [f"latent {self.latent}: max {self.max_activation:.4g} over {self.n_tokens:,} "
                 f"{plural(self.n_tokens, 'token')}, {len(self)} top {plural(len(self), 'context')}; contexts "
                 f"{self.contexts_drawn}"]
        for rank, (c, m, p, strs) in enumerate(zip(self.context_idx.tolist(), self.max_acts.tolist(),
                                                   self.max_pos.tolist(), self.str_tokens), start=1):
            left = "".join(strs[max(0, p - before):p])
            right = "".join(strs[p + 1:p + 1 + after])
            text = f"{left}[[{strs[p]}]]{right}".translate(ESCAPED)
            lines.append(f"{rank:3d}  {m:9.4g}  ctx {c:<7d} {text}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (for ``json.dumps``)."""
        return {"latent": self.latent, "max_activation": self.max_activation, "n_tokens": self.n_tokens,
                "contexts_drawn": self.contexts_drawn,
                "contexts": [{"context": int(c), "max": float(m), "max_pos": int(p), "tokens": t.tolist(),
                              "str_tokens": s, "acts": a.tolist()}
                             for c, m, p, t, a, s in zip(self.context_idx, self.max_acts, self.max_pos, self.tokens,
                                                         self.acts, self.str_tokens)]}


def _is_many(latent) -> bool:
    """A list (or 1-D tensor or array) of latents rather than one index (an int, numpy or 0-d tensor integer)."""
    if isinstance(latent, torch.Tensor):
        return latent.dim() > 0
    if isinstance(latent, np.bool_):  # no index (refused as one), yet not a list
        return False
    try:
        operator.index(latent)
    except TypeError:
        return True
    return False


def _index(i) -> int:
    """One latent index; a bool is refused (True would read as latent 1), as is anything not an integer."""
    if isinstance(i, (bool, np.bool_)) or isinstance(i, torch.Tensor) and i.dtype == torch.bool:
        raise ConfigError(f"latent: expected a latent index (an integer), got {i!r}")
    try:
        return operator.index(i)
    except TypeError:
        raise ConfigError(f"latent: expected a latent index (an integer) or a list of them, got {i!r}") from None


def _latent_list(latent: int | Sequence[int], n_latents: int) -> list[int]:
    try:
        items = list(latent) if _is_many(latent) else [latent]
    except TypeError:  # neither an index nor a list (2.5, None)
        items = [latent]
    lats = [_index(i) for i in items]
    if not lats:
        raise ConfigError("latent: expected a latent index or a non-empty list of them, got an empty list")
    bad = [i for i in lats if not 0 <= i < n_latents]
    if bad:
        raise ConfigError(f"latent {bad[0]} is out of range: the SAE has latents 0..{n_latents - 1}")
    check_latents_once(lats)
    return lats


def _source(sae, allow_http: bool = False) -> tuple[SAESource, bool]:
    """The SAE as a source, and whether the caller gave it loaded: a given one stays where the caller put it,
    one loaded here runs beside the model (``allow_http``: also from a plain http URL)."""
    if isinstance(sae, SAESource):
        return sae, True
    if isinstance(sae, TopKSAE):
        return SAESource("sae", "the SAE given", sae), True
    return open_sae_source(sae, allow_http=allow_http), False


def _check_corpus(corpus) -> None:
    """A corpus of the wrong type or a missing file is named before the model loads."""
    if isinstance(corpus, (torch.Tensor, DrawnContexts)):
        return
    if corpus is not None and not isinstance(corpus, (str, os.PathLike)):
        raise ConfigError(f"corpus: expected a path, a dataset name, a token tensor, drawn contexts or None, "
                          f"got {type(corpus).__name__}")
    resolve_corpus(None if corpus is None else str(corpus), "eval")


def _check_token_tensor(tokens: torch.Tensor, sae: TopKSAE) -> None:
    if tokens.dim() != 2 or tokens.dtype != torch.long or tokens.shape[1] - first_scored(sae) < 1:
        raise ShapeMismatchError(f"corpus: a token tensor must be a LongTensor [contexts, tokens] with at least "
                                 f"{first_scored(sae) + 1} {plural(first_scored(sae) + 1, 'token')} per context, got "
                                 f"{tokens.dtype} "
                                 f"{list(tokens.shape)}")


DEFAULT_K = 16
"""top_activations' contexts per latent when none are asked for."""


def check_k(k: int, sae: TopKSAE, n_tokens: int, named: tuple[str, str], context_size: int | None = None) -> None:
    """Refuse, before the model loads, more contexts per latent than ``n_tokens`` of text make (``saelab top -n``
    given past them; :func:`top_activations` lists them all): each context is listed once. ``named``: how the
    caller names k and n_tokens (a --config file's entry leading)."""
    n, T, first = contexts_read([sae], BrowseConfig(n_tokens=n_tokens, context_size=context_size))
    if k > n:
        lead, entry = given_parts(named[0])
        read = contexts_read_words(n, T, first, f"{given_parts(named[1])[1]} {n_tokens:,}")
        raise ConfigError(f"{lead}{entry} {k:,}: expected at most {read}: a latent lists each context once")


def _model_and_contexts(lm, source: SAESource, given: bool, corpus, hook: str, cfg: BrowseConfig | None,
                        progress: bool) -> tuple[Any, DrawnContexts]:
    """The model (loaded here unless ``lm`` is one) and the contexts: given (a LongTensor ``[N, T]``, numbered by
    its rows, or :class:`DrawnContexts`), or drawn from the corpus as ``cfg`` says (None for given ones), as the
    browser draws them, with a corpus too short for ``cfg.n_tokens`` refused before the load where the model's
    tokenizer can be had without it (``load_model_beside``)."""
    from saelab.explore.browser.make import load_model_beside
    from saelab.models import LanguageModel, check_before_load, load_model, model_provenance
    from saelab.models.lm import check_token_ids
    from saelab.models.loading import configured_vocab_size
    from saelab.run_folder import model_for

    loaded_here = [] if given else [source]
    if cfg is not None:
        return load_model_beside(lm, cfg, [source], loaded_here, hook, progress=progress)
    drawn, corpus = (corpus, corpus.tokens) if isinstance(corpus, DrawnContexts) else (None, corpus)
    _check_token_tensor(corpus, source.sae)
    if drawn is None:  # a tensor's contexts are numbered by their rows
        drawn = DrawnContexts(corpus, None, torch.arange(corpus.shape[0]))
    spec = lm if lm is not None else model_for(source.sae, source.source)
    if not isinstance(spec, LanguageModel):  # before the load where the config is on disk, as for a text corpus
        check_before_load(spec, hook, recorded_context=corpus.shape[1], recorded_named="corpus: contexts of {n} tokens",
                          sae=source.sae)
        check_token_ids(corpus, configured_vocab_size(spec), model_provenance(spec)["model_name"], "corpus")
    lm = load_model(spec, progress=progress)
    check_token_ids(corpus, lm.n_input_ids, lm.known_as, "corpus")  # before the scan, not at its failing batch
    for s in loaded_here:
        s.sae.to(lm.device)
    return lm, drawn


@torch.no_grad()
def top_activations(sae, lm=None, corpus=None, latent: int | Sequence[int] = 0, k: int = DEFAULT_K, *,
                    n_tokens: int = 262_144, context_size: int | None = None, hook: str | None = None,
                    batch_size: int = 16, progress: bool = False, allow_http: bool = False,
                    sample_pool_tokens: int = BrowseConfig.sample_pool_tokens
                    ) -> TopActivations | list[TopActivations]:
    """The ``k`` top-activating contexts of ``latent`` (an index, or a list: one result per entry). ``k`` past the
    contexts read lists them all (``saelab top`` refuses a ``-n`` given past them: :func:`check_k`).

    ``sae``: a :class:`~saelab.sae.TopKSAE`, or a run folder / SAELens folder / OpenAI ``.pt`` file or URL.
    ``lm``: a :class:`~saelab.models.LanguageModel` or a model name (None: the SAE's model).
    ``corpus``: a text file or folder, a Hugging Face dataset name, a LongTensor ``[N, T]`` of
    contexts (ids of the model's vocabulary), contexts :func:`~saelab.data.draw_contexts` drew (numbered by their
    ``index``), or None for the offline Wikipedia eval split; ``n_tokens`` tokens
    are read from a text corpus (rounded up to whole contexts), drawn at random (seed 0) from its first
    ``sample_pool_tokens`` tokens as ``saelab eval`` draws its contexts (0: its first contexts, in order; the
    result's ``contexts_drawn`` says how), given contexts all, in their order. ``hook`` overrides the SAE's
    own hook name. A model loaded here is loaded after the checks that need none: a corpus too short for
    ``n_tokens`` is refused before it. ``allow_http``
    also downloads the SAE from a plain http URL. ``progress``: bars over the scan and over that load.
    """
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k: expected a positive number of contexts, got {k!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:  # before the text is read
        raise ConfigError(f"batch_size: expected a positive number of contexts per forward, got {batch_size!r}")
    _check_corpus(corpus)
    text = not isinstance(corpus, (torch.Tensor, DrawnContexts))  # given contexts are read whole: no text settings
    cfg = BrowseConfig(n_tokens=n_tokens, corpus=None if corpus is None else str(corpus), context_size=context_size,
                       sample_pool_tokens=sample_pool_tokens) if text else None
    source, given = _source(sae, allow_http)
    sae = source.sae
    lats = _latent_list(latent, sae.n_latents)
    hook = check_compatible([source], hook, None)
    lm, drawn = _model_and_contexts(lm, source, given, corpus, hook, cfg, progress)
    tokens_NT = drawn.tokens
    lm.check_hook(hook)
    sae.check_input(torch.empty(0, lm.hook_width(hook)), name=f"activations at {hook} of {lm.known_as}")
    # a latent lists each context once: k past the contexts read lists them all (k = 10^8 had filled the memory)
    k = min(k, tokens_NT.shape[0])
    top = _scan(lm, sae, tokens_NT, hook, torch.tensor(lats), k, batch_size, progress)  # distinct (_latent_list)
    n_scored = tokens_NT.shape[0] * (tokens_NT.shape[1] - first_scored(sae))
    words = (contexts_drawn(cfg, tokens_NT.numel()) if text else "given as drawn contexts"
             if isinstance(corpus, DrawnContexts) else TopActivations.contexts_drawn)
    results = [_result(lat, j, top, drawn, lm.tokenizer, n_scored, words) for j, lat in enumerate(lats)]
    return results if _is_many(latent) else results[0]


def _scan(lm, sae: TopKSAE, tokens_NT: torch.Tensor, hook: str, latents_L: torch.Tensor, k: int, batch_size: int,
          progress: bool):
    """The browser's pass with a running top-k over the chosen latents only."""
    L = latents_L.numel()
    top = top_contexts_state(L, k, tokens_NT.shape[1])
    for ctx_B, [(vals, idx)] in encoded_batches(lm, [sae], tokens_NT, hook, batch_size, progress=progress,
                                                desc="top"):
        vals, idx = select_latents(vals, idx, latents_L, sae.n_latents)
        max_LB, pos_LB = context_maxima(vals, idx, L)
        top.update(max_LB, context_payload(vals, idx, L, ctx_B, pos_LB))
    return top


def _result(latent: int, row: int, top, drawn: DrawnContexts, tokenizer, n_scored: int,
            words: str) -> TopActivations:
    from saelab.evals.probe_tasks import token_strings

    filled = torch.isfinite(top.score_NK[row])
    ctx = top.payload["ctx"][row][filled]  # rows of the contexts read
    toks = drawn.tokens[ctx]
    cache: dict[int, str] = {}
    str_tokens = [token_strings(tokenizer, t.tolist(), cache, readable_bytes=True) for t in toks]
    return TopActivations(latent=latent, max_acts=top.score_NK[row][filled].clone(), context_idx=drawn.index[ctx],
                          max_pos=top.payload["pos"][row][filled].clone(), tokens=toks.clone(),
                          acts=top.payload["rows"][row][filled].clone(), str_tokens=str_tokens, n_tokens=n_scored,
                          contexts_drawn=words)


def latent_max_activation(sae, lm=None, corpus=None, latent: int | Sequence[int] = 0, *, n_tokens: int = 262_144,
                          context_size: int | None = None, hook: str | None = None, batch_size: int = 16,
                          progress: bool = False, allow_http: bool = False,
                          sample_pool_tokens: int = BrowseConfig.sample_pool_tokens) -> float | list[float]:
    """The latent's largest activation over the text read (0.0 if it never fires there): the unit for
    steering strengths given as multiples of it (``value = scale * latent_max_activation(...)``).

    The same number as the feature browser's "max" for the same text; arguments as :func:`top_activations`.
    """
    res = top_activations(sae, lm, corpus, latent, 1, n_tokens=n_tokens, context_size=context_size, hook=hook,
                          batch_size=batch_size, progress=progress, allow_http=allow_http,
                          sample_pool_tokens=sample_pool_tokens)
    return [r.max_activation for r in res] if isinstance(res, list) else res.max_activation
