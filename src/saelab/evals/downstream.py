"""Downstream metrics: the LM's loss with the SAE spliced in at its hook.

- delta CE   = CE(model with x replaced by SAE(x) at the hook) - CE(clean model), same tokens.
- KL         = mean over predictions of KL(p_clean || p_spliced).
- CE recovered against zero- and mean-ablation of the hook:
  (CE_ablated - CE_spliced) / (CE_ablated - CE_clean); 1 is perfect, 0 is no better than ablating.
  Undefined (NaN; null in metrics.json) where the ablation does not raise CE above the clean
  model's beyond noise: the gap is <= 0, or its 95 % interval (Student's t) over the contexts (or their
  documents, when known) reaches 0 (as N2G's
  ``ce_recovered_partial``, whose bootstrap interval decides); a ratio of noise reads -999 or +1001.

Position handling: contexts start with BOS. When the SAE was trained without position 0
(``exclude_first``), position 0 is left clean in every edited run, and the prediction made at
position 0 (identical in all runs) is left out of the averages. Otherwise every position is
replaced and every prediction counted.

Work shared between the runs: the layers below the hook run once per batch; the clean run and the
edited ones continue from that activation (``LanguageModel.logits_from``), one after the other or
several stacked into one batch (``variants_per_forward``). For hooks that do not hold the whole
residual stream (attn_out, resid_mid, mlp_out) the runs continue from ``resid_pre`` of the hook's
layer and the edit applies inside that layer.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saelab.errors import ConfigError, ShapeMismatchError
from saelab.utils.words import plural


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


def check_predictions(tokens_NT: torch.Tensor, first: int, name: str = "tokens") -> None:
    """Refuse ``tokens_NT`` [N, T] that hold no prediction at positions first..T-2 (a mean over none is 0 / 0)."""
    N, T = tokens_NT.shape[0], tokens_NT.shape[-1]
    if N == 0 or T < first + 2:
        raise ShapeMismatchError(f"{name}: {N} {plural(N, 'context')} of {T} {plural(T, 'token')} hold no next-token "
                                 f"prediction from position {first} on; expected at least 1 context of at least "
                                 f"{first + 2} tokens")


def replace_from(first_pos: int, fn):
    """An edit that replaces positions >= first_pos with fn(x) and keeps earlier positions."""
    def edit(x_BTD: torch.Tensor) -> torch.Tensor:
        if first_pos == 0:
            return fn(x_BTD)
        out = x_BTD.clone()
        out[:, first_pos:] = fn(x_BTD[:, first_pos:])
        return out
    return edit


def _variant_edits(sae, first: int, ablations: tuple[str, ...], mean_act_D: torch.Tensor | None) -> dict:
    """The runs to compare, clean first: name -> edit of the hook activation (None: unedited)."""
    edits = {"clean": None, "spliced": replace_from(first, sae)}
    if "zero" in ablations:
        edits["zero_abl"] = replace_from(first, torch.zeros_like)
    if "mean" in ablations:
        if mean_act_D is None:
            raise ValueError("mean-ablation needs mean_act_D, the mean activation at the hook")
        edits["mean_abl"] = replace_from(first, lambda x: mean_act_D.to(x.device, x.dtype).expand_as(x))
    return edits


def _resume_hook(lm, hook: str) -> str:
    """The residual hook the runs continue from: ``hook`` itself, or ``resid_pre`` of its layer."""
    if hook.endswith(("hook_resid_pre", "hook_resid_post")):
        return hook
    return hook.rsplit(".", 1)[0] + ".hook_resid_pre"


def _stacked_edit(fns: list, batch: int):
    """One edit for ``len(fns)`` runs stacked along the batch: run i's rows get ``fns[i]``."""
    def edit(x_BTD: torch.Tensor) -> torch.Tensor:
        return torch.cat([p if fn is None else fn(p) for fn, p in zip(fns, x_BTD.split(batch))])
    return edit


def variant_logits(lm, start: str, hook: str, acts_BTD: torch.Tensor, tokens_BT: torch.Tensor, edits: dict,
                   per_forward: int = 1):
    """Yield (name, logits ``[B, T, V]``) of each run in ``edits``, continued from ``acts_BTD`` at ``start``.

    ``per_forward`` runs share one forward (stacked along the batch): fewer, larger forwards,
    ``per_forward`` times the logits memory.
    """
    names, B = list(edits), tokens_BT.shape[0]
    for j in range(0, len(names), per_forward):
        group = names[j:j + per_forward]
        fns = [edits[name] for name in group]
        g = len(group)
        hook_edits = {} if fns == [None] else {hook: fns[0] if g == 1 else _stacked_edit(fns, B)}
        logits = lm.logits_from(start, acts_BTD.repeat(g, 1, 1), tokens_BT.repeat(g, 1), edits=hook_edits)
        yield from zip(group, logits.split(B))


@torch.no_grad()
def downstream_metrics(lm, sae, tokens_NT: torch.Tensor, *, hook: str | None = None, lm_batch_size: int = 8,
                       exclude_first: bool | None = None, mean_act_D: torch.Tensor | None = None,
                       ablations: tuple[str, ...] = ("zero", "mean"), progress: bool = True,
                       variants_per_forward: int = 4) -> dict[str, float]:
    """CE, delta CE, KL and CE recovered for ``sae`` spliced into ``lm`` on ``tokens_NT``
    (:func:`downstream_sums`, then :func:`downstream_summary`)."""
    return downstream_summary(downstream_sums(lm, sae, tokens_NT, hook=hook, lm_batch_size=lm_batch_size,
                                              exclude_first=exclude_first, mean_act_D=mean_act_D, ablations=ablations,
                                              progress=progress, variants_per_forward=variants_per_forward))


def downstream_sums(lm, sae, tokens_NT: torch.Tensor, *, hook: str | None = None, lm_batch_size: int = 8,
                    exclude_first: bool | None = None, mean_act_D: torch.Tensor | None = None,
                    ablations: tuple[str, ...] = ("zero", "mean"), progress: bool = True,
                    variants_per_forward: int = 4) -> dict[str, torch.Tensor]:
    """Per-context float64 sums ``[N]`` of each run's next-token CE (``clean``, ``spliced``, ``zero_abl``,
    ``mean_abl``), of KL(clean || spliced) (``kl``) and the predictions counted (``n``).

    ``mean_act_D`` (the mean activation at the hook) is needed for mean-ablation. The layers below
    the hook see ``lm_batch_size`` contexts per forward, the layers above ``variants_per_forward``
    times as many: by default the clean, spliced and two ablated runs in one forward (about as
    fast as one at a time on a quiet CPU, faster on a loaded one; peak memory ~7
    ``[lm_batch_size, T, vocab]`` float32 logits-sized tensors, against ~4 with
    ``variants_per_forward=1`` and ~5 before the runs shared their lower layers).
    """
    hook = hook or sae.cfg.hook_name
    lm.check_hook(hook)
    sae.check_input(torch.empty(0, lm.hook_width(hook)), name=f"hook {hook}")
    sae.check_device(lm.device, f"model {lm.known_as}")
    if not (isinstance(variants_per_forward, int) and variants_per_forward >= 1):
        raise ConfigError(f"variants_per_forward must be an integer >= 1, got {variants_per_forward!r}")
    first = 1 if (sae.cfg.exclude_first if exclude_first is None else exclude_first) else 0
    check_predictions(tokens_NT, first, "tokens_NT")
    edits = _variant_edits(sae, first, ablations, mean_act_D)
    start = _resume_hook(lm, hook)

    sums: dict[str, list[torch.Tensor]] = {name: [] for name in (*edits, "kl")}  # per context
    for i in tqdm(range(0, tokens_NT.shape[0], lm_batch_size), desc="downstream", unit="batch", disable=not progress):
        toks = tokens_NT[i:i + lm_batch_size].to(lm.device)
        acts = lm.activations(toks, start)
        logp_clean = None
        for name, logits in variant_logits(lm, start, hook, acts, toks, edits, variants_per_forward):
            logp = _next_token_logp(logits, first)
            del logits
            ce = -logp.gather(1, toks[:, first + 1:].reshape(-1, 1)).squeeze(1)
            sums[name].append(_per_context(ce, toks.shape[0]))
            if name == "clean":
                logp_clean = logp
            elif name == "spliced":
                sums["kl"].append(_per_context((logp_clean.exp() * (logp_clean - logp)).sum(dim=-1), toks.shape[0]))
    out = {name: torch.cat(s) for name, s in sums.items()}
    out["n"] = torch.full_like(out["clean"], tokens_NT.shape[1] - 1 - first)
    return out


def _per_context(per_prediction: torch.Tensor, n_contexts: int) -> torch.Tensor:
    return per_prediction.double().reshape(n_contexts, -1).sum(1).cpu()


def _next_token_logp(logits_BTV: torch.Tensor, first: int) -> torch.Tensor:
    """float32 log-probabilities ``[B * (T - 1 - first), V]`` of the predictions at positions first..T-2."""
    V = logits_BTV.shape[-1]
    return F.log_softmax(logits_BTV[:, first:-1].float().reshape(-1, V), dim=-1)


def ce_recovered(ablated: torch.Tensor, edited: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(ablated - edited) / (ablated - reference), NaN where the ablation does not raise CE above the reference
    (the scale from 0 to 1 is then undefined)."""
    gap = ablated - reference
    return torch.where(gap > 0, (ablated - edited) / torch.where(gap > 0, gap, torch.ones_like(gap)),
                       torch.full_like(gap, float("nan")))


def downstream_summary(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """The metrics from :func:`downstream_sums`' per-context sums (or per-group sums of them: only the noise
    rule of CE recovered sees the grouping, the means are the same)."""
    count = int(sums["n"].sum())
    ce = {name: float(s.sum()) / count for name, s in sums.items() if name not in ("n", "kl")}
    out = {"ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "delta_ce": ce["spliced"] - ce["clean"],
           "kl": float(sums["kl"].sum()) / count, "n_predictions": count}
    for name in ("zero_abl", "mean_abl"):
        if name in ce:
            out[f"ce_{name}"] = ce[name]
            value = ce_recovered(*(torch.tensor(ce[k], dtype=torch.float64) for k in (name, "spliced", "clean")))
            out[f"ce_recovered_{name.split('_')[0]}"] = float(value) if _rise_beyond_noise(sums, name) else float("nan")
    return out


def downstream_statistics(sums: dict[str, torch.Tensor]) -> dict[str, Callable]:
    """The bootstrap statistics of :func:`downstream_summary`'s sampled numbers, on (per-group) sums: delta CE,
    KL and CE recovered against each ablation run."""
    def mean(name: str) -> Callable:
        return lambda t: t[name] / t["n"]
    stats = {"delta_ce": lambda t: (t["spliced"] - t["clean"]) / t["n"], "kl": mean("kl")}
    for run in ("zero_abl", "mean_abl"):
        if run in sums:
            stats[f"ce_recovered_{run.split('_')[0]}"] = (
                lambda t, run=run: ce_recovered(mean(run)(t), mean("spliced")(t), mean("clean")(t)))
    return stats


def _rise_beyond_noise(sums: dict[str, torch.Tensor], name: str) -> bool:
    """Whether run ``name`` raises CE above the clean run's beyond the noise of the contexts drawn: the 95 %
    interval of the mean per-group rise (a group: a context, or a document of them; Student's t) does not
    reach 0 (from one group: the rise itself). A t interval, where N2G draws bootstrap replicates: those take
    1,000 x N counts in memory (1.6 GB at 65,536 contexts) to decide one sign."""
    import scipy.stats  # here: every saelab command imports this module, few reach this test

    rise = (sums[name] - sums["clean"]).double()
    if rise.numel() < 2:
        return bool(rise.sum() > 0)
    quantile = scipy.stats.t.ppf(0.975, rise.numel() - 1)  # few groups: Student's t, not the normal's 1.96
    return bool(rise.mean() - quantile * rise.std() / rise.numel() ** 0.5 > 0)
