"""Known-answer tests pinning the N2G explanation metric (saelab.evals.n2g)."""

import json
import math

import pytest
import torch

from saelab.evals.n2g import (
    WILDCARD,
    Explanation,
    N2GConfig,
    Pattern,
    build_explanations,
    checked_per_latent,
    n2g_scores,
    run_n2g,
    splice_latents,
)
from saelab.sae.topk import SAEConfig, TopKSAE

PAD = 99


def _synthetic(rule, n_ctx=12, length=12, seed=0, plant=None):
    """Random contexts over tokens 10..40 with ``plant`` inserted, and the rule's activations."""
    g = torch.Generator().manual_seed(seed)
    ctxs = []
    for _ in range(n_ctx):
        ids = torch.randint(10, 40, (length,), generator=g).tolist()
        if plant:
            piece = plant(g) if callable(plant) else plant
            at = int(torch.randint(len(piece), length, (1,), generator=g))
            ids[at - len(piece) + 1: at + 1] = piece
        ctxs.append(ids)
    acts = [[rule(ids[: i + 1]) for i in range(len(ids))] for ids in ctxs]
    return ctxs, acts


def _examples(ctxs, acts):
    """Each context cut after its max-activating token (the run_n2g convention)."""
    out = []
    for ids, a in zip(ctxs, acts):
        i = max(range(len(a)), key=lambda j: a[j])
        if a[i] > 0:
            out.append((ids[: i + 1], a[i]))
    return out


def _build(rule, examples, **kw):
    cfg = N2GConfig(max_len=kw.pop("max_len", 6), **kw)
    act_fn = lambda seqs, lats: [rule(s) for s in seqs]  # noqa: E731
    return build_explanations({0: examples}, act_fn, {0: 1.0}, cfg, PAD)[0]


def _pr(expl, ctxs, acts):
    pred = torch.tensor([v for ids in ctxs for v in expl.predict(ids)])
    act = torch.tensor([v for a in acts for v in a], dtype=torch.float32)
    return n2g_scores(pred, act, 0.0)


def test_bigram_latent_is_explained_by_its_bigram():
    def rule(s):
        return 1.0 if s[-2:] == [5, 7] else 0.0

    ctxs, acts = _synthetic(rule, plant=[5, 7])
    expl, used = _build(rule, _examples(ctxs, acts))
    assert used == 12
    assert expl.patterns == [Pattern((5, 7), anchored=False, value=1.0, count=12)]
    test_ctxs, test_acts = _synthetic(rule, n_ctx=20, seed=1, plant=[5, 7])
    sc = _pr(expl, test_ctxs, test_acts)
    assert sc["precision"] == 1.0 and sc["recall"] == 1.0 and sc["f1"] == 1.0 and sc["tp"] >= 20
    assert sc["corr"] == pytest.approx(1.0)


def test_wildcard_pattern():
    def rule(s):  # fires on 7 when the token two back is 5, whatever lies between
        return 0.8 if len(s) >= 3 and s[-1] == 7 and s[-3] == 5 else 0.0

    ctxs, acts = _synthetic(rule, plant=lambda g: [5, int(torch.randint(10, 40, (1,), generator=g)), 7])
    expl, _ = _build(rule, _examples(ctxs, acts))
    assert [p.ids for p in expl.patterns] == [(5, WILDCARD, 7)]
    assert expl.patterns[0].value == pytest.approx(0.8)  # normalized by max_act = 1
    assert expl.predict([5, 123, 7, 7]) == pytest.approx([0.0, 0.0, 0.8, 0.0])  # 123 never seen: the wildcard covers it
    test_ctxs, test_acts = _synthetic(rule, n_ctx=20, seed=2,
                                      plant=lambda g: [5, int(torch.randint(10, 40, (1,), generator=g)), 7])
    sc = _pr(expl, test_ctxs, test_acts)
    assert sc["precision"] == 1.0 and sc["recall"] == 1.0


def test_anchored_pattern_and_dropped_examples():
    def rule(s):  # fires on token 3 only as the very first token of the context
        return 1.0 if s == [3] else 0.0

    expl, used = _build(rule, [([3], 1.0)])
    assert expl.patterns == [Pattern((3,), anchored=True, value=1.0)]
    assert expl.predict([3, 3, 4]) == [1.0, 0.0, 0.0] and expl.predict([4, 3]) == [0.0, 0.0]
    # An example whose activation no suffix of <= max_len tokens reproduces makes no pattern.
    expl, used = _build(lambda s: 1.0 if len(s) >= 5 else 0.0, [([1, 2, 3, 4, 5], 1.0)], max_len=3)
    assert used == 0 and expl.patterns == [] and expl.predict([1, 2, 3, 4, 5, 6]) == [0.0] * 6


def test_trie_matching_backtracks_and_prefers_the_shortest_pattern():
    expl = Explanation([Pattern((5, 2, 3), False, 0.9), Pattern((WILDCARD, WILDCARD, 3), False, 0.4)])
    # Exact path 3 <- 2 <- (5 needed, 6 found) fails; the search backtracks to the wildcards.
    assert expl.predict([6, 2, 3]) == [0.0, 0.0, 0.4]
    assert expl.predict([5, 2, 3]) == [0.0, 0.0, 0.9]
    expl = Explanation([Pattern((2, 3), False, 0.3), Pattern((1, 2, 3), False, 0.9)])
    assert expl.predict([1, 2, 3]) == [0.0, 0.0, 0.3]


def test_duplicate_patterns_average_their_values():
    def rule(s):
        return 0.5 * s[-2] / 10 if s[-2:-1] in ([10], [20]) and s[-1] == 7 else 0.0

    expl, _ = _build(rule, [([1, 10, 7], 0.5), ([2, 10, 7], 0.5), ([20, 7], 1.0)])
    pats = {p.ids: p for p in expl.patterns}
    assert pats[(10, 7)].count == 2 and pats[(10, 7)].value == pytest.approx(0.5)
    assert pats[(20, 7)].value == pytest.approx(1.0)
    expl, _ = _build(rule, [([1, 10, 7], 0.5), ([2, 10, 7], 0.5), ([20, 7], 1.0)], min_value=0.6)
    assert [p.ids for p in expl.patterns] == [(20, 7)]


def test_precision_recall_arithmetic():
    pred = torch.tensor([0.0, 0.5, 0.5, 0.0, 1.0, 0.0])
    act = torch.tensor([0.0, 2.0, 0.0, 3.0, 1.0, 0.05])
    sc = n2g_scores(pred, act, threshold=0.1)  # 0.05 is below the firing threshold
    assert (sc["tp"], sc["fp"], sc["fn"]) == (2, 1, 1)
    assert sc["precision"] == pytest.approx(2 / 3) and sc["recall"] == pytest.approx(2 / 3)
    assert sc["f1"] == pytest.approx(2 / 3)
    sc = n2g_scores(torch.zeros(4), torch.tensor([0.0, 1.0, 0.0, 1.0]), 0.0)  # predicts nothing
    assert math.isnan(sc["precision"]) and sc["recall"] == 0.0 and sc["f1"] == 0.0
    sc = n2g_scores(torch.tensor([1.0, 0, 0, 0]), torch.zeros(4), 0.0)  # never fires: recall undefined
    assert sc["precision"] == 0.0 and math.isnan(sc["recall"])


def test_splice_with_true_values_is_the_sae_splice():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16) * 2 + 0.5
    for norm in ("none", "layernorm"):
        sae = TopKSAE(SAEConfig(d_in=16, n_latents=32, k=4, input_norm=norm))
        lats = torch.tensor([1, 4, 9, 30])
        z = sae.encode(x)[..., lats]
        out = splice_latents(sae, lats, z, first=1)(x)
        assert torch.equal(out[:, 0], x[:, 0])
        assert torch.allclose(out[:, 1:], sae(x)[:, 1:], atol=1e-5)
        assert torch.allclose(splice_latents(sae, lats, None, first=0, keep_error=True)(x), x, atol=1e-5)
        zeroed = splice_latents(sae, lats, torch.zeros_like(z), first=0)(x)
        x_n, st = sae.normalize_input(x)
        full = sae.encode(x)
        full[..., lats] = 0
        assert torch.allclose(zeroed, sae.denormalize_output(full @ sae.W_dec + sae.b_dec, st), atol=1e-5)


def test_run_n2g_on_a_real_tiny_model(tiny_gpt2, data_dir):
    from saelab.data import token_contexts

    lm = tiny_gpt2
    tokens = token_contexts(str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), lm.tokenizer, 32,
                            n_contexts=24, bos_token_id=lm.bos_token_id, limit_docs=6)
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=96, k=6, hook_name="blocks.0.hook_resid_post"))
    cfg = N2GConfig(n_latents=5, n_examples=4, max_len=4, lm_batch_size=12)
    res = run_n2g(lm, sae, tokens, cfg)
    saved = json.loads(json.dumps(res, allow_nan=False))
    # What the browser reads back is what was written: the reader's definition of the file keeps up with it.
    assert checked_per_latent(saved, "res", sae.n_latents) == saved["per_latent"]
    assert res["n_explained"] == 5 and res["n_build_contexts"] == 12 and res["n_eval_contexts"] == 12
    assert res["n_model_sequences"] > 0
    for r in res["per_latent"]:
        assert r["max_act"] > 0 and r["n_examples_used"] <= 4
        for p in r["patterns"]:
            assert len(p["ids"]) <= 4 and 0 < p["value"]
            assert all((t == "*") == (i == WILDCARD) for t, i in zip(p["tokens"], p["ids"]))
        for k in ("precision", "recall", "f1"):
            assert r[k] is None or 0 <= r[k] <= 1
    sp = res["splice"]
    assert sp["n_predictions"] == 12 * 30
    assert sp["delta_ce_sae"] == pytest.approx(sp["ce_sae"] - sp["ce_clean"])
    assert all(math.isfinite(sp[k]) for k in ("ce_clean", "ce_sae", "ce_n2g_all", "ce_n2g_partial", "ce_zeroed",
                                              "kl_n2g_all", "kl_n2g_partial"))
    # A latent whose examples were all dropped has no pattern: it predicts 0, as a latent never explained.
    explained = sum(1 for r in res["per_latent"] if r["n_patterns"] > 0)
    assert 0 < explained < 5
    assert sp["n_simulated"] == explained and sp["simulated_frac"] == explained / 96
    # Explaining the same latents again gives the same explanations.
    again = run_n2g(lm, sae, tokens, N2GConfig(latents=tuple(r["latent"] for r in res["per_latent"]),
                                               n_examples=4, max_len=4, splice=False))
    assert [r["patterns"] for r in again["per_latent"]] == [r["patterns"] for r in res["per_latent"]]
    assert again["splice"] is None


def test_summary_row_says_what_the_all_latents_splice_measures(tiny_gpt2, data_dir):
    """With a sample of latents explained, every other latent is 0 in the all-latents splice: the report's
    summary row says so, as its N2G section does; with every latent that fires explained it says that."""
    from saelab.data import token_contexts
    from saelab.report.paper import _headline

    tokens = token_contexts(str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), tiny_gpt2.tokenizer, 12,
                            n_contexts=8, bos_token_id=tiny_gpt2.bos_token_id, limit_docs=4)
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=16, k=4, hook_name="blocks.0.hook_resid_post"))
    sample = run_n2g(tiny_gpt2, sae, tokens, N2GConfig(n_latents=3, n_examples=3, max_len=3, n_boot=0))
    sp = sample["splice"]
    assert (f"N2G {sp['delta_ce_n2g_all']:.4f} (all latents simulated: only {sp['n_simulated']} explained "
            f"({sp['simulated_frac']:.1%}), every other latent 0, so mostly the cost of dropping them) vs SAE") \
        in _headline("n2g", sample)
    every = run_n2g(tiny_gpt2, sae, tokens, N2GConfig(n_latents=0, n_examples=3, max_len=3, n_boot=0))
    assert "(all latents simulated, every latent that fires explained) vs SAE" in _headline("n2g", every)


def _hand_spliced_ce(lm, sae, toks, z_sim, first):
    """Mean next-token CE with positions >= first replaced by the LayerNorm SAE's decoding of z_sim,
    written out densely (not through splice_latents)."""
    hook = sae.cfg.hook_name

    def edit(x):
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)  # unbiased, as the SAE's LayerNorm
        out = x.clone()
        out[:, first:] = ((z_sim @ sae.W_dec + sae.b_dec) * std + mu)[:, first:]
        return out

    logits = lm.logits(toks, edits={hook: edit}).double()
    logp = torch.log_softmax(logits[:, first:-1], dim=-1)
    return float(-logp.gather(-1, toks[:, first + 1:, None].to(logp.device)).mean())


def _simulated(res, held, n_latents):
    """The simulated activations ``[N, T, n_latents]`` the reported explanations give on ``held`` (after BOS)."""
    z_sim = torch.zeros(*held.shape, n_latents)
    for r in res["per_latent"]:
        expl = Explanation([Pattern(tuple(p["ids"]), p["anchored"], p["value"], p["count"]) for p in r["patterns"]])
        for c in range(held.shape[0]):
            z_sim[c, 1:, r["latent"]] = torch.tensor(expl.predict(held[c, 1:].tolist())) * r["max_act"]
    return z_sim


def test_splice_of_an_sae_reading_bos_keeps_its_reconstruction_there(tiny_gpt2, data_dir):
    """An SAE that reads position 0 of contexts starting with BOS: N2G predicts nothing at BOS, so every
    splice puts the SAE's own reconstruction there, as the plain SAE splice does (not b_dec, nor the SAE
    less the explained latents)."""
    from saelab.data import token_contexts

    lm = tiny_gpt2
    tokens = token_contexts(str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), lm.tokenizer, 24,
                            n_contexts=16, bos_token_id=lm.bos_token_id, limit_docs=6)
    torch.manual_seed(1)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=48, k=6, input_norm="layernorm", hook_name="blocks.0.hook_resid_post",
                            exclude_first=False))
    cfg = N2GConfig(n_latents=4, n_examples=4, max_len=3, max_patterns_reported=10_000, n_boot=0)
    res = run_n2g(lm, sae, tokens, cfg)
    sp, held = res["splice"], tokens[8:]
    assert sp["n_predictions"] == 8 * 23  # the prediction made at BOS is scored
    explained = [r["latent"] for r in res["per_latent"]]
    with torch.no_grad():
        z_sae = sae.encode(lm.activations(held, sae.cfg.hook_name).float())
        z_all = _simulated(res, held, sae.n_latents)
        z_all[:, 0] = z_sae[:, 0]
        z_zeroed = z_sae.clone()
        z_zeroed[:, 1:, explained] = 0
        assert sp["ce_n2g_all"] == pytest.approx(_hand_spliced_ce(lm, sae, held, z_all, first=0), abs=2e-5)
        assert sp["ce_zeroed"] == pytest.approx(_hand_spliced_ce(lm, sae, held, z_zeroed, first=0), abs=2e-5)
        assert sp["ce_sae"] == pytest.approx(_hand_spliced_ce(lm, sae, held, z_sae, first=0), abs=2e-5)


def test_full_n2g_splice_simulates_every_latent(tiny_gpt2, data_dir):
    from saelab.data import token_contexts

    lm = tiny_gpt2
    tokens = token_contexts(str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), lm.tokenizer, 24,
                            n_contexts=16, bos_token_id=lm.bos_token_id, limit_docs=6)
    torch.manual_seed(1)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=48, k=6, input_norm="layernorm", hook_name="blocks.0.hook_resid_post"))
    cfg = N2GConfig(n_latents=4, n_examples=4, max_len=3, lm_batch_size=8, max_patterns_reported=10_000, n_boot=300)
    res = run_n2g(lm, sae, tokens, cfg)
    json.dumps(res, allow_nan=False)
    sp = res["splice"]
    # Rebuild the simulated activations from the reported explanations, on the held-out half.
    held = tokens[8:]
    z_sim = _simulated(res, held, sae.n_latents)
    assert z_sim.abs().sum() > 0  # some explanation fires on the held-out text
    with torch.no_grad():
        hand_all = _hand_spliced_ce(lm, sae, held, z_sim, first=1)
        # The partial splice keeps the SAE's own values for the latents without an explanation.
        z_sae = sae.encode(lm.activations(held, sae.cfg.hook_name).float())
        explained = [r["latent"] for r in res["per_latent"]]
        z_part = z_sae.clone()
        z_part[..., explained] = z_sim[..., explained]
        hand_partial = _hand_spliced_ce(lm, sae, held, z_part, first=1)
    assert sp["ce_n2g_all"] == pytest.approx(hand_all, abs=2e-5)
    assert sp["ce_n2g_partial"] == pytest.approx(hand_partial, abs=2e-5)
    assert abs(sp["ce_n2g_all"] - sp["ce_n2g_partial"]) > 0.01
    assert sp["delta_ce_n2g_all"] == pytest.approx(sp["ce_n2g_all"] - sp["ce_clean"])
    # Intervals over the 8 held-out contexts, paired; their estimates are the reported numbers.
    ci = res["intervals"]
    for k in ("precision", "recall", "f1"):
        if res[k] is not None:
            assert ci[k]["estimate"] == pytest.approx(res[k], rel=1e-9)
            assert ci[k]["low"] <= ci[k]["estimate"] <= ci[k]["high"]
    for k in ("delta_ce_sae", "delta_ce_n2g_all", "delta_ce_n2g_partial"):
        assert ci[k]["estimate"] == pytest.approx(sp[k], rel=1e-9) and ci[k]["n_groups"] == 8
    assert ci["n2g_all_minus_sae"]["estimate"] == pytest.approx(sp["ce_n2g_all"] - sp["ce_sae"], rel=1e-9)
    # CE recovered, partial: a scale from zeroing the explained latents (0) to their real values (1), defined
    # where zeroing raises CE above the SAE's; the report gives it only where that rise is beyond its interval.
    from saelab.report.paper import _recovered_text

    gap = sp["ce_zeroed"] - sp["ce_sae"]
    assert ci["zeroed_minus_sae"]["estimate"] == pytest.approx(gap, rel=1e-9)
    assert ci["delta_ce_zeroed"]["estimate"] == pytest.approx(sp["delta_ce_zeroed"], rel=1e-9)
    if gap > 0:
        assert sp["ce_recovered_partial"] == pytest.approx((sp["ce_zeroed"] - sp["ce_n2g_partial"]) / gap)
        assert ci["ce_recovered_partial"]["estimate"] == pytest.approx(sp["ce_recovered_partial"], rel=1e-9)
    else:  # this data's case: zeroing does not raise CE, so neither the ratio nor an interval of it exists
        assert sp["ce_recovered_partial"] is None and ci["ce_recovered_partial"]["low"] is None
        assert _recovered_text(sp, ci).startswith("none: zeroing the explained latents does not raise CE above")
    rises = {**ci["zeroed_minus_sae"], "low": abs(gap) / 2, "high": 2 * abs(gap)}
    positive = {**sp, "ce_zeroed": sp["ce_sae"] + abs(gap), "ce_recovered_partial": 0.25}
    ratio = {**rises, "estimate": 0.25, "low": 0.125, "high": 0.5}
    assert _recovered_text(positive, {**ci, "zeroed_minus_sae": rises, "ce_recovered_partial": ratio}) == \
        "0.250 [0.125, 0.500]"
    for low, zeroed in ((-abs(gap), sp["ce_sae"] + abs(gap)), (None, sp["ce_sae"] - abs(gap))):  # noise; a fall
        noise = {**ci, "zeroed_minus_sae": {**rises, "low": low, "high": None if low is None else abs(gap)}}
        text = _recovered_text({**positive, "ce_zeroed": zeroed}, noise)
        assert text.startswith("none: zeroing the explained latents ") and "0.250" not in text


def test_report_counts_latents_attempted_and_lists_every_explained_one(tiny_gpt2, data_dir, tmp_path):
    """The report said "5 latents explained" of latents that kept no pattern, listed them with an empty pattern
    and F1 0.000, and left out explained latents whose F1 is undefined."""
    from saelab.data import token_contexts
    from saelab.report.paper import _section_n2g

    tokens = token_contexts(str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), tiny_gpt2.tokenizer, 32,
                            n_contexts=24, bos_token_id=tiny_gpt2.bos_token_id, limit_docs=6)
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=96, k=6, hook_name="blocks.0.hook_resid_post"))
    res = run_n2g(tiny_gpt2, sae, tokens, N2GConfig(n_latents=5, n_examples=4, max_len=4, lm_batch_size=12,
                                                    splice=False, n_boot=0))
    with_patterns = [r for r in res["per_latent"] if r["n_patterns"] > 0]
    assert 0 < len(with_patterns) < 5  # some latents kept no pattern (as in test_run_n2g_on_a_real_tiny_model)
    text = "\n".join(_section_n2g(res, tmp_path))
    assert text.startswith(f"5 latents attempted from 12 contexts, scored on 12 held-out contexts: "
                           f"{len(with_patterns)} explained (at least one pattern), {5 - len(with_patterns)} kept none")
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert sorted(int(row.split("|")[1]) for row in rows) == sorted(r["latent"] for r in with_patterns)
    assert "``" not in text  # no latent listed without a pattern
    for r in with_patterns:
        if r["f1"] is None:
            assert f"| {r['latent']} | — |" in text
    unlisted = {**res, "per_latent": [{**r, "patterns": []} for r in res["per_latent"]]}  # max_patterns_reported 0
    assert f": {len(with_patterns)} explained" in "\n".join(_section_n2g(unlisted, tmp_path))
