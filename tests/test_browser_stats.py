"""The feature browser's one-pass statistics against brute-force dense references.

Unit tests of the accumulators (running top-k merge, per-context maxima, sample keys, doubling
histogram, firing counts), of decoder neighbours and of the direct logit effect; then the whole
pass on the tiny GPT-2 over real Wikipedia text, checked latent by latent against dense codes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_browser_site import POOL

from saelab.explore.browser.build import (
    BrowseConfig,
    SAESource,
    collect_statistics,
    direct_logit_effects,
    nearest_by_decoder,
    read_tokens,
)
from saelab.explore.browser.stats import (
    DoublingHistogram,
    FiringCounts,
    RunningTopK,
    active_entries,
    context_maxima,
    context_rows,
    sample_keys,
)
from saelab.sae import SAEConfig, TopKSAE

HOOK = "blocks.1.hook_resid_post"


def brute_topk(scores_NM: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k largest finite scores, ties to the earlier column; padded with (-inf, -1)."""
    N, M = scores_NM.shape
    vals = torch.full((N, k), float("-inf"))
    idx = torch.full((N, k), -1, dtype=torch.long)
    for n in range(N):
        order = sorted((c for c in range(M) if np.isfinite(float(scores_NM[n, c]))),
                       key=lambda c: (-float(scores_NM[n, c]), c))[:k]
        vals[n, :len(order)] = scores_NM[n, order]
        idx[n, :len(order)] = torch.tensor(order, dtype=torch.long)
    return vals, idx


@pytest.mark.parametrize("batch_sizes", [[7, 7, 7, 7, 2], [1] * 10 + [20], [30]])
def test_running_topk_equals_brute_force(batch_sizes):
    g = torch.Generator().manual_seed(0)
    N, M, K = 9, sum(batch_sizes), 5
    # few distinct values, so ties are frequent; -inf holes (latent not active in that context)
    scores = torch.randint(0, 6, (N, M), generator=g).float()
    scores[torch.rand(N, M, generator=g) < 0.4] = float("-inf")
    scores[0] = float("-inf")  # a latent that never fires
    scores[1, :3] = 9.0  # fewer than K finite entries elsewhere is fine too
    scores[1, 3:] = float("-inf")
    top = RunningTopK(N, K, {"ctx": (), "rows": (3,)}, {"rows": torch.float32})
    start = 0
    for b in batch_sizes:
        cols = torch.arange(start, start + b)

        def payload(rows_P, items_P, cols=cols):
            ctx = cols[items_P]
            return {"ctx": ctx, "rows": torch.stack([ctx.float(), rows_P.float(), -ctx.float()], dim=1)}

        top.update(scores[:, start:start + b], payload)
        start += b
    want_vals, want_idx = brute_topk(scores, K)
    torch.testing.assert_close(top.score_NK, want_vals)
    assert torch.equal(top.payload["ctx"], want_idx)
    filled = want_idx >= 0
    rows = top.payload["rows"]
    assert torch.equal(rows[..., 0][filled], want_idx[filled].float())
    assert torch.equal(rows[..., 1][filled], torch.arange(N)[:, None].expand(N, K)[filled].float())
    assert (rows[~filled] == 0).all()


def test_context_maxima_rows_and_active_entries_match_dense():
    g = torch.Generator().manual_seed(1)
    B, T, K, n = 3, 6, 4, 11
    idx = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    vals = torch.randn(B, T, K, generator=g).relu()
    vals[0, 1, 0] = vals[0, 4, 0] = 5.0  # a tie within a context: the first position is reported
    idx[0, 1, 0] = idx[0, 4, 0] = 7
    idx[0, 4, 1:] = torch.tensor([0, 1, 2])
    idx[0, 1, 1:] = torch.tensor([3, 4, 5])
    z = torch.zeros(B, T, n).scatter_(-1, idx, vals)
    max_NB, pos_NB = context_maxima(vals, idx, n)
    for b in range(B):
        for lat in range(n):
            col = z[b, :, lat]
            if col.max() > 0:
                assert max_NB[lat, b] == col.max()
                assert pos_NB[lat, b] == int((col == col.max()).nonzero()[0])
            else:
                assert max_NB[lat, b] == float("-inf") and pos_NB[lat, b] == T
    assert pos_NB[7, 0] == 1
    lat_P, item_P = torch.meshgrid(torch.arange(n), torch.arange(B), indexing="ij")
    rows = context_rows(vals, idx, n, lat_P.flatten(), item_P.flatten())
    assert torch.equal(rows, z.permute(2, 0, 1).reshape(n * B, T))
    some = torch.tensor([5, 0, 9]), torch.tensor([2, 2, 0])
    assert torch.equal(context_rows(vals, idx, n, *some), z[some[1], :, some[0]])
    lat_M, val_M = active_entries(vals, idx)
    dense_counts = (z > 0).sum(dim=(0, 1))
    assert torch.equal(torch.bincount(lat_M, minlength=n), dense_counts)
    counts = FiringCounts(n)
    counts.update(lat_M, val_M)
    assert torch.equal(counts.count_N, dense_counts)
    torch.testing.assert_close(counts.sum_N, z.sum(dim=(0, 1)).double())


def test_sample_keys_are_uniform_and_independent_of_batching():
    keys = sample_keys(torch.arange(4000), 8, seed=3)
    assert keys.shape == (8, 4000) and (keys >= 0).all() and (keys < 1).all()
    assert torch.equal(keys[:, 1000:1010], sample_keys(torch.arange(1000, 1010), 8, seed=3))
    assert not torch.equal(keys, sample_keys(torch.arange(4000), 8, seed=4))
    # uniform: the deciles hold ~10% each (32,000 keys: a 3-sigma band is about +-0.5%)
    frac = torch.histc(keys.flatten(), bins=10, min=0, max=1) / keys.numel()
    assert (frac - 0.1).abs().max() < 0.008
    # and unrelated across latents
    assert abs(float(torch.corrcoef(keys[:2])[0, 1])) < 0.05


@pytest.mark.parametrize("n_bins", [4, 64])
def test_doubling_histogram_equals_final_histogram(n_bins):
    g = torch.Generator().manual_seed(2)
    n = 5
    hist = DoublingHistogram(n, n_bins)
    seen: dict[int, list[float]] = {i: [] for i in range(n)}
    for step in range(12):
        m = 40
        lat = torch.randint(0, n - 1, (m,), generator=g)  # latent n-1 never fires
        scale = 2.0 ** (step - 4)  # ranges grow over the batches, so bins must merge
        val = torch.rand(m, generator=g) * scale + 1e-6
        val[:3] = torch.tensor([scale, scale / 2, scale * 3 / n_bins])  # exact powers and bin edges
        hist.update(lat, val)
        for a, v in zip(lat.tolist(), val.tolist()):
            seen[a].append(v)
    top = hist.top_edge()
    for i in range(n):
        if not seen[i]:
            assert hist.counts_NH[i].sum() == 0 and top[i] == 0
            continue
        vmax = max(seen[i])
        assert top[i] > vmax and top[i] / 2 <= vmax  # smallest power of two above the max
        want, _ = np.histogram(np.array(seen[i], dtype=np.float32), bins=hist.edges(i).numpy())
        assert hist.counts_NH[i].tolist() == want.tolist()


def test_nearest_by_decoder_matches_brute_force():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(50, 8, generator=g) * torch.rand(50, 1, generator=g)  # rows of any norm
    got = nearest_by_decoder(W, 5, chunk=16)
    Wn = W / W.norm(dim=1, keepdim=True)
    cos = Wn @ Wn.T
    cos.fill_diagonal_(float("-inf"))
    want = cos.topk(5, dim=1)
    torch.testing.assert_close(got["cos"], want.values)
    assert torch.equal(got["ids"], want.indices)
    assert not (got["ids"] == torch.arange(50)[:, None]).any()


def small_sae(n: int = 96, k: int = 6, seed: int = 0, d: int = 64, hook: str = HOOK) -> TopKSAE:
    torch.manual_seed(seed)
    return TopKSAE(SAEConfig(d_in=d, n_latents=n, k=k, hook_name=hook, model_name="tiny", context_size=32))


def test_direct_logit_effect_matches_per_latent_function(tiny_gpt2):
    from saelab.explore.attribution import latent_logit_effects

    sae = small_sae()
    got = direct_logit_effects(tiny_gpt2, sae, 7, chunk=10)
    for lat in (0, 13, 95):
        ref = latent_logit_effects(tiny_gpt2, sae, lat, top=7)
        assert got["pos_ids"][lat].tolist() == [i for _, i, _ in ref["promoted"]]
        assert got["neg_ids"][lat].tolist() == [i for _, i, _ in ref["suppressed"]]
        torch.testing.assert_close(got["pos_vals"][lat], torch.tensor([v for _, _, v in ref["promoted"]]))


@pytest.fixture(scope="module")
def wiki_tokens(tiny_gpt2, data_dir):
    cfg = BrowseConfig(n_tokens=31 * 40, corpus=str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"),
                       sample_pool_tokens=POOL)
    return read_tokens(tiny_gpt2, small_sae(), cfg)


def test_one_pass_statistics_equal_dense_reference(tiny_gpt2, wiki_tokens):
    sae = small_sae()
    with torch.no_grad():  # b_dec at the data mean, so latents fire at varied rates
        x = tiny_gpt2.activations(wiki_tokens[:8], HOOK)[:, 1:].reshape(-1, 64)
        sae.b_dec.copy_(x.mean(0))
    cfg = BrowseConfig(n_top=5, n_samples=6, n_bins=16, lm_batch_size=7)
    (st,), _, _ = collect_statistics(tiny_gpt2, [SAESource("s", "mem", sae)], wiki_tokens, cfg, hook=HOOK,
                                     progress=False)
    assert wiki_tokens.shape == (40, 32)
    with torch.no_grad():
        z = sae.encode(tiny_gpt2.activations(wiki_tokens, HOOK))  # [N, T, n] dense
    z[:, 0] = 0  # position 0 is not scored (exclude_first)
    N, T, n = z.shape
    assert st.n_tokens == N * (T - 1)
    torch.testing.assert_close(st.count_N, (z > 0).sum(dim=(0, 1)))
    torch.testing.assert_close(st.max_N, z.amax(dim=(0, 1)))
    torch.testing.assert_close(st.mean_N.float(), z.sum(dim=(0, 1)) / (z > 0).sum(dim=(0, 1)).clamp(min=1))
    ctx_max = z.amax(dim=1)  # [N, n]
    keys = sample_keys(torch.arange(N), n, cfg.seed)
    checked = 0
    for lat in range(n):
        col = ctx_max[:, lat].clone()
        col[col <= 0] = float("-inf")
        want_vals, want_ctx = brute_topk(col[None], cfg.n_top)
        assert st.top_ctx_NK[lat].tolist() == want_ctx[0].tolist()
        torch.testing.assert_close(st.top_act_NK[lat], want_vals[0].nan_to_num(0, neginf=0).clamp(min=0))
        for c, p, row in zip(st.top_ctx_NK[lat], st.top_pos_NK[lat], st.top_rows_NKT[lat]):
            if c >= 0:
                torch.testing.assert_close(row, z[c, :, lat])
                assert z[c, p, lat] == ctx_max[c, lat]
        # quantile samples: the contexts where the latent fires with the largest keys
        k = keys[lat].clone()
        k[~torch.isfinite(col)] = float("-inf")
        _, want_s = brute_topk(k[None], cfg.n_samples)
        assert sorted(st.sample_ctx_NS[lat].tolist()) == sorted(want_s[0].tolist())
        for c, m in zip(st.sample_ctx_NS[lat], st.sample_act_NS[lat]):
            if c >= 0:
                assert m == ctx_max[c, lat]
        vals = z[..., lat][z[..., lat] > 0]
        if vals.numel():
            edges = torch.linspace(0, float(st.hist_top_N[lat]), cfg.n_bins + 1)
            want_h, _ = np.histogram(vals.numpy(), bins=edges.numpy())
            assert st.hist_NH[lat].tolist() == want_h.tolist()
            checked += 1
    assert checked > n // 2  # most latents fired, so the comparison covered real data


def test_statistics_do_not_depend_on_the_batch_size(tiny_gpt2, wiki_tokens):
    sae = small_sae(seed=1)
    runs = []
    for bs in (3, 16):
        cfg = BrowseConfig(n_top=4, n_samples=5, n_bins=8, lm_batch_size=bs)
        (st,), _, _ = collect_statistics(tiny_gpt2, [SAESource("s", "mem", sae)], wiki_tokens, cfg, hook=HOOK,
                                         progress=False)
        runs.append(st)
    a, b = runs
    for name in ("count_N", "hist_NH", "top_ctx_NK", "top_pos_NK", "sample_ctx_NS"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.top_rows_NKT, b.top_rows_NKT)


def test_each_sae_is_scored_from_its_own_first_position(tiny_gpt2, wiki_tokens):
    """Of two SAEs on one hook, one trained with position 0 and one without it, both were scored from the first
    one's position: the second's statistics changed with the order given (the SAE without position 0 was
    scored at BOS, where activations are largest). Each now has the statistics it has alone; the families
    count the positions both read."""
    without, with_bos = small_sae(seed=4), small_sae(n=128, seed=5)
    with_bos.cfg.exclude_first = False
    with torch.no_grad():  # centred on the text past BOS, so BOS stands out as it does for a trained SAE
        x = tiny_gpt2.activations(wiki_tokens[:8], HOOK)[:, 1:].reshape(-1, 64)
        without.b_dec.copy_(x.mean(0))
        with_bos.b_dec.copy_(x.mean(0))
    cfg = BrowseConfig(n_top=4, n_samples=5, n_bins=8, lm_batch_size=16)
    a, b = SAESource("without", "mem", without), SAESource("with", "mem", with_bos)

    def scored(*sources):
        return collect_statistics(tiny_gpt2, list(sources), wiki_tokens, cfg, hook=HOOK, progress=False)

    alone = {s.name: scored(s)[0][0] for s in (a, b)}
    N, T = wiki_tokens.shape
    assert (alone["without"].n_tokens, alone["with"].n_tokens) == (N * (T - 1), N * T)
    assert (alone["with"].top_pos_NK[alone["with"].top_ctx_NK >= 0] == 0).any()  # BOS is among its top examples
    for order in ((a, b), (b, a)):
        stats, coact, _ = scored(*order)
        for st in stats:
            own = alone[st.source.name]
            assert st.n_tokens == own.n_tokens
            for name in ("count_N", "sum_N", "max_N", "hist_NH", "top_act_NK", "top_ctx_NK", "top_pos_NK",
                         "top_rows_NKT", "sample_ctx_NS", "sample_pos_NS", "sample_rows_NST"):
                assert torch.equal(getattr(st, name), getattr(own, name)), (st.source.name, name)
        # families: the positions both read, so the SAE with position 0 is counted past it
        assert coact.n_tokens == N * (T - 1)
        z = with_bos.encode(tiny_gpt2.activations(wiki_tokens, HOOK)).detach()[:, 1:]
        assert torch.equal(coact.active[1], (z > 0).sum(dim=(0, 1)))
        assert torch.equal(coact.active[0], alone["without"].count_N)
