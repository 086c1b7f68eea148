"""A Hugging Face causal LM with TransformerLens-named hook points.

``LanguageModel`` wraps a model and its tokenizer and offers what SAE work needs: activations at a
hook (with a truncated forward that stops right after the hooked layer), several activations at
once, logits and per-token cross-entropy with activations replaced by arbitrary functions (an SAE
splice), and a context manager that keeps such replacements installed for any call (generation).
See ``saelab.models.hooks`` for what each hook name means.

Inputs are packed token contexts, a LongTensor ``[B, T]``; no attention mask or padding is used.
"""

from __future__ import annotations

import contextlib
import reprlib
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from saelab.errors import ConfigError, ShapeMismatchError
from saelab.models.hooks import (
    HookSet,
    Layout,
    StopForward,
    all_hook_names,
    apply_edit,
    detect_layout,
    forward_from,
    hook_position,
    parse_hook,
    resume_layer,
    unique,
)

Edits = Mapping[str, Callable[[torch.Tensor], torch.Tensor]]


CONTEXT_SETTING = "context_size={n}"
"""How a context-length refusal names a context the settings gave (the command line words it as its option)."""
SAE_CONTEXT = "the SAE's context of {n} tokens"
"""How it names the context an SAE recorded, read where no setting gave one."""


def context_named(setting: int | None) -> str:
    """How a refusal names a context: ``setting``'s name when one was given, else the SAE's own."""
    return CONTEXT_SETTING if setting else SAE_CONTEXT


def check_token_ids(tokens: torch.Tensor, n_ids: int | None, model: str | Callable[[], str],
                    named: str = "tokens") -> None:
    """Refuse ids outside ``0..n_ids-1`` (the rows of ``model``'s input embedding; None: not known yet): an
    embedding lookup past them is an IndexError on the CPU and a device-side assert that ends the process on CUDA.
    ``model``: its name, or what gives it (asked only for a refusal: every forward checks its tokens)."""
    if n_ids is None or tokens.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(tokens)).tolist()  # one read back from a GPU, not two
    if low < 0 or high >= n_ids:
        raise ShapeMismatchError(f"{named}: id {low if low < 0 else high} is outside the vocabulary of "
                                 f"{model() if callable(model) else model} (ids 0..{n_ids - 1})")


def bos_token_id(tokenizer) -> int | None:
    """The id a context starts with: the tokenizer's BOS, else its EOS (for tokenizers that name no BOS)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else tokenizer.eos_token_id


_SHORT = reprlib.Repr()  # what an error shows of a wrong input: a pasted document cut to a line
_SHORT.maxstring, _SHORT.maxother = 100, 100

class LanguageModel:
    """An HF causal LM (frozen, eval mode) plus its tokenizer, with hook points by name.

    Build one with ``saelab.models.load_model`` or directly from a model and a tokenizer.
    """

    def __init__(self, model: nn.Module, tokenizer, name: str | None = None) -> None:
        self.layout: Layout = detect_layout(model)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.family = self.layout.family
        self.n_layers = len(self.layout.blocks)
        self.d_model = int(model.config.hidden_size)
        out_emb = model.get_output_embeddings()
        self.vocab_size = int(out_emb.weight.shape[0]) if out_emb is not None else int(model.config.vocab_size)
        self.bos_token_id = bos_token_id(tokenizer)
        longest = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        self.max_context: int | None = int(longest) if longest else None
        """The longest context the model was built for (None: its config does not say)."""

    def __repr__(self) -> str:
        return (
            f"LanguageModel({self.name!r}, family={self.family}, n_layers={self.n_layers}, "
            f"d_model={self.d_model}, vocab_size={self.vocab_size}, device={self.device})"
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- hook names -------------------------------------------------------------------------
    def hook_names(self) -> list[str]:
        """Every valid hook name, layer by layer in forward order."""
        return all_hook_names(self.layout)

    def check_hook(self, name: str) -> str:
        """Return ``name`` if this model has that hook; else raise HookNameError saying why."""
        parse_hook(name, self.layout, self.known_as)
        return name

    def hook_width(self, name: str) -> int:
        """Size of the last dimension of the activation at ``name`` (d_model for every hook)."""
        self.check_hook(name)
        return self.d_model

    @property
    def n_input_ids(self) -> int | None:
        """How many token ids the model reads: the rows of its input embedding (None where it has none that says)."""
        embedding = self.model.get_input_embeddings()
        rows = getattr(embedding, "num_embeddings", None)
        weight = getattr(embedding, "weight", None)
        return int(rows) if rows is not None else int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None

    @property
    def known_as(self) -> str:
        """The model as reports and refusals name it: ``name``, the offline default by its hub id."""
        from saelab.models.loading import model_provenance  # loading builds on this module

        return model_provenance(self.name)["model_name"]

    def check_context_size(self, T: int, named: str = CONTEXT_SETTING) -> int:
        """``T`` if the model takes contexts that long, else ConfigError (before any forward runs); ``named``
        says where ``T`` came from (by default the setting). The model is named as ``check_context_fits`` names
        it before the load (the offline default by its hub id)."""
        if self.max_context is not None and T > self.max_context:
            raise ConfigError(f"{named.format(n=T)} exceeds the longest context of {self.known_as} "
                              f"({self.max_context} tokens)")
        return T

    # -- tokens -----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (no BOS/EOS added)."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of strings, got a single str; wrap it in a list")
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def to_tokens(self, text: str | Sequence[str], prepend_bos: bool = True, move_to_device: bool = True
                  ) -> torch.Tensor:
        """Token ids as a LongTensor ``[batch, seq]``, as TransformerLens' ``to_tokens``: one row per text
        (a single str gives one row), BOS first when ``prepend_bos`` (saelab's contexts all start with
        it), no other special tokens; rows of a list are right-padded with the pad token (EOS if none)."""
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise ConfigError(f"to_tokens takes a str or a non-empty list of str, got {type(text).__name__}")
        rows = [[self.bos_token_id, *ids] if prepend_bos else ids for ids in self.tokenize(texts)]
        width = max(len(ids) for ids in rows)
        if width == 0:
            raise ConfigError("to_tokens: the text is empty and prepend_bos=False, so there is no token")
        pad = next((t for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, self.bos_token_id)
                    if t is not None))
        tokens_BT = torch.full((len(rows), width), pad, dtype=torch.long)
        for b, ids in enumerate(rows):
            tokens_BT[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens_BT.to(self.device) if move_to_device else tokens_BT

    def as_tokens(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """``tokens_BT`` as a LongTensor [batch, seq] of ids the model has, on its device, or a one-line error."""
        texts = isinstance(tokens_BT, (list, tuple)) and tokens_BT and all(isinstance(t, str) for t in tokens_BT)
        if isinstance(tokens_BT, (str, bytes)) or texts:  # torch's refusal, deep in the caller: new(): invalid data type
            raise ShapeMismatchError(f"tokens must be an integer tensor [batch, seq], got the text "
                                     f"{_SHORT.repr(tokens_BT)}; "
                                     "tokenize it first: saelab.explore.steering.prompt_tokens(lm, text) gives its "
                                     "ids [1, T], BOS first")
        if not isinstance(tokens_BT, torch.Tensor):
            try:
                tokens_BT = torch.as_tensor(tokens_BT)
            except (TypeError, ValueError, RuntimeError):  # rows of unequal length, objects that are no numbers
                raise ShapeMismatchError(f"tokens must be an integer tensor [batch, seq], "
                                         f"got {_SHORT.repr(tokens_BT)}") from None
        if tokens_BT.ndim != 2 or tokens_BT.dtype not in (torch.int64, torch.int32):
            raise ShapeMismatchError(
                f"tokens must be an integer tensor [batch, seq], got {tokens_BT.dtype} of shape "
                f"{tuple(tokens_BT.shape)}"
            )
        check_token_ids(tokens_BT, self.n_input_ids, lambda: self.known_as)
        return tokens_BT.to(self.device, torch.long)

    # -- hooks ------------------------------------------------------------------------------
    def _hook_set(
        self,
        edits: Edits | None = None,
        reads: Sequence[str] = (),
        store: dict[str, torch.Tensor] | None = None,
        stop_when_done: bool = False,
    ) -> HookSet:
        parsed_edits = {}
        for name, fn in (edits or {}).items():
            layer, kind = parse_hook(name, self.layout, self.known_as)
            if not callable(fn):
                raise TypeError(f"edit for hook {name!r} must be callable, got {type(fn).__name__}")
            parsed_edits[name] = (layer, kind, fn)
        parsed_reads = {name: parse_hook(name, self.layout, self.known_as) for name in unique(reads)}
        return HookSet(self.layout, parsed_edits, parsed_reads, store, stop_when_done)

    @contextlib.contextmanager
    def hooked(self, edits: Edits) -> Iterator["LanguageModel"]:
        """Replace each hook's activation by ``fn(act)`` for every forward inside the block.

        Hooks are removed on exit, also on error. Gradients are not disabled here, so an edit
        may be trained through (e.g. an SAE spliced into the model).
        """
        hooks = self._hook_set(edits).attach()
        try:
            yield self
        finally:
            hooks.remove()

    def _forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens_BT, use_cache=False).logits

    @torch.no_grad()
    def run_with_cache(
        self, tokens_BT: torch.Tensor, hooks: Sequence[str], stop_early: bool = False
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Activations at ``hooks`` (each ``[B, T, D]``) and the logits ``[B, T, V]``.

        With ``stop_early`` the forward stops once the last requested activation exists and the
        logits are None; the activations are the same tensors a full forward produces.
        """
        if isinstance(hooks, str):
            hooks = [hooks]
        tokens_BT = self.as_tokens(tokens_BT)
        store: dict[str, torch.Tensor] = {}
        hook_set = self._hook_set(reads=hooks, store=store, stop_when_done=stop_early)
        if stop_early and not hook_set.n_reads:
            return None, store
        logits = None
        hook_set.attach()
        try:
            logits = self._forward(tokens_BT)
        except StopForward:
            pass
        finally:
            hook_set.remove()
        if stop_early:
            logits = None
        return logits, {name: store[name] for name in unique(hooks)}

    def activations(self, tokens_BT: torch.Tensor, hook: str) -> torch.Tensor:
        """Activation ``[B, T, D]`` at one hook, from a forward that stops after producing it."""
        return self.run_with_cache(tokens_BT, [hook], stop_early=True)[1][hook]

    @torch.no_grad()
    def logits(self, tokens_BT: torch.Tensor, edits: Edits | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` of a full forward, each edited hook's activation replaced by ``fn(act)``."""
        tokens_BT = self.as_tokens(tokens_BT)
        with self.hooked(edits or {}):
            return self._forward(tokens_BT)

    @torch.no_grad()
    def logits_from(
        self, hook: str, acts_BTD: torch.Tensor, tokens_BT: torch.Tensor, edits: Edits | None = None
    ) -> torch.Tensor:
        """Logits ``[B, T, V]`` of the forward in which the activation at ``hook`` is ``acts_BTD``.

        Equal to ``logits(tokens_BT, {hook: lambda _: acts_BTD, **edits})``; an edit at ``hook``
        itself receives ``acts_BTD``, and edits at hooks before ``hook`` are refused. For
        ``resid_pre``/``resid_post`` hooks only the layers after the hook run, so with ``acts_BTD``
        from ``activations(tokens_BT, hook)`` the layers below are computed once for any number
        of edited continuations; the model's own code still builds masks and positions from
        ``tokens_BT``. Other hooks (attn_out, resid_mid, mlp_out) do not determine the residual
        stream, so for them the full forward runs with ``acts_BTD`` patched in.
        """
        layer, kind = parse_hook(hook, self.layout, self.known_as)
        tokens_BT = self.as_tokens(tokens_BT)
        if acts_BTD.shape != (*tokens_BT.shape, self.hook_width(hook)):
            raise ShapeMismatchError(
                f"activation given for hook {hook!r} has shape {tuple(acts_BTD.shape)}, expected "
                f"{(*tokens_BT.shape, self.hook_width(hook))} (tokens' [batch, seq] and the hook width)"
            )
        acts_BTD = acts_BTD.to(self.device)
        edits = dict(edits or {})
        self._hook_set(edits)  # names and callables checked before anything runs
        self._check_after(hook, edits)
        at_hook = edits.pop(hook, None)
        start = resume_layer(layer, kind) if self.layout.skippable else None
        if start is None:
            edits[hook] = (lambda _: at_hook(acts_BTD)) if at_hook else (lambda _: acts_BTD)
            return self.logits(tokens_BT, edits)
        if at_hook is not None:
            acts_BTD = apply_edit(hook, at_hook, acts_BTD)
        with forward_from(self.layout, start, acts_BTD, hook), self.hooked(edits):
            return self._forward(tokens_BT)

    def _check_after(self, hook: str, edits: Edits) -> None:
        """Refuse edits at hooks that come before ``hook`` (a forward resumed there would skip them)."""
        position = hook_position(*parse_hook(hook, self.layout, self.known_as))
        for name in edits:
            if hook_position(*parse_hook(name, self.layout, self.known_as)) < position:
                raise ConfigError(f"edit at hook {name!r} comes before {hook!r}, where the forward is resumed; "
                                  f"expected edits at {hook!r} or later hooks")

    @torch.no_grad()
    def cross_entropy(
        self, tokens_BT: torch.Tensor, edits: Edits | None = None, reduction: str = "none"
    ) -> torch.Tensor:
        """Next-token cross-entropy: entry ``[b, t]`` is the loss of predicting token t+1 at position t.

        ``reduction``: 'none' gives ``[B, T-1]``; 'mean' and 'sum' reduce over all of it.
        Computed in float32 one sequence at a time, so at most one ``[T, V]`` float32 copy of
        the logits exists beside the logits themselves.
        """
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        tokens_BT = self.as_tokens(tokens_BT)
        if tokens_BT.shape[1] < 2:
            raise ShapeMismatchError(
                f"cross_entropy needs at least 2 tokens per sequence, got shape {tuple(tokens_BT.shape)}"
            )
        logits_BTV = self.logits(tokens_BT, edits)
        targets_BT = tokens_BT[:, 1:]
        ce_BT = torch.empty(targets_BT.shape, dtype=torch.float32, device=logits_BTV.device)
        for b in range(tokens_BT.shape[0]):
            ce_BT[b] = F.cross_entropy(logits_BTV[b, :-1].float(), targets_BT[b], reduction="none")
        del logits_BTV
        if reduction == "mean":
            return ce_BT.mean()
        if reduction == "sum":
            return ce_BT.sum()
        return ce_BT
