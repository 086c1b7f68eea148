"""SAE files: SAELens folders (ours and SAELens' own), OpenAI v5 checkpoints, URLs, and hostile input.

Every test writes real files under tmp_path. Foreign formats are built here exactly as their writers lay
them out, and compared against reference forwards written from each project's published math.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from saelab.cli import main
from saelab.errors import CheckpointError, ConfigError, ShapeMismatchError
from saelab.sae import (
    OPENAI_LOCATION_TO_HOOK,
    SAEConfig,
    TopKSAE,
    load_sae,
    openai_hook_name,
    openai_v5_url,
    read_sparsity,
    save_sae,
)

D, N, K = 24, 96, 6


def random_sae(input_norm: str = "none", seed: int = 0, **cfg_kwargs) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(d_in=D, n_latents=N, k=K, input_norm=input_norm, **cfg_kwargs)
    sae = TopKSAE(cfg)
    sae.reset_parameters(generator=g)
    with torch.no_grad():  # non-zero biases so a swapped or dropped bias shows up
        sae.b_enc.copy_(0.1 * torch.randn(N, generator=g))
        sae.b_dec.copy_(torch.randn(D, generator=g))
        sae.W_enc.add_(0.05 * torch.randn(D, N, generator=g))
    return sae


def activations(seed: int = 1, rows: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(rows, D, generator=g) + torch.randn(D, generator=g)


def ln(x: torch.Tensor):
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    return (x - mu) / (std + 1e-5), mu, std


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))


# ---- SAELens round trip -------------------------------------------------------------------------------


def test_save_sae_refuses_a_run_marker_among_extra_files(tmp_path):
    """An extra file named train_config.json made the saved SAE read as a run whose training had not
    finished: open_sae refused it, and inside a sweep eval and report listed it as an unfinished run."""
    with pytest.raises(ConfigError, match=r"^extra_files name 'train_config.json' marks a saelab run folder"):
        save_sae(random_sae("none"), tmp_path / "sae", extra_files={"train_config.json": {"lr": 1e-4}})
    assert not (tmp_path / "sae").exists()


@pytest.mark.parametrize("input_norm", ["none", "layernorm"])
def test_saelens_round_trip_is_exact(tmp_path, input_norm):
    sae = random_sae(input_norm, model_name="gpt2", hook_name="blocks.8.hook_resid_post", dataset="owt",
                     exclude_first=False, extra={"run": "r1", "steps": 3})
    sparsity = torch.log10(torch.rand(N) + 1e-6)
    folder = save_sae(sae, tmp_path / "sae", sparsity_log10=sparsity,
                      extra_files={"training.json": {"lr": 1e-4}, "notes.txt": "hello"})
    loaded = load_sae(folder)
    assert loaded.cfg == sae.cfg
    for name, p in sae.named_parameters():
        assert torch.equal(p, getattr(loaded, name)), name
    x = activations()
    assert torch.equal(loaded(x), sae(x))
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(read_sparsity(folder), sparsity)
    assert torch.equal(load_file(str(folder / "sparsity.safetensors"))["sparsity"], sparsity)
    assert json.loads((folder / "training.json").read_text()) == {"lr": 1e-4}
    assert (folder / "notes.txt").read_text() == "hello"
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_cfg_json_follows_saelens_topk_schema(tmp_path):
    sae = random_sae("layernorm", model_name="gpt2", hook_name="blocks.8.hook_resid_post", context_size=64,
                     prepend_bos=True, exclude_first=True, dataset="Skylion007/openwebtext")
    folder = save_sae(sae, tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    # Fields of SAELens' TopKSAEConfig (sae_lens/saes/topk_sae.py and SAEConfig in saes/sae.py).
    assert cfg["architecture"] == "topk"
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (D, N, K)
    assert cfg["dtype"] == "float32" and cfg["device"] == "cpu"
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "layer_norm"
    assert cfg["reshape_activations"] == "none"
    assert cfg["rescale_acts_by_decoder_norm"] is False
    meta = cfg["metadata"]
    assert meta["model_name"] == "gpt2"
    assert meta["hook_name"] == "blocks.8.hook_resid_post"
    assert meta["context_size"] == 64 and meta["prepend_bos"] is True
    assert meta["dataset_path"] == "Skylion007/openwebtext"
    assert meta["seqpos_slice"] == [1, None]  # exclude_first, in SAELens' terms
    assert meta["hook_head_index"] is None
    # SAELens reads the metadata block only from files marked as its >= 6.0 layout.
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6
    assert cfg["saelab"] == sae.cfg.to_dict()
    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (D, N), "W_dec": (N, D), "b_enc": (N,), "b_dec": (D,)}
    assert not (folder / "sparsity.safetensors").exists()


def test_resave_replaces_stale_files_and_loads_other_dtype(tmp_path):
    folder = save_sae(random_sae(seed=0), tmp_path / "sae", sparsity_log10=torch.zeros(N))
    second = random_sae(seed=5)
    save_sae(second, folder)  # no sparsity this time: the old one would describe other weights
    assert read_sparsity(folder) is None
    loaded = load_sae(folder, dtype=torch.float64)
    assert loaded.W_enc.dtype == torch.float64
    assert torch.equal(loaded.W_dec, second.W_dec.double())


def test_folder_without_cfg_json_is_incomplete(tmp_path):
    folder = save_sae(random_sae(), tmp_path / "sae")
    (folder / "cfg.json").unlink()  # what a reader sees while a save is still writing weights
    with pytest.raises(CheckpointError, match="cfg.json"):
        load_sae(folder)


def test_bad_extra_file_name_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        save_sae(random_sae(), tmp_path / "sae", extra_files={"../escape.txt": "x"})
    with pytest.raises(ValueError, match="reserved"):
        save_sae(random_sae(), tmp_path / "sae", extra_files={"cfg.json": "x"})
    assert not (tmp_path / "sae").exists()


# ---- folders written by SAELens -----------------------------------------------------------------------


def saelens_reference(x, w, k, norm, apply_b_dec, rescale):
    """SAELens TopKSAE.forward (saes/topk_sae.py with SAE.process_sae_in and the layer_norm hooks)."""
    if norm == "layer_norm":
        x, mu, std = ln(x)
    sae_in = x - w["b_dec"] * apply_b_dec
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    norms = w["W_dec"].norm(dim=-1)
    if rescale:
        pre = pre * norms
    acts = topk_relu(pre, k)
    if rescale:
        acts = acts / norms
    out = acts @ w["W_dec"] + w["b_dec"]
    return out * std + mu if norm == "layer_norm" else out


def write_saelens_v6_folder(folder: Path, w, *, norm="none", apply_b_dec=True, rescale=False, arch="topk"):
    """A folder as SAELens >= 6 SAE.save_model writes it (json.dump of TopKSAEConfig.to_dict())."""
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in w.items()}, str(folder / "sae_weights.safetensors"))
    cfg = {
        "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec, "normalize_activations": norm, "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.5.1", "sae_lens_training_version": "6.5.1",
            "dataset_path": "NeelNanda/c4-10k", "hook_name": "blocks.3.hook_resid_post",
            "model_name": "tiny-stories-1M", "model_class_name": "HookedTransformer", "hook_head_index": None,
            "context_size": 128, "seqpos_slice": [None],
            "model_from_pretrained_kwargs": {"center_writing_weights": False},
            "prepend_bos": True, "exclude_special_tokens": False, "sequence_separator_token": "bos",
            "disable_concat_sequences": False,
        },
        "k": K, "rescale_acts_by_decoder_norm": rescale, "architecture": arch,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def saelens_weights(seed=2, unit_decoder=True):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(N, D, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) if unit_decoder else W_dec * (0.5 + torch.rand(N, 1, generator=g))
    return {"W_enc": W_dec.T + 0.05 * torch.randn(D, N, generator=g), "W_dec": W_dec,
            "b_enc": 0.1 * torch.randn(N, generator=g), "b_dec": torch.randn(D, generator=g)}


@pytest.mark.parametrize(
    "norm,apply_b_dec,rescale",
    [("none", True, False), ("layer_norm", True, False), ("none", False, False), ("layer_norm", False, True),
     ("expected_average_only_in", True, True)],
)
def test_folder_written_by_saelens_matches_its_forward(tmp_path, norm, apply_b_dec, rescale):
    w = saelens_weights(unit_decoder=not rescale)
    folder = write_saelens_v6_folder(tmp_path / "sl", w, norm=norm, apply_b_dec=apply_b_dec, rescale=rescale)
    sae = load_sae(folder)
    assert (sae.cfg.d_in, sae.cfg.n_latents, sae.cfg.k) == (D, N, K)
    assert sae.cfg.input_norm == ("layernorm" if norm == "layer_norm" else "none")
    assert sae.cfg.hook_name == "blocks.3.hook_resid_post" and sae.cfg.model_name == "tiny-stories-1M"
    assert sae.cfg.context_size == 128 and sae.cfg.dataset == "NeelNanda/c4-10k"
    assert sae.cfg.exclude_first is False  # seqpos_slice [None] keeps position 0
    x = activations()
    # Folding SAELens options into the weights is exact math: check it in float64.
    w64 = {key: t.double() for key, t in w.items()}
    expected = saelens_reference(x.double(), w64, K, norm, apply_b_dec, rescale)
    torch.testing.assert_close(load_sae(folder, dtype=torch.float64)(x.double()), expected, atol=1e-9, rtol=1e-9)
    # In float32 both sides round; outputs reach a few hundred here, so the tolerance scales with them.
    scale = expected.abs().max().item()
    torch.testing.assert_close(sae(x).double(), expected, atol=1e-6 * scale, rtol=1e-5)
    if apply_b_dec and not rescale:  # nothing to fold: weights are taken verbatim
        assert torch.equal(sae.W_enc, w["W_enc"]) and torch.equal(sae.b_dec, w["b_dec"])


def test_pre_6_saelens_folder(tmp_path):
    """SAELens < 6 kept metadata at the top level and expressed top-k as an activation function."""
    w = saelens_weights()
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in w.items()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "d_in": D, "d_sae": N, "dtype": "torch.float32", "device": "cpu", "model_name": "gpt2-small",
        "hook_point": "blocks.6.hook_resid_pre", "hook_point_layer": 6, "context_size": 128,
        "dataset_path": "Skylion007/openwebtext", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": True, "normalize_activations": False, "sae_lens_training_version": "3.13.0",
    }))
    sae = load_sae(folder)
    assert sae.cfg.k == K and sae.cfg.hook_name == "blocks.6.hook_resid_pre" and sae.cfg.input_norm == "none"
    x = activations()
    torch.testing.assert_close(sae(x), saelens_reference(x, w, K, "none", True, False))


@pytest.mark.parametrize("arch", ["jumprelu", "gated"])  # "standard" loads as a ReLUSAE (test_relu_sae.py)
def test_non_topk_architecture_is_refused(tmp_path, arch):
    folder = write_saelens_v6_folder(tmp_path / "sl", saelens_weights(), arch=arch)
    with pytest.raises(CheckpointError, match=f'architecture "{arch}" is not a top-k SAE'):
        load_sae(folder)


@pytest.mark.parametrize("field,value,shown", [
    ("architecture", "\u009b2J\u009b31mjumprelu", '"\\u009b2J\\u009b31mjumprelu"'),  # C1 CSI: clear, red
    ("architecture", "jump\u007frelu", '"jump\\u007frelu"'),  # DEL
    ("normalize_activations", "\u001b[2J\u0085", '"\\u001b[2J\\u0085"'),  # ESC, C1 NEL
])
def test_control_characters_of_a_cfg_json_value_are_shown_escaped(tmp_path, capfdbinary, field, value, shown):
    """A refusal shows a downloaded cfg.json's value as the file writes it, control characters as JSON's escapes:
    JSON's own dump left DEL and C1 characters raw, and an 8-bit CSI cleared and recoloured the terminal."""
    folder = write_saelens_v6_folder(tmp_path / "sl", saelens_weights())
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg[field] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    capfdbinary.readouterr()
    assert main(["export", str(folder), str(tmp_path / "out"), "--format", "saelens"]) == 2
    err = capfdbinary.readouterr().err
    assert not any(0x7F <= b <= 0x9F or b == 0x1B for b in err), err
    assert f"{field}={shown}" in err.decode() or f"{field} {shown}" in err.decode(), err


def test_missing_cfg_keys_are_named(tmp_path):
    folder = write_saelens_v6_folder(tmp_path / "sl", saelens_weights())
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["k"], cfg["d_sae"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match='"d_sae", "k"') as err:
        load_sae(folder)
    assert "cfg.json" in str(err.value)


def test_weight_shape_disagreeing_with_cfg(tmp_path):
    w = saelens_weights()
    w["W_enc"] = torch.randn(D + 1, N)
    folder = write_saelens_v6_folder(tmp_path / "sl", w)
    with pytest.raises(CheckpointError, match=r"W_enc has shape \(25, 96\).*d_in=24, d_sae=96.*\(24, 96\)"):
        load_sae(folder)


def test_missing_weight_tensor_is_named(tmp_path):
    w = saelens_weights()
    del w["b_enc"]
    with pytest.raises(CheckpointError, match="missing tensor.*b_enc"):
        load_sae(write_saelens_v6_folder(tmp_path / "sl", w))
    # a file of more tensors than the listing shows says how many it leaves out, not reading as all it holds
    w |= {f"extra_{i}": torch.zeros(1) for i in range(8)}
    with pytest.raises(CheckpointError, match=r"missing tensor.*b_enc; found \[.*\] and 3 more$"):
        load_sae(write_saelens_v6_folder(tmp_path / "more", w))


@pytest.mark.parametrize("edit,message,read", [
    ({"k": K + 1}, '"saelab": k=6 disagrees with "k" \\(which means 7\\)', ("k", K + 1)),
    # An edit of the SAELens metadata alone is refused, not silently overruled by the 'saelab' key.
    # Values as the JSON file writes them ("x", true), not as Python's repr ('x', True).
    ({"metadata": {"hook_name": "blocks.1.hook_resid_post"}}, '"saelab": hook_name="blocks.0.hook_resid_post" '
     'disagrees with "metadata.hook_name".*delete the "saelab" key', ("hook_name", "blocks.1.hook_resid_post")),
    ({"metadata": {"prepend_bos": False}}, 'prepend_bos=true disagrees with "metadata.prepend_bos" \\(which means '
     'false\\)', ("prepend_bos", False)),
    ({"metadata": {"seqpos_slice": [0, None]}}, 'exclude_first=true disagrees with "metadata.seqpos_slice"',
     ("exclude_first", False)),
    # Wrong types are named, not read as the default.
    ({"metadata": {"prepend_bos": "false"}}, 'metadata.prepend_bos must be true or false, got "false"', None),
    ({"metadata": {"context_size": "128"}}, 'metadata.context_size must be an integer, got "128"', None),
    ({"metadata": {"hook_head_index": 3}}, "metadata.hook_head_index=3: an SAE on one attention head's slice", None),
])
def test_saelab_key_disagreeing_with_saelens_fields(tmp_path, edit, message, read):
    sae = random_sae(hook_name="blocks.0.hook_resid_post")
    folder = save_sae(sae, tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in edit.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        load_sae(folder)
    del cfg["saelab"]  # without saelab's own record the SAELens fields are read, and checked
    (folder / "cfg.json").write_text(json.dumps(cfg))
    if read is None:
        with pytest.raises(CheckpointError, match=message.split(",")[0]):
            load_sae(folder)
    else:
        assert getattr(load_sae(folder).cfg, read[0]) == read[1]


def test_cfg_json_not_json(tmp_path):
    folder = save_sae(random_sae(), tmp_path / "sae")
    text = (folder / "cfg.json").read_text()
    (folder / "cfg.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="cfg.json: not valid JSON"):
        load_sae(folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_safetensors(tmp_path, damage):
    folder = save_sae(random_sae(), tmp_path / "sae")
    path = folder / "sae_weights.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    with pytest.raises(CheckpointError, match="sae_weights.safetensors: not a readable safetensors file"):
        load_sae(folder)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_sae(tmp_path / "nowhere")


def test_non_finite_weights_are_refused(tmp_path):
    w = saelens_weights()
    w["W_dec"][3, 4] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_sae(write_saelens_v6_folder(tmp_path / "sl", w))


# ---- OpenAI v5 checkpoints ----------------------------------------------------------------------------


def openai_state_dict(seed=3, k=K, activation="TopK", postact="ReLU"):
    """Keys, shapes and extras exactly as OpenAI's Autoencoder.state_dict() (sparse_autoencoder/model.py)."""
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(D, N, generator=g)
    dec = dec / dec.norm(dim=0, keepdim=True)
    return {
        "pre_bias": 0.1 * torch.randn(D, generator=g),
        "latent_bias": 0.1 * torch.randn(N, generator=g),
        "stats_last_nonzero": torch.randint(0, 1000, (N,), generator=g, dtype=torch.long),
        "latents_activation_frequency": torch.rand(N, generator=g),
        "latents_mean_square": torch.rand(N, generator=g),
        "encoder.weight": dec.T.contiguous() + 0.05 * torch.randn(N, D, generator=g),
        "decoder.weight": dec,
        "activation": activation,
        "activation_state_dict": {"k": k, "postact_fn": postact},
    }


def openai_reference(sd, x):
    """OpenAI Autoencoder forward for a TopK checkpoint: LN, encode, TopK then ReLU, decode, undo LN."""
    xn, mu, std = ln(x)
    pre = F.linear(xn - sd["pre_bias"], sd["encoder.weight"], sd["latent_bias"])
    latents = topk_relu(pre, sd["activation_state_dict"]["k"])
    recons = F.linear(latents, sd["decoder.weight"]) + sd["pre_bias"]
    return recons * std + mu, latents


def test_openai_v5_checkpoint_matches_reference(tmp_path):
    sd = openai_state_dict()
    path = tmp_path / "resid_post_attn_v5_32k" / "autoencoders" / "3.pt"
    path.parent.mkdir(parents=True)
    torch.save(sd, path)
    sae = load_sae(path)
    assert (sae.cfg.d_in, sae.cfg.n_latents, sae.cfg.k, sae.cfg.input_norm) == (D, N, K, "layernorm")
    assert sae.cfg.hook_name == "blocks.3.hook_resid_mid"  # resid_post_attn, from the release path
    assert sae.cfg.model_name == "gpt2" and sae.cfg.context_size == 64
    assert torch.equal(sae.W_enc, sd["encoder.weight"].T) and torch.equal(sae.W_dec, sd["decoder.weight"].T)
    assert torch.equal(sae.b_dec, sd["pre_bias"]) and torch.equal(sae.b_enc, sd["latent_bias"])
    x = activations()
    recons, latents = openai_reference(sd, x)
    torch.testing.assert_close(sae(x), recons, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.encode(x), latents, atol=1e-5, rtol=1e-5)
    # A saved copy in SAELens layout reproduces it exactly, including the layer norm.
    again = load_sae(save_sae(sae, tmp_path / "converted"))
    assert torch.equal(again(x), sae(x))
    assert json.loads((tmp_path / "converted" / "cfg.json").read_text())["normalize_activations"] == "layer_norm"


@pytest.mark.parametrize(
    "change,message",
    [({"activation": "ReLU"}, "activation 'ReLU' is not supported"),
     ({"postact": "Identity"}, "postact_fn 'Identity' is not supported"),
     ({"k": N + 1}, "k=97 must be an integer in 1..96")],
)
def test_openai_unsupported_variants(tmp_path, change, message):
    sd = openai_state_dict(**change)
    torch.save(sd, tmp_path / "ae.pt")
    with pytest.raises(CheckpointError, match=message):
        load_sae(tmp_path / "ae.pt")


def test_foreign_checkpoints_are_refused(tmp_path):
    gpt2_like = {"transformer.wte.weight": torch.randn(50, D),
                 "transformer.h.0.attn.c_attn.weight": torch.randn(D, 3 * D),
                 "transformer.ln_f.weight": torch.ones(D)}
    torch.save(gpt2_like, tmp_path / "gpt2.pt")
    with pytest.raises(CheckpointError, match="not an OpenAI sparse_autoencoder checkpoint: missing encoder.weight"):
        load_sae(tmp_path / "gpt2.pt")
    torch.save({"weight": torch.randn(3, 3)}, tmp_path / "random.pt")
    with pytest.raises(CheckpointError, match="random.pt: not an OpenAI"):
        load_sae(tmp_path / "random.pt")
    torch.save(torch.randn(4), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        load_sae(tmp_path / "tensor.pt")
    sd = openai_state_dict()
    sd["decoder.weight"] = sd["decoder.weight"].T.contiguous()  # [n, d] instead of [d, n]
    torch.save(sd, tmp_path / "transposed.pt")
    with pytest.raises(CheckpointError, match=r"'decoder.weight' has shape \(96, 24\), expected \(24, 96\)"):
        load_sae(tmp_path / "transposed.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes.txt: not a torch checkpoint \(neither a zip archive nor a pickle\)"):
        load_sae(tmp_path / "notes.txt")


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    sd = openai_state_dict()
    sd["activation_state_dict"] = _Payload(marker)
    torch.save(sd, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt") as err:
        load_sae(tmp_path / "evil.pt")
    assert not marker.exists()
    # The reason is torch's, its advice to retry unsafely is not passed on.
    assert "GLOBAL 'posix.system'" in str(err.value) or "GLOBAL 'os.system'" in str(err.value)
    assert "False" not in str(err.value) and "trusted source" not in str(err.value)
    # The payload is live: an unrestricted load would have run it.
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_truncated_pt(tmp_path):
    torch.save(openai_state_dict(), tmp_path / "ae.pt")
    data = (tmp_path / "ae.pt").read_bytes()
    (tmp_path / "ae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ae.pt: could not be read"):
        load_sae(tmp_path / "ae.pt")


# ---- URLs ---------------------------------------------------------------------------------------------


def test_openai_urls_and_hooks():
    assert openai_v5_url(8) == (
        "https://openaipublic.blob.core.windows.net/sparse-autoencoder/gpt2-small/"
        "resid_post_mlp_v5_32k/autoencoders/8.pt")
    assert openai_v5_url(0, "resid_delta_attn", "128k").endswith("/resid_delta_attn_v5_128k/autoencoders/0.pt")
    assert OPENAI_LOCATION_TO_HOOK == {"resid_post_mlp": "hook_resid_post", "resid_post_attn": "hook_resid_mid",
                                       "resid_delta_attn": "hook_attn_out", "resid_delta_mlp": "hook_mlp_out"}
    assert openai_hook_name(5, "resid_delta_mlp") == "blocks.5.hook_mlp_out"
    for bad in ({"layer": 12}, {"layer": 1, "location": "mlp_post_act"}, {"layer": 1, "size": "64k"}):
        with pytest.raises(ValueError):
            openai_v5_url(**bad)


# ---- an API shaped like SAELens' and TransformerLens' ----------------------------------------------------


@pytest.mark.parametrize("input_norm", ["none", "layernorm"])
def test_encode_decode_on_raw_activations_match_a_dense_reference(input_norm):
    """encode / decode take raw activations for any input norm; checked against SAELens' math written densely."""
    sae = random_sae(input_norm).double()
    x = activations().double()
    w = {name: p.detach() for name, p in sae.named_parameters()}
    norm = "layer_norm" if input_norm == "layernorm" else "none"
    expected = saelens_reference(x, w, K, norm, True, False)
    x_in, mu, std = ln(x) if input_norm == "layernorm" else (x, None, None)
    expected_z = topk_relu((x_in - w["b_dec"]) @ w["W_enc"] + w["b_enc"], K)
    z = sae.encode(x)
    torch.testing.assert_close(z, expected_z, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(sae.decode(z), expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(sae.decode(z), sae(x), atol=1e-10, rtol=1e-10)
    vals, idx, _ = sae.encode_sparse(x)
    torch.testing.assert_close(torch.zeros_like(z).scatter(-1, idx, vals), expected_z, atol=1e-12, rtol=1e-12)
    # Gradients of the dense decode (latents and decoder weights) equal those of the plain formula.
    z1 = z.detach().clone().requires_grad_(True)
    z2 = z.detach().clone().requires_grad_(True)
    W_dec = w["W_dec"].clone().requires_grad_(True)
    sae.zero_grad()
    sae.decode(z1).square().sum().backward()
    out2 = z2 @ W_dec + w["b_dec"]
    (out2 * std + mu if std is not None else out2).square().sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(sae.W_dec.grad, W_dec.grad, atol=1e-9, rtol=1e-9)


def test_layernorm_decode_needs_the_input_statistics():
    sae = random_sae("layernorm")
    x = activations()
    z = sae.encode(x)
    with pytest.raises(ShapeMismatchError, match="leading shape"):
        sae.decode(z[:5])  # statistics kept by encode are for 64 rows
    other = activations(seed=9)[:5]
    torch.testing.assert_close(sae.decode(sae.encode(other)), sae(other), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(z, norm=sae.normalize_input(x)[1]), sae(x), atol=1e-5, rtol=1e-5)
    fresh = random_sae("layernorm")
    with pytest.raises(ConfigError, match="call encode"):
        fresh.decode(z)
    with pytest.raises(ShapeMismatchError, match="d_sae=96"):
        sae.decode(z[:, :10])


def test_saelens_names_for_config_fields():
    sae = random_sae(model_name="gpt2", hook_name="blocks.8.hook_resid_post", context_size=64,
                     dataset="Skylion007/openwebtext", exclude_first=True)
    assert sae.cfg.d_sae == N == sae.d_sae
    meta = sae.cfg.metadata
    assert (meta.model_name, meta.hook_name, meta.context_size, meta.prepend_bos) == (
        "gpt2", "blocks.8.hook_resid_post", 64, True)
    assert meta.dataset_path == "Skylion007/openwebtext" and meta.seqpos_slice == (1, None)
    with pytest.raises(AttributeError):
        meta.hook_name = "x"  # a view: change the SAEConfig instead
    assert "d_sae" not in sae.cfg.to_dict() and "metadata" not in sae.cfg.to_dict()


def test_to_tokens_prepends_bos_like_transformer_lens(tiny_gpt2):
    tokens = tiny_gpt2.to_tokens("Hello world")
    # GPT-2's BPE: "Hello" = 15496, " world" = 995; BOS is <|endoftext|> = 50256.
    assert tokens.dtype == torch.long and tokens.tolist() == [[50256, 15496, 995]]
    assert tiny_gpt2.to_tokens("Hello world", prepend_bos=False).tolist() == [[15496, 995]]
    batch = tiny_gpt2.to_tokens(["Hello world", "Hello"])
    assert batch.tolist() == [[50256, 15496, 995], [50256, 15496, 50256]]  # right-padded with EOS
    with pytest.raises(ConfigError, match="str or a non-empty list"):
        tiny_gpt2.to_tokens([])


# ---- the Hugging Face hub, offline ---------------------------------------------------------------------


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_cache(cache_dir: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A huggingface_hub cache as a download of ``repo_id`` at COMMIT leaves it: refs/main, blobs named by
    their hash (sha256 for LFS files, git's sha1 otherwise), snapshot entries as relative symlinks."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        lfs = name.endswith((".safetensors", ".pt"))
        blob = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        (repo / "blobs" / blob).write_bytes(data)
        link = repo / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    return repo


def folder_files(folder: Path, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{p.name}": p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_load_from_the_hub_offline(tmp_path, monkeypatch):
    sae = random_sae("layernorm", hook_name="blocks.8.hook_resid_post", model_name="gpt2")
    files = folder_files(save_sae(sae, tmp_path / "src"), "blocks.8.hook_resid_post")
    files.update(folder_files(save_sae(random_sae(seed=4), tmp_path / "other"), "blocks.9.hook_resid_post"))
    torch.save(openai_state_dict(), tmp_path / "3.pt")
    files["v5/3.pt"] = (tmp_path / "3.pt").read_bytes()
    cache = tmp_path / "hub"
    hub_cache(cache, "someone/gpt2-saes", files)
    kw = {"cache_dir": cache, "local_files_only": True}
    x = activations()
    loaded = load_sae("hf://someone/gpt2-saes/blocks.8.hook_resid_post", **kw)
    assert loaded.cfg == sae.cfg and torch.equal(loaded(x), sae(x))
    again = TopKSAE.from_pretrained("someone/gpt2-saes", "blocks.8.hook_resid_post", **kw)
    assert torch.equal(again.W_enc, sae.W_enc)
    assert load_sae(f"hf://someone/gpt2-saes@{COMMIT}/v5/3.pt", **kw).cfg.k == K
    # huggingface_hub's own offline switch (HF_HUB_OFFLINE=1 is read at import, hence the patch).
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert torch.equal(load_sae("hf://someone/gpt2-saes/blocks.9.hook_resid_post", cache_dir=cache).b_dec,
                       random_sae(seed=4).b_dec)
    with pytest.raises(CheckpointError, match=r"has no 'blocks.10.hook_resid_post' \(found \[.blocks.8"):
        load_sae("hf://someone/gpt2-saes/blocks.10.hook_resid_post", **kw)
    crowded = {f"layer{i:02d}/cfg.json": b"{}" for i in range(10)}  # more than the line lists: how many are left out
    hub_cache(cache, "someone/crowded", crowded)
    with pytest.raises(CheckpointError, match=re.escape(f"has no 'x' (found {[f'layer{i:02d}' for i in range(8)]} "
                                                        "and 2 more)")):
        load_sae("hf://someone/crowded/x", **kw)
    with pytest.raises(CheckpointError, match="hf://nobody/nothing/x: could not be read from the local Hugging Face "
                       "cache \\(the hub cannot be reached: offline mode is on"):
        load_sae("hf://nobody/nothing/x", **kw)
    with pytest.raises(CheckpointError, match="expected hf://owner/repo"):
        load_sae("hf://just-a-name")
    with pytest.raises(CheckpointError, match="not a hub repository id"):
        load_sae("hf://bad owner/repo/x")


@pytest.mark.parametrize("field,value", [("hook_name", ["blocks.3"]), ("context_size", True), ("prepend_bos", "yes"),
                                         ("extra", []), ("model_name", None)])
def test_config_values_of_the_wrong_type_are_refused_on_load(tmp_path, field, value):
    folder = save_sae(random_sae(), tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["saelab"][field] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f'cfg.json: "saelab" is not a valid SAEConfig.*SAEConfig.{field} must be'):
        load_sae(folder)
