"""sparsify (eai-sparsify 1.3.3) folders, both ways.

``tests/fixtures/sparsify-1.3.3`` was written by the real sparsify 1.3.3 (``tests/fixtures/sparsify_peer.py
write``): three hookpoint folders, the trainer's ``config.json``, and sparsify's own outputs on seeded
inputs. Where a Python with sparsify installed is available (``$SAELAB_SPARSIFY_PYTHON``, default
``/work/peer-venv/bin/python``) the tests also run sparsify live: a fresh folder it writes, and a folder
saelab writes read back by ``SparseCoder.load_many``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.errors import CheckpointError, ConfigError
from saelab.sae import (
    SAEConfig,
    TopKSAE,
    hook_to_hookpoint,
    hookpoint_to_hook,
    load_sae,
    load_sparsify,
    save_sae,
    save_sparsify,
)

FIXTURE = Path(__file__).parent / "fixtures" / "sparsify-1.3.3"
PEER_SCRIPT = Path(__file__).parent / "fixtures" / "sparsify_peer.py"
HOOKS = {"layers.0.self_attn": "blocks.0.hook_attn_out", "layers.1": "blocks.1.hook_resid_post",
         "layers.1.mlp": "blocks.1.hook_mlp_out"}


def peer_python() -> str | None:
    python = os.environ.get("SAELAB_SPARSIFY_PYTHON", "/work/peer-venv/bin/python")
    if not Path(python).is_file():
        return None
    probe = subprocess.run([python, "-c", "import importlib.metadata as m; assert m.version('eai-sparsify') == '1.3.3'"],
                           capture_output=True, timeout=60)
    return python if probe.returncode == 0 else None


def check_against_sparsify_outputs(saes: dict[str, TopKSAE], reference: dict[str, torch.Tensor]) -> None:
    """saelab's forward on sparsify's inputs equals sparsify's own outputs (dense latents and reconstruction)."""
    for hookpoint, hook in HOOKS.items():
        sae, x = saes[hook], reference[f"{hookpoint}.x"]
        assert x.shape[0] > 4
        z_theirs = torch.zeros(x.shape[0], sae.n_latents).scatter(
            -1, reference[f"{hookpoint}.top_indices"].long(), reference[f"{hookpoint}.top_acts"])
        torch.testing.assert_close(sae.encode(x), z_theirs, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(sae(x), reference[f"{hookpoint}.sae_out"], atol=1e-5, rtol=1e-5)
        # Rows 0-3 have fewer than k positive pre-activations: sparsify fills with zeros (ReLU before TopK),
        # saelab keeps the k largest and zeroes the negative ones (TopK before ReLU); values still agree.
        assert (reference[f"{hookpoint}.top_acts"][:4] == 0).any()


def test_folder_written_by_sparsify_loads_and_matches_its_outputs():
    saes = load_sparsify(FIXTURE)
    assert list(saes) == ["blocks.0.hook_attn_out", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"]
    for hookpoint, hook in HOOKS.items():
        cfg = saes[hook].cfg
        assert (cfg.d_in, cfg.n_latents, cfg.k, cfg.input_norm, cfg.hook_name) == (16, 64, 4, "none", hook)
        # Provenance from the trainer's config.json.
        assert (cfg.model_name, cfg.context_size) == ("HuggingFaceTB/SmolLM2-135M", 256)
        assert cfg.dataset == "EleutherAI/SmolLM2-135M-10B" and cfg.extra["sparsify_hookpoint"] == hookpoint
        assert cfg.exclude_first is False and cfg.prepend_bos is False
    check_against_sparsify_outputs(saes, load_file(str(FIXTURE / "reference.safetensors")))
    # One hookpoint through the general loader, by folder or by its cfg.json.
    one = load_sae(FIXTURE / "layers.1.mlp" / "cfg.json")
    assert one.cfg.hook_name == "blocks.1.hook_mlp_out" and torch.equal(one.W_dec, saes["blocks.1.hook_mlp_out"].W_dec)


def test_trainer_folder_given_to_load_sae_names_its_hookpoints():
    with pytest.raises(CheckpointError, match=r"3 hookpoints \(layers.0.self_attn, layers.1, layers.1.mlp\).*"
                                              r"load_sparsify") as err:
        load_sae(FIXTURE)
    assert str(FIXTURE / "layers.0.self_attn") in str(err.value)


def test_writing_reproduces_sparsify_files_byte_for_byte(tmp_path):
    saes = load_sparsify(FIXTURE)
    out = save_sparsify(saes, tmp_path / "run")
    for hookpoint in HOOKS:
        for name in ("cfg.json", "sae.safetensors"):
            assert (out / hookpoint / name).read_bytes() == (FIXTURE / hookpoint / name).read_bytes(), (hookpoint, name)
    run = json.loads((out / "config.json").read_text())
    assert run["hookpoints"] == list(HOOKS) and run["model"] == "HuggingFaceTB/SmolLM2-135M" and run["ctx_len"] == 256
    again = load_sparsify(out)
    for hook, sae in saes.items():
        for name, p in sae.named_parameters():
            assert torch.equal(p, getattr(again[hook], name)), (hook, name)
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


def trained_like_sae(seed: int = 0, **cfg) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=16, n_latents=48, k=5, **cfg))
    sae.reset_parameters(generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(48, generator=g))
        sae.b_dec.copy_(torch.randn(16, generator=g))
        sae.W_enc.add_(0.1 * torch.randn(16, 48, generator=g))
    return sae


def test_saelab_sae_round_trips_through_the_sparsify_layout(tmp_path):
    sae = trained_like_sae(model_name="gpt2", hook_name="blocks.3.hook_mlp_out")
    folder = save_sae(sae, tmp_path / "h.3.mlp", format="sparsify")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae.safetensors", "saelab.json"]
    cfg = json.loads((folder / "cfg.json").read_text())
    # sparsify's SparseCoderConfig fields in its order, then d_in (as save_to_disk writes them).
    assert list(cfg) == list(json.loads((FIXTURE / "layers.1" / "cfg.json").read_text()))
    assert (cfg["num_latents"], cfg["k"], cfg["d_in"], cfg["activation"], cfg["expansion_factor"]) == (48, 5, 16, "topk", 3)
    assert cfg["normalize_decoder"] is True
    weights = load_file(str(folder / "sae.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "encoder.weight": (48, 16), "encoder.bias": (48,), "W_dec": (48, 16), "b_dec": (16,)}
    loaded = load_sae(folder)
    assert loaded.cfg.hook_name == "blocks.3.hook_mlp_out"  # from the folder name h.3.mlp (GPT-2)
    for name, p in sae.named_parameters():
        assert torch.equal(p, getattr(loaded, name)), name
    x = 3 * torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(x), sae(x))


def test_saelab_settings_survive_the_sparsify_layout(tmp_path):
    """BOS, position 0, context, model and where the model came from have no sparsify field: saelab.json
    beside sparsify's files keeps them, so an exported SAE evaluates like the original; without it the
    folder reads with sparsify's own conventions."""
    sae = trained_like_sae(model_name="HuggingFaceTB/SmolLM2-135M-Instruct", hook_name="blocks.1.hook_resid_post",
                           context_size=32, prepend_bos=True, exclude_first=True, dataset="wiki",
                           extra={"model_source": {"spec": "default"}})
    single = save_sae(sae, tmp_path / "one", format="sparsify")
    trainer = save_sparsify({sae.cfg.hook_name: sae}, tmp_path / "run")
    for loaded in (load_sae(single), load_sparsify(trainer)["blocks.1.hook_resid_post"]):
        assert {**loaded.cfg.to_dict(), "extra": None} == {**sae.cfg.to_dict(), "extra": None}
        assert loaded.cfg.extra["model_source"] == {"spec": "default"}
        assert loaded.cfg.extra["source"]["format"] == "sparsify"
    (single / "saelab.json").unlink()
    bare = load_sae(single).cfg
    assert (bare.prepend_bos, bare.exclude_first, bare.hook_name, bare.model_name) == (False, False, "", "")
    # A saelab.json that no longer describes sparsify's files (retrained over by sparsify) is refused.
    stale = json.loads((trainer / "layers.1" / "saelab.json").read_text())
    (trainer / "layers.1" / "saelab.json").write_text(json.dumps({**stale, "k": 4}))
    with pytest.raises(CheckpointError, match='saelab.json: k=4 disagrees with cfg.json\'s "k".*delete saelab.json'):
        load_sparsify(trainer)
    (trainer / "layers.1" / "saelab.json").write_text(json.dumps({**stale, "hook_name": "blocks.0.hook_mlp_out"}))
    with pytest.raises(CheckpointError, match='hook_name="blocks.0.hook_mlp_out" is not the tensor the folder name'):
        load_sparsify(trainer)
    # The writer names blocks.L.hook_resid_pre by the module whose output it is (layer L-1); an SAE that
    # records no hook takes the folder's.
    pre = trained_like_sae(model_name="gpt2", hook_name="blocks.3.hook_resid_pre")
    assert load_sparsify(save_sparsify({pre.cfg.hook_name: pre}, tmp_path / "pre")).keys() == {"blocks.3.hook_resid_pre"}
    assert load_sae(tmp_path / "pre" / "h.2").cfg.hook_name == "blocks.3.hook_resid_pre"
    no_hook = save_sae(trained_like_sae(), tmp_path / "x" / "layers.9", format="sparsify")
    assert load_sae(no_hook).cfg.hook_name == "blocks.9.hook_resid_post"


def test_saving_over_the_other_layout_leaves_one_sae(tmp_path):
    """Both layouts share cfg.json: saving one over the other removes the other's files, so the folder
    loads as the SAE just written; a file in the folder's place is refused."""
    first, second = trained_like_sae(seed=0), trained_like_sae(seed=1)
    folder = save_sae(first, tmp_path / "sae", format="sparsify")
    save_sae(second, folder, sparsity_log10=torch.zeros(48))
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    assert torch.equal(load_sae(folder).W_dec, second.W_dec)
    save_sae(first, folder, format="sparsify")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae.safetensors", "saelab.json"]
    assert torch.equal(load_sae(folder).W_dec, first.W_dec)
    (tmp_path / "file").write_text("x")
    for save in (lambda: save_sae(first, tmp_path / "file"), lambda: save_sparsify(first, tmp_path / "file")):
        with pytest.raises(ConfigError, match="file: exists and is not a folder"):
            save()
    assert (tmp_path / "file").read_text() == "x"


def test_one_layout_s_config_beside_the_other_s_weights_is_named(tmp_path):
    sae = trained_like_sae()
    saelens, sparsify = save_sae(sae, tmp_path / "a"), save_sae(sae, tmp_path / "b", format="sparsify")
    (saelens / "sae_weights.safetensors").rename(saelens / "sae.safetensors")
    with pytest.raises(CheckpointError, match="a SAELens config \\(d_sae\\) beside sparsify's weights file"):
        load_sae(saelens)
    (sparsify / "sae.safetensors").rename(sparsify / "sae_weights.safetensors")
    with pytest.raises(CheckpointError, match="a sparsify config \\(num_latents\\) beside SAELens' weights file"):
        load_sae(sparsify)
    (sparsify / "cfg.json").unlink()
    (sparsify / "sae_weights.safetensors").rename(sparsify / "sae.safetensors")
    with pytest.raises(CheckpointError, match="cfg.json: missing; expected a sparsify SAE config beside sae.safetensors"):
        load_sae(sparsify)


def test_hookpoints_map_to_hook_names_both_ways():
    expected = {
        "gpt2": {"h.9": "blocks.9.hook_resid_post", "h.9.mlp": "blocks.9.hook_mlp_out", "h.9.attn": "blocks.9.hook_attn_out"},
        "llama": {"layers.9": "blocks.9.hook_resid_post", "layers.9.mlp": "blocks.9.hook_mlp_out",
                  "layers.9.self_attn": "blocks.9.hook_attn_out"},
        "gpt_neox": {"layers.2": "blocks.2.hook_resid_post", "layers.2.mlp": "blocks.2.hook_mlp_out",
                     "layers.2.attention": "blocks.2.hook_attn_out"},
    }
    for family, table in expected.items():
        for hookpoint, hook in table.items():
            assert hookpoint_to_hook(hookpoint) == hook
            assert hook_to_hookpoint(hook, family) == hookpoint
    assert hook_to_hookpoint("blocks.4.hook_resid_pre", "llama") == "layers.3"  # the same tensor
    for unmapped in ("embed_tokens", "layers.9.mlp.act_fn", "h.9.self_attn", "layers.9.attn"):
        assert hookpoint_to_hook(unmapped) is None
    for hook in ("blocks.0.hook_resid_pre", "blocks.3.hook_resid_mid", "blocks.x.hook_mlp_out"):
        with pytest.raises(ConfigError, match="not the output of a module"):
            hook_to_hookpoint(hook, "llama")


def tiny_models(gpt2_tokenizer):
    """Randomly initialised 2-layer models of the three families saelab hooks, with a real tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    from saelab.models import LanguageModel

    torch.manual_seed(0)
    vocab = len(gpt2_tokenizer)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
             "vocab_size": vocab}
    return {
        "gpt2": LanguageModel(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab)),
                              gpt2_tokenizer, "tiny-gpt2"),
        "llama": LanguageModel(LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, **small)), gpt2_tokenizer, "tiny-llama"),
        "gpt_neox": LanguageModel(GPTNeoXForCausalLM(GPTNeoXConfig(**small)), gpt2_tokenizer, "tiny-neox"),
    }


def test_hookpoint_module_outputs_are_the_hooked_activations(gpt2_tokenizer):
    """What sparsify records at a hookpoint (the module's output under base_model) is what saelab's hook
    of the mapped name returns, in a real forward of each family."""
    for family, lm in tiny_models(gpt2_tokenizer).items():
        tokens = lm.to_tokens(["The cat sat on the mat.", "A dog barked twice"])
        hooks = [f"blocks.{layer}.hook_{kind}" for layer in range(2) for kind in ("resid_post", "mlp_out", "attn_out")]
        seen, handles = {}, []
        for hook in hooks:
            hookpoint = hook_to_hookpoint(hook, family)
            assert hookpoint_to_hook(hookpoint) == hook
            module = lm.model.base_model.get_submodule(hookpoint)
            handles.append(module.register_forward_hook(
                lambda m, i, o, hook=hook: seen.setdefault(hook, o[0] if isinstance(o, tuple) else o)))
        try:
            _, cache = lm.run_with_cache(tokens, hooks)
        finally:
            for handle in handles:
                handle.remove()
        for hook in hooks:
            assert torch.equal(seen[hook], cache[hook]), (family, hook)


@pytest.mark.parametrize("change,message", [
    # values as the JSON file writes them ("groupmax", true), not as Python's repr ('groupmax', True)
    ({"activation": "groupmax"}, 'cfg.json has activation "groupmax"; saelab reads top-k SAEs \\(sparsify activation '
     '"topk"\\)'),
    # control characters (C1, DEL) as JSON escapes them, not raw to the terminal
    ({"activation": "group\u009bmax\u007f"}, r'cfg.json has activation "group\\u009bmax\\u007f"; saelab reads'),
    ({"transcode": True}, "transcode=true: a transcoder"),
    ({"skip_connection": True}, "skip_connection=true"),
    ({"k": 65}, "k=65 exceeds the number of latents 64"),
    ({"d_in": "16"}, '"d_in" must be an integer >= 1, got "16"'),
    ({"multi_topk": "yes"}, '"multi_topk" must be true or false, got "yes"'),
    ({"multi_topk": None}, '"multi_topk" must be true or false, got null'),
    ({"expansion_factor": 0}, '"expansion_factor" must be an integer >= 1'),
    ({"num_latents": 32}, r"encoder.weight has shape \(64, 16\) but cfg.json \(d_in=16, 32 latents\)"),
])
def test_unsupported_or_inconsistent_sparsify_folders(tmp_path, change, message):
    folder = shutil.copytree(FIXTURE / "layers.1", tmp_path / "layers.1")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=message) as err:
        load_sae(folder)
    assert "layers.1" in str(err.value)


def test_missing_decoder_and_skip_weights_are_named(tmp_path):
    folder = shutil.copytree(FIXTURE / "layers.1", tmp_path / "layers.1")
    weights = load_file(str(folder / "sae.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "W_dec"}, str(folder / "sae.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) W_dec \(saved without a decoder\)"):
        load_sae(folder)
    save_file({**weights, "W_skip": torch.zeros(16, 16)}, str(folder / "sae.safetensors"))
    with pytest.raises(CheckpointError, match="W_skip"):
        load_sae(folder)


def test_what_sparsify_cannot_hold_is_refused_before_writing(tmp_path):
    with pytest.raises(ConfigError, match="input_norm='layernorm'"):
        save_sae(trained_like_sae(input_norm="layernorm"), tmp_path / "ln", format="sparsify")
    with pytest.raises(ConfigError, match="sparsity_log10 and extra_files need format='saelens'"):
        save_sae(trained_like_sae(), tmp_path / "x", format="sparsify", extra_files={"a.txt": "a"})
    with pytest.raises(ConfigError, match="format must be one of"):
        save_sae(trained_like_sae(), tmp_path / "x", format="dictionary_learning")
    with pytest.raises(ConfigError, match="cannot tell the layer layout of model 'my-model'"):
        save_sparsify({"blocks.1.hook_resid_post": trained_like_sae(model_name="my-model")}, tmp_path / "run")
    with pytest.raises(ConfigError, match="two SAEs map to sparsify hookpoint 'layers.1'"):
        save_sparsify({"blocks.1.hook_resid_post": trained_like_sae(), "blocks.2.hook_resid_pre": trained_like_sae()},
                      tmp_path / "run", family="llama")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # two imports of sparsify and its dependencies: about a minute on 2 cores
def test_live_sparsify_both_ways(tmp_path):
    """sparsify writes a fresh folder that saelab reads; saelab writes a folder that sparsify's load_many reads.
    Both sides' forwards agree."""
    ours = {hook: trained_like_sae(seed=i, model_name="default") for i, hook in enumerate(HOOKS.values())}
    save_sparsify(ours, tmp_path / "ours")
    subprocess.run([python_or_skip(), str(PEER_SCRIPT), "both", str(tmp_path / "theirs"), str(tmp_path / "ours"),
                    str(tmp_path / "out.safetensors")], check=True, capture_output=True, timeout=600)
    check_against_sparsify_outputs(load_sparsify(tmp_path / "theirs"),
                                   load_file(str(tmp_path / "theirs" / "reference.safetensors")))
    theirs = load_file(str(tmp_path / "out.safetensors"))
    for hookpoint, hook in HOOKS.items():
        x, sae = theirs[f"{hookpoint}.x"], ours[hook]
        torch.testing.assert_close(sae(x), theirs[f"{hookpoint}.sae_out"], atol=1e-5, rtol=1e-5)
        z = torch.zeros(x.shape[0], sae.n_latents).scatter(-1, theirs[f"{hookpoint}.top_indices"].long(),
                                                            theirs[f"{hookpoint}.top_acts"])
        torch.testing.assert_close(sae.encode(x), z, atol=1e-6, rtol=1e-5)


def python_or_skip() -> str:
    python = peer_python()
    if python is None:
        pytest.skip("no Python with eai-sparsify 1.3.3 (set $SAELAB_SPARSIFY_PYTHON)")
    return python
