"""Attribution patching, ablation effects, latent->logit and token->latent (tiny GPT-2; one test on SmolLM2)."""

from __future__ import annotations

import pytest
import torch

from saelab.explore import (
    ablation_effects,
    attribution_patching,
    compare_attribution_with_ablation,
    latent_edit,
    latent_logit_effects,
    logit_diff,
    run_with_saes,
    steer,
    token_latent_gradients,
)
from saelab.explore.attribution import pearson, spearman
from saelab.explore.steering import generate_ids, prompt_tokens
from saelab.sae import SAEConfig, TopKSAE

HOOK = "blocks.0.hook_resid_post"
POST = HOOK + ".hook_sae_acts_post"


def make_sae(lm, hook, n, k, seed=0):
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=lm.d_model, n_latents=n, k=k, hook_name=hook))
    with torch.no_grad():
        acts = lm.activations(torch.randint(0, min(lm.vocab_size, 40000), (4, 16)), hook)
        sae.b_dec.copy_(acts[:, 1:].reshape(-1, lm.d_model).mean(0))
    return sae


@pytest.fixture(scope="module")
def sae(tiny_gpt2):
    return make_sae(tiny_gpt2, HOOK, 128, 8)


@pytest.fixture(scope="module")
def tokens(tiny_gpt2):
    return prompt_tokens(tiny_gpt2, "When Mary and John went to the store, John gave a drink to")


def test_attribution_equals_finite_differences(tiny_gpt2, sae, tokens):
    metric = logit_diff(tiny_gpt2, " Mary", " John")
    attr = attribution_patching(tiny_gpt2, sae, tokens, metric)
    assert attr.attr_BTN.shape == (1, tokens.shape[1], sae.n_latents)
    torch.testing.assert_close(attr.metric_B, metric(tiny_gpt2.logits(tokens)), atol=1e-5, rtol=1e-5)
    assert attr.attr_BTN[:, 0].abs().max() == 0  # position 0 is not spliced
    # the largest few (position, latent) entries, checked by central differences on the latent
    z = attr.acts_BTN[0]
    top = torch.topk(attr.attr_BTN[0].abs().flatten(), 3).indices
    eps = 1e-2
    for flat in top.tolist():
        t, i = divmod(flat, sae.n_latents)
        ms = []
        for sign in (1, -1):
            hooks = {POST: latent_edit(tiny_gpt2, i, "add", sign * eps, positions=[t])}
            with torch.no_grad():
                ms.append(metric(run_with_saes(tiny_gpt2, tokens, [sae], use_error_term=True, hooks=hooks)))
        grad_fd = float((ms[0] - ms[1]) / (2 * eps))
        assert float(attr.attr_BTN[0, t, i]) == pytest.approx(float(z[t, i]) * grad_fd, rel=2e-2, abs=1e-6)


def test_ablation_effects_batching_and_sign(tiny_gpt2, sae, tokens):
    metric = logit_diff(tiny_gpt2, " Mary", " John")
    both = torch.cat([tokens, tokens.flip(1)], dim=0)  # two sequences at once
    z = sae.encode(tiny_gpt2.activations(both, HOOK))
    lats = torch.nonzero(z[:, 1:].sum((0, 1))).flatten()[:6].tolist()
    a = ablation_effects(tiny_gpt2, sae, both, lats, metric, batch_size=1)
    b = ablation_effects(tiny_gpt2, sae, both, lats, metric, batch_size=4)
    assert a.shape == (len(lats), 2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # effect = metric(clean) - metric(ablated), ablated by hand with a steering edit
    i = lats[0]
    manual = metric(tiny_gpt2.logits(tokens)) - metric(tiny_gpt2.logits(tokens, edits=steer(tiny_gpt2, sae, i, "ablate").edits))
    assert float(a[0, 0]) == pytest.approx(float(manual[0]), abs=1e-5)
    # a latent the SAE lacks is refused: -1 ablated the last latent, silently
    for bad in (-1, sae.n_latents):
        with pytest.raises(IndexError, match=f"latent {bad} out of range: the SAE has {sae.n_latents} latents"):
            ablation_effects(tiny_gpt2, sae, both, [lats[0], bad], metric)


def test_attribution_approximates_ablation(tiny_gpt2, sae, tokens, tmp_path):
    cases = [(tokens, logit_diff(tiny_gpt2, " Mary", " John")),
             (prompt_tokens(tiny_gpt2, "The capital of France is the city of"), logit_diff(tiny_gpt2, " Paris", " London"))]
    res = compare_attribution_with_ablation(tiny_gpt2, sae, cases, max_latents=30, batch_size=32, plot=tmp_path / "scatter.png")
    assert res["n"] >= 30
    assert res["pearson"] > 0.9 and res["spearman"] > 0.8, res  # measured: ~0.97 / ~0.9
    assert (tmp_path / "scatter.png").read_bytes()[:4] == b"\x89PNG"


def test_correlations():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, torch.tensor([1.0, 1.0, 2.0, 2.0])) == pytest.approx(0.8944, abs=1e-4)  # ties averaged


def test_latent_logit_effects_equal_manual_matmul(tiny_gpt2, sae):
    eff = latent_logit_effects(tiny_gpt2, sae, 9, top=5)
    d = sae.W_dec[9].detach()
    ln = tiny_gpt2.model.transformer.ln_f
    manual = tiny_gpt2.model.lm_head.weight @ ((d - d.mean()) * ln.weight)
    torch.testing.assert_close(eff["values"], manual.detach(), atol=1e-6, rtol=1e-5)
    assert [i for _, i, _ in eff["promoted"]] == manual.topk(5).indices.tolist()
    assert [i for _, i, _ in eff["suppressed"]] == (-manual).topk(5).indices.tolist()
    assert eff["promoted"][0][0] == tiny_gpt2.tokenizer.decode([eff["promoted"][0][1]])


def test_logit_effects_show_a_token_holding_part_of_a_character_as_its_bytes(tiny_gpt2):
    """Byte-level BPE tokens holding part of a character (🎉: F0 9F | 8E | 89) were listed one by one as
    "\ufffd": different tokens looked the same. They read as their bytes, as top and the site show them."""
    from saelab.evals.probe_tasks import token_strings

    tok = tiny_gpt2.tokenizer
    partial = [i for i in tok(" 🎉中")["input_ids"] if "\ufffd" in tok.decode([i])]
    assert len(partial) >= 2
    sae = TopKSAE(SAEConfig(d_in=tiny_gpt2.d_model, n_latents=4, k=1, hook_name=HOOK))
    W_U = tiny_gpt2.model.lm_head.weight.detach()
    with torch.no_grad():  # latent 1 writes the sum of their unembeddings: they are its top tokens
        sae.W_dec[1] = W_U[partial].sum(0) / tiny_gpt2.model.transformer.ln_f.weight
    eff = latent_logit_effects(tiny_gpt2, sae, 1, top=len(partial))
    shown = {i: s for s, i, _ in eff["promoted"]}
    assert sorted(shown) == sorted(partial)
    assert not [s for s in shown.values() if "\ufffd" in s]
    assert len(set(shown.values())) == len(partial)
    assert [s for s, _, _ in eff["promoted"]] == token_strings(tok, list(shown), readable_bytes=True)


def test_token_latent_gradients(tiny_gpt2, sae, tokens):
    lm, pos, lat = tiny_gpt2, 6, 4
    sal = token_latent_gradients(lm, sae, tokens, lat, pos)
    assert sal.grad_x_input_BT.shape == tokens.shape
    assert torch.all(sal.grad_x_input_BT[:, pos + 1:] == 0) and torch.all(sal.grad_norm_BT[:, pos + 1:] == 0)
    assert sal.grad_norm_BT[0, pos] > 0
    # independent computation: inputs_embeds as the leaf, full forward, capture at the hook
    emb = lm.model.get_input_embeddings()(tokens).detach().requires_grad_(True)
    store = {}

    def keep(x):
        store["x"] = x
        return x

    with torch.enable_grad(), lm.hooked({HOOK: keep}):
        lm.model(inputs_embeds=emb)
        pre = sae.pre_acts(store["x"][:, pos])[:, lat]
        (g,) = torch.autograd.grad(pre.sum(), emb)
    torch.testing.assert_close(sal.grad_x_input_BT, (g * emb).sum(-1).detach(), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(sal.pre_act_B, pre.detach(), atol=1e-6, rtol=1e-5)


def test_real_model_identity_steering_and_logit_lens(smollm2):
    """On SmolLM2: error-term identity, KV-cache generation positions, and the RMSNorm logit path."""
    lm, hook = smollm2, "blocks.9.hook_resid_post"
    torch.manual_seed(1)
    sae = TopKSAE(SAEConfig(d_in=lm.d_model, n_latents=256, k=8, hook_name=hook))
    toks = prompt_tokens(lm, "The capital of France is")
    clean = lm.logits(toks)
    with torch.no_grad():
        ident = run_with_saes(lm, toks, [sae], use_error_term=True,
                              hooks={f"{hook}.hook_sae_acts_post": lambda z: z.clone()})
    torch.testing.assert_close(ident, clean, atol=2e-4, rtol=1e-5)
    # steering from the first generated token on: generation agrees with full-sequence scoring
    P = toks.shape[1]
    s = steer(lm, sae, 3, "add", 30.0, positions=slice(P, None))
    full = generate_ids(lm, toks, s.edits, max_new_tokens=3, greedy=True)
    assert full.shape[1] == P + 3
    assert torch.equal(lm.logits(full, edits=s.edits)[0, P - 1:-1].argmax(-1), full[0, P:])
    # latent -> logits through the final RMSNorm weight
    d = sae.W_dec[3].detach()
    manual = lm.model.lm_head.weight @ (d * lm.model.model.norm.weight)
    torch.testing.assert_close(latent_logit_effects(lm, sae, 3)["values"], manual, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_refused_before_the_forwards(tiny_gpt2, sae, tokens, tmp_path, monkeypatch):
    """A plot path that is a folder failed after every attribution and ablation forward (IsADirectoryError at the
    atomic rename: the results lost); batch_size 0 was range()'s error, True a token id, and a position past the
    sequence torch's IndexError. Each is now refused by name, the first two before any forward."""
    import saelab.explore.attribution as attribution

    forwards = []
    monkeypatch.setattr(attribution, "attribution_patching", lambda *a, **k: forwards.append(a))
    metric = logit_diff(tiny_gpt2, " Mary", " John")
    cases = [(tokens, metric)]
    for plot, expect in ((tmp_path, "expected a file path in an existing, writable folder"),
                         (tmp_path / "no" / "p.png", "expected a file path in an existing, writable folder"),
                         (tmp_path / "p.txt", r"expected an image file \(.avif, .eps")):
        with pytest.raises(ValueError, match=f"^plot {plot}: {expect}"):
            compare_attribution_with_ablation(tiny_gpt2, sae, cases, plot=plot)
    with pytest.raises(ValueError, match="^batch_size 0: expected a whole number of latents per forward"):
        compare_attribution_with_ablation(tiny_gpt2, sae, cases, batch_size=0)
    assert forwards == []
    with pytest.raises(ValueError, match="^batch_size 0: expected"):
        ablation_effects(tiny_gpt2, sae, tokens, [1, 2], metric, batch_size=0)
    with pytest.raises(ValueError, match="^token True: expected a token id or a string of one token"):
        logit_diff(tiny_gpt2, True, " John")
    import numpy as np  # an integer of another type is a whole number: numpy's, a 0-d tensor's

    assert logit_diff(tiny_gpt2, np.int64(5), torch.tensor(6)).tokens == (5, 6)
    assert ablation_effects(tiny_gpt2, sae, tokens, [1, 2], metric, batch_size=np.int64(1)).shape == (2, 1)
    with pytest.raises(ValueError, match=rf"^logit_diff position 50: the sequences have {tokens.shape[1]} positions"):
        run = logit_diff(tiny_gpt2, " Mary", " John", position=50)
        run(run_with_saes(tiny_gpt2, tokens, {}))


def test_a_bad_max_latents_or_no_case_is_refused_before_the_forwards(tiny_gpt2, sae, tokens, monkeypatch):
    """max_latents -3 dropped 3 latents without a word, 0 gave pearson nan over n 0, and no case at all was
    torch.cat's "expected a non-empty list of Tensors": each is refused by name, before any forward."""
    import saelab.explore.attribution as attribution

    forwards = []
    monkeypatch.setattr(attribution, "attribution_patching", lambda *a, **k: forwards.append(a))
    cases = [(tokens, logit_diff(tiny_gpt2, " Mary", " John"))]
    for bad in (-3, 0, 2.5, True):
        with pytest.raises(ValueError, match=rf"^max_latents {bad!r}: expected a whole number of latents to compare "
                                             "per case, at least 1$"):
            compare_attribution_with_ablation(tiny_gpt2, sae, cases, max_latents=bad)
    with pytest.raises(ValueError, match=r"^cases: expected at least one \(tokens, metric\) pair, got none$"):
        compare_attribution_with_ablation(tiny_gpt2, sae, [])
    assert forwards == []


def test_latent_logit_effects_refuse_a_top_that_lists_no_token(tiny_gpt2, sae):
    """top=-5 was torch's "selected index k out of range"; top=0 listed nothing, 2.5 failed in topk."""
    for bad in (-5, 0, 2.5):
        with pytest.raises(ValueError, match=rf"^top {bad!r}: expected a whole number of tokens to list, at least 1$"):
            latent_logit_effects(tiny_gpt2, sae, 1, top=bad)
    assert len(latent_logit_effects(tiny_gpt2, sae, 1, top=10**9)["promoted"]) == tiny_gpt2.vocab_size


def test_token_latent_gradients_refuse_a_position_the_sae_does_not_read(tiny_gpt2, sae, tokens):
    """A position past the sequence was torch's IndexError (logit_diff names it: the same check now); position 0
    of an SAE trained without it returned a saliency of a position the SAE never reads, where attribution
    patching gives 0 and the splice leaves it: refused, and read with skip_first=False, as the splice takes it."""
    T = tokens.shape[1]
    for bad in (50, -T - 1):
        with pytest.raises(ValueError, match=rf"^position {bad}: the sequences have {T} positions$"):
            token_latent_gradients(tiny_gpt2, sae, tokens, 1, position=bad)
    with pytest.raises(ValueError, match=r"^position 1.5: expected an integer index of a token$"):
        token_latent_gradients(tiny_gpt2, sae, tokens, 1, position=1.5)
    assert sae.cfg.exclude_first
    for first in (0, -T):
        with pytest.raises(ValueError, match=rf"^position {first}: the SAE was trained without position 0 "
                                             r"\(cfg.exclude_first\) and never reads it"):
            token_latent_gradients(tiny_gpt2, sae, tokens, 1, position=first)
    read = token_latent_gradients(tiny_gpt2, sae, tokens, 1, position=0, skip_first=False)
    assert read.grad_norm_BT[0, 0] > 0 and torch.all(read.grad_norm_BT[:, 1:] == 0)


def test_text_for_tokens_is_refused_in_one_line_naming_the_helper_that_tokenizes_it(tiny_gpt2, sae):
    """attribution_patching(lm, sae, "a string", metric) ended in torch's TypeError inside the splice's forward
    (new(): invalid data type 'str'); ablation_effects and token_latent_gradients in as_tokens. These take token
    ids, as the rest of saelab.explore but generate's prompt does: text is refused by name, before any forward."""
    from saelab.errors import ShapeMismatchError

    metric = logit_diff(tiny_gpt2, " Mary", " John")
    text = "When Mary and John went to the store, John gave a drink to"
    said = (f"^tokens must be an integer tensor \\[batch, seq\\], got the text '{text}'; tokenize it first: "
            r"saelab\.explore\.steering\.prompt_tokens\(lm, text\) gives its ids \[1, T\], BOS first$")
    for call in (lambda t: attribution_patching(tiny_gpt2, sae, t, metric),
                 lambda t: ablation_effects(tiny_gpt2, sae, t, [1], metric),
                 lambda t: token_latent_gradients(tiny_gpt2, sae, t, 1),
                 lambda t: compare_attribution_with_ablation(tiny_gpt2, sae, [(t, metric)], plot=None)):
        with pytest.raises(ShapeMismatchError, match=said):
            call(text)
    with pytest.raises(ShapeMismatchError, match=r"^tokens must be an integer tensor \[batch, seq\], got the text "
                                                 r"\['Mary', 'John'\]; tokenize it first"):  # a batch of texts
        attribution_patching(tiny_gpt2, sae, ["Mary", "John"], metric)
    ragged = r"^tokens must be an integer tensor \[batch, seq\], got \[\[1, 2\], \[3\]\]$"
    with pytest.raises(ShapeMismatchError, match=ragged):  # rows of unequal length: torch's ValueError
        attribution_patching(tiny_gpt2, sae, [[1, 2], [3]], metric)
