"""Tests of saelab.models on real components: tiny random GPT-2 / Llama / GPT-NeoX models with real
tokenizers, and the real default SmolLM2 model (loaded once per session, cached on disk)."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from saelab.errors import HookNameError, ShapeMismatchError
from saelab.models import (
    DEFAULT_MODEL,
    LanguageModel,
    ModelLoadError,
    UnsupportedModelError,
    default_gguf_path,
    load_model,
    save_dequantized,
)
from saelab.models.loading import configured_layer_count, gguf_cache_dir, model_name
from saelab.utils import hub

KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")


@pytest.fixture(scope="module")
def tiny_llama(gpt2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    return LanguageModel(LlamaForCausalLM(config), gpt2_tokenizer, "tiny-llama")


@pytest.fixture(scope="module")
def tiny_neox(gpt2_tokenizer):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(2)
    config = GPTNeoXConfig(
        vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, use_parallel_residual=True,
    )
    return LanguageModel(GPTNeoXForCausalLM(config), gpt2_tokenizer, "tiny-neox")


def tokens(batch: int = 2, seq: int = 12, vocab: int = 50257, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def n_hooks(lm: LanguageModel) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


def norms(lm: LanguageModel):
    """(pre-attention norm name, pre-MLP norm name, final norm module) of a tiny model."""
    if lm.family == "gpt2":
        return "ln_1", "ln_2", lm.model.transformer.ln_f
    return "input_layernorm", "post_attention_layernorm", lm.model.model.norm


# -- construction and names -----------------------------------------------------------------


def test_attributes(tiny_gpt2, tiny_llama):
    assert (tiny_gpt2.family, tiny_gpt2.n_layers, tiny_gpt2.d_model, tiny_gpt2.vocab_size) == ("gpt2", 2, 64, 50257)
    assert (tiny_llama.family, tiny_llama.n_layers, tiny_llama.d_model) == ("llama", 2, 64)
    assert tiny_gpt2.bos_token_id == 50256  # GPT-2 has no BOS of its own: falls back to <|endoftext|>
    assert tiny_gpt2.device == torch.device("cpu") and tiny_gpt2.name == "tiny-gpt2"
    for lm in (tiny_gpt2, tiny_llama):
        assert not lm.model.training
        assert not any(p.requires_grad for p in lm.model.parameters())


def test_context_longer_than_the_model_is_refused_before_any_forward(tiny_gpt2, tiny_llama, data_dir):
    from saelab.errors import ConfigError
    from saelab.evals.core import EvalConfig, evaluate_core
    from saelab.sae import SAEConfig, TopKSAE

    for lm in (tiny_gpt2, tiny_llama):  # GPT-2's n_positions, Llama's max_position_embeddings
        assert lm.max_context == 128 and lm.check_context_size(128) == 128
        with pytest.raises(ConfigError, match=f"context_size=129 exceeds the longest context of {lm.name} \\(128"):
            lm.check_context_size(129)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=32, k=4, hook_name="blocks.1.hook_resid_post", context_size=64))
    with pytest.raises(ConfigError, match="context_size=1000 exceeds"):
        evaluate_core(sae, tiny_gpt2, EvalConfig(context_size=1000, corpus=str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")))


def test_hook_names(tiny_gpt2, tiny_neox):
    names = tiny_gpt2.hook_names()
    assert names == [f"blocks.{L}.hook_{k}" for L in range(2) for k in KINDS]
    for name in names:
        assert tiny_gpt2.check_hook(name) == name
        assert tiny_gpt2.hook_width(name) == 64
    assert "blocks.0.hook_resid_mid" not in tiny_neox.hook_names()  # parallel residual


@pytest.mark.parametrize(
    "bad, why",
    [
        ("blocks.40.hook_resid_post", "layer 40 out of range 0..1"),
        ("blocks.0.hook_resid_middle", "no hook kind 'resid_middle'"),
        ("resid_post", "not of the form"),
        ("blocks.-1.hook_resid_pre", "not of the form"),
        (8, "not of the form"),
    ],
)
def test_bad_hook_names(tiny_gpt2, bad, why):
    with pytest.raises(HookNameError) as info:
        tiny_gpt2.check_hook(bad)
    msg = str(info.value)
    assert repr(bad) in msg and "tiny-gpt2" in msg and why in msg
    assert "blocks.{L}.hook_resid_pre|" in msg and "0..1" in msg
    assert isinstance(info.value, KeyError)
    before = n_hooks(tiny_gpt2)
    with pytest.raises(HookNameError):
        tiny_gpt2.activations(tokens(), bad)
    with pytest.raises(HookNameError):
        tiny_gpt2.logits(tokens(), {"blocks.0.hook_resid_pre": lambda x: x, bad: lambda x: x})
    assert n_hooks(tiny_gpt2) == before


def test_resid_mid_refused_with_parallel_residual(tiny_neox):
    with pytest.raises(HookNameError, match="parallel"):
        tiny_neox.check_hook("blocks.0.hook_resid_mid")


def test_unsupported_model_named(gpt2_tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=100, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                       num_attention_heads=2, word_embed_proj_dim=16)
    with pytest.raises(UnsupportedModelError, match="'opt'"):
        LanguageModel(OPTForCausalLM(config), gpt2_tokenizer)


# -- values at each hook against independent references ---------------------------------------


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama"])
def test_hook_values_match_references(request, which):
    lm: LanguageModel = request.getfixturevalue(which)
    toks = tokens()
    pre_norm, mid_norm, final_norm = norms(lm)
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def grab(key):
        def hook(module, args):
            seen[key] = args[0]
        return hook

    # Reference: plain torch hooks on the norm modules, whose inputs are the residual stream.
    for L, block in enumerate(lm.layout.blocks):
        handles.append(getattr(block, pre_norm).register_forward_pre_hook(grab(f"pre{L}")))
        handles.append(getattr(block, mid_norm).register_forward_pre_hook(grab(f"mid{L}")))
    handles.append(final_norm.register_forward_pre_hook(grab("final")))
    try:
        with torch.no_grad():
            out = lm.model(input_ids=toks, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    logits, cache = lm.run_with_cache(toks, lm.hook_names())
    assert torch.equal(logits, out.logits)

    with torch.no_grad():
        if lm.family == "gpt2":
            emb = lm.model.transformer.wte(toks) + lm.model.transformer.wpe(torch.arange(toks.shape[1]))
        else:
            emb = lm.model.model.embed_tokens(toks)
    assert torch.equal(cache["blocks.0.hook_resid_pre"], emb)
    for L in range(lm.n_layers):
        c = {k: cache[f"blocks.{L}.hook_{k}"] for k in KINDS}
        for k in KINDS:
            assert c[k].shape == (2, 12, lm.d_model)
        assert torch.equal(c["resid_pre"], seen[f"pre{L}"])
        assert torch.equal(c["resid_mid"], seen[f"mid{L}"])
        assert torch.equal(c["resid_mid"], c["resid_pre"] + c["attn_out"])
        assert torch.equal(c["resid_post"], c["resid_mid"] + c["mlp_out"])
        block = lm.layout.blocks[L]
        with torch.no_grad():
            mlp_ref = block.mlp(getattr(block, mid_norm)(c["resid_mid"]))
        assert torch.equal(c["mlp_out"], mlp_ref)
        if L < lm.n_layers - 1:
            assert torch.equal(c["resid_post"], out.hidden_states[L + 1])
            assert torch.equal(c["resid_post"], cache[f"blocks.{L + 1}.hook_resid_pre"])
        else:
            assert torch.equal(c["resid_post"], seen["final"])
            assert not torch.equal(c["resid_post"], out.hidden_states[-1])  # HF's is after the final norm


def test_neox_parallel_residual_values(tiny_neox):
    _, cache = tiny_neox.run_with_cache(tokens(), tiny_neox.hook_names())
    for L in range(2):
        c = {k: cache[f"blocks.{L}.hook_{k}"] for k in ("resid_pre", "attn_out", "mlp_out", "resid_post")}
        torch.testing.assert_close(c["resid_post"], c["resid_pre"] + c["attn_out"] + c["mlp_out"])


# -- truncated forward ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama", "tiny_neox"])
def test_truncated_equals_full_forward(request, which):
    lm: LanguageModel = request.getfixturevalue(which)
    toks = tokens(seed=3)
    baseline = n_hooks(lm)  # transformers installs some of its own (output recording)
    logits, full = lm.run_with_cache(toks, lm.hook_names())
    assert logits is not None
    for name in lm.hook_names():
        acts = lm.activations(toks, name)
        assert (acts - full[name]).abs().max().item() == 0, name
    none, some = lm.run_with_cache(toks, ["blocks.1.hook_mlp_out", "blocks.0.hook_resid_pre"], stop_early=True)
    assert none is None and set(some) == {"blocks.1.hook_mlp_out", "blocks.0.hook_resid_pre"}
    assert n_hooks(lm) == baseline


def test_truncated_forward_stops_after_hooked_layer(tiny_gpt2):
    ran = []
    blocks = tiny_gpt2.layout.blocks
    handles = [b.register_forward_hook(lambda m, a, o, L=L: ran.append(L)) for L, b in enumerate(blocks)]
    head = tiny_gpt2.model.lm_head.register_forward_hook(lambda m, a, o: ran.append("head"))
    try:
        tiny_gpt2.activations(tokens(), "blocks.0.hook_resid_mid")
        assert ran == []  # stopped inside layer 0, before its MLP and the layer's return
        tiny_gpt2.activations(tokens(), "blocks.0.hook_resid_post")
        assert ran == [0]
    finally:
        for h in (*handles, head):
            h.remove()


# -- edits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama"])
def test_identity_edits_leave_logits_unchanged(request, which):
    lm: LanguageModel = request.getfixturevalue(which)
    toks = tokens(seed=4)
    baseline = n_hooks(lm)
    clean = lm.logits(toks)
    for name in lm.hook_names():
        assert torch.equal(lm.logits(toks, {name: lambda x: x}), clean), name
        copied = lm.logits(toks, {name: lambda x: x.clone()})
        if name.endswith("resid_mid"):  # written back as (mid - resid_pre): one rounding
            torch.testing.assert_close(copied, clean, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(copied, clean), name
    assert n_hooks(lm) == baseline


def test_zero_edits_match_manual_reference(tiny_gpt2):
    lm, toks = tiny_gpt2, tokens(seed=5)
    clean = lm.logits(toks)
    block = lm.model.transformer.h[1]
    for hook, proj in (("blocks.1.hook_mlp_out", block.mlp.c_proj), ("blocks.1.hook_attn_out", block.attn.c_proj)):
        edited = lm.logits(toks, {hook: torch.zeros_like})
        assert not torch.allclose(edited, clean)
        # Reference: zero the output projection, so the module itself outputs exact zeros.
        saved = proj.weight.clone(), proj.bias.clone()
        with torch.no_grad():
            proj.weight.zero_()
            proj.bias.zero_()
            try:
                reference = lm.model(input_ids=toks, use_cache=False).logits
            finally:
                proj.weight.copy_(saved[0])
                proj.bias.copy_(saved[1])
        assert torch.equal(edited, reference), hook
    # Zero residual stream at the end: the final LayerNorm maps 0 to its bias at every position.
    edited = lm.logits(toks, {"blocks.1.hook_resid_post": torch.zeros_like})
    with torch.no_grad():
        reference = lm.model.lm_head(lm.model.transformer.ln_f(torch.zeros(1, 1, 64)))
    torch.testing.assert_close(edited, reference.expand_as(edited), rtol=0, atol=1e-6)
    assert torch.equal(lm.logits(toks), clean)


@pytest.mark.parametrize("kind", ["resid_pre", "resid_mid", "resid_post"])
def test_patching_residual_from_other_input(tiny_llama, kind):
    # Replacing the whole residual stream at a point with that of other tokens gives their logits.
    lm = tiny_llama
    a, b = tokens(seed=6), tokens(seed=7)
    hook = f"blocks.0.hook_{kind}"
    from_b = lm.activations(b, hook)
    patched = lm.logits(a, {hook: lambda x: from_b})
    if kind == "resid_mid":
        torch.testing.assert_close(patched, lm.logits(b), rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(patched, lm.logits(b))


def test_edit_with_grad_and_capture_inside_hooked(tiny_gpt2):
    lm, toks = tiny_gpt2, tokens(seed=8)
    scale = torch.tensor(1.5, requires_grad=True)
    baseline = n_hooks(lm)
    hook = "blocks.0.hook_resid_post"
    with lm.hooked({hook: lambda x: x * scale}):
        loss = lm.model(input_ids=toks, use_cache=False).logits.square().mean()
        _, cache = lm.run_with_cache(toks, [hook])  # captures see the edited value
    loss.backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0
    assert all(p.grad is None for p in lm.model.parameters())
    torch.testing.assert_close(cache[hook], lm.activations(toks, hook) * 1.5)
    assert n_hooks(lm) == baseline


def test_hooked_generation(tiny_gpt2):
    lm, prompt = tiny_gpt2, tokens(batch=1, seq=5, seed=12)

    def generate():
        out = lm.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                do_sample=False, pad_token_id=lm.bos_token_id)
        return out[0, 5:].tolist()

    clean = generate()
    with lm.hooked({"blocks.1.hook_resid_mid": lambda x: x.clone()}):
        assert generate() == clean
    # Forcing the last residual stream to a fixed direction forces the same next token every step.
    direction = lm.model.transformer.wte.weight[1234] * 50
    with lm.hooked({"blocks.1.hook_resid_post": lambda x: direction.expand_as(x).clone()}):
        forced = generate()
    assert len(set(forced)) == 1


def test_hooks_removed_on_error(tiny_gpt2):
    lm, toks = tiny_gpt2, tokens(seed=9)
    baseline = n_hooks(lm)
    clean = lm.logits(toks)
    with pytest.raises(RuntimeError, match="boom"):
        with lm.hooked({"blocks.0.hook_resid_mid": torch.zeros_like, "blocks.1.hook_mlp_out": torch.zeros_like}):
            assert n_hooks(lm) > baseline
            raise RuntimeError("boom")
    assert n_hooks(lm) == baseline
    with pytest.raises(ShapeMismatchError, match="blocks.1.hook_attn_out"):
        lm.logits(toks, {"blocks.1.hook_attn_out": lambda x: x[..., :3]})
    assert n_hooks(lm) == baseline
    assert torch.equal(lm.logits(toks), clean)


# -- tokens and loss ----------------------------------------------------------------------------


def test_tokenize(tiny_gpt2):
    assert tiny_gpt2.tokenize(["hello world", "", " hello"]) == [[31373, 995], [], [23748]]
    with pytest.raises(TypeError):
        tiny_gpt2.tokenize("hello world")


def test_cross_entropy(tiny_gpt2):
    lm, toks = tiny_gpt2, tokens(seed=10)
    ce = lm.cross_entropy(toks)
    assert ce.shape == (2, 11) and ce.dtype == torch.float32
    logits = lm.logits(toks)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(ce, ref.view(2, 11), rtol=0, atol=1e-6)
    torch.testing.assert_close(lm.cross_entropy(toks, reduction="mean"), ce.mean())
    assert torch.equal(lm.cross_entropy(toks, {"blocks.1.hook_resid_pre": lambda x: x}), ce)
    zeroed = lm.cross_entropy(toks, {"blocks.1.hook_resid_pre": torch.zeros_like})
    assert not torch.allclose(zeroed, ce)
    with pytest.raises(ValueError, match="reduction"):
        lm.cross_entropy(toks, reduction="avg")
    with pytest.raises(ShapeMismatchError):
        lm.cross_entropy(toks[0])


# -- loading ------------------------------------------------------------------------------------


def test_save_and_load_directory_round_trip(tiny_gpt2, tmp_path):
    dest = save_dequantized(tiny_gpt2.model, tiny_gpt2.tokenizer, tmp_path / "tiny")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    lm = load_model(str(dest))
    assert lm.name == str(dest.resolve())
    assert lm.model.lm_head.weight.data_ptr() == lm.model.transformer.wte.weight.data_ptr()  # re-tied
    toks = tokens(seed=11)
    assert torch.equal(lm.logits(toks), tiny_gpt2.logits(toks))
    assert lm.tokenize(["hello world"]) == [[31373, 995]]


def test_load_errors_name_the_spec(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(ModelLoadError, match="nope/model.gguf"):
        load_model(str(tmp_path / "nope" / "model.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(tmp_path / "weights.bin"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(ModelLoadError, match="'saelab-tests/no-such-model' from the local Hugging Face cache \\(the hub cannot be reached: "
                                              "offline mode is on"):
        load_model("saelab-tests/no-such-model")
    with pytest.raises(ValueError, match="dtype"):
        load_model("default", dtype="float33")


def test_a_folder_without_config_json_is_named_as_no_model_folder(tmp_path):
    """An empty folder or a run folder given as --model: transformers' tokenizer error was cut to its first line,
    'Couldn't instantiate the backend tokenizer from one of:', which names nothing."""
    (tmp_path / "empty").mkdir()
    run = tmp_path / "run"
    (run / "sae").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    crowded = tmp_path / "crowded"  # more entries than the line lists: how many are left out
    crowded.mkdir()
    for i in range(10):
        (crowded / f"f{i}").write_text("x")
    listed = ", ".join(f"'f{i}'" for i in range(8))
    for folder, found in ((tmp_path / "empty", r"\[\]"), (run, r"\['sae', 'train_config.json'\]"),
                          (crowded, re.escape(f"[{listed}] and 2 more"))):
        with pytest.raises(ModelLoadError, match=f"model directory {folder}: no config.json \\(found {found}\\); "
                                                 "expected a Hugging Face model folder"):
            load_model(str(folder))


def test_unreachable_hub_is_named_at_once(monkeypatch):
    """A hub whose host does not resolve: the local cache only, no minute of retries, and a message
    that says so; behind a proxy (unless the host bypasses it) the name is not checked."""
    import huggingface_hub.constants

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://saelab-tests.invalid")
    assert hub.hub_unreachable_reason() == "saelab-tests.invalid does not resolve: no network?"
    assert hub.hub_kwargs() == {"local_files_only": True}
    with pytest.raises(ModelLoadError, match="from the local Hugging Face cache \\(the hub cannot be reached: "
                                             "saelab-tests.invalid does not resolve"):
        load_model("saelab-tests/no-such-model")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.saelab-tests.invalid:3128")
    assert hub.hub_unreachable_reason() is None and hub.hub_kwargs() == {}
    monkeypatch.setenv("NO_PROXY", "saelab-tests.invalid")  # the proxy is bypassed: the name is checked again
    assert hub.hub_unreachable_reason() == "saelab-tests.invalid does not resolve: no network?"


def test_checks_before_a_load_pass_over_an_unreachable_hub_at_once(monkeypatch):
    """The config and tokenizer fetched ahead of a hub model's weights: with the hub unreachable, neither is
    there, so nothing is refused and nothing retried; the load then names the problem, as before."""
    import time

    import huggingface_hub.constants

    from saelab.models import check_before_load, tokenizer_before_load

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://saelab-tests.invalid")
    started = time.perf_counter()
    check_before_load("saelab-tests/no-such-model", "blocks.99.hook_resid_post", 100_000)
    assert tokenizer_before_load("saelab-tests/no-such-model") is None
    assert time.perf_counter() - started < 5  # huggingface_hub's retries take about 25 s


def test_default_model(smollm2):
    lm = smollm2
    assert lm.name == DEFAULT_MODEL == "default"
    assert (lm.family, lm.n_layers, lm.d_model, lm.vocab_size) == ("llama", 30, 576, 49152)
    assert lm.bos_token_id == 1
    assert lm.tokenize(["hello world"]) == [[28120, 905]]
    toks = torch.tensor([[lm.bos_token_id] + lm.tokenize(["The cat sat on the mat and"])[0]])
    hooks = ["blocks.3.hook_resid_mid", "blocks.9.hook_resid_post", "blocks.29.hook_resid_post"]
    _, full = lm.run_with_cache(toks, hooks)
    for name, value in full.items():
        assert torch.equal(lm.activations(toks, name), value), name
    text = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."
    toks = torch.tensor([[lm.bos_token_id] + lm.tokenize([text])[0]])
    ce = lm.cross_entropy(toks)
    assert ce.shape == (1, toks.shape[1] - 1)
    assert ce.mean().item() < 4  # a trained model; uniform guessing would be ln(49152) = 10.8


def test_layer_count_is_read_from_the_config_without_a_load(smollm2, tiny_dir, tmp_path):
    assert configured_layer_count(DEFAULT_MODEL) == smollm2.n_layers == 30  # the dequantized cache's config
    assert configured_layer_count(str(tiny_dir)) == 2  # GPT-2's n_layer
    assert configured_layer_count(str(tmp_path)) is None  # no config: the load names the problem
    assert configured_layer_count("saelab-tests/no-such-model") is None  # a hub id not in the local cache


@pytest.mark.slow  # ~15 s on 2 cores; .ci/run runs the slow tests
def test_default_cache_round_trip_is_exact(smollm2):
    from transformers import AutoModelForCausalLM

    cached_dir = gguf_cache_dir(default_gguf_path())
    assert (cached_dir / "model.safetensors").is_file() and (cached_dir / "config.json").is_file()
    assert "quantization_config" not in (cached_dir / "config.json").read_text()
    again = load_model("default")  # from the cache
    # Reference: the GGUF file dequantized by transformers now (the slow path the cache replaces).
    gguf = default_gguf_path()
    fresh = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    toks = torch.tensor([smollm2.tokenize(["Sparse autoencoders find features in language models."])[0]])
    with torch.no_grad():
        reference = fresh(input_ids=toks, use_cache=False).logits
    assert torch.equal(smollm2.logits(toks), reference)
    assert torch.equal(again.logits(toks), reference)
    text = "Zürich, 1999: naïve café — ok?"
    assert again.tokenizer.decode(again.tokenize([text])[0]) == text


@pytest.mark.slow  # ~20 s on 2 cores: rebuilds the default model's cache; .ci/run runs the slow tests
def test_default_cache_whose_weights_do_not_fit_is_rebuilt(smollm2, tmp_path, monkeypatch):
    """A dequantized cache that lacks weights (but for the embedding) loaded with them made up at random; it is
    rebuilt from the GGUF file instead (~20 s), as a cache that does not load is."""
    from safetensors.torch import save_file

    real = gguf_cache_dir(default_gguf_path())
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path))
    damaged = gguf_cache_dir(default_gguf_path())
    shutil.copytree(real, damaged, ignore=shutil.ignore_patterns("model.safetensors"))
    embedding = smollm2.model.get_input_embeddings().weight.detach().contiguous()
    save_file({"model.embed_tokens.weight": embedding}, str(damaged / "model.safetensors"))
    toks = torch.tensor([smollm2.tokenize(["Sparse autoencoders find features in language models."])[0]])
    assert torch.equal(load_model("default").logits(toks), smollm2.logits(toks))


# -- forward resumed at a hook ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen2_mixed(gpt2_tokenizer):
    """Qwen2 whose layer 1 uses sliding-window attention (window 4) and layer 0 full attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(
        vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, use_sliding_window=True, sliding_window=4,
        max_window_layers=1,
    )
    assert config.layer_types == ["full_attention", "sliding_attention"]
    return LanguageModel(Qwen2ForCausalLM(config), gpt2_tokenizer, "tiny-qwen2-mixed")


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama", "tiny_neox", "tiny_qwen2_mixed"])
def test_logits_from_equals_full_forward(request, which):
    """From any hook: the clean continuation, and a replaced activation plus a later edit."""
    lm: LanguageModel = request.getfixturevalue(which)
    toks, other = tokens(batch=3, seed=5), tokens(batch=3, seed=6)
    baseline, blocks = n_hooks(lm), lm.layout.blocks
    clean = lm.logits(toks)
    last_mlp, last_post = (f"blocks.{lm.n_layers - 1}.hook_{k}" for k in ("mlp_out", "resid_post"))
    for name in lm.hook_names():
        torch.testing.assert_close(lm.logits_from(name, lm.activations(toks, name), toks), clean)
        patch = lm.activations(other, name) * 1.5  # another text's activation, scaled: positions matter
        later = {} if name in (last_mlp, last_post) else {last_mlp: lambda x: x * 0.5}
        want = lm.logits(toks, {name: lambda _: patch, **later})
        torch.testing.assert_close(lm.logits_from(name, patch, toks, later), want)
        assert (want - clean).abs().max() > 1e-3, name  # the patch changes the logits
    assert n_hooks(lm) == baseline and lm.layout.blocks is blocks
    assert getattr(lm.layout.blocks_owner, lm.layout.blocks_attr) is blocks


def test_logits_from_edit_at_the_hook_gets_the_given_activation(tiny_llama):
    toks, hook = tokens(seed=7), "blocks.0.hook_resid_post"
    acts = tiny_llama.activations(tokens(seed=8), hook)
    got = tiny_llama.logits_from(hook, acts, toks, {hook: lambda x: x * 2})
    torch.testing.assert_close(got, tiny_llama.logits(toks, {hook: lambda _: acts * 2}))


def test_logits_from_runs_only_the_layers_after_the_hook(tiny_gpt2):
    ran = []
    blocks = tiny_gpt2.layout.blocks
    handles = [b.register_forward_hook(lambda m, a, o, L=L: ran.append(L)) for L, b in enumerate(blocks)]
    toks = tokens()
    try:
        for hook, layers in [("blocks.0.hook_resid_pre", [0, 1]), ("blocks.0.hook_resid_post", [1]),
                             ("blocks.1.hook_resid_pre", [1]), ("blocks.1.hook_resid_post", []),
                             ("blocks.1.hook_mlp_out", [0, 1])]:  # mlp_out: full forward, patched
            acts = tiny_gpt2.activations(toks, hook)
            ran.clear()
            tiny_gpt2.logits_from(hook, acts, toks)
            assert ran == layers, hook
    finally:
        for h in handles:
            h.remove()


def test_logits_from_skips_nothing_when_layers_differ(tiny_qwen2_mixed):
    """Qwen2 picks each layer's mask by loop position, so a forward over a tail of layers is not taken."""
    assert not tiny_qwen2_mixed.layout.skippable


def test_logits_from_bad_input(tiny_gpt2):
    from saelab.errors import ConfigError

    toks, hook = tokens(), "blocks.1.hook_resid_pre"
    acts = tiny_gpt2.activations(toks, hook)
    baseline = n_hooks(tiny_gpt2)
    with pytest.raises(ConfigError, match="blocks.0.hook_resid_post.*comes before"):
        tiny_gpt2.logits_from(hook, acts, toks, {"blocks.0.hook_resid_post": lambda x: x})
    with pytest.raises(ShapeMismatchError, match="blocks.1.hook_resid_pre"):
        tiny_gpt2.logits_from(hook, acts[:, :-1], toks)
    with pytest.raises(HookNameError):
        tiny_gpt2.logits_from("blocks.7.hook_resid_pre", acts, toks)
    with pytest.raises(ShapeMismatchError, match="blocks.1.hook_mlp_out"):  # an edit's wrong output, mid-forward
        tiny_gpt2.logits_from(hook, acts, toks, {"blocks.1.hook_mlp_out": lambda x: x[:, :1]})
    assert n_hooks(tiny_gpt2) == baseline
    assert tiny_gpt2.model.transformer.h is tiny_gpt2.layout.blocks


@pytest.mark.parametrize("hook", ["blocks.9.hook_resid_post", "blocks.9.hook_resid_pre", "blocks.29.hook_resid_post"])
def test_logits_from_on_smollm2(smollm2, data_dir, hook):
    """The real Llama-family model (rotary positions, grouped-query attention), real text."""
    from saelab.data import token_contexts

    toks = token_contexts(str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), smollm2.tokenize, 24, n_contexts=4,
                          bos_token_id=smollm2.bos_token_id)
    clean = smollm2.logits(toks[:3])
    torch.testing.assert_close(smollm2.logits_from(hook, smollm2.activations(toks[:3], hook), toks[:3]), clean)
    patch = smollm2.activations(toks[1:], hook)  # other contexts' activations, BOS kept
    want = smollm2.logits(toks[:3], {hook: lambda _: patch})
    torch.testing.assert_close(smollm2.logits_from(hook, patch, toks[:3]), want)
    assert (want - clean).abs().max() > 1.0


def test_model_name_is_a_local_models_absolute_path_and_any_other_spec_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("folder", "default"):
        (tmp_path / folder).mkdir()
    (tmp_path / "weights.gguf").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert model_name("folder") == str(tmp_path / "folder")
    assert model_name("./weights.gguf") == str(tmp_path / "weights.gguf")
    # A file that is no model, a hub id, and the offline default even beside a folder of its name
    for spec in ("notes.txt", "openai-community/gpt2", "default", "https://example.org/model"):
        assert model_name(spec) == spec


def test_load_model_without_progress_draws_no_bar_and_leaves_the_setting(tiny_dir, library_bars_on, capfd):
    """load_model(progress=False) in Python, as --no-progress on the command line: no "Loading weights" bar of
    transformers; the bars come back afterwards for a caller who did not hide them, and the hub's stay hidden
    for one who hid them."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as hf_logging

    load_model(str(tiny_dir), progress=False)
    assert "Loading weights" not in capfd.readouterr().err
    load_model(str(tiny_dir))
    assert "Loading weights" in capfd.readouterr().err
    disable_progress_bars()  # the hub's alone
    load_model(str(tiny_dir), progress=False)
    assert are_progress_bars_disabled() and hf_logging.is_progress_bar_enabled()


def test_same_model_tells_one_model_by_any_of_its_names(tiny_dir, tmp_path, monkeypatch):
    """The offline default is the model of its hub id, a folder the one its paths lead to (relative, through a
    link); another hub id, another folder or an empty name is another model. Compute-equivalent matches its
    family members so, and the note on a --model other than the SAE's."""
    from saelab.models import DEFAULT_MODEL_HUB_ID, same_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-link").symlink_to(tiny_dir)
    for a, b in (("default", DEFAULT_MODEL_HUB_ID), ("gpt2", "gpt2"), (str(tiny_dir), os.path.relpath(tiny_dir)),
                 (str(tiny_dir), "tiny-link")):
        assert same_model(a, b) and same_model(b, a), (a, b)
    for a, b in (("default", "gpt2"), ("gpt2", "openai-community/gpt2"), (str(tiny_dir), str(tiny_dir.parent)),
                 ("", ""), ("gpt2", "")):
        assert not same_model(a, b) and not same_model(b, a), (a, b)


def test_same_model_takes_the_offline_default_as_the_gguf_file_it_loads(tmp_path, monkeypatch):
    """'default' is the .gguf file it loads, by any path to it, and so is the hub id it stands for: a run trained
    on 'default' read with --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf was noted as read from another model. A
    folder named 'default' here is not the offline default; another .gguf file is another model."""
    from saelab.models import DEFAULT_MODEL_HUB_ID, same_model

    gguf = default_gguf_path()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smol.gguf").symlink_to(gguf)
    (tmp_path / "default").mkdir()
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    for spec in (str(gguf), os.path.relpath(gguf), "smol.gguf"):
        for named in ("default", DEFAULT_MODEL_HUB_ID):
            assert same_model(named, spec) and same_model(spec, named), (named, spec)
    for a, b in (("default", str(tmp_path / "default")), ("default", "other.gguf"), (str(gguf), "other.gguf")):
        assert not same_model(a, b) and not same_model(b, a), (a, b)


def test_a_model_is_fingerprinted_by_the_weights_files_its_load_reads(tiny_dir, tmp_path):
    """model_fingerprint: a model folder's weights file, the offline default's .gguf file, nothing for a hub id;
    the tokenizer and config beside the weights are not part of it (saving the same weights again keeps it)."""
    from saelab.models import default_gguf_path, model_fingerprint
    from saelab.utils.file_digests import file_sha256

    model = tmp_path / "tiny"
    shutil.copytree(tiny_dir, model)
    weights = model / "model.safetensors"
    assert model_fingerprint(str(model)) == {"bytes": weights.stat().st_size, "sha256": file_sha256(weights)}
    (model / "config.json").write_text((model / "config.json").read_text().replace("}", ', "note": 1}', 1))
    assert model_fingerprint(str(model))["sha256"] == file_sha256(weights)
    assert model_fingerprint("default")["bytes"] == default_gguf_path().stat().st_size
    assert model_fingerprint("gpt2") is None and model_fingerprint(str(tmp_path / "missing")) is None
