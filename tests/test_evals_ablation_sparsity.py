"""Known-answer tests pinning the ablation-sparsity definition (saelab.evals.ablation_sparsity)."""

import json
import math

import pytest
import torch

from saelab.evals._common import latent_contributions
from saelab.evals.ablation_sparsity import (
    AblationSparsityConfig,
    ablation_logit_deltas,
    ablation_sparsity_score,
    random_directions_like,
    run_ablation_sparsity,
)
from saelab.sae.topk import SAEConfig, TopKSAE


# ---- the score ------------------------------------------------------------------------------
def test_score_hand_computed():
    # One position (T=1), V=4, delta (3, 4, 0, 0): L1 = 7, L2 = 5 -> (7/5)^2 / 4 = 0.49.
    d = torch.tensor([[[3.0, 4.0, 0.0, 0.0]]])
    assert ablation_sparsity_score(d, center="none").item() == pytest.approx(0.49, abs=1e-12)
    # Median centering: the lower median of (0, 0, 3, 4) is 0, so nothing changes here ...
    assert ablation_sparsity_score(d, center="median").item() == pytest.approx(0.49, abs=1e-12)
    # ... but (5, 6, 2, 2) has median 2 and centres to (3, 4, 0, 0): same score.
    d2 = torch.tensor([[[5.0, 6.0, 2.0, 2.0]]])
    assert ablation_sparsity_score(d2, center="median").item() == pytest.approx(0.49, abs=1e-12)
    # Two positions concatenated: (1, 0 | 0, 1) -> L1 = 2, L2^2 = 2 -> 4/2 / 4 = 0.5.
    d3 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert ablation_sparsity_score(d3, center="none").item() == pytest.approx(0.5)


def test_score_limits():
    T, V = 3, 101
    one_hot = torch.zeros(1, T, V)
    one_hot[0, 1, 17] = -2.5
    assert ablation_sparsity_score(one_hot).item() == pytest.approx(1 / (V * T))
    signs = torch.randint(0, 2, (1, T, V), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    assert ablation_sparsity_score(0.3 * signs, center="none").item() == pytest.approx(1.0)
    # A constant shift of a position's logits is no effect under median centering: all-zero -> NaN.
    const = torch.full((1, T, V), 4.0)
    assert math.isnan(ablation_sparsity_score(const).item())
    assert math.isnan(ablation_sparsity_score(torch.zeros(2, T, V)).sum().item())


def test_score_gaussian_is_two_over_pi_and_shift_invariant():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(4, 16, 50_000, generator=g)
    s = ablation_sparsity_score(d)
    assert torch.allclose(s, torch.full_like(s, 2 / math.pi), atol=5e-3)
    shift = torch.randn(4, 16, 1, generator=g) * 10  # per-position constants do not matter
    assert torch.allclose(ablation_sparsity_score(d + shift), s, atol=1e-9)


# ---- the ablation itself, on a real (tiny) model ---------------------------------------------
@pytest.fixture(scope="module")
def setup(tiny_gpt2, data_dir):
    from saelab.data import token_contexts

    tokens = token_contexts(str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), tiny_gpt2.tokenizer,
                            40, n_contexts=6, bos_token_id=tiny_gpt2.bos_token_id, limit_docs=4)
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=128, k=6, hook_name="blocks.0.hook_resid_post"))
    return tiny_gpt2, sae, tokens


def test_latent_contributions_sum_to_reconstruction():
    torch.manual_seed(0)
    x = torch.randn(5, 16) * 3 + 1
    for norm in ("none", "layernorm"):
        sae = TopKSAE(SAEConfig(d_in=16, n_latents=40, k=4, input_norm=norm))
        with torch.no_grad():
            sae.b_dec.normal_()
        vals, idx, contrib = latent_contributions(sae, x)
        x_n, state = sae.normalize_input(x)
        bias = sae.b_dec if state is None else sae.b_dec * state[1] + state[0]
        assert torch.allclose(contrib.sum(1) + bias, sae(x), atol=1e-5)


def test_deltas_match_single_ablations_and_respect_causality(setup):
    lm, sae, tokens = setup
    hook, pos, T = sae.cfg.hook_name, 7, 5
    ctx = tokens[0]
    x = lm.activations(ctx[None], hook)[0, pos]
    _, _, contrib = latent_contributions(sae, x[None])
    deltas = contrib[0]
    zero_row = torch.zeros(1, deltas.shape[1])
    batched = ablation_logit_deltas(lm, ctx, pos, torch.cat([deltas, zero_row]), hook, T, batch_size=4)
    assert batched.shape == (deltas.shape[0] + 1, T, lm.vocab_size)
    assert batched[-1].abs().max() == 0  # ablating nothing is exactly the clean model
    clean = lm.logits(ctx[None, :pos + T])[0, pos:]
    for r in (0, deltas.shape[0] - 1):  # one at a time, through the public API
        def edit(a, r=r):
            a = a.clone()
            a[0, pos] -= deltas[r]
            return a
        ablated = lm.logits(ctx[None, :pos + T], edits={hook: edit})[0, pos:]
        assert torch.allclose(batched[r], ablated - clean, atol=1e-4)
        assert batched[r].abs().max() > 0
    # Positions before the ablated one never change (read through a longer window).
    before = ablation_logit_deltas(lm, ctx, pos - 3, torch.zeros(1, 64), hook, 3)
    assert before.abs().max() == 0


def test_random_directions_have_the_latents_sizes_and_no_preferred_axis():
    g = torch.Generator().manual_seed(0)
    contrib = torch.randn(7, 16, generator=g) * torch.arange(1, 8).float()[:, None]
    dirs = random_directions_like(contrib, torch.Generator().manual_seed(1))
    assert torch.allclose(dirs.norm(dim=1), contrib.norm(dim=1), rtol=1e-6)
    assert (dirs / dirs.norm(dim=1, keepdim=True) * contrib / contrib.norm(dim=1, keepdim=True)).sum(1).abs().max() < 0.9
    many = random_directions_like(torch.ones(20_000, 16), torch.Generator().manual_seed(2))
    unit = many / many.norm(dim=1, keepdim=True)
    assert unit.pow(2).mean(0).sub(1 / 16).abs().max() < 3e-3  # every axis gets 1/d of the size
    assert unit.mean(0).abs().max() < 0.01


def test_run_ablation_sparsity_schema_and_ranges(setup):
    lm, sae, tokens = setup
    cfg = AblationSparsityConfig(n_future=8, n_sites=4, channels_per_site=8, batch_size=8, seed=3, n_boot=200)
    res = run_ablation_sparsity(lm, sae, tokens, cfg)
    json.dumps(res, allow_nan=False)
    assert res["metric"] == "ablation_sparsity" and res["vocab_size"] == lm.vocab_size
    assert res["latent"]["n_ablations"] == 4 * 6  # k = 6 active latents at each of 4 sites
    assert res["random"]["n_ablations"] == 4 * 6  # one random direction per latent ablation
    assert res["channel"]["n_ablations"] == 4 * 8
    for part in ("latent", "random", "channel"):
        assert 1 / (8 * lm.vocab_size) <= res[part]["mean"] <= 1
    assert res["ratio_latent_to_random"] == pytest.approx(res["latent"]["mean"] / res["random"]["mean"])
    assert res["random"]["mean"] != res["latent"]["mean"]
    ci = res["intervals"]
    for name, part in (("latent_mean", "latent"), ("random_mean", "random"), ("channel_mean", "channel")):
        assert ci[name]["estimate"] == pytest.approx(res[part]["mean"], rel=1e-9)
        assert ci[name]["low"] <= ci[name]["estimate"] <= ci[name]["high"]
    assert ci["ratio_latent_to_random"]["estimate"] == pytest.approx(res["ratio_latent_to_random"], rel=1e-9)
    assert ci["latent_minus_random"]["estimate"] == pytest.approx(res["latent"]["mean"] - res["random"]["mean"])
    assert 1 <= ci["latent_mean"]["n_groups"] <= 4  # the sites' contexts are the resampled groups
    assert res["ablations_per_s"] > 0
    assert res["latents_per_s"] > 0 and 0 < res["latent_s"] <= res["wall_s"]
    # Same seed, same sites, same numbers.
    again = run_ablation_sparsity(lm, sae, tokens, cfg)
    assert again["latent"]["mean"] == res["latent"]["mean"]
    with pytest.raises(ValueError, match="too short"):
        run_ablation_sparsity(lm, sae, tokens, AblationSparsityConfig(n_future=40))
