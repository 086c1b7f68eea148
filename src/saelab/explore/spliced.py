"""SAEs spliced into a language model, with hook points on their internals (as SAELens' HookedSAETransformer).

    from saelab.explore import run_with_saes, run_with_cache_with_saes, spliced
    logits = run_with_saes(lm, tokens, [sae])                                   # reconstruction replaces x
    logits, cache = run_with_cache_with_saes(lm, tokens, [sae], use_error_term=True)
    z_BTN = cache["blocks.9.hook_resid_post.hook_sae_acts_post"]
    with spliced(lm, [sae], use_error_term=True,
                 hooks={"blocks.9.hook_resid_post.hook_sae_acts_post": fn}):  # any forward: generate, grad
        ...

Hook points of an SAE spliced at model hook ``H`` (SAELens names and meanings), in forward order:

==============================  ==============================================================
``H.hook_sae_input``            the activation the SAE reads, ``[B, T, D]``
``H.hook_sae_acts_pre``         encoder pre-activations ``W_enc^T (x_n - b_dec) + b_enc``, ``[B, T, N]``
``H.hook_sae_acts_post``        latents after TopK + ReLU, dense ``[B, T, N]`` (zeros off the top k)
``H.hook_sae_recons``           decoder output from (possibly edited) ``acts_post``, ``[B, T, D]``
``H.hook_sae_error``            ``input - reconstruction of the unedited latents`` (error term only)
``H.hook_sae_output``           what replaces the activation at ``H``: ``recons`` or ``recons + error``
==============================  ==============================================================

A hook is a function ``tensor -> tensor`` of the same shape; it runs at its point and its result
is what the computation continues with (and what is cached). Plain model hook names
(``blocks.L.hook_resid_post``) may be given too and are passed to ``LanguageModel.hooked``.

**Error term.** Without it, ``H`` is replaced by the SAE reconstruction. With it, the output is
``recons(edited latents) + (x - recons(unedited latents))``: with no edits (or identity edits) the
model is the clean model up to float rounding; an edit of the latents changes the activation by
exactly ``W_dec^T (z_edited - z)`` (scaled by the token's std for SAEs with ``input_norm='layernorm'``).
"Unedited" means no ``acts_pre`` / ``acts_post`` hooks, as SAELens computes its error term with
hooks disabled; an edit of ``hook_sae_input`` is seen by both paths.

**Gradients.** Nothing here disables autograd: run inside ``torch.enable_grad()`` and the cached
tensors are nodes of the graph. The error term is computed through a separate path from the same
TopK values (not through the ``acts_post`` tensor), so with the error term

- the gradient of a downstream quantity with respect to ``cache[H.hook_sae_acts_post]`` is the partial
  derivative holding the error fixed: ``W_dec`` times the gradient at ``H`` (what attribution
  patching needs), and
- the gradient with respect to anything upstream of ``H`` is the clean model's gradient (the SAE's
  Jacobian enters once through the reconstruction and once, negated, through the error).

Without the error term gradients flow through the TopK encoder (the kept entries only).

**Position 0.** SAEs trained with ``cfg.exclude_first`` (the default) never saw the BOS/attention
sink position, so by default absolute position 0 leaves the splice unchanged (output = input there;
the cache still holds the SAE's values for it). Pass ``skip_first=False`` to splice every position.
During generation with a KV cache "position 0" is the first token of the first forward only
(see :mod:`saelab.explore.positions`).
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterator, Mapping, Sequence

import torch

from saelab.errors import HookNameError, ShapeMismatchError
from saelab.explore.positions import Positions, check_positions, position_mask, position_tracker
from saelab.sae.topk import TopKSAE
from saelab.utils.words import plural

SAE_HOOK_POINTS = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_recons",
    "hook_sae_error",
    "hook_sae_output",
)
"""Hook points inside a spliced SAE, in forward order (SAELens names)."""

_SAE_POINT_RE = re.compile(r"^(.+)\.(hook_sae_[a-z_]+)$")

Hook = Callable[[torch.Tensor], torch.Tensor]
SAEs = TopKSAE | Sequence[TopKSAE] | Mapping[str, TopKSAE]


def sae_hook_name(hook: str, point: str) -> str:
    """``'<hook>.<point>'``, e.g. ``sae_hook_name('blocks.9.hook_resid_post', 'hook_sae_acts_post')``."""
    if point not in SAE_HOOK_POINTS:
        raise HookNameError(f"unknown SAE hook point {point!r}; valid: {', '.join(SAE_HOOK_POINTS)}")
    return f"{hook}.{point}"


def normalize_saes(lm, saes: SAEs) -> dict[str, TopKSAE]:
    """``{model hook: sae}`` from one SAE, a list (each at its ``cfg.hook_name``) or a dict."""
    if isinstance(saes, TopKSAE):
        saes = [saes]
    if isinstance(saes, Mapping):
        out = dict(saes)
    else:
        out = {}
        for sae in saes:
            if not isinstance(sae, TopKSAE):
                raise TypeError(f"expected TopKSAE objects, got {type(sae).__name__}")
            if not sae.cfg.hook_name:
                raise HookNameError(f"{sae!r} has no cfg.hook_name; pass saes as a dict {{hook: sae}}")
            if sae.cfg.hook_name in out:
                raise HookNameError(f"two SAEs for hook {sae.cfg.hook_name!r}; one SAE per hook")
            out[sae.cfg.hook_name] = sae
    for hook, sae in out.items():
        lm.check_hook(hook)
        sae.check_input(torch.empty(0, lm.hook_width(hook)), name=f"activations at {hook}")
        sae.check_device(lm.device, f"model {lm.known_as}")
    return out


def _split_hooks(hooks: Mapping[str, Hook] | None, sae_hooks: Sequence[str]) -> tuple[dict, dict]:
    """Split ``hooks`` into {sae hook: {point: fn}} and {model hook: fn}; bad names raise HookNameError."""
    per_sae: dict[str, dict[str, Hook]] = {h: {} for h in sae_hooks}
    model: dict[str, Hook] = {}
    for name, fn in (hooks or {}).items():
        if not callable(fn):
            raise TypeError(f"hook {name!r} must be callable, got {type(fn).__name__}")
        m = _SAE_POINT_RE.match(name) if isinstance(name, str) else None
        if m is None:
            if name in per_sae:
                raise HookNameError(
                    f"an SAE is spliced at {name!r}; hook its input or output instead "
                    f"({name}.hook_sae_input / {name}.hook_sae_output)"
                )
            model[name] = fn
            continue
        hook, point = m.groups()
        if point not in SAE_HOOK_POINTS:
            raise HookNameError(f"unknown SAE hook point {point!r} in {name!r}; valid: {', '.join(SAE_HOOK_POINTS)}")
        if hook not in per_sae:
            raise HookNameError(f"hook {name!r} names no spliced SAE; SAEs are at: {', '.join(sae_hooks) or 'none'}")
        per_sae[hook][point] = fn
    return per_sae, model


def _checked(new, old: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(new, torch.Tensor):
        raise TypeError(f"hook {name!r} returned {type(new).__name__}, expected a Tensor")
    if new.shape != old.shape:
        raise ShapeMismatchError(f"hook {name!r} returned shape {tuple(new.shape)}, expected {tuple(old.shape)}")
    return new.to(old.dtype) if new.dtype != old.dtype else new


def decode_dense(sae: TopKSAE, z: torch.Tensor, state) -> torch.Tensor:
    """Reconstruction from dense latents ``[..., N]`` in the activation space (undoing input norm)."""
    lead = z.shape[:-1]
    out = torch.addmm(sae.b_dec, z.reshape(-1, sae.n_latents), sae.W_dec).reshape(*lead, sae.d_in)
    return sae.denormalize_output(out, state)


class SAESplice:
    """The edit installed at an SAE's model hook: SAE forward with hook points, cache and error term.

    Build it through :func:`spliced`; calling it on ``x [B, T, D]`` returns what replaces ``x``.
    """

    def __init__(
        self,
        sae: TopKSAE,
        hook: str,
        *,
        use_error_term: bool = False,
        hooks: Mapping[str, Hook] | None = None,
        cache: dict[str, torch.Tensor] | None = None,
        cache_points: Sequence[str] = SAE_HOOK_POINTS,
        skip_first: bool | None = None,
        tracker=None,
    ) -> None:
        self.sae = sae
        self.hook = hook
        self.use_error_term = use_error_term
        self.hooks = dict(hooks or {})
        self.cache = cache
        self.cache_points = frozenset(cache_points)
        self.skip_first = sae.cfg.exclude_first if skip_first is None else skip_first
        self.tracker = tracker

    def _point(self, point: str, value: torch.Tensor) -> torch.Tensor:
        fn = self.hooks.get(point)
        if fn is not None:
            new = fn(value)
            if new is not value:
                value = _checked(new, value, f"{self.hook}.{point}")
        if self.cache is not None and point in self.cache_points:
            self.cache[f"{self.hook}.{point}"] = value
        return value

    def __call__(self, x_BTD: torch.Tensor) -> torch.Tensor:
        sae = self.sae
        x = x_BTD.to(sae.W_enc.dtype)
        x_in = self._point("hook_sae_input", x)
        x_n, state = sae.normalize_input(x_in)
        pre = sae.pre_acts(x_n)
        pre_h = self._point("hook_sae_acts_pre", pre)
        vals, idx = sae.topk(pre_h)
        z = torch.zeros_like(pre_h).scatter(-1, idx, vals)
        z_h = self._point("hook_sae_acts_post", z)
        # Dense decode: the acts_post tensor is a node of the graph, so its gradient is W_dec @ grad.
        recons = self._point("hook_sae_recons", decode_dense(sae, z_h, state))
        if self.use_error_term:
            if pre_h is not pre:  # the clean path ignores latent edits, as SAELens' error term
                vals, idx = sae.topk(pre)
            # Sparse decode from the TopK values (not from the acts_post node): see the module docstring.
            recons_clean = sae.denormalize_output(sae.decode_topk(vals, idx), state)
            error = self._point("hook_sae_error", x_in - recons_clean)
            out = recons + error
        else:
            out = recons
        out = self._point("hook_sae_output", out)
        if self.skip_first and x.shape[1] > 0 and (self.tracker is None or self.tracker.offset == 0):
            out = torch.cat([x[:, :1], out[:, 1:]], dim=1)
        return out.to(x_BTD.dtype)


@contextlib.contextmanager
def spliced(
    lm,
    saes: SAEs,
    *,
    use_error_term: bool = False,
    hooks: Mapping[str, Hook] | None = None,
    cache: dict[str, torch.Tensor] | None = None,
    cache_names: Sequence[str] | None = None,
    skip_first: bool | None = None,
) -> Iterator[dict[str, SAESplice]]:
    """Splice ``saes`` into ``lm`` for every forward inside the block (generation and grad included).

    ``saes``: one SAE, a list (each at its ``cfg.hook_name``) or ``{model hook: sae}``.
    ``hooks``: ``{'<hook>.hook_sae_<point>': fn}`` on SAE internals and/or ``{model hook: fn}``.
    ``cache``: a dict that receives ``'<hook>.hook_sae_<point>'`` tensors at every forward (the last
    forward wins); ``cache_names`` restricts which (default: every point of every SAE).
    ``skip_first``: leave absolute position 0 unspliced (default: each SAE's ``cfg.exclude_first``).
    Yields the ``{hook: SAESplice}`` installed.
    """
    sae_map = normalize_saes(lm, saes)
    per_sae, model_hooks = _split_hooks(hooks, list(sae_map))
    wanted = None
    if cache_names is not None:
        wanted = {}
        for name in cache_names:
            m = _SAE_POINT_RE.match(name)
            if m is None or m.group(1) not in sae_map or m.group(2) not in SAE_HOOK_POINTS:
                raise HookNameError(
                    f"cannot cache {name!r}: cache names are '<hook>.<point>' with hook one of "
                    f"{', '.join(sae_map)} and point one of {', '.join(SAE_HOOK_POINTS)}"
                )
            wanted.setdefault(m.group(1), []).append(m.group(2))
    tracker = position_tracker(lm)
    splices = {
        hook: SAESplice(
            sae,
            hook,
            use_error_term=use_error_term,
            hooks=per_sae[hook],
            cache=cache,
            cache_points=SAE_HOOK_POINTS if wanted is None else wanted.get(hook, ()),
            skip_first=skip_first,
            tracker=tracker,
        )
        for hook, sae in sae_map.items()
    }
    with lm.hooked({**model_hooks, **splices}):
        yield splices


def _logits(lm, tokens_BT: torch.Tensor) -> torch.Tensor:
    return lm.model(input_ids=lm.as_tokens(tokens_BT), use_cache=False).logits


def run_with_saes(
    lm,
    tokens_BT: torch.Tensor,
    saes: SAEs,
    *,
    use_error_term: bool = False,
    hooks: Mapping[str, Hook] | None = None,
    skip_first: bool | None = None,
) -> torch.Tensor:
    """Logits ``[B, T, V]`` with ``saes`` spliced in (and ``hooks`` applied); autograd as the caller's context."""
    with spliced(lm, saes, use_error_term=use_error_term, hooks=hooks, skip_first=skip_first):
        return _logits(lm, tokens_BT)


def run_with_cache_with_saes(
    lm,
    tokens_BT: torch.Tensor,
    saes: SAEs,
    *,
    use_error_term: bool = False,
    hooks: Mapping[str, Hook] | None = None,
    names: Sequence[str] | None = None,
    skip_first: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(logits [B, T, V], cache)`` with ``saes`` spliced in; cache keys ``'<hook>.hook_sae_<point>'``.

    ``names`` restricts the cache (the dense ``acts_pre``/``acts_post`` are ``[B, T, N]`` each).
    Under ``torch.enable_grad()`` the cached tensors are graph nodes (see the module docstring).
    """
    cache: dict[str, torch.Tensor] = {}
    with spliced(lm, saes, use_error_term=use_error_term, hooks=hooks, cache=cache, cache_names=names,
                 skip_first=skip_first):
        logits = _logits(lm, tokens_BT)
    return logits, cache


# ---- latent edits (hooks for hook_sae_acts_post) --------------------------------------------------


def latent_edit(
    lm,
    latents: int | Sequence[int],
    mode: str = "clamp",
    value: float | Sequence[float] = 0.0,
    positions: Positions = None,
) -> Hook:
    """A hook for ``<hook>.hook_sae_acts_post`` that edits some latents at some positions.

    ``mode``: 'clamp' sets the latents to ``value``; 'ablate' sets them to 0; 'add' adds ``value``;
    'scale' multiplies them by ``value``. ``positions`` are absolute (see
    :mod:`saelab.explore.positions`), so the same hook works in scoring and in generation.
    """
    if mode not in ("clamp", "ablate", "add", "scale"):
        raise ValueError(f"mode must be 'clamp', 'ablate', 'add' or 'scale', got {mode!r}")
    lat = torch.as_tensor([latents] if isinstance(latents, int) else list(latents), dtype=torch.long)
    val = torch.as_tensor(0.0 if mode == "ablate" else value, dtype=torch.float32).flatten()
    if val.numel() not in (1, lat.numel()):
        raise ValueError(f"got {val.numel()} values for {lat.numel()} {plural(lat.numel(), 'latent')}")
    positions = check_positions(positions)
    tracker = position_tracker(lm)

    def edit(z_BTN: torch.Tensor) -> torch.Tensor:
        if lat.numel() and int(lat.max()) >= z_BTN.shape[-1]:
            raise IndexError(f"latent {int(lat.max())} out of range for an SAE with {z_BTN.shape[-1]} "
                             f"{plural(z_BTN.shape[-1], 'latent')}")
        li = lat.to(z_BTN.device)
        v = val.to(z_BTN.device, z_BTN.dtype).expand(li.numel())
        cur = z_BTN[..., li]
        new = {"clamp": v.expand_as(cur), "ablate": torch.zeros_like(cur), "add": cur + v, "scale": cur * v}[mode]
        mask = position_mask(positions, tracker.offset, z_BTN.shape[1], z_BTN.device)
        if mask is not None:
            new = torch.where(mask[None, :, None], new, cur)
        return z_BTN.index_copy(-1, li, new)

    return edit


__all__ = [
    "SAE_HOOK_POINTS",
    "SAESplice",
    "decode_dense",
    "latent_edit",
    "normalize_saes",
    "run_with_cache_with_saes",
    "run_with_saes",
    "sae_hook_name",
    "spliced",
]
