"""Hook points with TransformerLens names, mapped onto Hugging Face modules.

Names: ``blocks.{L}.hook_resid_pre | hook_attn_out | hook_resid_mid | hook_mlp_out | hook_resid_post``.

Convention (raw HF weights: no LayerNorm folding, no weight centring, no other processing;
TransformerLens agrees only when loaded with ``fold_ln=False, center_writing_weights=False``):

- ``resid_pre``  = the input of decoder layer L (layer 0: token embeddings, plus position
  embeddings for GPT-2; any embedding scale the model applies is included).
- ``attn_out``   = the attention module's output (after its output projection), as added to the residual.
- ``resid_mid``  = ``resid_pre + attn_out``, the residual stream the MLP reads.
- ``mlp_out``    = the MLP module's output, as added to the residual.
- ``resid_post`` = the output of decoder layer L = ``resid_mid + mlp_out`` = ``resid_pre`` of layer L+1.
  For L < n_layers - 1 this equals HF's ``output_hidden_states[L + 1]``; for the last layer it does
  not, because HF applies the final norm to its last hidden-states entry. Values here always come
  from module hooks, never from ``hidden_states``.

Families: GPT-2 (``transformer.h[L]`` with ``.attn``, ``.mlp``), Llama-like (``model.layers[L]``
with ``.self_attn``, ``.mlp``: Llama, Mistral, Qwen2, Qwen3, Gemma) and GPT-NeoX / Pythia
(``gpt_neox.layers[L]`` with ``.attention``, ``.mlp``). NeoX models with a parallel residual
(Pythia) have no ``resid_mid``: their MLP reads ``resid_pre``, not ``resid_pre + attn_out``.

Reading ``resid_mid`` captures ``resid_pre`` in a pre-hook on the layer and adds the attention
output (the same float addition the layer does, so the value is exact). Replacing it rewrites the
attention output as ``new_mid - resid_pre``, so the layer's own addition yields ``new_mid`` up to
one float rounding; an edit that returns its input unchanged leaves the forward bit-identical.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from saelab.errors import HookNameError, SaelabError, ShapeMismatchError
from saelab.models.config import HOOK_KINDS, HOOK_RE

# Model types known to share Llama's decoder layout exactly (pre-norm, residual + attn, residual + mlp,
# no extra post-norms or residual multipliers). Others are refused rather than hooked wrongly.
LLAMA_LIKE_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma"})

Edit = Callable[[torch.Tensor], torch.Tensor]


class UnsupportedModelError(SaelabError, ValueError):
    """A model whose layer layout saelab does not know how to hook."""


class StopForward(Exception):
    """Raised from a hook to end a forward pass once every requested activation is captured."""


@dataclass(frozen=True)
class Layout:
    """Where the hookable modules of one model live."""

    family: str
    """'gpt2', 'llama' or 'gpt_neox'."""
    blocks: nn.ModuleList
    """The decoder layers, in order."""
    attn_attr: str
    """Attribute name of the attention module inside a layer."""
    mlp_attr: str
    """Attribute name of the MLP module inside a layer."""
    kinds: tuple[str, ...]
    """Hook kinds this model supports."""
    blocks_owner: nn.Module
    """The module whose forward loops over ``blocks`` (it holds them as attribute ``blocks_attr``)."""
    blocks_attr: str
    final_norm: nn.Module
    """The norm applied to the last layer's output before the unembedding."""
    skippable: bool
    """Whether the forward may loop over a tail of ``blocks`` (False where it indexes per-layer
    settings by loop position, e.g. Qwen2's mixed sliding/full attention ``layer_types``)."""

    def attn(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.attn_attr)

    def mlp(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.mlp_attr)


def detect_layout(model: nn.Module) -> Layout:
    """Find the decoder layers of an HF causal LM, or raise UnsupportedModelError naming its type."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    skippable = len(set(getattr(config, "layer_types", None) or ())) <= 1
    if model_type == "gpt2" and hasattr(model, "transformer"):
        body = model.transformer
        return Layout("gpt2", body.h, "attn", "mlp", HOOK_KINDS, body, "h", body.ln_f, skippable)
    if model_type in LLAMA_LIKE_TYPES and hasattr(model, "model"):
        body = model.model
        return Layout("llama", body.layers, "self_attn", "mlp", HOOK_KINDS, body, "layers", body.norm, skippable)
    if model_type == "gpt_neox" and hasattr(model, "gpt_neox"):
        parallel = bool(getattr(config, "use_parallel_residual", True))
        kinds = tuple(k for k in HOOK_KINDS if not (parallel and k == "resid_mid"))
        body = model.gpt_neox
        return Layout("gpt_neox", body.layers, "attention", "mlp", kinds, body, "layers", body.final_layer_norm,
                      skippable)
    raise UnsupportedModelError(
        f"cannot hook model of type {model_type!r} ({type(model).__name__}): supported are gpt2, "
        f"gpt_neox and the Llama layout ({', '.join(sorted(LLAMA_LIKE_TYPES))})"
    )


def parse_hook(name: Any, layout: Layout, model_name: str) -> tuple[int, str]:
    """Split ``blocks.L.hook_KIND`` into (L, KIND), or raise HookNameError naming what is wrong."""
    n_layers = len(layout.blocks)
    valid = (
        f"valid hooks look like blocks.{{L}}.hook_{'|hook_'.join(layout.kinds)} "
        f"with L in 0..{n_layers - 1}"
    )
    match = HOOK_RE.match(name) if isinstance(name, str) else None
    if match is None:
        problem = "not of the form blocks.{L}.hook_{kind}"
    else:
        layer, kind = int(match.group(1)), match.group(2)
        if kind not in layout.kinds:
            problem = f"no hook kind {kind!r}"
            if kind == "resid_mid":
                problem += " (this model adds attention and MLP outputs in parallel)"
        elif not 0 <= layer < n_layers:
            problem = f"layer {layer} out of range 0..{n_layers - 1}"
        else:
            return layer, kind
    raise HookNameError(f"unknown hook {name!r} for model {model_name}: {problem}; {valid}")


def hook_position(layer: int, kind: str) -> int:
    """Order of a hook point in the forward pass (``resid_post`` of L comes just before ``resid_pre`` of L+1)."""
    return layer * len(HOOK_KINDS) + HOOK_KINDS.index(kind)


def resume_layer(layer: int, kind: str) -> int | None:
    """The first layer to run when the residual stream at (layer, kind) is given; None for non-residual kinds."""
    return {"resid_pre": layer, "resid_post": layer + 1}.get(kind)


@contextlib.contextmanager
def forward_from(layout: Layout, start: int, hidden_BTD: torch.Tensor, name: str) -> Iterator[None]:
    """Inside the block, a forward of the model runs only layers ``start..`` and they read ``hidden_BTD``.

    The model's own forward still embeds its tokens and builds the attention mask and positions
    (rotary or learned) from them, so the layers see the same masks and positions as in a full
    forward; only the decoder-layer list it loops over is swapped for its tail, and the tail's first
    module (layer ``start``, or the final norm when ``start`` is past the last layer) gets
    ``hidden_BTD`` in place of the embeddings. ``name`` (the hook given) is used in error messages.
    Not safe for concurrent forwards of the same model in other threads.
    """
    entry = layout.blocks[start] if start < len(layout.blocks) else layout.final_norm

    def inject(module, args, kwargs):
        from_args = len(args) > 0
        x = args[0] if from_args else kwargs["hidden_states"]
        if hidden_BTD.shape != x.shape:
            raise ShapeMismatchError(f"activation given for hook {name!r} has shape {tuple(hidden_BTD.shape)}, "
                                     f"expected {tuple(x.shape)} (the tokens' [batch, seq] and the model width)")
        new = hidden_BTD.to(x.device, x.dtype)
        if from_args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    original = getattr(layout.blocks_owner, layout.blocks_attr)
    handle = entry.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        setattr(layout.blocks_owner, layout.blocks_attr, nn.ModuleList(list(original)[start:]))
        yield
    finally:
        setattr(layout.blocks_owner, layout.blocks_attr, original)
        handle.remove()


def _first(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output: the tensor itself or element 0 of a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_first(output: Any, value: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced, keeping tuple/list structure."""
    if isinstance(output, tuple):
        return (value, *output[1:])
    if isinstance(output, list):
        return [value, *output[1:]]
    return value


@dataclass
class _LayerPlan:
    edits: dict[str, tuple[str, Edit]] = field(default_factory=dict)  # kind -> (hook name, fn)
    reads: dict[str, str] = field(default_factory=dict)  # kind -> hook name

    def touches(self, *kinds: str) -> bool:
        return any(k in self.edits or k in self.reads for k in kinds)


class HookSet:
    """Replacing and capturing hooks for one use; ``attach`` installs them, ``remove`` undoes it.

    Within a point the edit runs first, so a capture sees the edited value (as TransformerLens'
    run_with_cache inside run_with_hooks does).
    """

    def __init__(
        self,
        layout: Layout,
        parsed_edits: dict[str, tuple[int, str, Edit]],
        parsed_reads: dict[str, tuple[int, str]],
        store: dict[str, torch.Tensor] | None = None,
        stop_when_done: bool = False,
    ) -> None:
        self.layout = layout
        self.store = store if store is not None else {}
        self.stop_when_done = stop_when_done
        self.n_reads = len(parsed_reads)
        self.plans: dict[int, _LayerPlan] = {}
        for name, (layer, kind, fn) in parsed_edits.items():
            self.plans.setdefault(layer, _LayerPlan()).edits[kind] = (name, fn)
        for name, (layer, kind) in parsed_reads.items():
            self.plans.setdefault(layer, _LayerPlan()).reads[kind] = name
        self._resid_pre: dict[int, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    # -- one step at one point: edit, then capture, then maybe stop --------------------------
    def _apply(self, plan: _LayerPlan, kind: str, x: torch.Tensor) -> torch.Tensor:
        if kind in plan.edits:
            x = apply_edit(*plan.edits[kind], x)
        return x

    def _read(self, plan: _LayerPlan, kind: str, x: torch.Tensor) -> None:
        if kind in plan.reads:
            self.store[plan.reads[kind]] = x
            if self.stop_when_done and len(self.store) >= self.n_reads:
                raise StopForward

    # -- module hooks -----------------------------------------------------------------------
    def _block_pre(self, layer: int, plan: _LayerPlan):
        def hook(module, args, kwargs):
            from_args = len(args) > 0
            x = args[0] if from_args else kwargs["hidden_states"]
            new = self._apply(plan, "resid_pre", x)
            if plan.touches("resid_mid"):
                self._resid_pre[layer] = new
            self._read(plan, "resid_pre", new)
            if new is x:
                return None
            if from_args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return hook

    def _attn_post(self, layer: int, plan: _LayerPlan):
        def hook(module, args, output):
            a = _first(output)
            new_a = self._apply(plan, "attn_out", a)
            self._read(plan, "attn_out", new_a)
            if plan.touches("resid_mid"):
                pre = self._resid_pre.pop(layer)
                mid = pre + new_a
                new_mid = self._apply(plan, "resid_mid", mid)
                if new_mid is not mid:
                    # The layer adds resid_pre back to the attention output; hand it the difference.
                    new_a = new_mid - pre
                self._read(plan, "resid_mid", new_mid)
            return None if new_a is a else _with_first(output, new_a)

        return hook

    def _simple_post(self, plan: _LayerPlan, kind: str):
        def hook(module, args, output):
            x = _first(output)
            new = self._apply(plan, kind, x)
            self._read(plan, kind, new)
            return None if new is x else _with_first(output, new)

        return hook

    def attach(self) -> "HookSet":
        lay = self.layout
        try:
            for layer, plan in sorted(self.plans.items()):
                block = lay.blocks[layer]
                if plan.touches("resid_pre", "resid_mid"):
                    self._handles.append(
                        block.register_forward_pre_hook(self._block_pre(layer, plan), with_kwargs=True)
                    )
                if plan.touches("attn_out", "resid_mid"):
                    self._handles.append(lay.attn(layer).register_forward_hook(self._attn_post(layer, plan)))
                if plan.touches("mlp_out"):
                    self._handles.append(lay.mlp(layer).register_forward_hook(self._simple_post(plan, "mlp_out")))
                if plan.touches("resid_post"):
                    self._handles.append(block.register_forward_hook(self._simple_post(plan, "resid_post")))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._resid_pre.clear()


def apply_edit(name: str, fn: Edit, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` as an edit at hook ``name`` yields it inside a forward: checked shape, ``x``'s dtype."""
    new = fn(x)
    return x if new is x else _checked(new, x, name)


def _checked(new: Any, old: torch.Tensor, name: str) -> torch.Tensor:
    """An edit's result, cast to the activation's dtype; a wrong type or shape is named."""
    if not isinstance(new, torch.Tensor):
        raise TypeError(f"edit for hook {name!r} returned {type(new).__name__}, expected a Tensor")
    if new.shape != old.shape:
        raise ShapeMismatchError(
            f"edit for hook {name!r} returned shape {tuple(new.shape)}, expected {tuple(old.shape)}"
        )
    return new.to(old.dtype) if new.dtype != old.dtype else new


def all_hook_names(layout: Layout) -> list[str]:
    """Every valid hook name, layer by layer in forward order."""
    return [f"blocks.{layer}.hook_{kind}" for layer in range(len(layout.blocks)) for kind in layout.kinds]


def unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))
