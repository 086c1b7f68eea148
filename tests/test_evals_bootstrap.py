"""Known-answer tests pinning the shared bootstrap intervals (saelab.evals.bootstrap)."""

import numpy as np
import pytest
import torch

from saelab.errors import ConfigError
from saelab.evals.bootstrap import paired_bootstrap, ratio, resample_counts


def _mean_interval(x, n_boot, seed, level=0.95):
    per_group = {"sum": x, "n": torch.ones_like(x)}
    return paired_bootstrap(per_group, {"mean": ratio("sum", "n")}, n_boot=n_boot, level=level, seed=seed)["mean"]


def test_interval_of_a_mean_equals_a_hand_computation():
    x = torch.tensor([0.3, 1.7, -0.4, 2.2, 0.9, 1.1, 3.0, -1.2, 0.5, 0.8], dtype=torch.float64)
    ci = _mean_interval(x, n_boot=500, seed=7, level=0.9)
    # By hand: the same seeded draws of 10 indices with replacement, the mean of each, numpy percentiles.
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(10, (500, 10), generator=g).numpy()
    means = x.numpy()[idx].mean(axis=1)
    lo, hi = np.percentile(means, [5, 95])
    assert ci["estimate"] == pytest.approx(float(x.mean()), abs=1e-15)
    assert ci["low"] == pytest.approx(lo, abs=1e-12) and ci["high"] == pytest.approx(hi, abs=1e-12)
    assert (ci["level"], ci["n_boot"], ci["n_groups"], ci["n_undefined"]) == (0.9, 500, 10, 0)


def test_counts_draw_every_group_with_replacement():
    c = resample_counts(6, 2000, torch.Generator().manual_seed(0))
    assert c.shape == (2000, 6) and torch.all(c.sum(1) == 6)
    assert c.mean(0).sub(1).abs().max() < 0.1  # each group drawn once per replicate on average


def test_interval_covers_the_true_mean_at_its_level():
    # 300 seeded samples of 100 draws from N(1.3, 2^2): the 95 % interval should cover 1.3 about
    # 95 % of the time (the percentile bootstrap runs slightly below nominal at this size).
    g = torch.Generator().manual_seed(1)
    covered = 0
    for rep in range(300):
        x = 1.3 + 2 * torch.randn(100, generator=g, dtype=torch.float64)
        ci = _mean_interval(x, n_boot=400, seed=rep)
        covered += ci["low"] <= 1.3 <= ci["high"]
    assert 0.91 <= covered / 300 <= 0.98


def test_pairing_removes_the_shared_spread_and_groups_are_resampled_whole():
    g = torch.Generator().manual_seed(2)
    shared = 5 * torch.randn(200, generator=g, dtype=torch.float64)
    a, b = shared + 0.1 * torch.randn(200, generator=g, dtype=torch.float64), shared
    n = torch.ones(200, dtype=torch.float64)
    stats = {"a": ratio("a", "n"), "b": ratio("b", "n"),
             "diff": lambda t: t["a"] / t["n"] - t["b"] / t["n"]}
    ci = paired_bootstrap({"a": a, "b": b, "n": n}, stats, n_boot=500, seed=0)
    width = {k: v["high"] - v["low"] for k, v in ci.items()}
    assert width["diff"] < 0.05 * width["a"]  # paired: the +-5 shared noise cancels
    # Group totals: a group of 10 identical values is one unit; the interval is that of 20 units.
    grouped = paired_bootstrap({"s": 10 * a[:20], "n": 10 * n[:20]}, {"m": ratio("s", "n")}, n_boot=500, seed=0)
    single = paired_bootstrap({"s": a[:20], "n": n[:20]}, {"m": ratio("s", "n")}, n_boot=500, seed=0)
    assert grouped["m"]["low"] == pytest.approx(single["m"]["low"])
    assert grouped["m"]["n_groups"] == 20


def test_undefined_replicates_are_counted_and_bad_options_refused():
    # A precision-like ratio: one of the two groups has a zero denominator.
    ci = paired_bootstrap({"tp": torch.tensor([1.0, 0.0]), "pp": torch.tensor([2.0, 0.0])},
                          {"p": ratio("tp", "pp")}, n_boot=200, seed=0)["p"]
    assert ci["estimate"] == 0.5 and ci["low"] == ci["high"] == 0.5
    assert 20 < ci["n_undefined"] < 80  # about a quarter of the replicates drew group 2 twice
    none = paired_bootstrap({"s": torch.ones(3), "n": torch.ones(3)}, {"m": ratio("s", "n")}, n_boot=0)["m"]
    assert none["estimate"] == 1.0 and none["low"] is None and none["n_boot"] == 0
    with pytest.raises(ConfigError, match="ci_level"):
        paired_bootstrap({"s": torch.ones(3)}, {"m": ratio("s", "s")}, level=1.5)
    with pytest.raises(ConfigError, match="n_boot"):
        paired_bootstrap({"s": torch.ones(3)}, {"m": ratio("s", "s")}, n_boot=-1)


def test_one_group_gives_no_interval_and_reports_say_why(tiny_gpt2, data_dir):
    """One group redrawn is always itself: its replicates all equal the estimate, which is no interval."""
    from saelab.data import token_contexts
    from saelab.evals.bootstrap import format_interval
    from saelab.evals.n2g import N2GConfig, run_n2g
    from saelab.report.paper import _section_n2g
    from saelab.sae.topk import SAEConfig, TopKSAE

    one = {"s": torch.tensor([7.3], dtype=torch.float64), "n": torch.tensor([10.0], dtype=torch.float64)}
    ci = paired_bootstrap(one, {"m": ratio("s", "n")}, n_boot=1000)["m"]
    assert ci["estimate"] == pytest.approx(0.73)
    assert ci["low"] is None and ci["high"] is None
    assert ci["n_groups"] == 1 and format_interval(ci) == " (no interval: 1 group)"
    # N2G on 2 contexts holds out 1: its intervals are of one group.
    tokens = token_contexts(str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), tiny_gpt2.tokenizer, 16,
                            n_contexts=2, bos_token_id=tiny_gpt2.bos_token_id, limit_docs=2)
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=16, k=4, hook_name="blocks.0.hook_resid_post"))
    res = run_n2g(tiny_gpt2, sae, tokens, N2GConfig(n_latents=3, n_examples=1, max_len=3))
    delta = res["intervals"]["delta_ce_sae"]
    assert delta["n_groups"] == 1 and delta["low"] is None and delta["estimate"] == pytest.approx(
        res["splice"]["delta_ce_sae"])
    report = "\n".join(_section_n2g(res, data_dir))
    assert f"{res['splice']['delta_ce_sae']:.4f} (no interval: 1 group)" in report
