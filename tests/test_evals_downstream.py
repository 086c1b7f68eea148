"""Downstream metrics (delta CE, KL, CE recovered) against a plain reference: four full forwards per
batch through ``lm.logits`` with the edit installed at the hook, on real models and real text."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from saelab.data import token_contexts
from saelab.evals.downstream import downstream_metrics
from saelab.sae import SAEConfig, TopKSAE

EVAL = ("wiki-en", "wiki_eval.jsonl.xz")


def reference_metrics(lm, sae, tokens_NT, hook, first, mean_D, batch=4):
    """The definition, computed the obvious way: each run is a full forward of the model."""
    def replace_from_first(fn):
        def edit(x):
            out = x.clone()
            out[:, first:] = fn(x[:, first:])
            return out
        return edit

    runs = {"spliced": replace_from_first(sae), "zero_abl": replace_from_first(torch.zeros_like),
            "mean_abl": replace_from_first(lambda x: mean_D.to(x.dtype).expand_as(x))}
    ce = {name: [] for name in ("clean", *runs)}
    kl = []
    for toks in tokens_NT.split(batch):
        targets = toks[:, first + 1:].reshape(-1)
        clean = lm.logits(toks)[:, first:-1].float().flatten(0, 1)
        ce["clean"].append(F.cross_entropy(clean, targets, reduction="none"))
        for name, fn in runs.items():
            edited = lm.logits(toks, edits={hook: fn})[:, first:-1].float().flatten(0, 1)
            ce[name].append(F.cross_entropy(edited, targets, reduction="none"))
            if name == "spliced":
                kl.append(F.kl_div(edited.log_softmax(-1), clean.log_softmax(-1), log_target=True,
                                   reduction="none").sum(-1))
    mean = {name: torch.cat(v).double().mean().item() for name, v in ce.items()}

    def recovered(ablated):  # undefined unless the ablation raises CE beyond noise (test ...beyond_noise)
        rise = (torch.cat(ce[ablated]) - torch.cat(ce["clean"])).double().reshape(tokens_NT.shape[0], -1).sum(1)
        half_width = scipy.stats.t.ppf(0.975, rise.numel() - 1) * rise.std() / rise.numel() ** 0.5
        gap = mean[ablated] - mean["clean"]
        return (mean[ablated] - mean["spliced"]) / gap if rise.mean() > half_width else math.nan

    return {"ce_clean": mean["clean"], "ce_spliced": mean["spliced"], "delta_ce": mean["spliced"] - mean["clean"],
            "kl": torch.cat(kl).double().mean().item(), "n_predictions": torch.cat(ce["clean"]).numel(),
            "ce_zero_abl": mean["zero_abl"], "ce_mean_abl": mean["mean_abl"],
            "ce_recovered_zero": recovered("zero_abl"), "ce_recovered_mean": recovered("mean_abl")}


def assert_metrics_match(got, want):
    assert set(got) == set(want)
    assert got["n_predictions"] == want["n_predictions"]
    for key, value in want.items():
        # float32 logits, double sums: the runs differ at most by GEMM rounding between batch shapes
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key


def mean_activation(lm, tokens_NT, hook, first):
    return lm.activations(tokens_NT, hook)[:, first:].reshape(-1, lm.d_model).mean(0)


def centred_sae(lm, hook, tokens_NT, n=256, k=8, seed=0, exclude_first=True):
    """A random SAE centred on the model's activations (its latents fire like a trained one's)."""
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=lm.d_model, n_latents=n, k=k, hook_name=hook, exclude_first=exclude_first))
    with torch.no_grad():
        sae.b_dec.copy_(mean_activation(lm, tokens_NT, hook, 1))
    return sae


@pytest.fixture(scope="module")
def series_case(tiny_series, data_dir):
    """A 2-layer model trained on Wikipedia, an SAE between its layers, 10 real eval contexts of 32 tokens.
    Not the last layer's output: there an edit at position 0 reaches only the prediction at 0, which is
    not counted. k=2 because this small model hardly uses the detail of its residual stream."""
    from saelab.models import load_model

    lm = load_model(str(tiny_series / "checkpoint-120"))
    tokens = token_contexts(str(data_dir.joinpath(*EVAL)), lm.tokenize, 32, n_contexts=10,
                            bos_token_id=lm.bos_token_id)
    return lm, centred_sae(lm, "blocks.0.hook_resid_post", tokens, n=128, k=2), tokens


@pytest.mark.parametrize("exclude_first", [True, False])
@pytest.mark.parametrize("per_forward", [1, 4])
def test_matches_full_forwards_on_trained_model(series_case, exclude_first, per_forward):
    lm, sae, tokens = series_case
    hook, first = sae.cfg.hook_name, int(exclude_first)
    mean_D = mean_activation(lm, tokens, hook, first)
    got = downstream_metrics(lm, sae, tokens, lm_batch_size=4, exclude_first=exclude_first, mean_act_D=mean_D,
                             progress=False, variants_per_forward=per_forward)
    assert_metrics_match(got, reference_metrics(lm, sae, tokens, hook, first, mean_D))
    assert got["n_predictions"] == 10 * (31 - first)
    assert got["delta_ce"] > 0.01  # the splice does change the model, so the comparison means something


@pytest.mark.parametrize("kind", ["resid_pre", "attn_out", "resid_mid", "mlp_out"])
def test_matches_full_forwards_at_every_hook_kind(series_case, kind):
    """resid_pre continues from the hook itself; the others from resid_pre of their layer."""
    lm, _, tokens = series_case
    hook = f"blocks.1.hook_{kind}"
    sae = centred_sae(lm, hook, tokens)
    mean_D = mean_activation(lm, tokens, hook, 1)
    got = downstream_metrics(lm, sae, tokens, lm_batch_size=4, mean_act_D=mean_D, progress=False,
                             variants_per_forward=2)
    assert_metrics_match(got, reference_metrics(lm, sae, tokens, hook, 1, mean_D))
    assert abs(got["delta_ce"]) > 1e-3


def test_layers_below_the_hook_run_once_per_batch(series_case):
    lm, sae, tokens = series_case  # hook blocks.0.hook_resid_post: layer 0 runs in the lower part only
    mean_D = mean_activation(lm, tokens, sae.cfg.hook_name, 1)
    blocks = lm.layout.blocks
    calls = {0: 0, 1: 0}
    handles = [blocks[i].register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i in calls]
    try:
        downstream_metrics(lm, sae, tokens, lm_batch_size=4, mean_act_D=mean_D, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert calls == {0: 3, 1: 3}  # 3 batches of <= 4 contexts, all runs stacked above; before: 12 and 12


# ~25 s each on 2 cores (.ci/run runs the slow tests); the trained tiny model above checks the same in the default suite
@pytest.mark.parametrize("per_forward", [pytest.param(1, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])
def test_matches_full_forwards_on_smollm2(smollm2, data_dir, per_forward):
    lm, hook = smollm2, "blocks.9.hook_resid_post"
    tokens = token_contexts(str(data_dir.joinpath(*EVAL)), lm.tokenize, 24, n_contexts=6,
                            bos_token_id=lm.bos_token_id)
    sae = centred_sae(lm, hook, tokens, n=1024, k=32)
    mean_D = mean_activation(lm, tokens, hook, 1)
    got = downstream_metrics(lm, sae, tokens, lm_batch_size=4, mean_act_D=mean_D, progress=False,
                             variants_per_forward=per_forward)
    assert_metrics_match(got, reference_metrics(lm, sae, tokens, hook, 1, mean_D))
    assert got["delta_ce"] > 0.01


def test_bad_variants_per_forward(series_case):
    from saelab.errors import ConfigError

    lm, sae, tokens = series_case
    with pytest.raises(ConfigError, match="variants_per_forward"):
        downstream_metrics(lm, sae, tokens, mean_act_D=torch.zeros(lm.d_model), progress=False, variants_per_forward=0)


@pytest.mark.parametrize("shape, exclude_first", [((0, 20), False), ((2, 2), True), ((2, 1), False)])
def test_tokens_without_a_prediction_to_score_are_refused(tiny_gpt2, shape, exclude_first):
    """No contexts, or contexts too short for a prediction after the first position scored: one line naming the
    tokens, not a ZeroDivisionError from the mean over no prediction."""
    from saelab.errors import ShapeMismatchError
    from saelab.evals.compute_equivalent import mean_loss

    tokens = torch.full(shape, tiny_gpt2.bos_token_id, dtype=torch.long)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=32, k=4, hook_name="blocks.0.hook_resid_post",
                            exclude_first=exclude_first))
    first = int(exclude_first)
    expected = (f"tokens_NT: {shape[0]} context.* of {shape[1]} token.* hold no next-token prediction from position "
                f"{first} on; expected at least 1 context of at least {first + 2} tokens")
    with pytest.raises(ShapeMismatchError, match=expected):
        downstream_metrics(tiny_gpt2, sae, tokens, mean_act_D=torch.zeros(64), progress=False)
    with pytest.raises(ShapeMismatchError, match=expected):
        mean_loss(tiny_gpt2, tokens, first)


def test_ce_recovered_needs_an_ablation_that_raises_ce_beyond_noise():
    """CE recovered's scale runs from the ablated loss (0) to the clean one (1): where the ablation does not raise
    CE above clean, or only within the noise of the contexts, it is undefined (NaN), as N2G's partial one is,
    not -999 from a gap of 1e-4."""
    from saelab.evals.downstream import downstream_summary

    g = torch.Generator().manual_seed(0)
    clean = 31 * (3 + torch.rand(40, generator=g, dtype=torch.float64))  # per-context CE sums, 31 predictions each
    spliced = clean + 31 * 0.1
    noise = 31 * 0.05 * torch.randn(40, generator=g, dtype=torch.float64)
    rest = {"kl": torch.zeros(40, dtype=torch.float64), "n": torch.full((40,), 31.0, dtype=torch.float64)}
    for rise in (0.0, -1e-4, 1e-4):
        ablated = clean + 31 * rise + (noise - noise.mean() if rise else 0)
        got = downstream_summary({"clean": clean, "spliced": spliced, "zero_abl": ablated, **rest})
        assert math.isnan(got["ce_recovered_zero"]), rise
        assert got["ce_zero_abl"] - got["ce_clean"] == pytest.approx(rise, abs=1e-12)
    got = downstream_summary({"clean": clean, "spliced": spliced, "zero_abl": clean + 31 * 2.0 + noise, **rest})
    gap = got["ce_zero_abl"] - got["ce_clean"]
    assert got["ce_recovered_zero"] == pytest.approx((gap - 0.1) / gap, rel=1e-9)
