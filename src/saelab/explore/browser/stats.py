"""Per-latent statistics gathered in one pass, batch by batch, with tensor ops only.

Every accumulator here takes a batch of SAE codes in the sparse form the top-k SAE produces
(``vals_BTK`` kept values after ReLU, ``idx_BTK`` their latent indices, for B contexts of T
tokens) and updates fixed-size state; none loops over tokens or latents in Python. Positions
that are not scored (position 0 when the SAE leaves BOS out) must arrive with value 0: a latent
is *active* at a token when its kept value is > 0.

- :class:`RunningTopK`: per latent, the K largest scores seen so far with a payload per entry.
  Each update concatenates the state ``[N, K]`` with the batch's candidates ``[N, B]`` and keeps
  the top K (a merge, not a heap of Python objects). Ties are broken towards earlier entries.
- :func:`context_maxima` / :func:`context_rows`: a latent's largest activation in each context and
  where it is; the latent's activations along a context, for the entries that enter a top-k.
- :func:`sample_keys`: a deterministic uniform key per (context, latent), so that keeping the K
  largest keys among the contexts where a latent fires is a uniform sample without replacement
  of those contexts, whatever the batch size.
- :class:`DoublingHistogram`: an exact histogram of each latent's nonzero activations in
  ``n_bins`` equal bins ``[lo, hi)`` over ``[0, 2^e)``, where ``2^e`` is the smallest power of two
  above the latent's largest activation. When a larger value arrives the range doubles (as often
  as needed) and adjacent bins merge pairwise, so the counts always equal those of a histogram
  made at the end with the final edges.
- :class:`FiringCounts`: per latent, the number of active tokens and the sum of its values.
- :func:`select_latents`: the codes of a few chosen latents only, renumbered, for the same accumulators.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


class RunningTopK:
    """The ``k`` largest scores per row (latent) with integer payloads, merged batch by batch.

    ``payload_shapes`` names extra per-entry tensors, e.g. ``{"ctx": (), "pos": ()}`` (long) or
    ``{"acts": (T,)}`` (with ``payload_dtypes``). Empty slots have score ``-inf`` and payload -1/0.
    Candidates with score ``-inf`` never enter.
    """

    def __init__(self, n_rows: int, k: int, payload_shapes: dict[str, tuple[int, ...]],
                 payload_dtypes: dict[str, torch.dtype] | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.n_rows, self.k = n_rows, k
        self.score_NK = torch.full((n_rows, k), float("-inf"))
        dtypes = payload_dtypes or {}
        self.payload = {
            name: torch.full((n_rows, k, *shape), -1 if dtypes.get(name, torch.long) == torch.long else 0,
                             dtype=dtypes.get(name, torch.long))
            for name, shape in payload_shapes.items()
        }

    def update(self, score_NB: torch.Tensor, payload_fn) -> None:
        """Merge candidates ``score_NB`` (one per row and batch item, ``-inf`` = none).

        ``payload_fn(rows_P, items_P)`` returns ``{name: tensor [P, *shape]}`` for the candidates
        that entered, so payloads (e.g. activation rows) are built only for those.
        """
        N, K = self.score_NK.shape
        all_NM = torch.cat([self.score_NK, score_NB.to(self.score_NK.dtype)], dim=1)
        # stable descending sort keeps earlier entries first among equal scores
        order_NM = all_NM.argsort(dim=1, descending=True, stable=True)[:, :K]
        new_score = all_NM.gather(1, order_NM)
        from_batch = (order_NM >= K) & torch.isfinite(new_score)
        # Rows that take no candidate keep their entries in the same order (stable sort of a sorted
        # row), so only the changed rows' payloads are rebuilt: after the first batches, few rows.
        changed = from_batch.any(dim=1).nonzero().squeeze(1)
        self.score_NK = new_score
        if changed.numel() == 0:
            return
        order_CK, fresh_CK = order_NM[changed], from_batch[changed]
        rows_P, slots_P = fresh_CK.nonzero(as_tuple=True)
        fresh = payload_fn(changed[rows_P], order_CK[rows_P, slots_P] - K)
        keep_CK = order_CK.clamp(max=K - 1)
        empty_CK = ~torch.isfinite(new_score[changed])
        for name, old in self.payload.items():
            sub = old[changed]
            merged = sub.gather(1, keep_CK.reshape(*keep_CK.shape, *([1] * (old.dim() - 2))).expand_as(sub))
            merged[rows_P, slots_P] = fresh[name].to(old.dtype)
            merged[empty_CK] = -1 if old.dtype == torch.long else 0
            old[changed] = merged


def context_maxima(vals_BTK: torch.Tensor, idx_BTK: torch.Tensor, n_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each latent's maximum in each context, from the sparse codes (no dense [B, T, n] tensor).

    Returns ``max_NB`` (the latent's largest activation in each context, ``-inf`` where it is never
    active there) and ``pos_NB`` (the first position reaching it; T where never active).
    """
    B, T, K = vals_BTK.shape
    flat = (torch.arange(B)[:, None, None] * n_latents + idx_BTK).reshape(-1)
    v = vals_BTK.reshape(-1).float()
    max_flat = torch.zeros(B * n_latents).scatter_reduce_(0, flat, v, reduce="amax")
    t = torch.arange(T)[None, :, None].expand(B, T, K).reshape(-1)
    at_max = (v > 0) & (v == max_flat[flat])
    pos_flat = torch.full((B * n_latents,), T, dtype=torch.long).scatter_reduce_(0, flat[at_max], t[at_max],
                                                                                reduce="amin")
    max_NB = max_flat.view(B, n_latents).T.contiguous()
    max_NB[max_NB <= 0] = float("-inf")
    return max_NB, pos_flat.view(B, n_latents).T.contiguous()


def context_rows(vals_BTK: torch.Tensor, idx_BTK: torch.Tensor, n_latents: int, lat_P: torch.Tensor,
                 item_P: torch.Tensor) -> torch.Tensor:
    """``[P, T]``: the activations of latent ``lat_P[p]`` at every position of context ``item_P[p]``.

    Built by scattering the sparse entries of the wanted (context, latent) pairs, so the cost is
    that of the batch's entries, not of a dense [B, T, n] tensor.
    """
    B, T, K = vals_BTK.shape
    table = torch.full((B, n_latents), -1, dtype=torch.long)
    table[item_P, lat_P] = torch.arange(lat_P.numel())
    pid = table[torch.arange(B)[:, None, None].expand(B, T, K), idx_BTK].reshape(-1)
    v = vals_BTK.reshape(-1).float()
    keep = (pid >= 0) & (v > 0)
    t = torch.arange(T)[None, :, None].expand(B, T, K).reshape(-1)
    rows = torch.zeros(lat_P.numel(), T)
    rows[pid[keep], t[keep]] = v[keep]  # top-k indices are distinct per token: no collisions
    return rows


def sample_keys(ctx_B: torch.Tensor, n_latents: int, seed: int) -> torch.Tensor:
    """Pseudo-random keys in [0, 1), ``[n_latents, B]``, a fixed function of (seed, context, latent).

    A 32-bit integer hash (multiply / xor-shift rounds, every product kept below 2^63), so the
    same context and latent get the same key in any batch.
    """
    lat = torch.arange(n_latents, dtype=torch.long)[:, None]
    h = (ctx_B.long()[None, :] * 0x27D4EB2D + lat * 0x165667B1 + (seed & 0x7FFFFFFF) * 0x61C88647) & _MASK32
    for mult in (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39):
        h = h ^ (h >> 15)
        h = (h * mult) & _MASK32
    h = h ^ (h >> 16)
    return h.double().div_(2.0**32).float()


class DoublingHistogram:
    """Exact per-latent histograms of nonzero activations on a range that doubles (module docstring)."""

    def __init__(self, n_latents: int, n_bins: int = 64) -> None:
        if n_bins < 2 or n_bins & (n_bins - 1):
            raise ValueError(f"n_bins must be a power of two >= 2, got {n_bins}")
        self.n_bins = n_bins
        self.log2_bins = n_bins.bit_length() - 1
        self.counts_NH = torch.zeros(n_latents, n_bins, dtype=torch.long)
        self.exp_N = torch.zeros(n_latents, dtype=torch.long)
        self.seen_N = torch.zeros(n_latents, dtype=torch.bool)

    def update(self, lat_M: torch.Tensor, val_M: torch.Tensor) -> None:
        """Add values ``val_M`` (> 0) of latents ``lat_M``."""
        if lat_M.numel() == 0:
            return
        val_M = val_M.float()
        bmax_N = torch.zeros(self.exp_N.shape[0]).scatter_reduce_(0, lat_M, val_M, reduce="amax")
        hit = bmax_N > 0
        _, ex = torch.frexp(bmax_N[hit])  # max = m 2^ex, m in [0.5, 1)
        need = ex.long()  # smallest e with 2^e > max (strictly: no value sits on the top edge)
        old = self.exp_N[hit]
        was_seen = self.seen_N[hit]
        new = torch.where(was_seen, torch.maximum(old, need), need)
        grow_N = torch.zeros_like(self.exp_N)
        grow_N[hit] = torch.where(was_seen, new - old, torch.zeros_like(new))
        self.exp_N[hit] = new
        self.seen_N[hit] = True
        for d in grow_N[grow_N > 0].unique().tolist():  # a handful of distinct growth steps per batch
            sel = (grow_N == d).nonzero().squeeze(1)
            c = self.counts_NH[sel]
            if d >= self.log2_bins:
                merged = torch.zeros_like(c)
                merged[:, 0] = c.sum(1)
            else:
                g = 1 << d
                merged = torch.zeros_like(c)
                merged[:, : self.n_bins // g] = c.view(-1, self.n_bins // g, g).sum(-1)
            self.counts_NH[sel] = merged
        # bin width 2^(e - log2_bins): dividing by a power of two is exact, so floor() is exact
        shift = (self.log2_bins - self.exp_N[lat_M]).to(torch.int32)
        scale = torch.ldexp(torch.ones(shift.shape), shift)
        bins = (val_M * scale).floor().long().clamp_(0, self.n_bins - 1)
        self.counts_NH.view(-1).index_add_(0, lat_M * self.n_bins + bins, torch.ones_like(bins))

    def edges(self, latent: int) -> torch.Tensor:
        """The ``n_bins + 1`` bin edges of one latent (all zero if it never fired)."""
        if not bool(self.seen_N[latent]):
            return torch.zeros(self.n_bins + 1)
        return torch.linspace(0, float(self.top_edge()[latent]), self.n_bins + 1)

    def top_edge(self) -> torch.Tensor:
        """``2^e`` per latent, the histogram's upper edge (0 where it never fired)."""
        top = torch.ldexp(torch.ones(self.exp_N.shape), self.exp_N.to(torch.int32))
        return torch.where(self.seen_N, top, torch.zeros_like(top))


class FiringCounts:
    """Active-token counts and activation sums per latent."""

    def __init__(self, n_latents: int) -> None:
        self.count_N = torch.zeros(n_latents, dtype=torch.long)
        self.sum_N = torch.zeros(n_latents, dtype=torch.float64)

    def update(self, lat_M: torch.Tensor, val_M: torch.Tensor) -> None:
        self.count_N.index_add_(0, lat_M, torch.ones_like(lat_M))
        self.sum_N.index_add_(0, lat_M, val_M.double())


def active_entries(vals_BTK: torch.Tensor, idx_BTK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent, value) of every kept entry with value > 0, flattened."""
    mask = vals_BTK > 0
    return idx_BTK[mask], vals_BTK[mask]


def select_latents(vals_BTK: torch.Tensor, idx_BTK: torch.Tensor, latents_L: torch.Tensor,
                   n_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes restricted to the latents ``latents_L`` (distinct), renumbered 0..L-1.

    Entries of other latents keep their slot with value 0 and index 0: every accumulator here
    ignores values <= 0, so the result reads as the codes of an SAE with only those L latents.
    """
    where_N = torch.full((n_latents,), -1, dtype=torch.long)
    where_N[latents_L] = torch.arange(latents_L.numel())
    new_idx = where_N[idx_BTK]
    keep = new_idx >= 0
    return torch.where(keep, vals_BTK, torch.zeros_like(vals_BTK)), new_idx.clamp(min=0)
