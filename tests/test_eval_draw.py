"""The eval contexts are drawn across the corpus with each one's document, and the metrics' intervals
resample whole documents."""

from __future__ import annotations

import json
import lzma
import math

import pytest
import torch

from saelab.data import DrawnContexts, context_documents, draw_contexts, token_contexts, token_documents
from saelab.evals.ablation_sparsity import AblationSparsityConfig, run_ablation_sparsity
from saelab.evals.bootstrap import by_document, paired_bootstrap, ratio
from saelab.evals.core import EvalConfig, read_eval_contexts
from saelab.evals.n2g import N2GConfig, run_n2g
from saelab.evals.probe import ProbeConfig, run_probe
from saelab.sae import SAEConfig, TopKSAE


def _articles(data_dir) -> list[str]:
    with lzma.open(data_dir / "wiki-en" / "wiki_eval.jsonl.xz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.mark.slow  # ~25 s on 2 cores: tokenizes the whole eval split for its draws
def test_eval_contexts_come_from_many_documents_each_named_right(gpt2_tokenizer, data_dir):
    tok = gpt2_tokenizer
    sep = tok.bos_token_id
    drawn = read_eval_contexts(EvalConfig(), tok, sep, 64, 0, True)
    first = drawn.head(64)
    assert len(set(first.documents.tolist())) >= 40  # the first 64 consecutive contexts: one or two articles
    # Each context's document, checked against the articles' text: its text up to the first separator is in it.
    articles = _articles(data_dir)
    for row, doc in zip(first.tokens.tolist(), first.documents.tolist()):
        text_ids = row[1:row.index(sep, 1)] if sep in row[1:] else row[1:]
        if row[1] == sep:
            continue  # the window opens on a separator: the document it opens starts there
        text = tok.decode(text_ids)
        if "\ufffd" not in text and len(text) > 20:
            assert text in articles[doc]
    again = read_eval_contexts(EvalConfig(), tok, sep, 64, 0, True)
    assert torch.equal(again.tokens, drawn.tokens)  # one draw: SAEs are compared on the same contexts
    in_order = read_eval_contexts(EvalConfig(sample_pool_tokens=0), tok, sep, 64, 0, True)
    n = in_order.tokens.shape[0]
    assert torch.equal(in_order.tokens, token_contexts(str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), tok, 64,
                                                       n_contexts=n, bos_token_id=sep))
    assert in_order.documents[-1] < 40  # the first contexts: a few articles


def test_documents_of_packed_contexts_and_their_tokens():
    docs = ["a b c d e", "f g", "h i j k l m n o", "p"]
    tokenize = lambda texts: [[ord(w) for w in t.split()] for t in texts]  # noqa: E731
    for prepend in (True, False):
        ctx = torch.stack(list(token_contexts(docs, tokenize, 4, bos_token_id=0, prepend_bos=prepend)))
        per_ctx = context_documents(ctx, 0, prepend)
        per_tok = token_documents(ctx, per_ctx, 0, prepend)
        owner = {ord(c): i for i, d in enumerate(docs) for c in d.split()}  # each letter's document
        for n in range(ctx.shape[0]):
            text = [t for t in ctx[n].tolist()[int(prepend):] if t]  # separators (0) left out
            assert per_ctx[n] == owner[text[0]]
            for pos, t in enumerate(ctx[n].tolist()):
                if t:
                    assert per_tok[n, pos] == owner[t]
    assert context_documents(ctx, None) is None  # no separator: documents cannot be told apart


def test_a_draw_is_a_random_sample_and_too_short_a_corpus_is_refused(gpt2_tokenizer, data_dir):
    texts = _articles(data_dir)[:40]
    drawn = draw_contexts(texts, gpt2_tokenizer, 32, 50, pool_tokens=10**9, bos_token_id=gpt2_tokenizer.bos_token_id)
    assert drawn.tokens.shape == (50, 32) and not torch.equal(drawn.index, drawn.index.sort().values)
    ordered = drawn.in_corpus_order()
    assert torch.equal(ordered.index, drawn.index.sort().values)
    assert torch.all(ordered.documents.diff() >= 0)  # documents follow the corpus
    with pytest.raises(Exception, match="gave only"):
        draw_contexts(texts[:1], gpt2_tokenizer, 32, 10_000, pool_tokens=10**9, bos_token_id=0)


def _coverage(n_sims: int, documents: torch.Tensor | None) -> float:
    """How often the 95 % interval of a mean over 30 documents of 6 contexts covers the true mean 0, where a
    context's value is its document's effect (sd 1) plus its own noise (sd 0.3)."""
    g = torch.Generator().manual_seed(5)
    doc_of = torch.arange(30).repeat_interleave(6)
    covered = 0
    for sim in range(n_sims):
        value = torch.randn(30, generator=g, dtype=torch.float64)[doc_of] + 0.3 * torch.randn(180, generator=g,
                                                                                             dtype=torch.float64)
        per = by_document({"sum": value, "n": torch.ones(180, dtype=torch.float64)}, documents)
        ci = paired_bootstrap(per, {"mean": ratio("sum", "n")}, n_boot=300, seed=sim)["mean"]
        covered += ci["low"] <= 0 <= ci["high"]
    return covered / n_sims


def test_resampling_documents_covers_a_per_document_effect_where_contexts_do_not():
    doc_of = torch.arange(30).repeat_interleave(6)
    assert _coverage(150, doc_of) >= 0.88
    assert _coverage(150, None) <= 0.75  # contexts taken as independent: the interval is far too narrow


@pytest.fixture(scope="module")
def consecutive(tiny_gpt2, data_dir):
    """24 contexts of 32 drawn from the eval split's first 8 articles, in corpus order, with their documents."""
    drawn = draw_contexts(_articles(data_dir)[:8], tiny_gpt2.tokenizer, 32, 24, pool_tokens=10**9,
                          bos_token_id=tiny_gpt2.bos_token_id).in_corpus_order()
    tokens, documents = drawn.tokens, drawn.documents
    assert 3 <= documents.unique().numel() < 12
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=96, k=6, hook_name="blocks.0.hook_resid_post"))
    return tiny_gpt2, sae, tokens, documents


def test_ablation_intervals_resample_documents(consecutive):
    lm, sae, tokens, documents = consecutive
    cfg = AblationSparsityConfig(n_future=4, n_sites=8, latents_per_site=2, channels_per_site=0, random_baseline=False,
                                 n_boot=50)
    by_context = run_ablation_sparsity(lm, sae, tokens, cfg)["intervals"]["latent_mean"]
    by_doc = run_ablation_sparsity(lm, sae, tokens, cfg, documents=documents)
    sites = by_context["n_groups"]  # the contexts the sites fell in
    assert by_doc["intervals"]["latent_mean"]["n_groups"] < sites
    assert by_doc["intervals"]["latent_mean"]["estimate"] == pytest.approx(by_context["estimate"])
    with pytest.raises(ValueError, match="one document per context"):
        run_ablation_sparsity(lm, sae, tokens, cfg, documents=documents[:3])


def test_n2g_holds_out_whole_documents_and_resamples_them(consecutive):
    lm, sae, tokens, documents = consecutive
    cfg = N2GConfig(n_latents=3, n_examples=3, max_len=3, lm_batch_size=12, n_boot=50)
    res = run_n2g(lm, sae, tokens, cfg, documents=documents)
    sizes = {int(d): int((documents == d).sum()) for d in documents.unique()}
    held_groups = res["intervals"]["f1"]["n_groups"]
    # The held-out part is whole documents: its size is the sum of some documents' sizes, in as many groups.
    assert res["n_build_contexts"] + res["n_eval_contexts"] == 24
    sums = {0: {0}}
    for size in sizes.values():
        sums = {k: s | {x + size for x in sums.get(k - 1, set())} for k, s in
                ((k, sums.get(k, set())) for k in range(len(sizes) + 1))}
    assert res["n_eval_contexts"] in sums[held_groups]
    assert held_groups < res["n_eval_contexts"]


def test_probe_intervals_resample_documents(consecutive):
    lm, sae, tokens, documents = consecutive
    cfg = ProbeConfig(tasks=("capitalized",), max_examples=300, min_per_class=10, n_boot=50)
    paragraphs = run_probe(lm, sae, tokens, cfg)["tasks"]["capitalized"]
    whole = run_probe(lm, sae, tokens, cfg, documents=documents)["tasks"]["capitalized"]
    # documents keep each paragraph within its own (contexts drawn are seldom neighbours): as many held-out
    # paragraphs as documents at least, where a paragraph run on across cuts made them fewer
    assert whole["n_test_groups"] >= whole["intervals"]["loss"]["n_groups"]
    assert paragraphs["intervals"]["loss"]["n_groups"] == paragraphs["n_test_groups"] >= 2
    in_text = token_documents(tokens, documents, lm.bos_token_id).unique().numel()
    assert 2 <= whole["intervals"]["loss"]["n_groups"] <= in_text < 12


def test_a_draws_nmse_is_the_nmse_of_the_rows_drawn():
    """The nMSE statistic on a bootstrap draw of groups equals nMSE computed on the drawn rows themselves
    (a group drawn twice: its rows twice), the draw's own mean included."""
    from saelab.evals.bootstrap import replicate_statistics, resample_counts
    from saelab.evals.reconstruction import NMSE_STATS, ReconstructionAccumulator, nmse

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g) + 3 * torch.randn(8, generator=g)
    x_hat = x + 0.4 * torch.randn(60, 8, generator=g)
    groups = torch.arange(6).repeat_interleave(10)
    acc = ReconstructionAccumulator(4, 8, groups)
    for rows in torch.arange(60).split(17):  # batches that cut across groups
        acc.update(x[rows], x_hat[rows], torch.zeros(rows.numel(), 1), torch.zeros(rows.numel(), 1, dtype=torch.long))
    result = acc.result()
    counts = resample_counts(6, 5, torch.Generator().manual_seed(1))
    reps = replicate_statistics(result.per_group, NMSE_STATS, counts)
    for b in range(5):
        take = torch.cat([torch.arange(10 * grp, 10 * grp + 10).repeat(int(c)) for grp, c in enumerate(counts[b])])
        assert reps["nmse"][b] == pytest.approx(nmse(x[take], x_hat[take]), rel=1e-9)
    ones = torch.ones(1, 6, dtype=torch.float64)
    assert replicate_statistics(result.per_group, NMSE_STATS, ones)["nmse"][0] == pytest.approx(result.nmse, rel=1e-12)


def test_core_metrics_carry_intervals_over_documents(tiny_gpt2, data_dir):
    from saelab.evals.core import evaluate_core

    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=96, k=6, hook_name="blocks.0.hook_resid_post", context_size=32))
    texts = _articles(data_dir)[:30]
    drawn = draw_contexts(texts, tiny_gpt2.tokenizer, 32, 40, pool_tokens=10**9, bos_token_id=tiny_gpt2.bos_token_id)
    m = evaluate_core(sae, tiny_gpt2, EvalConfig(recon_tokens=31 * 40, downstream_tokens=31 * 20), progress=False,
                      contexts=drawn).metrics
    assert m["interval_groups"] == "documents"
    for key in ("nmse", "nmse_sae_input", "delta_ce", "kl"):
        ci = m["intervals"][key]
        assert ci["estimate"] == pytest.approx(m[key], rel=1e-9, abs=1e-12) and ci["low"] <= m[key] <= ci["high"]
    assert m["intervals"]["nmse"]["n_groups"] == drawn.documents.unique().numel()  # one per document read
    assert m["intervals"]["delta_ce"]["n_groups"] == drawn.documents[:20].unique().numel()
    for kind in ("zero", "mean"):  # a value and its interval, or neither
        ci = m["intervals"][f"ce_recovered_{kind}"]
        assert (m[f"ce_recovered_{kind}"] is None or m[f"ce_recovered_{kind}"] != m[f"ce_recovered_{kind}"]) == \
            (ci["low"] is None)
    from saelab.report.markdown import metric_rows

    rows = dict(metric_rows(json.loads(json.dumps(m, default=float))))
    assert rows["nMSE (FVU), raw activation space"].startswith(f"{m['nmse']:.4f} [")


def test_one_document_is_resampled_by_its_contexts(tiny_gpt2, data_dir):
    """A .txt corpus is one document: its contexts are the only units the intervals and CE recovered's noise rule
    can resample (one group would give no interval and no noise check at all)."""
    from saelab.evals.core import evaluate_core

    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=96, k=6, hook_name="blocks.0.hook_resid_post", context_size=32))
    text = max(_articles(data_dir)[:40], key=len)
    drawn = draw_contexts([text], tiny_gpt2.tokenizer, 32, 30, pool_tokens=10**9, bos_token_id=tiny_gpt2.bos_token_id)
    assert drawn.documents.unique().numel() == 1
    m = evaluate_core(sae, tiny_gpt2, EvalConfig(recon_tokens=31 * 30, downstream_tokens=31 * 10), progress=False,
                      contexts=drawn).metrics
    assert m["interval_groups"] == "contexts"
    assert m["intervals"]["nmse"]["n_groups"] == 30 and m["intervals"]["delta_ce"]["n_groups"] == 10
    given = evaluate_core(sae, tiny_gpt2, EvalConfig(recon_tokens=31 * 30, downstream_tokens=31 * 10), progress=False,
                          contexts=drawn.tokens).metrics  # a plain tensor from Python: contexts of unknown documents
    assert given["interval_groups"] == "contexts" and given["nmse"] == m["nmse"]


def test_ce_recovered_from_few_documents_asks_a_students_t_interval():
    """Three documents whose rises are 0.3, 1.0 and 1.7 nats: the normal 95 % interval of their mean stays above
    0, Student's t with 2 degrees of freedom (4.30, not 1.96) reaches it: no value."""
    from saelab.evals.downstream import downstream_summary

    rise = torch.tensor([0.3, 1.0, 1.7], dtype=torch.float64)
    clean = torch.tensor([30.0, 31.0, 29.0], dtype=torch.float64)
    sums = {"clean": clean, "spliced": clean + 0.05, "kl": torch.zeros(3, dtype=torch.float64),
            "n": torch.full((3,), 10.0, dtype=torch.float64)}
    assert math.isnan(downstream_summary({**sums, "zero_abl": clean + rise})["ce_recovered_zero"])
    assert downstream_summary({**sums, "zero_abl": clean + 3 * rise.mean() + 0.1 * rise})["ce_recovered_zero"] > 0


def test_the_interval_note_says_why_there_is_no_interval():
    """One document drawn gives no interval, and an evaluation an earlier saelab wrote before it computed them has
    none: the report says which, rather than leaving a reader to wonder where the [low, high] went."""
    from saelab.evals.core import INTERVAL_METHOD
    from saelab.report.markdown import earlier_intervals_note, intervals_note

    one = {"estimate": 0.5, "low": None, "high": None, "level": 0.95, "n_boot": 0, "n_groups": 1, "n_undefined": 0}
    assert intervals_note({"intervals": {"nmse": one}, "interval_groups": "documents"})[1] == \
        "No intervals: the eval contexts came from 1 document."
    assert intervals_note({"nmse": 0.5}) == []
    assert earlier_intervals_note({"nmse": 0.5}, INTERVAL_METHOD, "again")[1] == \
        "It has no intervals (an earlier saelab wrote it, before saelab computed them); again."
    current = {"intervals": {"nmse": one}, "interval_method": INTERVAL_METHOD}
    assert earlier_intervals_note(current, INTERVAL_METHOD, "again") == []
    assert earlier_intervals_note({**current, "interval_method": "contexts"}, INTERVAL_METHOD, "again")[1] == \
        (f"Its intervals were made another way (interval_method 'contexts'; this saelab's: {INTERVAL_METHOD!r}); "
         "again.")
    assert intervals_note({"intervals": {"nmse": {**one, "low": 0.4, "high": 0.6, "n_boot": 1000, "n_groups": 9}},
                           "interval_groups": "documents"})[1].startswith("[low, high]: 95% bootstrap intervals")


def test_frequencies_saved_before_the_draw_belong_with_their_evaluation(tmp_path):
    """latent_frequencies.safetensors written before eval_settings held sample_pool_tokens describes an evaluation
    of the first contexts: it still matches its metrics.json (read as sample_pool_tokens 0), and only that one."""
    from saelab.evals.core import eval_settings
    from saelab.report.markdown import frequencies_mismatch
    from saelab.run_folder import LatentFrequencies

    metrics = {"model": "m", "hook": "h", "eval_corpus": "c", "context_size": 64, "position_0": "excluded",
               "n_tokens": 100, "n_predictions": 50}
    older = {k: v for k, v in eval_settings(metrics).items() if k != "sample_pool_tokens"}
    saved = LatentFrequencies(torch.zeros(4, dtype=torch.float64), "abc", older)
    assert frequencies_mismatch(saved, tmp_path, 4, "abc", eval_settings(metrics), weights="w", evaluation="e") is None
    drawn = eval_settings({**metrics, "sample_pool_tokens": 4_194_304})
    assert "another evaluation" in frequencies_mismatch(saved, tmp_path, 4, "abc", drawn, weights="w", evaluation="e")


def _one_document_then_others(lm, data_dir, n_first: int, n_others: int):
    """Contexts of 32 whose first ``n_first`` lie in one long article and the next ``n_others`` in other ones: the
    paper suite's draw, whose first contexts (a metric's own) can be of one document while the whole draw is not."""
    from saelab.data import DrawnContexts

    articles = _articles(data_dir)[:40]
    long_one = max(articles, key=len)
    one = draw_contexts([long_one], lm.tokenizer, 32, n_first, pool_tokens=10**9, bos_token_id=lm.bos_token_id)
    rest = draw_contexts([a for a in articles if a is not long_one], lm.tokenizer, 32, n_others, pool_tokens=10**9,
                         bos_token_id=lm.bos_token_id)
    assert one.documents.unique().numel() == 1 and rest.documents.unique().numel() > 2
    return DrawnContexts(torch.cat([one.tokens, rest.tokens]), torch.cat([one.documents, rest.documents + 1000]),
                         torch.arange(n_first + n_others))


def test_core_decides_its_resampling_units_from_the_contexts_it_reads(tiny_gpt2, data_dir):
    """Core reads the first contexts of a draw that holds every metric's: where those lie in one document, its
    intervals resample them (the other metrics' documents further on do not make core's one group)."""
    from saelab.evals.core import evaluate_core

    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=96, k=6, hook_name="blocks.0.hook_resid_post", context_size=32))
    drawn = _one_document_then_others(tiny_gpt2, data_dir, 12, 20)
    m = evaluate_core(sae, tiny_gpt2, EvalConfig(recon_tokens=31 * 12, downstream_tokens=31 * 10), progress=False,
                      contexts=drawn).metrics
    assert m["interval_groups"] == "contexts"
    assert m["intervals"]["nmse"]["n_groups"] == 12 and m["intervals"]["delta_ce"]["n_groups"] == 10
    assert m["intervals"]["delta_ce"]["low"] < m["delta_ce"] < m["intervals"]["delta_ce"]["high"]
    # Reading into the other documents too, both parts resample documents.
    m = evaluate_core(sae, tiny_gpt2, EvalConfig(recon_tokens=31 * 20, downstream_tokens=31 * 16), progress=False,
                      contexts=drawn).metrics
    assert m["interval_groups"] == "documents"
    assert m["intervals"]["delta_ce"]["n_groups"] == drawn.documents[:16].unique().numel() >= 2


def test_ablation_decides_its_resampling_units_from_the_sites_contexts(consecutive):
    """The ablation intervals resample the contexts its sites fell in: when those lie in one document, the contexts
    (the metric's contexts without a site span several documents, which does not give that one document a spread)."""
    from saelab.evals.ablation_sparsity import _sample_sites

    lm, sae, tokens, _ = consecutive
    cfg = AblationSparsityConfig(n_future=4, n_sites=8, latents_per_site=2, channels_per_site=0, random_baseline=False,
                                 n_boot=50)
    sites = {c for c, _ in _sample_sites(tokens.shape[0], tokens.shape[1], 0, 4, 8, torch.Generator().manual_seed(0))}
    assert 2 <= len(sites) < tokens.shape[0]
    documents = torch.tensor([0 if c in sites else 1 + c for c in range(tokens.shape[0])])
    res = run_ablation_sparsity(lm, sae, tokens, cfg, documents=documents)
    ci = res["intervals"]["latent_mean"]
    assert res["interval_groups"] == "contexts" and ci["n_groups"] == len(sites)
    assert ci["low"] <= ci["estimate"] <= ci["high"]
    split = run_ablation_sparsity(lm, sae, tokens, cfg, documents=torch.tensor([c % 2 for c in range(tokens.shape[0])]))
    assert split["interval_groups"] == "documents" and split["intervals"]["latent_mean"]["n_groups"] == 2


def test_n2g_held_out_in_one_document_resamples_its_contexts(consecutive):
    """Two documents of 12 contexts: one is built on, the other held out; the held-out contexts, all of one
    document, are what the intervals resample (one group gave none)."""
    lm, sae, tokens, _ = consecutive
    cfg = N2GConfig(n_latents=3, n_examples=3, max_len=3, lm_batch_size=12, n_boot=50)
    res = run_n2g(lm, sae, tokens, cfg, documents=torch.arange(24) // 12)
    assert res["n_eval_contexts"] == 12 and res["interval_groups"] == "contexts"
    delta = res["intervals"]["delta_ce_sae"]
    assert delta["n_groups"] == 12 and delta["low"] <= delta["estimate"] <= delta["high"]


def test_the_interval_note_names_what_each_part_resampled():
    """The note under core's table (and quickstart's summary) gives each part's count of what its intervals
    resampled, and says where that was the contexts themselves, likely too narrow: it read "over the contexts the
    eval contexts were drawn from" and gave nMSE's count alone."""
    from saelab.report.markdown import intervals_note

    def interval(n: int) -> dict:
        return {"estimate": 0.5, "low": 0.4, "high": 0.6, "level": 0.95, "n_boot": 1000, "n_groups": n}

    metrics = {"intervals": {"nmse": interval(32), "delta_ce": interval(17)}, "interval_groups": "documents"}
    assert intervals_note(metrics)[1] == ("[low, high]: 95% bootstrap intervals over the documents of the eval "
                                          "contexts (nMSE: 32; the losses: 17 documents), 1,000 draws.")
    assert intervals_note({**metrics, "interval_groups": "contexts"})[1] == (
        "[low, high]: 95% bootstrap intervals over the eval contexts themselves (nMSE: 32; the losses: 17 "
        "contexts), 1,000 draws; likely too narrow, as the contexts lie in one document or the corpus marks none.")


def test_core_intervals_do_not_depend_on_contexts_only_other_metrics_read(tiny_gpt2, data_dir, monkeypatch):
    """The paper suite draws every metric's contexts at once and core reads the first: where the draw spans more
    documents than MAX_GROUPS, which of core's documents were merged followed the documents only the others read, so
    core's intervals moved with --probe-contexts though its contexts did not."""
    from saelab.evals import bootstrap
    from saelab.evals.core import evaluate_core

    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=96, k=6, hook_name="blocks.0.hook_resid_post", context_size=32))
    drawn = draw_contexts(_articles(data_dir)[:60], tiny_gpt2.tokenizer, 32, 40, pool_tokens=10**9,
                          bos_token_id=tiny_gpt2.bos_token_id)
    cfg = EvalConfig(recon_tokens=31 * 9, downstream_tokens=31 * 8)
    core_alone = DrawnContexts(drawn.tokens[:9], drawn.documents[:9], drawn.index[:9])
    read_by_core = set(drawn.documents[:9].tolist())
    assert len(read_by_core) > 3 and min(set(drawn.documents.tolist()) - read_by_core) < max(read_by_core)
    monkeypatch.setattr(bootstrap, "MAX_GROUPS", 3)  # stands in for 4,096 documents
    alone = evaluate_core(sae, tiny_gpt2, cfg, progress=False, contexts=core_alone).metrics
    in_the_draw = evaluate_core(sae, tiny_gpt2, cfg, progress=False, contexts=drawn).metrics
    assert alone["intervals"] == in_the_draw["intervals"]
