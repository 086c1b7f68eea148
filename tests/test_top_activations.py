"""top_activations / latent_max_activation on the tiny GPT-2 over real Wikipedia text, against a brute-force
dense computation (encode every token, take each context's maximum, sort)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from saelab.data import draw_contexts, token_contexts
from saelab.errors import ConfigError, CorpusError, ShapeMismatchError
from saelab.explore import TopActivations, latent_max_activation, top_activations
from saelab.explore.browser.build import BrowseConfig, SAESource, collect_statistics, first_scored
from saelab.sae import SAEConfig, TopKSAE, save_sae

HOOK = "blocks.1.hook_resid_post"
T = 32
N_CONTEXTS = 24
POOL = 16 * N_CONTEXTS * T
"""The tokens the contexts are drawn from where the draw is not what a test checks: a few articles, quick to
tokenize (the default, the whole eval split, takes seconds each time)."""


@pytest.fixture(scope="module")
def corpus(data_dir) -> str:
    return str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")


def centred_sae(lm, corpus: str, exclude_first: bool = True) -> TopKSAE:
    """A random SAE whose b_dec is the mean activation, so its latents fire at varied rates."""
    torch.manual_seed(3)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=256, k=4, hook_name=HOOK, model_name="tiny", context_size=T,
                            exclude_first=exclude_first))
    toks = token_contexts(corpus, lm.tokenize, T, n_contexts=8, bos_token_id=lm.bos_token_id)
    with torch.no_grad():
        sae.b_dec.copy_(lm.activations(toks, HOOK)[:, 1:].reshape(-1, 64).mean(0))
    return sae


def dense_reference(lm, sae: TopKSAE, corpus: str):
    """The contexts top reads from ``corpus`` drawn from ``POOL`` tokens (``draw_contexts``, the evaluations' draw),
    every token encoded densely: (the drawn contexts, z [N, T, n])."""
    drawn = draw_contexts(corpus, lm.tokenize, T, N_CONTEXTS, pool_tokens=POOL, bos_token_id=lm.bos_token_id)
    toks = drawn.tokens
    with torch.no_grad():
        z = sae.encode(lm.activations(toks, HOOK))
    if sae.cfg.exclude_first:
        z[:, 0] = 0
    return drawn, z


def brute_top(z: torch.Tensor, latent: int, k: int):
    """Contexts where the latent fires, by their maximum (ties to the earlier context), the first k."""
    per_ctx = z[:, :, latent]
    maxima = per_ctx.max(dim=1).values
    order = sorted((c for c in range(z.shape[0]) if maxima[c] > 0), key=lambda c: (-float(maxima[c]), c))[:k]
    pos = [int((per_ctx[c] == maxima[c]).nonzero()[0]) for c in order]
    return order, maxima[order], pos, per_ctx[order]


def spelled(str_tokens: list[str]) -> str:
    """The text that a context's token strings spell, their parts of a character (shown as bytes, "\\xe2\\x80")
    put back together."""
    parts = re.split(r"((?:\\x[0-9a-f]{2})+)", "".join(str_tokens))
    raw = [bytes.fromhex(p.replace("\\x", "")) if i % 2 else p.encode() for i, p in enumerate(parts)]
    return b"".join(raw).decode("utf-8", "replace")


def n_tokens_for(sae: TopKSAE) -> int:
    return N_CONTEXTS * (T - int(sae.cfg.exclude_first))


@pytest.mark.parametrize("exclude_first", [True, False])
def test_top_activations_match_dense_brute_force(tiny_gpt2, corpus, exclude_first):
    sae = centred_sae(tiny_gpt2, corpus, exclude_first)
    drawn, z = dense_reference(tiny_gpt2, sae, corpus)
    toks = drawn.tokens
    counts = (z > 0).flatten(0, 1).sum(0)
    ctx_counts = (z > 0).any(dim=1).sum(0)
    busy = int(counts.argmax())
    rare = int(torch.where(ctx_counts > 0, ctx_counts, 10**9).argmin())  # fires in fewer contexts than k
    assert 0 < int(ctx_counts[rare]) < 7, "the SAE should have a rare latent for this test"
    lats = [busy, rare, 5]
    if exclude_first:  # a latent that fires on BOS must read 0 there
        with torch.no_grad():
            lats.append(int(sae.encode(tiny_gpt2.activations(toks[:1], HOOK))[0, 0].argmax()))
    lats = list(dict.fromkeys(lats))  # each once: a latent given twice is refused
    got = top_activations(sae, tiny_gpt2, corpus, lats, k=7, n_tokens=n_tokens_for(sae), batch_size=5,
                          sample_pool_tokens=POOL)
    assert isinstance(got, list) and [r.latent for r in got] == lats
    for r in got:
        order, maxima, pos, rows = brute_top(z, r.latent, 7)
        assert r.context_idx.tolist() == drawn.index[order].tolist() and r.max_pos.tolist() == pos
        torch.testing.assert_close(r.max_acts, maxima, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r.acts, rows, rtol=1e-5, atol=1e-5)
        assert torch.equal(r.tokens, toks[order])
        assert r.n_tokens == n_tokens_for(sae) and len(r) == len(order)
        assert [spelled(s) for s in r.str_tokens] == [tiny_gpt2.tokenizer.decode(t) for t in toks[order]]
        if exclude_first:
            assert (r.acts[:, 0] == 0).all()
    assert len(got[1]) == int(ctx_counts[rare])


def test_single_latent_tensor_corpus_and_browser_agree(tiny_gpt2, corpus):
    sae = centred_sae(tiny_gpt2, corpus)
    drawn, z = dense_reference(tiny_gpt2, sae, corpus)
    toks = drawn.tokens
    busy = int((z > 0).flatten(0, 1).sum(0).argmax())
    one = top_activations(sae, tiny_gpt2, toks, busy, k=4)  # a tensor's contexts: numbered by their rows
    assert isinstance(one, TopActivations) and one.latent == busy
    from_path = top_activations(sae, tiny_gpt2, corpus, busy, k=4, n_tokens=n_tokens_for(sae),
                                sample_pool_tokens=POOL)
    assert torch.equal(drawn.index[one.context_idx], from_path.context_idx) and torch.equal(one.acts, from_path.acts)
    given = top_activations(sae, tiny_gpt2, drawn, busy, k=4)  # drawn contexts given: by their places
    assert torch.equal(given.context_idx, from_path.context_idx)
    # the browser's own pass keeps the same contexts and rows for this latent
    cfg = BrowseConfig(n_top=4, lm_batch_size=16)
    [stats], _, _ = collect_statistics(tiny_gpt2, [SAESource("s", "s", sae)], toks, cfg, hook=HOOK, progress=False)
    assert one.context_idx.tolist() == stats.top_ctx_NK[busy].tolist()
    assert torch.equal(one.acts, stats.top_rows_NKT[busy])
    d = one.to_dict()
    assert d["latent"] == busy and len(d["contexts"]) == 4 and d["contexts"][0]["max"] == d["max_activation"]
    text = one.to_text().splitlines()
    assert len(text) == 5 and text[0].startswith(f"latent {busy}: max ")
    p0 = int(one.max_pos[0])
    assert f"[[{one.str_tokens[0][p0]}]]".replace("\n", "\\n") in text[1]
    assert f"ctx {int(one.context_idx[0])}" in text[1]


def test_latent_max_activation_is_the_dense_max(tiny_gpt2, corpus, tmp_path):
    sae = centred_sae(tiny_gpt2, corpus)
    _, z = dense_reference(tiny_gpt2, sae, corpus)
    dense_max = z.flatten(0, 1).max(dim=0).values
    lats = [0, 1, 2, int(dense_max.argmax())]
    got = latent_max_activation(sae, tiny_gpt2, corpus, lats, n_tokens=n_tokens_for(sae), sample_pool_tokens=POOL)
    assert got == pytest.approx(dense_max[lats].tolist(), rel=1e-5, abs=1e-6)
    save_sae(sae, tmp_path / "run" / "sae")  # a run folder given by path
    one = latent_max_activation(tmp_path / "run", tiny_gpt2, corpus, lats[-1], n_tokens=n_tokens_for(sae),
                                sample_pool_tokens=POOL)
    assert one == pytest.approx(float(dense_max[lats[-1]]), rel=1e-5)
    dead = torch.nonzero(dense_max == 0).flatten()
    if dead.numel():  # a latent silent on this text reads 0.0 and has no context
        r = top_activations(sae, tiny_gpt2, corpus, int(dead[0]), k=3, n_tokens=n_tokens_for(sae),
                            sample_pool_tokens=POOL)
        assert len(r) == 0 and r.max_activation == 0.0


def test_bad_input_is_refused_with_a_named_error(tiny_gpt2, corpus):
    sae = centred_sae(tiny_gpt2, corpus)
    toks = token_contexts(corpus, tiny_gpt2.tokenize, T, n_contexts=2, bos_token_id=tiny_gpt2.bos_token_id)
    with pytest.raises(ConfigError, match="latent 256 is out of range"):
        top_activations(sae, tiny_gpt2, toks, 256)
    # numpy integers are latent indices (np.int64(3) raised "not iterable"); a bool is no index (True read as 1)
    assert top_activations(sae, tiny_gpt2, toks, np.int64(3)).latent == 3
    assert [r.latent for r in top_activations(sae, tiny_gpt2, toks, np.array([3, 5]))] == [3, 5]
    for flag in (True, [False], np.bool_(True)):
        with pytest.raises(ConfigError, match="latent: expected a latent index"):
            top_activations(sae, tiny_gpt2, toks, flag)
    with pytest.raises(ConfigError, match="latent: expected a latent index"):
        top_activations(sae, tiny_gpt2, toks, 2.5)
    with pytest.raises(ConfigError, match="latent"):
        top_activations(sae, tiny_gpt2, toks, [])
    with pytest.raises(ConfigError, match="k: expected a positive"):
        top_activations(sae, tiny_gpt2, toks, 0, k=0)
    with pytest.raises(ShapeMismatchError, match="corpus: a token tensor"):
        top_activations(sae, tiny_gpt2, toks.float(), 0)
    # more contexts per latent than are read (k=10^8 failed in the allocator): every context, listed once
    many = top_activations(sae, tiny_gpt2, toks, 0, k=10**8)
    assert torch.equal(many.context_idx, top_activations(sae, tiny_gpt2, toks, 0, k=2).context_idx)
    # A corpus of the wrong kind or a missing file is named before the SAE (here a path to nothing) is read.
    with pytest.raises(ConfigError, match="corpus: expected a path, a dataset name, a token tensor, drawn contexts or "
                                          "None, got list"):
        top_activations("no-such-sae", "no-such-model", [1, 2], 0)
    with pytest.raises(CorpusError, match="corpus path '/no/such/text.txt' does not exist"):
        top_activations("no-such-sae", "no-such-model", "/no/such/text.txt", 0)


def test_tokens_holding_part_of_a_character_read_as_their_bytes(tiny_gpt2, tmp_path):
    """Byte-level BPE splits "中文" and emoji into tokens that each decode to U+FFFD: shown that way, different
    tokens looked the same. top shows each as its bytes, escaped; whole characters stay as they are."""
    text = "Das Wort ünïcödé, 中文 und 🎉 stehen hier. " * 12
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    sae = centred_sae(tiny_gpt2, str(tmp_path / "c.txt"))
    busy = [t for t in top_activations(sae, tiny_gpt2, str(tmp_path / "c.txt"), list(range(64)), k=1,
                                       n_tokens=2 * (T - 1)) if t.str_tokens]
    tokens = busy[0].str_tokens[0]
    assert "\ufffd" not in "".join(tokens)
    assert "中" in tokens and " \\xf0\\x9f" in tokens and "\\x8e" in tokens  # 🎉: F0 9F | 8E | 89


def test_control_characters_of_the_text_are_shown_escaped(tiny_gpt2, corpus, tmp_path):
    """A corpus with terminal escape sequences: the text output printed them raw (ESC[2J cleared the screen
    that showed it); every control character is shown escaped, as a newline was."""
    ansi = tmp_path / "ansi.txt"
    ansi.write_text("\x1b[2J\x1b[31mred\tcolumn\x1b[0m and\x7f plain text\n" * 40)
    sae = centred_sae(tiny_gpt2, corpus)
    res = top_activations(sae, tiny_gpt2, str(ansi), [0, 1, 2, 3], 2, n_tokens=4 * (T - 1), context_size=T)
    shown = "\n".join(r.to_text(before=T, after=T) for r in res if len(r))
    raw = "".join(s for r in res for strs in r.str_tokens for s in strs)
    assert "\x1b" in raw and "\t" in raw  # the tokens themselves keep the text as it is
    assert "\\x1b[2J\\x1b[31mred\\tcolumn\\x1b[0m and\\x7f plain text\\n" in shown
    assert not [c for c in shown if c != "\n" and (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0)]


def test_a_corpus_too_short_is_refused_before_the_model_loads(gpt2_tokenizer, tmp_path):
    """With no model given, top_activations loaded the SAE's model and then read the corpus: a corpus too short
    for n_tokens was named only after the load. The model folder holds a config and a tokenizer but no weights:
    a refusal after the load would read "cannot load model directory", so the corpus's came first."""
    from transformers import GPT2Config

    from saelab.models.loading import ModelLoadError

    model = tmp_path / "model"
    GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128).save_pretrained(model)
    gpt2_tokenizer.save_pretrained(model)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=64, k=4, hook_name=HOOK, model_name=str(model), context_size=T))
    text = tmp_path / "c.txt"
    text.write_text("The cat sat on the mat. " * 50, encoding="utf-8")  # 351 tokens: 11 contexts of 32
    most = 11 * (T - 1)  # position 0 (BOS) is not scored
    for lm in (None, str(model)):  # the SAE's model, or one named
        with pytest.raises(CorpusError, match="gave only 11 contexts") as e:
            top_activations(sae, lm, str(text), 0, n_tokens=most + 1)
        assert e.value.max_tokens == most
        with pytest.raises(ModelLoadError, match="cannot load model directory"):  # as many as it holds: the load
            top_activations(sae, lm, str(text), 0, n_tokens=most)


@pytest.mark.parametrize("contexts", ["tensor", "corpus"])
def test_a_model_loaded_here_draws_its_bar_only_with_progress(tiny_gpt2, tiny_dir, corpus, contexts,
                                                              library_bars_on, capfd):
    """A model named by its folder is loaded here; progress=False (the default in Python) hides transformers'
    "Loading weights" bar of that load, as load_model(progress=False) does, and progress=True shows it."""
    sae = centred_sae(tiny_gpt2, corpus)
    text = (token_contexts(corpus, tiny_gpt2.tokenize, T, n_contexts=2, bos_token_id=tiny_gpt2.bos_token_id)
            if contexts == "tensor" else corpus)
    capfd.readouterr()
    top_activations(sae, str(tiny_dir), text, 3, k=1, n_tokens=2 * T, sample_pool_tokens=POOL)
    assert "Loading weights" not in capfd.readouterr().err
    top_activations(sae, str(tiny_dir), text, 3, k=1, n_tokens=2 * T, progress=True, sample_pool_tokens=POOL)
    assert "Loading weights" in capfd.readouterr().err


def test_token_ids_outside_the_vocabulary_are_refused_before_any_forward(tiny_gpt2, corpus, gpt2_tokenizer,
                                                                        tmp_path):
    """A token tensor holding an id past the vocabulary (or a negative one) reached the embedding: torch's
    IndexError on the CPU, a device-side assert ending the process on CUDA. Refused, naming the id and the range:
    from the config before the load (the model here has none to load), after it for a model given, and by
    every forward of the model."""
    from transformers import GPT2Config

    sae = centred_sae(tiny_gpt2, corpus)
    toks = token_contexts(corpus, tiny_gpt2.tokenize, T, n_contexts=2, bos_token_id=tiny_gpt2.bos_token_id)
    vocab = tiny_gpt2.model.get_input_embeddings().weight.shape[0]
    for bad in (vocab, -1):
        wrong = toks.clone()
        wrong[1, 5] = bad
        with pytest.raises(ShapeMismatchError) as e:
            top_activations(sae, tiny_gpt2, wrong, 0)
        assert str(e.value) == f"corpus: id {bad} is outside the vocabulary of {tiny_gpt2.known_as} (ids 0..{vocab - 1})"
        with pytest.raises(ShapeMismatchError, match=f"tokens: id {bad} is outside the vocabulary"):
            tiny_gpt2.logits(wrong)
    model = tmp_path / "model"  # a config and no weights: a refusal after the load would be "cannot load"
    GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=1000).save_pretrained(model)
    sae.cfg.model_name = str(model)
    with pytest.raises(ShapeMismatchError, match=r"corpus: id \d+ is outside the vocabulary of .*\(ids 0..999\)"):
        top_activations(sae, None, toks, 0)
    # the model's width and positions are read from its config before the load too, as for a text corpus
    GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=16).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ShapeMismatchError, match="of .*narrow have width 32 but the SAE expects d_in=64"):
        top_activations(sae, str(tmp_path / "narrow"), toks, 0)
    GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=16).save_pretrained(tmp_path / "short")
    with pytest.raises(ConfigError, match=f"corpus: contexts of {T} tokens exceeds the longest context of .*short "
                                          r"\(16 tokens\)"):
        top_activations(sae, str(tmp_path / "short"), toks, 0)
    assert top_activations(sae, tiny_gpt2, toks, 0).n_tokens == 2 * (T - 1)  # ids it has: read, all of them


def test_a_batch_size_below_1_is_refused_before_the_text_is_read(tiny_gpt2, corpus, monkeypatch):
    """batch_size 0 was range()'s "arg 3 must not be zero" after the corpus was read; -1 scanned nothing."""
    import saelab.explore.top as top

    sae = TopKSAE(SAEConfig(d_in=64, n_latents=16, k=4, hook_name=HOOK, model_name="tiny", context_size=T))
    monkeypatch.setattr(top, "_model_and_contexts", lambda *a, **k: pytest.fail("the text was read"))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match=rf"^batch_size: expected a positive number of contexts per forward, "
                                              rf"got {bad!r}$"):
            top_activations(sae, tiny_gpt2, corpus, latent=1, k=2, n_tokens=512, batch_size=bad)
        with pytest.raises(ConfigError, match="^batch_size: expected"):
            latent_max_activation(sae, tiny_gpt2, corpus, 1, n_tokens=512, batch_size=bad)


def test_a_latent_given_twice_is_refused_as_the_command_line_refuses_it(tiny_gpt2, corpus):
    """top_activations(latent=[1, 1]) listed latent 1 twice and steer added it twice, where `--latent 1,1` is
    refused; both refuse it in the command line's words, before the text is read."""
    from saelab.explore import steer

    sae = centred_sae(tiny_gpt2, corpus)
    toks = token_contexts(corpus, tiny_gpt2.tokenize, T, n_contexts=2, bos_token_id=tiny_gpt2.bos_token_id)
    for twice, said in (([1, 1], "latent 1 given twice in [1, 1]"), (np.array([3, 5, 3]), "latent 3 given twice in "
                                                                                         "[3, 5, 3]")):
        with pytest.raises(ConfigError, match=f"^{re.escape(said)}; give each latent once$"):
            top_activations(sae, tiny_gpt2, toks, twice)
        with pytest.raises(ConfigError, match=f"^{re.escape(said)}; give each latent once$"):
            steer(tiny_gpt2, sae, [int(i) for i in twice], "add", 1.0)
    assert [r.latent for r in top_activations(sae, tiny_gpt2, toks, [5, 3])] == [5, 3]  # the order given, as before


def test_top_contexts_are_drawn_across_the_eval_split_as_the_evaluation_draws_its_own(tiny_gpt2, corpus,
                                                                                      eval_article_of):
    """The eval split's first contexts are one article (its first ~4,096 tokens: the README's example), and top read
    them in order: every top context of a latent came from that article. They are drawn now across the split,
    seeded, by the draw `saelab eval` reads its contexts with (its pool by default; the brute-force tests above
    check the draw's contexts themselves), and the result says so."""
    from saelab.evals.config import EvalConfig

    sae = centred_sae(tiny_gpt2, corpus)
    results = top_activations(sae, tiny_gpt2, corpus, list(range(sae.n_latents)), k=7, n_tokens=n_tokens_for(sae))
    busy = max(results, key=lambda r: (len(r), r.max_activation))
    assert len(busy) == 7
    articles = [eval_article_of(ids) for ids in busy.tokens.tolist()]
    assert len(set(articles) - {None}) >= 4, f"the top contexts come from articles {articles}"
    words = f"drawn at random (seed 0) from the corpus's first {EvalConfig.sample_pool_tokens:,} tokens"
    assert busy.contexts_drawn == words and busy.to_dict()["contexts_drawn"] == words
    assert busy.to_text().splitlines()[0].endswith(f"; contexts {words}")
    in_order = top_activations(sae, tiny_gpt2, corpus, busy.latent, k=7, n_tokens=n_tokens_for(sae),
                               sample_pool_tokens=0)
    assert {eval_article_of(ids) for ids in in_order.tokens.tolist()} == {0}  # the reading of before, asked for
    assert in_order.contexts_drawn == "read from the corpus's start, in order"
    # a pool smaller than the contexts read: the draw pools those contexts, and the words say so
    small = top_activations(sae, tiny_gpt2, corpus, busy.latent, k=7, n_tokens=n_tokens_for(sae),
                            sample_pool_tokens=64)
    read = len(small.tokens[0]) * math.ceil(n_tokens_for(sae) / (len(small.tokens[0]) - first_scored(sae)))
    assert read > 64 and small.contexts_drawn == f"drawn at random (seed 0) from the corpus's first {read:,} tokens"


def test_a_context_is_numbered_by_its_place_in_the_corpus(tiny_gpt2, tiny_dir, corpus, tmp_path, capsys):
    """top numbered each context by its row in the draw ("ctx 3": the fourth drawn), which says nothing of where its
    text is. It is numbered by its place in the corpus's stream of contexts (the corpus packed in order, from 0), in
    the result, its JSON and its text, from Python and from `saelab top`; read in order (pool 0) the two are one, as
    they were."""
    from saelab.cli import main

    sae = centred_sae(tiny_gpt2, corpus)
    in_order = token_contexts(corpus, tiny_gpt2.tokenize, T, n_contexts=POOL // T, bos_token_id=tiny_gpt2.bos_token_id)
    lats = list(range(12))
    for pool in (POOL, 0):
        got = top_activations(sae, tiny_gpt2, corpus, lats, k=5, n_tokens=n_tokens_for(sae), sample_pool_tokens=pool)
        for r in got:
            assert torch.equal(in_order[r.context_idx], r.tokens), f"pool {pool}, latent {r.latent}"
            assert [c["context"] for c in r.to_dict()["contexts"]] == r.context_idx.tolist()
            shown = [int(re.search(r"  ctx (\d+) ", line).group(1)) for line in r.to_text().splitlines()[1:]]
            assert shown == r.context_idx.tolist()
        places = [int(c) for r in got for c in r.context_idx]
        assert (max(places) >= N_CONTEXTS) == bool(pool)  # drawn: places past the count of contexts read
    save_sae(sae, tmp_path / "sae")
    assert main(["top", str(tmp_path / "sae"), "--latent", "0,1", "-n", "5", "--n-tokens", str(n_tokens_for(sae)),
                 "--corpus", corpus, "--sample-pool-tokens", str(POOL), "--model", str(tiny_dir), "--device", "cpu",
                 "--no-progress", "--json"]) == 0
    for r in json.loads(capsys.readouterr().out)["latents"]:
        assert r["contexts"] and all(in_order[c["context"]].tolist() == c["tokens"] for c in r["contexts"])


def test_contexts_given_as_drawn_are_numbered_and_named_as_such(tiny_gpt2, corpus):
    """Contexts a draw gave (``draw_contexts``) passed to top_activations are numbered by their places in the corpus,
    as top's own draw numbers them, and said to be given as drawn contexts (it read "given as a token tensor")."""
    sae = centred_sae(tiny_gpt2, corpus)
    drawn = draw_contexts(corpus, tiny_gpt2.tokenize, T, N_CONTEXTS, pool_tokens=POOL,
                          bos_token_id=tiny_gpt2.bos_token_id)
    got = top_activations(sae, tiny_gpt2, drawn, list(range(6)), k=5)
    assert all(r.contexts_drawn == "given as drawn contexts" for r in got)
    for r in got:
        rows = [int((drawn.index == c).nonzero()) for c in r.context_idx]
        assert torch.equal(drawn.tokens[rows], r.tokens)
    tensor = top_activations(sae, tiny_gpt2, drawn.tokens, 0, k=5)
    assert tensor.contexts_drawn == "given as a token tensor" and tensor.context_idx.max() < N_CONTEXTS
