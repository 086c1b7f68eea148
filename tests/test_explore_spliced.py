"""SAEs spliced into the model: hook points, cache, error term, gradients (tiny GPT-2, small random SAE)."""

from __future__ import annotations

import pytest
import torch

from saelab.errors import HookNameError, ShapeMismatchError
from saelab.explore import (
    SAE_HOOK_POINTS,
    latent_edit,
    parse_positions,
    run_with_cache_with_saes,
    run_with_saes,
    spliced,
)
from saelab.explore.steering import generate_ids, prompt_tokens
from saelab.explore.positions import position_mask
from saelab.sae import SAEConfig, TopKSAE

HOOK = "blocks.0.hook_resid_post"
POST = HOOK + ".hook_sae_acts_post"


def make_sae(lm, hook=HOOK, n=128, k=8, seed=0, input_norm="none"):
    """A random SAE centred on the model's activations (so latents fire like a trained one's would)."""
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=lm.d_model, n_latents=n, k=k, hook_name=hook, input_norm=input_norm))
    toks = torch.randint(0, 50000, (4, 16))
    with torch.no_grad():
        sae.b_dec.copy_(lm.activations(toks, hook)[:, 1:].reshape(-1, lm.d_model).mean(0))
    return sae


@pytest.fixture(scope="module")
def sae(tiny_gpt2):
    return make_sae(tiny_gpt2)


@pytest.fixture(scope="module")
def tokens(tiny_gpt2):
    ids = tiny_gpt2.tokenize(["The cat sat on the mat while the dog slept by the door."])[0]
    return torch.tensor([[tiny_gpt2.bos_token_id, *ids], [tiny_gpt2.bos_token_id, *ids[::-1]]])


def test_error_term_identity_reproduces_clean_model(tiny_gpt2, sae, tokens):
    clean = tiny_gpt2.logits(tokens)
    with torch.no_grad():
        plain = run_with_saes(tiny_gpt2, tokens, [sae], use_error_term=True)
        ident = run_with_saes(tiny_gpt2, tokens, [sae], use_error_term=True, hooks={POST: lambda z: z.clone()},
                              skip_first=False)
        spliced_only = run_with_saes(tiny_gpt2, tokens, [sae])
    torch.testing.assert_close(plain, clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(ident, clean, atol=1e-5, rtol=0)
    assert (spliced_only - clean).abs().max() > 1e-3  # a random SAE's reconstruction does change the model


def test_cache_keys_shapes_and_values(tiny_gpt2, sae, tokens):
    B, T = tokens.shape
    with torch.no_grad():
        logits, cache = run_with_cache_with_saes(tiny_gpt2, tokens, [sae], use_error_term=True)
    assert set(cache) == {f"{HOOK}.{p}" for p in SAE_HOOK_POINTS}
    D, N = tiny_gpt2.d_model, sae.n_latents
    for p in SAE_HOOK_POINTS:
        want = (B, T, N) if p in ("hook_sae_acts_pre", "hook_sae_acts_post") else (B, T, D)
        assert cache[f"{HOOK}.{p}"].shape == want, p
    x = tiny_gpt2.activations(tokens, HOOK)
    c = lambda p: cache[f"{HOOK}.{p}"]  # noqa: E731
    torch.testing.assert_close(c("hook_sae_input"), x)
    torch.testing.assert_close(c("hook_sae_acts_post"), sae.encode(x))
    assert int((c("hook_sae_acts_post") > 0).sum(-1).max()) <= sae.cfg.k
    torch.testing.assert_close(c("hook_sae_recons"), sae(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c("hook_sae_error"), x - sae(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c("hook_sae_output"), x, atol=1e-5, rtol=1e-5)
    assert logits.shape == (B, T, tiny_gpt2.vocab_size)
    # names= restricts the cache
    with torch.no_grad():
        _, small = run_with_cache_with_saes(tiny_gpt2, tokens, [sae], names=[POST])
    assert list(small) == [POST]


def test_splice_without_error_term_matches_manual_replacement(tiny_gpt2, sae, tokens):
    def manual(x):  # position 0 (BOS) left clean, as cfg.exclude_first says
        return torch.cat([x[:, :1], sae(x)[:, 1:]], dim=1)

    want = tiny_gpt2.logits(tokens, edits={HOOK: manual})
    with torch.no_grad():
        got = run_with_saes(tiny_gpt2, tokens, sae)
        every = run_with_saes(tiny_gpt2, tokens, sae, skip_first=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(every, tiny_gpt2.logits(tokens, edits={HOOK: sae}), atol=1e-5, rtol=1e-5)


def test_latent_edit_clamp_shows_in_cache_and_equals_decoder_shift(tiny_gpt2, sae, tokens):
    lat, val, pos = 5, 3.0, [3, 4]
    with torch.no_grad():
        _, cache = run_with_cache_with_saes(
            tiny_gpt2, tokens, [sae], use_error_term=True, hooks={POST: latent_edit(tiny_gpt2, lat, "clamp", val, pos)}
        )
    z = cache[POST]
    assert torch.all(z[:, pos, lat] == val)
    clean_z = sae.encode(tiny_gpt2.activations(tokens, HOOK))
    others = [t for t in range(tokens.shape[1]) if t not in pos]
    torch.testing.assert_close(z[:, others], clean_z[:, others])
    # with the error term, the output moves by exactly (val - z) * W_dec[lat] at those positions
    x = cache[HOOK + ".hook_sae_input"]
    expect = x.clone()
    expect[:, pos] += (val - clean_z[:, pos, lat])[..., None] * sae.W_dec[lat]
    torch.testing.assert_close(cache[HOOK + ".hook_sae_output"], expect, atol=1e-5, rtol=1e-5)


def test_gradients_with_error_term(tiny_gpt2, sae, tokens):
    """Upstream gradients are the clean model's; the latent gradient is W_dec @ (gradient at the hook)."""
    lm = tiny_gpt2
    emb = lm.model.get_input_embeddings()
    store = {}

    def leaf(module, args, out):
        store["e"] = out.detach().requires_grad_(True)
        return store["e"]

    def grad_wrt_embeddings(fn):
        h = emb.register_forward_hook(leaf)
        try:
            with torch.enable_grad():
                out = fn()
                return torch.autograd.grad(out[:, -1, 11].sum(), store["e"])[0]
        finally:
            h.remove()

    g_clean = grad_wrt_embeddings(lambda: lm.model(input_ids=tokens).logits)
    g_spliced = grad_wrt_embeddings(lambda: run_with_saes(lm, tokens, [sae], use_error_term=True))
    torch.testing.assert_close(g_spliced, g_clean, atol=1e-6, rtol=1e-4)

    # d logit / d z  ==  W_dec @ d logit / d x  (error held fixed)
    with torch.enable_grad():
        logits, cache = run_with_cache_with_saes(
            lm, tokens, [sae], use_error_term=True, names=[POST],
            hooks={POST: lambda z: z.detach().requires_grad_(True), HOOK + ".hook_sae_output": _keep(store, "out")},
        )
        gz, gx = torch.autograd.grad(logits[:, -1, 11].sum(), [cache[POST], store["out"]])
    torch.testing.assert_close(gz[:, 1:], gx[:, 1:] @ sae.W_dec.T, atol=1e-6, rtol=1e-4)
    assert gz[:, 0].abs().max() == 0  # position 0 is not spliced


def _keep(store, key):
    def fn(t):
        store[key] = t
        return t
    return fn


def test_multiple_saes_and_model_hooks(tiny_gpt2, tokens):
    s0, s1 = make_sae(tiny_gpt2, "blocks.0.hook_resid_post", seed=1), make_sae(tiny_gpt2, "blocks.1.hook_mlp_out", seed=2)
    seen = {}
    with torch.no_grad():
        _, cache = run_with_cache_with_saes(
            tiny_gpt2, tokens, [s0, s1], use_error_term=True,
            hooks={"blocks.0.hook_attn_out": _keep(seen, "attn")},
        )
    assert {k.rsplit(".", 1)[0] for k in cache} == {"blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"}
    assert seen["attn"].shape == (*tokens.shape, tiny_gpt2.d_model)


def test_bad_names_are_refused(tiny_gpt2, sae, tokens):
    with pytest.raises(HookNameError, match="hook_sae_bogus"):
        run_with_saes(tiny_gpt2, tokens, [sae], hooks={HOOK + ".hook_sae_bogus": lambda t: t})
    with pytest.raises(HookNameError, match="names no spliced SAE"):
        run_with_saes(tiny_gpt2, tokens, [sae], hooks={"blocks.1.hook_resid_post.hook_sae_acts_post": lambda t: t})
    with pytest.raises(HookNameError, match="hook_sae_input"):
        run_with_saes(tiny_gpt2, tokens, [sae], hooks={HOOK: lambda t: t})
    with pytest.raises(ShapeMismatchError):
        run_with_saes(tiny_gpt2, tokens, [sae], hooks={POST: lambda z: z[..., :3]})
    bad = TopKSAE(SAEConfig(d_in=32, n_latents=64, k=4, hook_name=HOOK))
    with pytest.raises(ShapeMismatchError):
        run_with_saes(tiny_gpt2, tokens, [bad])


def test_spliced_generation_uses_absolute_positions(tiny_gpt2, sae):
    """A latent edit from the 2nd generated token on: KV-cache generation agrees with full scoring."""
    lm = tiny_gpt2
    ids = prompt_tokens(lm, " Hello world, this is")
    P = ids.shape[1]
    hooks = {POST: latent_edit(lm, 5, "clamp", 40.0, positions=slice(P + 1, None))}
    cache = {}
    with spliced(lm, [sae], use_error_term=True, hooks=hooks, cache=cache, cache_names=[POST]):
        full = generate_ids(lm, ids, max_new_tokens=5, greedy=True)
    assert cache[POST].shape == (1, 1, sae.n_latents)  # the last forward saw one new token
    assert float(cache[POST][0, 0, 5]) == 40.0
    with torch.no_grad():
        logits = run_with_saes(lm, full, [sae], use_error_term=True, hooks=hooks)
    assert torch.equal(logits[0, P - 1:-1].argmax(-1), full[0, P:])
    plain = generate_ids(lm, ids, max_new_tokens=5, greedy=True)
    assert torch.equal(plain[0, :P + 2], full[0, :P + 2])  # tokens chosen before the edit starts


def test_no_hooks_left_behind(tiny_gpt2, sae, tokens):
    import gc

    from saelab.explore import steer

    def n_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_gpt2.model.modules())

    baseline = n_hooks()  # transformers' own output-recording hooks, once a forward asked for hidden states
    s = steer(tiny_gpt2, sae, 3, "add", 1.0, positions=[2])
    tiny_gpt2.logits(tokens, edits=s.edits)
    with torch.no_grad():
        run_with_saes(tiny_gpt2, tokens, [sae], hooks={POST: latent_edit(tiny_gpt2, 3, "clamp", 1.0, [2])})
    assert n_hooks() == baseline + 1  # the position tracker, held by the steering edit
    del s
    gc.collect()
    assert n_hooks() == baseline


def test_positions_parsing_and_masks():
    assert parse_positions("all") is None
    assert parse_positions("3,1,3") == [1, 3]
    assert parse_positions("1:") == slice(1, None)
    with pytest.raises(ValueError):
        parse_positions("-1")
    with pytest.raises(ValueError):
        parse_positions("a:b")
    # the user's input and what it takes, not int()'s words; "" is no position, not 'all'
    for text in ("abc", "1,x", "2:x", "5,", "-1", ""):
        with pytest.raises(ValueError) as e:
            parse_positions(text)
        assert str(e.value) == (f"cannot read positions {text!r}: expected 'all', a position '5', positions "
                                "'3,7,9' or a range '1:' / '2:10' / '1::2', as integers >= 0 (0 = the first token)")
    # during generation the forward covers absolute positions offset .. offset+length-1
    assert position_mask(slice(1, None), 0, 4).tolist() == [False, True, True, True]
    assert position_mask([5], 5, 1).tolist() == [True]
    assert position_mask([5], 6, 1).tolist() == [False]
    assert position_mask(slice(2, 8, 3), 4, 4).tolist() == [False, True, False, False]
