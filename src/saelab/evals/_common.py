"""Small helpers shared by the paper-metric modules (ablation sparsity, probes, N2G).

Nothing here defines a metric; each metric module documents its own definition.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Mapping

import torch


def position_0_words(first: int) -> str:
    """How a record says whether position 0 was read ("included") or left out ("excluded"), from the first
    position read."""
    return "excluded" if first else "included"


def first_position(sae, exclude_first: bool | None) -> int:
    """First context position an evaluation edits or scores: 1 when position 0 (BOS) is left out."""
    flag = sae.cfg.exclude_first if exclude_first is None else exclude_first
    return 1 if flag else 0


def resolve_hook(lm, sae, hook: str | None) -> str:
    """The hook to use (``hook`` or the SAE's own), checked against the model and the SAE width."""
    hook = hook or sae.cfg.hook_name
    if not hook:
        raise ValueError("no hook given and the SAE's cfg.hook_name is empty; pass cfg.hook")
    lm.check_hook(hook)
    sae.check_input(torch.empty(0, lm.hook_width(hook)), name=f"hook {hook}")
    sae.check_device(lm.device, f"model {lm.known_as}")
    return hook


def json_float(x: float | torch.Tensor | None) -> float | None:
    """A float for JSON: NaN and inf (undefined values) become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def jsonable(obj: Any) -> Any:
    """A metric result for JSON: tuples become lists, NaN and inf (undefined values) become None (strict JSON
    has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return json_float(obj) if isinstance(obj, float) else obj


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-ready dict (tuples become lists)."""
    def fix(v):
        if isinstance(v, (tuple, list)):
            return [fix(u) for u in v]
        if isinstance(v, dict):
            return {k: fix(u) for k, u in v.items()}
        return v
    return {k: fix(v) for k, v in dataclasses.asdict(cfg).items()}


def check_tokens(tokens_NT: torch.Tensor) -> torch.Tensor:
    if not isinstance(tokens_NT, torch.Tensor):
        tokens_NT = torch.as_tensor(tokens_NT)
    if tokens_NT.ndim != 2 or tokens_NT.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be an integer tensor [N, T], got {tokens_NT.dtype} {tuple(tokens_NT.shape)}")
    return tokens_NT.long()


@torch.no_grad()
def last_logits(lm, tokens_BT: torch.Tensor, edits: Mapping[str, Callable] | None, n_keep: int) -> torch.Tensor:
    """Float32 logits of the last ``n_keep`` positions, ``[B, n_keep, V]``, with ``edits`` installed.

    Uses the HF ``logits_to_keep`` argument so the unembedding runs on ``n_keep`` positions only;
    models without it fall back to full logits, sliced.
    """
    tokens_BT = tokens_BT.to(lm.device)
    kwargs = {"logits_to_keep": n_keep} if "logits_to_keep" in inspect.signature(lm.model.forward).parameters else {}
    with lm.hooked(dict(edits or {})):
        out = lm.model(input_ids=tokens_BT, use_cache=False, **kwargs).logits
    return out[:, -n_keep:].float()


@torch.no_grad()
def latent_contributions(sae, x_RD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each kept latent's additive contribution to the SAE output, in the activation's own space.

    Returns ``vals_RK, idx_RK, contrib_RKD`` with ``contrib = val * W_dec[idx] * scale``, where
    ``scale`` is 1, or the per-token std when the SAE normalizes its input (the decoder output is
    multiplied by it on the way out). So ``contrib.sum(1) + b_dec * scale + mean == sae(x)``.
    """
    x_n, state = sae.normalize_input(x_RD.to(sae.W_dec.dtype))
    vals, idx, _ = sae.encode_topk(x_n)
    contrib = vals.unsqueeze(-1) * sae.W_dec[idx]
    if state is not None:
        contrib = contrib * state[1].unsqueeze(1)
    return vals, idx, contrib


def split_by_group(groups_M: torch.Tensor, test_frac: float, g: torch.Generator) -> torch.Tensor | None:
    """A boolean train mask over M examples keeping every group on one side (the probe's and N2G's splits).

    Groups are taken in random order into the held-out part until it holds at least
    ``round(M * test_frac)`` (and at least 1) examples; at least one group stays in train.
    None when the examples come from fewer than two groups.
    """
    ids, inverse, sizes = torch.unique(groups_M.cpu(), return_inverse=True, return_counts=True)
    if ids.numel() < 2:
        return None
    target = max(1, round(groups_M.numel() * test_frac))
    order = torch.randperm(ids.numel(), generator=g)
    n_test_groups = int((sizes[order].cumsum(0) < target).sum()) + 1
    test_groups = order[:min(n_test_groups, ids.numel() - 1)]
    return ~torch.isin(inverse, test_groups)
