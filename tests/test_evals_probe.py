"""Known-answer tests pinning the probe-loss definition (saelab.evals.probe, saelab.evals.probe_tasks)."""

import json
import math

import pytest
import torch

from saelab.errors import CorpusError
from saelab.evals.probe import (
    ProbeConfig,
    best_single_feature_probe,
    binary_entropy,
    fit_logistic_1d,
    logistic_ce,
    probe_task,
    run_probe,
    split_by_group,
)
from saelab.evals.probe_tasks import ContextTask, label_tokens, load_hf_task, text_groups, token_strings
from saelab.sae.topk import SAEConfig, TopKSAE


# ---- the 1-D logistic fits --------------------------------------------------------------------
def test_separable_feature_gets_near_zero_loss():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(400, generator=g) < 0.5).double()
    x = torch.where(y > 0, 1.0, -1.0) + 0.1 * torch.randn(400, generator=g, dtype=torch.float64)
    w, b, ce = fit_logistic_1d(x[:, None], y, l2=1e-4)
    assert ce.item() < 0.02 and w.item() > 0
    # With no ridge at all the loss keeps falling toward 0 and stays finite.
    _, _, ce0 = fit_logistic_1d(x[:, None], y, l2=0.0, steps=60)
    assert 0 <= ce0.item() < ce.item() and math.isfinite(ce0.item())


def test_uninformative_feature_gets_the_base_rate_entropy():
    g = torch.Generator().manual_seed(1)
    n, rate = 20_000, 0.2
    y = (torch.rand(n, generator=g) < rate).double()
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    w, b, ce = fit_logistic_1d(x, y)
    h = binary_entropy(float(y.mean()))
    assert torch.allclose(ce, torch.full_like(ce, h), atol=2e-3)
    assert torch.all(ce <= h + 1e-12)  # never worse than the start point (w=0, b=logit(rate))
    assert binary_entropy(0.5) == pytest.approx(math.log(2))
    # Held out on fresh noise, the fitted probe scores about H(rate) as well.
    y2 = (torch.rand(n, generator=g) < rate).double()
    ce2 = logistic_ce(torch.randn(n, 3, generator=g, dtype=torch.float64), y2, w, b)
    assert torch.allclose(ce2, torch.full_like(ce2, binary_entropy(rate)), atol=1e-2)


def test_newton_matches_a_plain_lbfgs_reference():
    g = torch.Generator().manual_seed(2)
    n = 500
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(1.7 * x - 0.6)).double()
    l2 = 1e-2
    # Several columns at once (the real one among noise and a constant) fit as if alone.
    X = torch.stack([torch.randn(n, generator=g, dtype=torch.float64), x, torch.ones(n, dtype=torch.float64)], 1)
    w, b, ce = fit_logistic_1d(X, y, l2=l2)

    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = params[0] * x + params[1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y) + 0.5 * l2 * params[0] ** 2
        loss.backward()
        return loss

    opt.step(closure)
    assert w[1].item() == pytest.approx(params[0].item(), abs=1e-6)
    assert b[1].item() == pytest.approx(params[1].item(), abs=1e-6)
    ref_ce = torch.nn.functional.binary_cross_entropy_with_logits(params[0] * x + params[1], y).item()
    assert ce[1].item() == pytest.approx(ref_ce, abs=1e-9)
    assert ce[1] < ce[0] and ce[1] < ce[2]


def test_best_feature_is_selected_on_train_and_scored_on_test():
    g = torch.Generator().manual_seed(3)
    n = 1000
    y = (torch.rand(n, generator=g) < 0.5).double()
    X = torch.randn(n, 50, generator=g, dtype=torch.float64)
    X[:, 37] += 3 * (2 * y - 1)  # feature 37 carries the label
    X[:, 5] = 7.0  # a constant (dead) feature
    train = torch.arange(n) < 700
    chunks = ((s, X[train, s:s + 16], X[~train, s:s + 16]) for s in range(0, 50, 16))
    res = best_single_feature_probe(chunks, y, train)
    assert res["index"] == 37
    assert res["train_loss"] < 0.1 and res["loss"] < 0.1


# ---- the offline task suite -----------------------------------------------------------------
def test_token_task_labels_known_answer(gpt2_tokenizer):
    tok = gpt2_tokenizer
    text = ('The club (founded in 1984) won the league. Fans said "Bob Smith scored twice" in Paris.\n'
            'The album sold well. She sang songs and the band played')
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    strs = token_strings(tok, ids)
    assert "".join(strs[1:]) == text
    lab = label_tokens(tok, torch.tensor([ids]))

    def at(task, piece, nth=0):
        hits = [i for i, s in enumerate(strs) if s == piece]
        return int(lab[task][0, hits[nth]])

    assert at("number", " 1984") == 1 and at("number", " club") == 0 and at("number", " (") == -1
    assert at("in_parens", "founded") == 1 and at("in_parens", " 1984") == 1 and at("in_parens", " won") == 0
    assert at("in_parens", ")") == -1
    assert at("in_quotes", " Smith") == 1 and at("in_quotes", " said") == 0 and at("in_quotes", " Paris") == 0
    assert at("capitalized", " Smith") == 1 and at("capitalized", " Paris") == 1
    assert at("capitalized", " won") == 0 and at("capitalized", " Fans") == -1  # sentence start: not in task
    assert at("sentence_start", " Fans") == 1 and at("sentence_start", " She") == 1
    assert at("sentence_start", "The", 1) == 1  # after a newline: a paragraph start
    assert at("sentence_start", "The", 0) == -1  # first word after BOS: the window may cut a paragraph
    assert at("sentence_start", " said") == 0
    # Sports keywords "club", "league" precede " Fans": positive from the second hit on.
    assert at("topic_sports", " the", 0) == -1 and at("topic_sports", ".", 0) == 1
    assert at("topic_music", " Paris") == 0  # no music keyword in that paragraph, >= 8 tokens in
    assert at("topic_music", " and") == 1 and at("topic_sports", " and") == 0
    assert all(int(lab[t][0, 0]) == -1 for t in lab)  # BOS is never labelled


def test_text_groups_follow_paragraphs_across_context_cuts(gpt2_tokenizer):
    from saelab.data import token_contexts

    tok = gpt2_tokenizer
    docs = ["One two three four five six seven.\nEight nine ten eleven twelve.", "Alpha beta gamma delta epsilon."]
    tokens = token_contexts(docs, tok, 6, bos_token_id=tok.bos_token_id)  # 5 text tokens per context
    stream = [t for row in tokens.tolist() for t in row[1:]]
    strs = token_strings(tok, stream)
    groups = text_groups(tok, tokens, prepend_bos=True)
    flat = groups[:, 1:].flatten().tolist()
    assert groups[:, 0].eq(-1).all()  # the BOS packing puts first is no part of the text
    # Expected: a new id after every newline or separator, the same id across context cuts.
    expected, cur, nxt = [], None, 0
    for t, s in zip(stream, strs):
        if t == tok.bos_token_id or "\n" in s:
            expected.append(-1)
            cur = None
            continue
        if cur is None:
            cur, nxt = nxt, nxt + 1
        expected.append(cur)
    assert flat == expected and max(flat) == 2  # three paragraphs
    assert flat[:7] == [0] * 7  # the first paragraph runs over the first cut (after 5 tokens)
    docs_only = text_groups(tok, tokens, prepend_bos=True, unit="document")[:, 1:].flatten()
    assert docs_only.max() == 1 and docs_only[strs.index("\n")] == 0  # a newline splits no document


def test_text_groups_keep_a_paragraph_within_its_document(gpt2_tokenizer):
    """Contexts drawn at random are seldom neighbours: a paragraph cut at one context's end ran on into the next
    context, of another article (59 of 116 groups of a suite's probe spanned several documents). Given each
    token's document, a group runs on across a cut only into the same document."""
    from saelab.data import context_documents, token_contexts, token_documents

    tok = gpt2_tokenizer
    docs = ["One two three four five six seven eight nine ten.", "Alpha beta gamma delta epsilon zeta eta theta."]
    tokens = token_contexts(docs, tok, 4, bos_token_id=tok.bos_token_id)  # 3 text tokens per context
    documents_N = context_documents(tokens, tok.bos_token_id)
    drawn = [0, int((documents_N == 1).nonzero()[-1])]  # a context of each article, side by side as a draw gives
    tokens, documents_N = tokens[drawn], documents_N[drawn]
    documents_NT = token_documents(tokens, documents_N, tok.bos_token_id, prepend_bos=True)
    assert documents_NT[0].unique().tolist() == [0] and documents_NT[1].unique().tolist() == [1]
    merged = text_groups(tok, tokens, prepend_bos=True)  # no break token at the cut: one group across it
    assert merged[0, -1] == merged[1, 1]
    apart = text_groups(tok, tokens, prepend_bos=True, documents_NT=documents_NT)
    assert apart[0, -1] != apart[1, 1] and apart[1, 1:].unique().numel() == 1
    assert torch.equal(apart[0], merged[0])


def test_split_by_group_keeps_groups_whole():
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5, 5, 6, 7, 7, 7, 8, 9, 9])
    for seed in range(20):
        train = split_by_group(groups, 0.3, torch.Generator().manual_seed(seed))
        in_train, in_test = set(groups[train].tolist()), set(groups[~train].tolist())
        assert not in_train & in_test and in_train | in_test == set(range(10))
        assert (~train).sum() >= 6  # round(20 * 0.3) held-out examples at least
        assert in_train  # never everything held out
    assert split_by_group(torch.zeros(5, dtype=torch.long), 0.3, torch.Generator()) is None


def test_probe_task_intervals_are_paired_over_held_out_groups():
    # 60 paragraphs of 8 tokens each; channel 2 carries the label, the SAE's latent 0 reads it.
    g = torch.Generator().manual_seed(4)
    groups = torch.arange(60).repeat_interleave(8)
    y = (torch.rand(480, generator=g) < 0.5).long()
    x = torch.randn(480, 4, generator=g)
    x[:, 2] += 1.5 * (2 * y - 1)
    sae = TopKSAE(SAEConfig(d_in=4, n_latents=6, k=2))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[2, 0] = 1.0
        sae.W_enc[1, 1] = 1.0
    cfg = ProbeConfig(n_boot=400)
    res, totals = probe_task(sae, x, y, cfg, torch.Generator().manual_seed(0), groups)
    assert res["n_train_groups"] + res["n_test_groups"] == 60 and res["n_test"] == 8 * res["n_test_groups"]
    assert totals["n"].sum() == res["n_test"]
    assert float(totals["sae"].sum() / totals["n"].sum()) == pytest.approx(res["loss"], rel=1e-12)
    from saelab.evals.probe import probe_intervals

    per_task, mean = probe_intervals({"t": totals}, cfg)
    ci = per_task["t"]
    assert ci["loss"]["estimate"] == pytest.approx(res["loss"]) and ci["loss"]["n_groups"] == res["n_test_groups"]
    assert ci["loss"]["low"] < res["loss"] < ci["loss"]["high"]
    # The latent reads the very channel: the paired difference is 0 in every replicate.
    assert res["latent"] == 0 and res["baseline_channel"] == 2
    assert abs(ci["loss_minus_baseline"]["low"]) < 1e-12 and abs(ci["loss_minus_baseline"]["high"]) < 1e-12
    assert mean["mean_loss"]["low"] == ci["loss"]["low"]


def test_a_task_whose_split_leaves_a_part_with_one_class_is_skipped():
    """Positive examples all in one paragraph: every split puts them on one side, whose probe then fits one class
    (a near-zero train loss and a held-out loss of ~20 that once dominated the mean). The task is skipped, saying
    why; where a split with both classes on both sides exists, it is taken."""
    g = torch.Generator().manual_seed(0)
    groups = torch.arange(10).repeat_interleave(4)
    x = torch.randn(40, 4, generator=g)
    sae = TopKSAE(SAEConfig(d_in=4, n_latents=6, k=2))
    cfg = ProbeConfig(n_boot=50)
    y = (groups == 3).long()  # one paragraph holds every positive
    assert probe_task(sae, x, y, cfg, torch.Generator().manual_seed(0), groups) == (
        "no split of its paragraphs into train and held-out parts gave each part both classes (positive examples in "
        "1 paragraph, negative in 9 paragraphs; 16 splits tried)")
    assert probe_task(sae, x[:2], torch.tensor([1, 0]), ProbeConfig(min_per_class=1), torch.Generator(),
                      torch.arange(2), "text").startswith("no split of its texts")  # a context task's groups
    y = ((groups == 3) | (groups == 7)).long()  # two: some splits give one to each side
    for seed in range(10):
        res, _ = probe_task(sae, x, y, cfg, torch.Generator().manual_seed(seed), groups)
        assert 0 < res["base_rate"] < 1 and res["n_train_groups"] + res["n_test_groups"] == 10


def test_hf_loader_without_datasets_says_so():
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed here")
    except ImportError:
        pass
    with pytest.raises(CorpusError, match="datasets"):
        load_hf_task("sst2")


# ---- end to end on a tiny real model -----------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tiny_gpt2, data_dir):
    from saelab.data import token_contexts

    tokens = token_contexts(str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), tiny_gpt2.tokenizer,
                            64, n_contexts=48, bos_token_id=tiny_gpt2.bos_token_id, limit_docs=12)
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=256, k=8, hook_name="blocks.1.hook_resid_post"))
    return tiny_gpt2, sae, tokens


def test_run_probe_schema_and_known_planted_latent(setup):
    lm, sae, tokens = setup
    cfg = ProbeConfig(tasks=("number", "capitalized", "sentence_start"), max_examples=400, min_per_class=10,
                      latent_chunk=100)
    texts = ["the number is %d" % i for i in range(30)] + ["the word is %s" % w for w in "abcdefghijklmnopqrstuvwxyzabcd"]
    ctx = ContextTask("ends_in_digit", texts, [1] * 30 + [0] * 30)
    res = run_probe(lm, sae, tokens, cfg, context_tasks=[ctx])
    json.dumps(res, allow_nan=False)
    assert set(res["tasks"]) == {"number", "capitalized", "sentence_start", "ends_in_digit"}
    for name, r in res["tasks"].items():
        assert 0 <= r["loss"] and 0 <= r["baseline_loss"] and 0 <= r["latent"] < 256
        assert r["train_loss"] <= r["entropy"] + 0.05  # a fit is never much worse than a constant
        assert r["n_train"] + r["n_test"] <= 400
        ci = r["intervals"]["loss"]
        assert ci["low"] <= r["loss"] <= ci["high"] and ci["n_groups"] == r["n_test_groups"] >= 2
    assert res["mean_loss"] == pytest.approx(sum(r["loss"] for r in res["tasks"].values()) / 4)
    assert res["intervals"]["mean_loss"]["estimate"] == pytest.approx(res["mean_loss"])
    assert res["intervals"]["mean_loss_minus_baseline"]["estimate"] == pytest.approx(
        res["mean_loss"] - res["mean_baseline_loss"])

    # Plant the answer: zero every encoder column (those latents become constants) except latent
    # 3, which reads exactly the residual channel the baseline picked for "number". The best
    # latent must then be 3 with the channel probe's very loss (standardization removes b_dec).
    ch = res["tasks"]["number"]["baseline_channel"]
    saved = sae.W_enc.detach().clone()
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[ch, 3] = 2.5
    try:
        planted = run_probe(lm, sae, tokens, ProbeConfig(tasks=("number",), max_examples=400, min_per_class=10))
    finally:
        with torch.no_grad():
            sae.W_enc.copy_(saved)
    t = planted["tasks"]["number"]
    assert t["latent"] == 3
    assert t["train_loss"] == pytest.approx(t["baseline_train_loss"], abs=1e-9)
    assert t["loss"] == pytest.approx(t["baseline_loss"], abs=1e-9)


def test_token_strings_spell_loose_bytes_only_when_asked(gpt2_tokenizer):
    """The probe's labels read tokens as decoded (U+FFFD for part of a character); pages people read ask for
    the bytes, escaped, which tell such tokens apart."""
    text = "Das ist ünïcödé 中文 🎉 end"
    ids = gpt2_tokenizer(text)["input_ids"]
    assert "".join(token_strings(gpt2_tokenizer, ids)).count("\ufffd") == 7
    assert token_strings(gpt2_tokenizer, ids, readable_bytes=True) == [
        "D", "as", " is", "t", " \\xc3", "\\xbc", "n", "ï", "c", "ö", "d", "é", " ", "中", "\\xe6\\x96", "\\x87",
        " \\xf0\\x9f", "\\x8e", "\\x89", " end"]  # ü = C3 BC, 文 = E6 96 87, 🎉 = F0 9F 8E 89
