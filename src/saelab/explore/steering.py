"""Steering and ablation with SAE latents, in scoring and in generation; the ``saelab steer`` verb.

    from saelab.explore import steer, generate_with_and_without
    s = steer(lm, sae, latent=1234, mode="add", value=40.0)          # positions=None: every token the SAE reads
    lm.cross_entropy(tokens, edits=s.edits)                          # scoring
    with lm.hooked(s.edits):                                         # generation (KV cache)
        out = lm.model.generate(...)
    print(generate_with_and_without(lm, "The", s.edits, max_new_tokens=40).format())

Modes (``x`` is the activation at the SAE's hook, ``d_i = W_dec[i]``, ``z_i`` the latent's TopK value).
``value`` is in the latent's own units, those of its activations (``top``'s max activation, ``--scale``'s
unit), for every SAE:

- ``add``:    the latent raised by ``value``: ``x + value * d_i`` (times each token's ``std(x)`` for SAEs with
  ``input_norm='layernorm'``, which read ``x / std(x)``), i.e. exactly what splicing the SAE with the error
  term and adding ``value`` at ``hook_sae_acts_post`` gives; the SAE's encoder is not run. The SAE reading
  the steered ``x`` back finds the latent raised by about ``value`` (a layernorm SAE's own normalization
  of the moved token takes a little off).
- ``clamp``:  the latent set to ``value`` through the SAE with its error term:
  ``x + (value - z_i(x)) * d_i`` (times ``std(x)`` for layernorm SAEs), i.e. exactly what splicing
  the SAE with the error term and editing ``hook_sae_acts_post`` gives (see :mod:`.spliced`).
- ``ablate``: ``clamp`` to 0, which changes only the tokens where the latent fired.

``positions`` are **absolute** token positions (0 = the first token, BOS included; generated tokens
continue the count), so the same edit means the same thing in ``lm.logits`` and in ``generate``
with a KV cache; ``None`` = every position the SAE reads, the prompt's and each generated token's:
from 1 for an SAE trained without position 0 (``cfg.exclude_first``), which the splice leaves
unedited too, so that clamp and ablate stay equal to it; pass ``slice(0, None)`` to edit BOS as
well. See :mod:`saelab.explore.positions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from saelab.errors import ConfigError
from saelab.explore.config import STEER_MODES
from saelab.explore.positions import Positions, check_positions, position_mask, position_tracker
from saelab.sae.topk import TopKSAE
from saelab.utils.words import ESCAPED_BUT_LINES, plural


class Steering:
    """An edit ``x -> x'`` at ``hook`` that adds, clamps or ablates SAE latents; build with :func:`steer`.
    ``values``: one per latent, in the latent's own units (its activations', for a layernorm SAE too: the added
    direction is scaled by each token's std(x)); ``positions`` as :func:`steer` takes them (None: every position
    the SAE reads)."""

    def __init__(self, lm, sae: TopKSAE, latents: Sequence[int], mode: str, values: torch.Tensor,
                 positions: Positions, hook: str) -> None:
        self.lm, self.sae, self.mode, self.hook = lm, sae, mode, hook
        self.positions = steered_positions(sae, positions)
        self.latents = torch.as_tensor(list(latents), dtype=torch.long)
        self.values = values
        self._tracker = position_tracker(lm)
        self.positions_edited = 0
        """Token positions this edit has changed so far (0 when ``positions`` lie past every text seen)."""
        self.tokens_seen = 0
        """The longest text (prompt and generation, in tokens) this edit has been applied to."""

    @property
    def edits(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """``{hook: self}``, for ``lm.logits(edits=)``, ``lm.cross_entropy(edits=)``, ``lm.hooked(...)``."""
        return {self.hook: self}

    def delta(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The change this edit makes to ``x`` at every position (before position masking)."""
        sae = self.sae
        x = x_BTD.to(sae.W_dec.dtype)
        lat = self.latents.to(x.device)
        d_LD = sae.W_dec[lat]
        vals = self.values.to(x.device, x.dtype)
        x_n, state = sae.normalize_input(x)
        if self.mode == "add":
            dx = vals @ d_LD
        else:
            vals_BTK, idx_BTK, _ = sae.encode_topk(x_n)
            z_BTN = torch.zeros(*x.shape[:-1], sae.n_latents, dtype=x.dtype, device=x.device)
            cur_BTL = z_BTN.scatter_(-1, idx_BTK, vals_BTK)[..., lat]
            dx = (vals - cur_BTL) @ d_LD
        if state is None:
            return dx.expand_as(x)
        # A layernorm SAE decodes in units of each token's std(x) (denormalize_output): a change of its latents
        # moves x that many times further, in add as in clamp.
        return dx * state[1]

    def __call__(self, x_BTD: torch.Tensor) -> torch.Tensor:
        offset, length = self._tracker.offset, x_BTD.shape[1]
        self.tokens_seen = max(self.tokens_seen, offset + length)
        mask = position_mask(self.positions, offset, length, x_BTD.device)
        self.positions_edited += length if mask is None else int(mask.sum())
        if mask is not None and not bool(mask.any()):
            return x_BTD
        dx = self.delta(x_BTD)
        if mask is not None:
            dx = dx * mask[None, :, None].to(dx.dtype)
        steered = x_BTD + dx.to(x_BTD.dtype)
        self._check_in_range(x_BTD, steered)
        return steered

    @torch.no_grad()  # a check, not part of any gradient taken through the steered forward
    def _check_in_range(self, x_BTD: torch.Tensor, steered: torch.Tensor) -> None:
        """Refuse a change past the activations' dtype, which makes every later activation and the text NaN, or
        one whose squares, summed over a token, pass the range the model's next normalisation sums them in
        (float32 at least: half models upcast for it), which leaves the text empty, degenerate or NaN with no
        error. A layernorm SAE adds its value times each token's std(x): known only here, as the model runs (the
        SAE records no std of the model's activations), so no check of the value alone can bound it. The model's
        own NaN or size is not ours: a token whose own activations are already past the bound is left to it."""
        own = torch.isfinite(x_BTD)
        if not bool((torch.isfinite(steered) | ~own).all()):
            limit = torch.finfo(x_BTD.dtype).max
            raise ConfigError(f"the change made by steering ({self.describe()}) is past {x_BTD.dtype}'s range "
                              f"(|x| <= {limit:.4g}){self._std_note(x_BTD)}; steer with a smaller value")
        bound = _squares_bound(x_BTD.dtype, x_BTD.shape[-1])
        sums = _squares_summed(steered)
        if not bool((sums > bound).any()):
            return
        past = (sums > bound) & (_squares_summed(x_BTD) <= bound)  # NaN or inf of the model's own: not past
        if not bool(past.any()):
            return
        raise ConfigError(f"the change made by steering ({self.describe()}) gives activations whose squares sum to "
                          f"{float(sums[past].max()):.4g} at a token, which overflows the model's normalisations "
                          f"(sum of squares <= {bound:.4g}: the text would come out empty or NaN)"
                          f"{self._std_note(x_BTD)}; steer with a smaller value")

    def _std_note(self, x_BTD: torch.Tensor) -> str:
        if self.sae.cfg.input_norm != "layernorm":
            return ""
        std = float(self.sae.normalize_input(x_BTD.to(self.sae.W_dec.dtype))[1][1].max())
        return f" (a layernorm SAE adds each value times the token's std(x), here up to {std:.4g})"

    def describe(self) -> str:
        lat = ",".join(str(int(i)) for i in self.latents)
        vals = ",".join(f"{float(v):g}" for v in self.values)
        where = "all positions" if self.positions is None else f"positions {_fmt_positions(self.positions)}"
        how = "ablate" if self.mode == "ablate" else f"{self.mode} {vals}"
        return f"latent {lat} at {self.hook}: {how}, {where}"

    def __repr__(self) -> str:
        return f"Steering({self.describe()})"


def _squares_bound(dtype: torch.dtype, width: int) -> float:
    """The largest sum of a token's ``width`` squared activations that the model's normalisations take without
    overflow, in float32 at least. RMSNorm sums the squares; LayerNorm the squared deviations from the mean, no
    more than that sum S, but PyTorch's Welford reductions (WelfordOps, and CUDA's vectorized layer norm) compute
    (mean_b - mean_a)^2 * count_a before dividing: the squared gap of two partial means is at most 2 * S, the
    count less than ``width``, so S <= max / (2 * width) keeps every step in range, with room for rounding."""
    return torch.finfo(torch.promote_types(dtype, torch.float32)).max / (2 * width)


def _squares_summed(x_BTD: torch.Tensor) -> torch.Tensor:
    """Each token's sum of squared activations, in float64: float32 squares of 1e20 would be inf."""
    return torch.linalg.vector_norm(x_BTD, dim=-1, dtype=torch.float64).square()


def _fmt_positions(p: Positions) -> str:
    if isinstance(p, slice):
        return f"{p.start or 0}:{'' if p.stop is None else p.stop}" + (f":{p.step}" if p.step else "")
    return ",".join(map(str, p))


def steer(
    lm,
    sae: TopKSAE,
    latent: int | Sequence[int],
    mode: str = "add",
    value: float | Sequence[float] | None = None,
    positions: Positions = None,
    hook: str | None = None,
) -> Steering:
    """An edit that steers (``add``), clamps or ablates ``latent`` (one index or several) at ``positions``.

    ``value``: one number, or one per latent, for ``add`` and ``clamp``, in the latent's own units (what ``add``
    raises it by, ``clamp`` sets it to; e.g. a multiple of :func:`~saelab.explore.latent_max_activation`);
    ``ablate`` takes none (or 0). ``hook``: default the SAE's
    ``cfg.hook_name``. ``positions=None``: every position but 0 when the SAE was trained without it.
    See the module docstring for what each mode does and what positions mean.
    """
    if mode not in STEER_MODES:
        raise ValueError(f"mode must be one of {STEER_MODES}, got {mode!r}")
    hook = hook or sae.cfg.hook_name
    if not hook:
        raise ValueError("the SAE has no cfg.hook_name; pass hook=")
    lm.check_hook(hook)
    sae.check_input(torch.empty(0, lm.hook_width(hook)), name=f"activations at {hook}")
    sae.check_device(lm.device, f"model {lm.known_as}")
    given = [latent] if isinstance(latent, int) else list(latent)
    if not given:
        raise ValueError("no latent given")
    sae.check_latents(given)  # before int(): 2.9 would be read as 2
    latents = [int(i) for i in given]
    values = _steer_values(mode, value)
    if values.numel() == 1:
        values = values.expand(len(latents)).clone()
    if values.numel() != len(latents):
        raise ValueError(f"got {values.numel()} values for {len(latents)} {plural(len(latents), 'latent')}")
    if not torch.isfinite(values).all():  # the command line refuses it too: every steered activation would be NaN
        raise ValueError(f"value must be a finite number, got {value!r}")
    return Steering(lm, sae, latents, mode, values, positions, hook)


def _steer_values(mode: str, value) -> torch.Tensor:
    """``value`` as float32 numbers, as ``mode`` takes it: add and clamp need one (an add of the default 0 changed
    nothing, silently), ablate sets 0 and takes no other."""
    if value is None and mode != "ablate":
        raise ValueError(f"mode {mode!r} needs a value: one number, or one per latent")
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        values = torch.as_tensor(0.0 if value is None else value, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"value: expected a number, or one per latent, got {value!r}") from None
    if mode == "ablate" and not bool((values == 0).all()):
        raise ValueError(f"mode 'ablate' sets the latent to 0: it takes no value, got {value!r}")
    return values


def steered_positions(sae: TopKSAE, positions: Positions) -> Positions:
    """``positions`` checked; None: every position the SAE reads, from 1 for an SAE trained without
    position 0 (``cfg.exclude_first``): the splice leaves position 0, which the SAE never saw."""
    if positions is None and sae.cfg.exclude_first:
        return slice(1, None)
    return check_positions(positions)


def combine_edits(*edit_dicts: Mapping[str, Callable]) -> dict[str, Callable]:
    """Merge edit dicts (e.g. several ``Steering.edits``); edits at the same hook run in the given order."""
    merged: dict[str, list[Callable]] = {}
    for d in edit_dicts:
        for hook, fn in d.items():
            merged.setdefault(hook, []).append(fn)

    def chain(fns):
        if len(fns) == 1:
            return fns[0]

        def run(x):
            for fn in fns:
                x = fn(x)
            return x

        return run

    return {hook: chain(fns) for hook, fns in merged.items()}


# ---- generation --------------------------------------------------------------------------------


def prompt_length(tokenizer, prompt: str, prepend_bos: bool = True) -> int:
    """How many tokens ``prompt_tokens`` gives ``prompt``, from the tokenizer alone (no model needed)."""
    return len(tokenizer([prompt], add_special_tokens=False)["input_ids"][0]) + int(prepend_bos)


def prompt_tokens(lm, prompt: str, prepend_bos: bool = True) -> torch.Tensor:
    """``[1, T]`` token ids of ``prompt``, BOS first when ``prepend_bos`` (as SAE training contexts)."""
    ids = lm.tokenize([prompt])[0]
    if prepend_bos:
        ids = [lm.bos_token_id, *ids]
    if not ids:
        raise ValueError("empty prompt (and no BOS)")
    return torch.tensor([ids], dtype=torch.long, device=lm.device)


@torch.no_grad()
def _check_sampling(max_new_tokens: int, greedy: bool, temperature: float, top_p: float) -> None:
    """The sampling settings, refused as the command line refuses them (top_p = 2 was taken, 0 new tokens or a
    temperature of 0 reached transformers' own errors)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r} (greedy=True picks the likeliest token)")
    if not greedy and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def generate_ids(
    lm,
    ids_BT: torch.Tensor,
    edits: Mapping[str, Callable] | None = None,
    *,
    max_new_tokens: int = 40,
    greedy: bool = False,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> torch.Tensor:
    """``[B, T + new]`` token ids: ``ids_BT`` continued by the model with ``edits`` installed (KV cache on).

    Sampling is seeded (``seed``) without touching the global RNG, so two calls with different
    edits draw the same random numbers and differ only through the edits. Generation stops early
    at the tokenizer's EOS token.
    """
    from transformers import GenerationConfig

    _check_sampling(max_new_tokens, greedy, temperature, top_p)
    ids_BT = lm.as_tokens(ids_BT)
    eos = lm.tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None if greedy else 0,
        eos_token_id=eos,
        pad_token_id=eos if eos is not None else lm.bos_token_id,
    )
    # Sampling on a GPU draws from that GPU's generator: it is forked and seeded too (torch.manual_seed
    # would reseed every GPU's generator and leave them reseeded).
    gpu = [lm.device.index] if lm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpu), lm.hooked(dict(edits or {})):
        torch.random.default_generator.manual_seed(seed)
        for i in gpu:
            torch.cuda.default_generators[i].manual_seed(seed)
        return lm.model.generate(ids_BT, attention_mask=torch.ones_like(ids_BT), generation_config=config)


def generate(
    lm,
    prompt: str,
    edits: Mapping[str, Callable] | None = None,
    *,
    max_new_tokens: int = 40,
    greedy: bool = False,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    prepend_bos: bool = True,
) -> str:
    """The model's continuation of ``prompt`` (text of the new tokens only), with ``edits`` installed.

    BOS is prepended when ``prepend_bos`` (SAEs are trained on contexts that start with it).
    See :func:`generate_ids` for seeding.
    """
    ids = prompt_tokens(lm, prompt, prepend_bos)
    out = generate_ids(lm, ids, edits, max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                       top_p=top_p, seed=seed)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@dataclass
class SteeredGeneration:
    prompt: str
    clean: str
    """Continuation without edits."""
    steered: str
    """Continuation with the edits, same seed."""
    description: str = ""
    """What the edits do."""

    def format(self) -> str:
        """Both generations as they read, their control characters but newlines and tabs escaped (the prompt's or
        the model's ESC sequences would drive the terminal)."""
        prompt, clean, steered = (text.translate(ESCAPED_BUT_LINES) for text in (self.prompt, self.clean, self.steered))
        return (
            f"prompt: {self.prompt!r}\n\n"
            f"--- without steering ---\n{prompt}{clean}\n\n"
            f"--- with steering ({self.description or 'edits'}) ---\n{prompt}{steered}\n"
        )


def generate_with_and_without(
    lm,
    prompt: str,
    edits: Mapping[str, Callable] | Steering,
    *,
    max_new_tokens: int = 40,
    greedy: bool = False,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    prepend_bos: bool = True,
) -> SteeredGeneration:
    """Generate from ``prompt`` twice, without and with ``edits``, from the same seed."""
    description = ""
    if isinstance(edits, Steering):
        description, edits = edits.describe(), edits.edits
    kw = dict(max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p, seed=seed,
              prepend_bos=prepend_bos)
    clean = generate(lm, prompt, None, **kw)
    steered = generate(lm, prompt, edits, **kw)
    return SteeredGeneration(prompt, clean, steered, description)


__all__ = [
    "STEER_MODES",
    "SteeredGeneration",
    "Steering",
    "combine_edits",
    "generate",
    "generate_ids",
    "generate_with_and_without",
    "prompt_length",
    "prompt_tokens",
    "steer",
]
