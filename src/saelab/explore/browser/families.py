"""Feature families across dictionary sizes: how a latent of a small SAE splits into latents of a larger one.

The SAEs must read the same hook (same model, same width); they are sorted by size, n_1 < n_2 < ...,
and each pair of neighbouring sizes is matched on the same tokens (one pass, see
:func:`saelab.explore.browser.build.collect_statistics`): the positions every SAE reads, so position 0
is left out when any of them was trained without it (``n_tokens`` counts these). For parent latent ``i``
of the smaller SAE and child latent ``j`` of the next larger one:

- ``cos[i, j]``: cosine between their decoder rows (directions written into the model);
- ``containment[i, j] = both[i, j] / active[j]``: of the tokens where the child is active, the
  fraction where the parent is active too (P(parent active | child active));
- ``share[i, j] = both[i, j] / active[i]``: of the parent's active tokens, the fraction where this
  child is active (how the parent's tokens are divided among its children);
- ``score[i, j] = sqrt(max(cos, 0) * containment)``, in [0, 1]: high only when the child points
  the same way *and* fires within the parent's tokens.

Each child's **parent** is ``argmax_i score[i, j]``, kept when the score is at least
``min_score``; children with none (or never active on the tokens read) start a family of their
own. Parents link to every child that chose them, so the links form a forest across sizes: a
**family** is the tree under a latent without a parent, and a latent "splits" into its children.

``families.json`` (:func:`family_tree`)::

    format "saelab-feature-families", version 1, hook, model, n_tokens, position_0, min_score, definitions
    saes      [{name, source, n_latents, activation, k}]  (ascending size: the levels; "relu": k null)
    links     [{parent_sae, child_sae, n_children_matched, n_children_active,
                children: [{child, parent, cos, containment, share, score}]}]
    families  [{sae, latent, density, n_descendants, depth, children: [{sae, latent, density, cos,
                containment, share, score, children: [...]}]}]   roots with children, most descendants first
    singletons  {sae: number of latents in no family (no parent, no child)}
    key       (written by build_families) hash of the inputs and settings, keyed by this machine's secret
              (make.build_key; null without one): the same command reuses the file
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from saelab.sae.relu import sparsity_of
from saelab.sae.topk import TopKSAE

FAMILIES_FORMAT = "saelab-feature-families"

DEFINITIONS = {
    "cos": "cosine between the parent's and the child's decoder rows",
    "containment": "P(parent active | child active) on the tokens read",
    "share": "P(child active | parent active) on the tokens read",
    "score": "sqrt(max(cos, 0) * containment); a child's parent is the latent of the next smaller SAE with the "
             "largest score, kept when score >= min_score",
    "density": "fraction of the tokens read at which the latent is active (value > 0)",
    "tokens read": "the positions every SAE reads: position 0 is left out when any SAE was trained without it",
}


class CoactivationCounts:
    """Active-token counts per latent and joint counts for each pair of neighbouring sizes.

    ``saes`` must be sorted by size. Memory: ``4 * n_l * n_{l+1}`` bytes per pair (int32 counts),
    e.g. 268 MB for 4,096 x 16,384.
    """

    def __init__(self, saes: Sequence[TopKSAE]) -> None:
        sizes = [s.n_latents for s in saes]
        if sizes != sorted(sizes):
            raise ValueError(f"SAEs must be sorted by size, got {sizes}")
        self.sizes = sizes
        self.active = [torch.zeros(n, dtype=torch.long) for n in sizes]
        self.both = [torch.zeros(a, b, dtype=torch.int32) for a, b in zip(sizes, sizes[1:])]
        self.n_tokens = 0

    def update(self, codes: Sequence[tuple[torch.Tensor, torch.Tensor]], n_tokens: int) -> None:
        """Add one batch of ``n_tokens`` scored tokens: per SAE (in the order built), ``(vals_BTK, idx_BTK)``
        on the same tokens, unscored positions with value 0."""
        flat = [(v.reshape(-1, v.shape[-1]), i.reshape(-1, i.shape[-1])) for v, i in codes]
        for (v, i), act in zip(flat, self.active):
            on = v > 0
            act.index_add_(0, i[on], torch.ones(int(on.sum()), dtype=torch.long))
        self.n_tokens += n_tokens
        for level, both in enumerate(self.both):
            (va, ia), (vb, ib) = flat[level], flat[level + 1]
            n_b = self.sizes[level + 1]
            pair = ia[:, :, None] * n_b + ib[:, None, :]  # [tokens, k_a, k_b] flat (parent, child) index
            on = (va > 0)[:, :, None] & (vb > 0)[:, None, :]
            sel = pair[on]
            both.view(-1).index_add_(0, sel, torch.ones(sel.shape[0], dtype=torch.int32))


@torch.no_grad()
def match_children(W_parent: torch.Tensor, W_child: torch.Tensor, both: torch.Tensor, active_child: torch.Tensor,
                   active_parent: torch.Tensor, min_score: float, chunk: int = 2048) -> dict[str, torch.Tensor]:
    """Best parent of every child latent (see the module docstring), in chunks of children.

    Returns tensors over children: ``parent`` (-1 = none), ``cos``, ``containment``, ``share``, ``score``
    (of the best parent, whether kept or not).
    """
    Wp = W_parent.float()
    Wp = Wp / Wp.norm(dim=1, keepdim=True).clamp_min(1e-12)
    Wc = W_child.float()
    Wc = Wc / Wc.norm(dim=1, keepdim=True).clamp_min(1e-12)
    # The counts are gathered on the CPU; SAEs given on a GPU keep their decoders there.
    both, active_child, active_parent = (t.to(Wp.device) for t in (both, active_child, active_parent))
    n_c = Wc.shape[0]
    out = {name: torch.zeros(n_c) for name in ("cos", "containment", "share", "score")}
    out["parent"] = torch.full((n_c,), -1, dtype=torch.long)
    act_p = active_parent.double().clamp(min=1)
    for s in range(0, n_c, chunk):
        cos_PC = Wp @ Wc[s:s + chunk].T
        both_PC = both[:, s:s + chunk].double()
        act_c = active_child[s:s + chunk].double()
        cont_PC = both_PC / act_c.clamp(min=1)[None, :]
        score_PC = (cos_PC.clamp(min=0).double() * cont_PC).sqrt()
        best_score, best = score_PC.max(dim=0)
        cols = torch.arange(best.numel())
        out["cos"][s:s + chunk] = cos_PC[best, cols]
        out["containment"][s:s + chunk] = cont_PC[best, cols].float()
        out["share"][s:s + chunk] = (both_PC[best, cols] / act_p[best]).float()
        out["score"][s:s + chunk] = best_score.float()
        keep = (best_score >= min_score) & (act_c > 0)
        out["parent"][s:s + chunk] = torch.where(keep, best, torch.full_like(best, -1))
    return out


def _r(x: float, digits: int = 4) -> float:
    return float(f"{float(x):.{digits}g}")


def family_tree(names: Sequence[str], sources: Sequence[str], saes: Sequence[TopKSAE], counts: CoactivationCounts,
                *, min_score: float, hook: str, model: str, position_0: str = "included") -> dict[str, Any]:
    """The families JSON (module docstring) from the counts of one pass; ``saes`` sorted by size.
    ``position_0``: "excluded" when the counts left position 0 out."""
    n_tok = max(counts.n_tokens, 1)
    links, parent_of = [], []
    for level in range(len(saes) - 1):
        m = match_children(saes[level].W_dec.detach(), saes[level + 1].W_dec.detach(), counts.both[level],
                           counts.active[level + 1], counts.active[level], min_score)
        parent_of.append(m)
        kids = (m["parent"] >= 0).nonzero().squeeze(1).tolist()
        links.append({
            "parent_sae": names[level], "child_sae": names[level + 1], "n_children_matched": len(kids),
            "n_children_active": int((counts.active[level + 1] > 0).sum()),
            "children": [{"child": j, "parent": int(m["parent"][j]), "cos": _r(m["cos"][j]),
                          "containment": _r(m["containment"][j]), "share": _r(m["share"][j]),
                          "score": _r(m["score"][j])} for j in kids],
        })
    # children lists per (level, latent)
    kids_of: list[dict[int, list[int]]] = [dict() for _ in saes]
    for level, m in enumerate(parent_of):
        for j in (m["parent"] >= 0).nonzero().squeeze(1).tolist():
            kids_of[level].setdefault(int(m["parent"][j]), []).append(j)

    def node(level: int, lat: int) -> dict[str, Any]:
        rec: dict[str, Any] = {"sae": names[level], "latent": lat,
                               "density": _r(counts.active[level][lat].item() / n_tok)}
        if level > 0:
            m = parent_of[level - 1]
            rec.update(cos=_r(m["cos"][lat]), containment=_r(m["containment"][lat]), share=_r(m["share"][lat]),
                       score=_r(m["score"][lat]))
        kids = sorted(kids_of[level].get(lat, []), key=lambda j: -float(parent_of[level]["share"][j]))
        rec["children"] = [node(level + 1, j) for j in kids]
        return rec

    def measure(rec: dict[str, Any]) -> tuple[int, int]:
        sub = [measure(c) for c in rec["children"]]
        return sum(n + 1 for n, _ in sub), 1 + max((d for _, d in sub), default=0)

    families, singletons = [], {}
    for level, sae in enumerate(saes):
        has_parent = parent_of[level - 1]["parent"] >= 0 if level > 0 else torch.zeros(sae.n_latents, dtype=torch.bool)
        roots = (~has_parent).nonzero().squeeze(1).tolist()
        alone = 0
        for lat in roots:
            if lat not in kids_of[level]:
                alone += 1
                continue
            rec = node(level, lat)
            rec["n_descendants"], rec["depth"] = measure(rec)
            families.append(rec)
        singletons[names[level]] = alone
    families.sort(key=lambda r: (-r["n_descendants"], names.index(r["sae"]), r["latent"]))
    return {
        "format": FAMILIES_FORMAT, "version": 1, "hook": hook, "model": model, "n_tokens": counts.n_tokens,
        "position_0": position_0, "min_score": min_score, "definitions": DEFINITIONS,
        "saes": [{"name": n, "source": s, "n_latents": sae.n_latents, **sparsity_of(sae)}
                 for n, s, sae in zip(names, sources, saes)],
        "links": links, "families": families, "singletons": singletons,
    }
