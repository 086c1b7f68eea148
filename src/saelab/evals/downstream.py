"""Downstream metrics: the LM's loss with the SAE spliced in at its hook.

- delta CE   = CE(model with x replaced by SAE(x) at the hook) - CE(clean model), same tokens.
- KL         = mean over predictions of KL(p_clean || p_spliced).
- CE recovered against zero- and mean-ablation of the hook:
  (CE_ablated - CE_spliced) / (CE_ablated - CE_clean); 1 is perfect, 0 is no better than ablating.

Position handling: contexts start with BOS. When the SAE was trained without position 0
(``exclude_first``), position 0 is left clean in every edited run, and the prediction made at
position 0 (identical in all runs) is left out of the averages. Otherwise every position is
replaced and every prediction counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class LossTotals:
    """Running sums over predictions; ``result`` turns them into means."""

    ce: dict[str, float] = field(default_factory=dict)
    kl: dict[str, float] = field(default_factory=dict)
    count: int = 0


def ce_and_kl(clean_logits_BTV: torch.Tensor, edited_logits_BTV: torch.Tensor | None, tokens_BT: torch.Tensor,
              first_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-prediction next-token CE of clean and edited logits and KL(clean || edited).

    Predictions at positions first_pos..T-2 (targets first_pos+1..T-1). Returns flat tensors.
    """
    targets = tokens_BT[:, first_pos + 1:].reshape(-1)
    V = clean_logits_BTV.shape[-1]
    logp_clean = F.log_softmax(clean_logits_BTV[:, first_pos:-1].float().reshape(-1, V), dim=-1)
    ce_clean = -logp_clean.gather(1, targets[:, None]).squeeze(1)
    if edited_logits_BTV is None:
        return ce_clean, None, None
    logp_edit = F.log_softmax(edited_logits_BTV[:, first_pos:-1].float().reshape(-1, V), dim=-1)
    ce_edit = -logp_edit.gather(1, targets[:, None]).squeeze(1)
    kl = (logp_clean.exp() * (logp_clean - logp_edit)).sum(dim=-1)
    return ce_clean, ce_edit, kl


def _replace_from(first_pos: int, fn):
    """An edit that replaces positions >= first_pos with fn(x) and keeps earlier positions."""
    def edit(x_BTD: torch.Tensor) -> torch.Tensor:
        if first_pos == 0:
            return fn(x_BTD)
        out = x_BTD.clone()
        out[:, first_pos:] = fn(x_BTD[:, first_pos:])
        return out
    return edit


@torch.no_grad()
def downstream_metrics(lm, sae, tokens_NT: torch.Tensor, *, hook: str | None = None, lm_batch_size: int = 8,
                       exclude_first: bool | None = None, mean_act_D: torch.Tensor | None = None,
                       ablations: tuple[str, ...] = ("zero", "mean"), progress: bool = True) -> dict[str, float]:
    """CE, delta CE, KL and CE recovered for ``sae`` spliced into ``lm`` on ``tokens_NT``.

    ``mean_act_D`` (the mean activation at the hook) is needed for mean-ablation.
    """
    hook = hook or sae.cfg.hook_name
    lm.check_hook(hook)
    sae.check_input(torch.empty(0, lm.hook_width(hook)), name=f"hook {hook}")
    first = 1 if (sae.cfg.exclude_first if exclude_first is None else exclude_first) else 0
    edits = {"spliced": _replace_from(first, sae)}
    if "zero" in ablations:
        edits["zero_abl"] = _replace_from(first, torch.zeros_like)
    if "mean" in ablations:
        if mean_act_D is None:
            raise ValueError("mean-ablation needs mean_act_D, the mean activation at the hook")
        edits["mean_abl"] = _replace_from(first, lambda x: mean_act_D.to(x.dtype).expand_as(x))

    sums = {"clean": 0.0, **{name: 0.0 for name in edits}}
    kl_sum, count = 0.0, 0
    for i in tqdm(range(0, tokens_NT.shape[0], lm_batch_size), desc="downstream", unit="batch", disable=not progress):
        toks = tokens_NT[i:i + lm_batch_size]
        clean = lm.logits(toks)
        for name, fn in edits.items():
            edited = lm.logits(toks, edits={hook: fn})
            ce_clean, ce_edit, kl = ce_and_kl(clean, edited, toks, first)
            sums[name] += float(ce_edit.double().sum())
            if name == "spliced":
                kl_sum += float(kl.double().sum())
        sums["clean"] += float(ce_clean.double().sum())
        count += ce_clean.numel()
        del clean

    ce = {name: s / count for name, s in sums.items()}
    out = {"ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "delta_ce": ce["spliced"] - ce["clean"],
           "kl": kl_sum / count, "n_predictions": count}
    for name in ("zero_abl", "mean_abl"):
        if name in ce:
            out[f"ce_{name}"] = ce[name]
            gap = ce[name] - ce["clean"]
            out[f"ce_recovered_{name.split('_')[0]}"] = (ce[name] - ce["spliced"]) / gap if gap != 0 else float("nan")
    return out
