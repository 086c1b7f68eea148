"""Attribution with SAE latents: attribution patching vs true ablation, latent->logit, token->latent.

- :func:`attribution_patching`: for every latent at every position at once, activation x gradient of a
  metric (e.g. a logit difference) with respect to the latent, in the model with the SAE spliced in
  *with its error term* (so the forward is the clean model's). ``z * dm/dz`` is the first-order
  estimate of ``m(clean) - m(latent zero-ablated)``, the latent's contribution to the metric.
- :func:`ablation_effects`: that contribution measured exactly, ``m(clean) - m(ablated)``, by
  zero-ablating each latent at every position (several latents per forward by repeating the batch).
- :func:`compare_attribution_with_ablation`: both on a sample of active latents; Pearson and
  Spearman correlation and a scatter plot.
- :func:`latent_logit_effects`: the direct effect of a latent's decoder direction on the logits.
- :func:`token_latent_gradients`: which input tokens drive a latent at a position (gradient of its
  pre-activation with respect to the input token embeddings).

A metric is a function ``logits [B, T, V] -> [B]`` (one value per sequence); :func:`logit_diff`
builds the usual one.
"""

from __future__ import annotations

import operator
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from saelab.errors import ShapeMismatchError
from saelab.explore.spliced import run_with_cache_with_saes, run_with_saes, sae_hook_name
from saelab.sae.topk import TopKSAE
from saelab.utils.config import whole_at_least
from saelab.utils.figures import check_figure_path, figure, save_figure

Metric = Callable[[torch.Tensor], torch.Tensor]


# ---- metrics ----------------------------------------------------------------------------------------


def token_id(lm, token: int | str) -> int:
    """A token id from an id or a string that is exactly one token (e.g. ' Paris')."""
    if isinstance(token, bool) or not (isinstance(token, str) or hasattr(token, "__index__")):  # True: token 1
        raise ValueError(f"token {token!r}: expected a token id or a string of one token")
    if not isinstance(token, str):  # an id of any integer type (numpy's, a 0-d tensor's)
        token = operator.index(token)
        if not 0 <= token < lm.vocab_size:
            raise ValueError(f"token id {token} out of range 0..{lm.vocab_size - 1}")
        return token
    ids = lm.tokenize([token])[0]
    if len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids)} tokens {ids}, not one; pick a single-token string or pass an id")
    return ids[0]


def logit_diff(lm, token_a: int | str, token_b: int | str, position: int = -1) -> Metric:
    """Metric ``logits[:, position, a] - logits[:, position, b]`` (one value per sequence)."""
    a, b = token_id(lm, token_a), token_id(lm, token_b)

    def metric(logits_BTV: torch.Tensor) -> torch.Tensor:
        check_position(position, logits_BTV.shape[1], "logit_diff position")
        return (logits_BTV[:, position, a] - logits_BTV[:, position, b]).float()

    metric.tokens = (a, b)  # type: ignore[attr-defined]
    return metric


def check_position(position: int, T: int, named: str = "position") -> int:
    """``position`` as an index into sequences of ``T`` tokens, from 0 (negative ones count from the end)."""
    if isinstance(position, bool) or not hasattr(position, "__index__"):
        raise ValueError(f"{named} {position!r}: expected an integer index of a token")
    if not -T <= operator.index(position) < T:
        raise ValueError(f"{named} {position}: the sequences have {T} positions")
    return operator.index(position) % T


def _metric_B(metric: Metric, logits_BTV: torch.Tensor) -> torch.Tensor:
    m = metric(logits_BTV)
    if m.ndim != 1 or m.shape[0] != logits_BTV.shape[0]:
        raise ShapeMismatchError(
            f"metric must return one value per sequence, shape [{logits_BTV.shape[0]}], got {tuple(m.shape)}"
        )
    return m


# ---- attribution patching and ablation ----------------------------------------------------------------


@dataclass
class Attribution:
    attr_BTN: torch.Tensor
    """Activation x gradient ``z * dm/dz`` per sequence, position and latent (float32)."""
    acts_BTN: torch.Tensor
    """The latents ``z`` (dense TopK activations)."""
    metric_B: torch.Tensor
    """The metric of the clean forward."""

    @property
    def per_sequence_BN(self) -> torch.Tensor:
        """Estimated effect of ablating each latent at every position of each sequence."""
        return self.attr_BTN.sum(dim=1)

    @property
    def total_N(self) -> torch.Tensor:
        """Summed over sequences and positions."""
        return self.attr_BTN.sum(dim=(0, 1))


def _hook_of(sae: TopKSAE, hook: str | None) -> str:
    hook = hook or sae.cfg.hook_name
    if not hook:
        raise ValueError("the SAE has no cfg.hook_name; pass hook=")
    return hook


def attribution_patching(
    lm, sae: TopKSAE, tokens_BT: torch.Tensor, metric: Metric, *, hook: str | None = None,
    skip_first: bool | None = None,
) -> Attribution:
    """Activation x gradient of ``metric`` for every latent at every position, from one forward and one backward.

    The SAE is spliced with its error term, so the forward equals the clean model's and the
    gradient with respect to the latents is taken holding the error fixed. The estimate of
    zero-ablating latent ``i`` at every position of sequence ``b`` is ``per_sequence_BN[b, i]``.
    Positions the splice leaves alone (position 0 for SAEs trained without it) get 0.
    """
    hook = _hook_of(sae, hook)
    tokens_BT = lm.as_tokens(tokens_BT)  # before the splice is installed, as ablation_effects checks them
    post = sae_hook_name(hook, "hook_sae_acts_post")
    with torch.enable_grad():
        logits, cache = run_with_cache_with_saes(
            lm, tokens_BT, {hook: sae}, use_error_term=True, names=[post], skip_first=skip_first,
            hooks={post: lambda z: z.detach().requires_grad_(True)},
        )
        z = cache[post]
        m = _metric_B(metric, logits)
        (grad,) = torch.autograd.grad(m.sum(), z)
    z = z.detach()
    return Attribution((z * grad).float(), z, m.detach())


@torch.no_grad()
def ablation_effects(
    lm, sae: TopKSAE, tokens_BT: torch.Tensor, latents: Sequence[int], metric: Metric, *,
    hook: str | None = None, batch_size: int = 16, skip_first: bool | None = None,
) -> torch.Tensor:
    """``[len(latents), B]``: ``metric(clean) - metric(latent zero-ablated at every position)`` per sequence.

    The SAE is spliced with its error term (ablating a latent subtracts exactly its decoder
    contribution). ``batch_size`` latents are ablated per forward, the batch repeated once per latent.
    """
    hook = _hook_of(sae, hook)
    sae.check_latents(latents)
    _check_batch_size(batch_size)
    post = sae_hook_name(hook, "hook_sae_acts_post")
    tokens_BT = lm.as_tokens(tokens_BT)
    B, T = tokens_BT.shape
    saes = {hook: sae}
    clean = _metric_B(metric, run_with_saes(lm, tokens_BT, saes, use_error_term=True, skip_first=skip_first))
    lat = torch.as_tensor(list(latents), dtype=torch.long)
    out = torch.empty(len(lat), B, dtype=torch.float32)
    for s in range(0, len(lat), batch_size):
        chunk = lat[s:s + batch_size]
        c = len(chunk)
        rows = torch.arange(c * B)
        lat_rows = chunk.repeat_interleave(B)

        def ablate(z_RTN: torch.Tensor, rows=rows, lat_rows=lat_rows) -> torch.Tensor:
            z_RTN = z_RTN.clone()
            z_RTN[rows, :, lat_rows.to(z_RTN.device)] = 0.0
            return z_RTN

        logits = run_with_saes(lm, tokens_BT.repeat(c, 1), saes, use_error_term=True, hooks={post: ablate},
                               skip_first=skip_first)
        out[s:s + c] = (clean.repeat(c) - _metric_B(metric, logits)).view(c, B).float().cpu()
    return out


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged."""
    x = x.double()
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    uniq, inv = torch.unique(x, return_inverse=True)
    if len(uniq) < len(x):
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks)
        counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(ranks))
        ranks = (sums / counts)[inv]
    return ranks


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else float("nan")


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(_ranks(x), _ranks(y))


def _check_batch_size(batch_size: int) -> None:
    _check_count(batch_size, "batch_size", "latents per forward")


def _check_count(value: int, name: str, of: str) -> None:
    """A whole number >= 1 of any integer type (numpy's too), not a bool."""
    if not whole_at_least(value, 1):
        raise ValueError(f"{name} {value!r}: expected a whole number of {of}, at least 1")


def compare_attribution_with_ablation(
    lm, sae: TopKSAE, cases: Sequence[tuple[torch.Tensor, Metric]], *, max_latents: int = 200,
    seed: int = 0, plot: str | Path | None = None, title: str | None = None, hook: str | None = None,
    batch_size: int = 16, skip_first: bool | None = None,
) -> dict:
    """Attribution patching against true zero-ablation on a random sample of active latents.

    ``cases``: ``(tokens [B, T], metric)`` pairs (prompts of different lengths go in different
    cases). In each case up to ``max_latents`` latents are drawn at random (``seed``) among those
    active in it, ablated exactly, and paired with their attribution per sequence where active.
    Returns ``{pearson, spearman, n, n_cases, attribution, ablation, plot}`` (the two lists hold the
    points). ``plot``: write a scatter plot PNG there (atomically).
    """
    _check_batch_size(batch_size)
    _check_count(max_latents, "max_latents", "latents to compare per case")
    if plot is not None:  # before the forwards: a path that cannot be written would lose them
        check_figure_path(plot, "plot")
    if isinstance(cases, tuple) and len(cases) == 2 and isinstance(cases[0], torch.Tensor):
        cases = [cases]
    if not cases:  # else torch.cat's "expected a non-empty list of Tensors"
        raise ValueError("cases: expected at least one (tokens, metric) pair, got none")
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for tokens_BT, metric in cases:
        attr = attribution_patching(lm, sae, tokens_BT, metric, hook=hook, skip_first=skip_first)
        active_BN = attr.acts_BTN.gt(0)
        first = 1 if (sae.cfg.exclude_first if skip_first is None else skip_first) else 0
        active_BN = active_BN[:, first:].any(dim=1).cpu()
        candidates = torch.nonzero(active_BN.any(dim=0)).flatten()
        if len(candidates) > max_latents:
            candidates = candidates[torch.randperm(len(candidates), generator=gen)[:max_latents]].sort().values
        abl_LB = ablation_effects(lm, sae, tokens_BT, candidates.tolist(), metric, hook=hook,
                                  batch_size=batch_size, skip_first=skip_first)
        est_LB = attr.per_sequence_BN.cpu()[:, candidates].T
        mask = active_BN[:, candidates].T
        xs.append(abl_LB[mask])
        ys.append(est_LB[mask])
    x, y = torch.cat(xs), torch.cat(ys)
    result = {
        "pearson": pearson(x, y),
        "spearman": spearman(x, y),
        "n": len(x),
        "n_cases": len(cases),
        "attribution": y.tolist(),
        "ablation": x.tolist(),
        "plot": None,
    }
    if plot is not None:
        result["plot"] = str(scatter_plot(x, y, plot, result["pearson"], result["spearman"], title))
    return result


def scatter_plot(ablation: torch.Tensor, attribution: torch.Tensor, path: str | Path, r: float, rho: float,
                 title: str | None = None) -> Path:
    """Scatter of attribution-patching estimates against true ablation effects, with y = x."""
    x, y = ablation.double().numpy(), attribution.double().numpy()
    fig, ax = figure(figsize=(5, 5), dpi=100)
    ax.scatter(x, y, s=9, alpha=0.6, edgecolors="none")
    lo = float(min(x.min(initial=0), y.min(initial=0)))
    hi = float(max(x.max(initial=0), y.max(initial=0)))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=1, ls="--", label="y = x")
    ax.set_xlabel("true effect: metric(clean) - metric(latent ablated)")
    ax.set_ylabel("attribution patching: activation x gradient")
    ax.set_title(textwrap.fill(title or "attribution patching vs ablation", 60), fontsize=9)
    ax.text(0.03, 0.97, f"Pearson r = {r:.3f}\nSpearman rho = {rho:.3f}\nn = {len(x)}", transform=ax.transAxes,
            va="top", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path, dpi=100)


# ---- latent -> logits ---------------------------------------------------------------------------------


def final_norm(lm) -> torch.nn.Module:
    """The norm applied before the unembedding (GPT-2 ln_f, Llama norm, NeoX final_layer_norm)."""
    m = lm.model
    for path in ("transformer.ln_f", "model.norm", "gpt_neox.final_layer_norm"):
        obj = m
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ValueError(f"cannot find the final norm of {type(m).__name__}")


def unembed_direction(lm, d_D: torch.Tensor) -> torch.Tensor:
    """Logit change ``[V]`` from adding direction ``d`` to the final residual stream, linearized.

    Several directions ``[..., D]`` give ``[..., V]``.

    The final norm is taken as a fixed linear map: its centring (LayerNorm) and its weight
    (``1 + weight`` for Gemma's RMSNorm) are applied, its data-dependent ``1 / rms`` scale and its
    bias are not (the scale multiplies every direction alike at a token; the bias does not depend on
    ``d``). Layers between the SAE's hook and the output are skipped: this is the direct path only.
    """
    norm = final_norm(lm)
    W_U = lm.model.get_output_embeddings().weight
    d = d_D.to(W_U.device, W_U.dtype)  # the SAE (decoder rows) may live on another device than the model
    if isinstance(norm, torch.nn.LayerNorm):
        d = d - d.mean(dim=-1, keepdim=True)
    w = getattr(norm, "weight", None)
    if w is not None:
        d = d * (w + 1 if type(norm).__name__.startswith("Gemma") else w)
    return d @ W_U.T


@torch.no_grad()
def latent_logit_effects(lm, sae: TopKSAE, latent: int, top: int = 20) -> dict:
    """Tokens whose logits the latent's decoder direction raises and lowers most (direct path).

    ``values`` = ``W_U (g * W_dec[latent])`` (see :func:`unembed_direction`; ``g`` the final norm
    weight). Returns ``{latent, promoted, suppressed, values}`` with ``promoted``/``suppressed``
    lists of ``(token string, token id, value)``; a token holding part of a character reads as its
    bytes, escaped (``token_strings(..., readable_bytes=True)``).
    """
    sae.check_latents([latent])
    _check_count(top, "top", "tokens to list")
    from saelab.evals.probe_tasks import token_strings

    values = unembed_direction(lm, sae.W_dec[latent]).float().cpu()
    k = min(top, values.numel())

    def listing(idx: torch.Tensor) -> list[tuple[str, int, float]]:
        # a token holding part of a character as its bytes ("\xe4\xb8"), as top and the site show it, not "\ufffd"
        ids = idx.tolist()
        return [(s, i, float(values[i])) for s, i in zip(token_strings(lm.tokenizer, ids, readable_bytes=True), ids)]

    return {
        "latent": latent,
        "promoted": listing(values.topk(k).indices),
        "suppressed": listing((-values).topk(k).indices),
        "values": values,
    }


# ---- tokens -> latent ---------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _check_read_position(sae: TopKSAE, position: int, T: int, skip_first: bool | None) -> None:
    """A position of the sequences that the SAE reads: position 0 not, where the splice leaves it alone."""
    at = check_position(position, T)
    if at == 0 and (sae.cfg.exclude_first if skip_first is None else skip_first):
        raise ValueError(f"position {position}: the SAE was trained without position 0 (cfg.exclude_first) and "
                         "never reads it, as the splice leaves it; pick a later position, or pass skip_first=False")


@dataclass
class TokenSaliency:
    grad_x_input_BT: torch.Tensor
    """``sum_d grad * embedding`` per input token (signed first-order contribution)."""
    grad_norm_BT: torch.Tensor
    """``||grad||`` per input token."""
    pre_act_B: torch.Tensor
    """The latent's encoder pre-activation at ``position``."""
    act_B: torch.Tensor
    """The latent's activation (after TopK + ReLU) at ``position``."""


def token_latent_gradients(
    lm, sae: TopKSAE, tokens_BT: torch.Tensor, latent: int, position: int = -1, *, hook: str | None = None,
    skip_first: bool | None = None,
) -> TokenSaliency:
    """Gradient of ``latent``'s pre-activation at ``position`` with respect to the input token embeddings.

    The pre-activation (``W_enc^T (x - b_dec) + b_enc`` for the latent) is used rather than the
    activation because TopK makes the latter zero, with zero gradient, wherever the latent does not
    win. The embeddings are the output of the model's input embedding module (before any position
    embedding or scale). The forward stops after the SAE's layer. Tokens after ``position`` get 0.
    Position 0 is refused for an SAE trained without it, which never reads it (``skip_first``: as
    :func:`attribution_patching`; False reads it there).
    """
    hook = _hook_of(sae, hook)
    sae.check_latents([latent])
    tokens_BT = lm.as_tokens(tokens_BT)
    _check_read_position(sae, position, tokens_BT.shape[1], skip_first)
    store: dict[str, torch.Tensor] = {}

    def emb_hook(module, args, output):
        e = output.detach().requires_grad_(True)
        store["emb"] = e
        return e

    def capture(x):
        store["x"] = x
        raise _Stop

    with torch.enable_grad():
        handle = lm.model.get_input_embeddings().register_forward_hook(emb_hook)
        try:
            with lm.hooked({hook: capture}):
                lm.model(input_ids=tokens_BT, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        x_BD = store["x"][:, position].to(sae.W_enc.dtype)
        x_n, _ = sae.normalize_input(x_BD)
        pre_BN = sae.pre_acts(x_n)
        (grad,) = torch.autograd.grad(pre_BN[:, latent].sum(), store["emb"])
    with torch.no_grad():
        vals, idx = sae.topk(pre_BN)
        act = torch.where(idx == latent, vals, torch.zeros_like(vals)).sum(-1)
    e = store["emb"].detach()
    return TokenSaliency(
        (grad * e).sum(-1).float(), grad.norm(dim=-1).float(), pre_BN[:, latent].detach().float(), act.float()
    )


__all__ = [
    "Attribution",
    "Metric",
    "TokenSaliency",
    "ablation_effects",
    "attribution_patching",
    "compare_attribution_with_ablation",
    "final_norm",
    "latent_logit_effects",
    "logit_diff",
    "pearson",
    "scatter_plot",
    "spearman",
    "token_id",
    "token_latent_gradients",
    "unembed_direction",
]
