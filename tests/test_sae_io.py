"""SAE files: SAELens folders (ours and SAELens' own), OpenAI v5 checkpoints, URLs, and hostile input.

Every test writes real files under tmp_path. Foreign formats are built here exactly as their writers lay
them out, and compared against reference forwards written from each project's published math.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from saelab.errors import CheckpointError
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
from saelab.sae.io import download

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


@pytest.mark.parametrize("input_norm", ["none", "layernorm"])
def test_saelens_round_trip_is_exact(tmp_path, input_norm):
    sae = random_sae(input_norm, model_name="gpt2", hook_name="blocks.8.hook_resid_post", dataset="owt",
                     exclude_first=False, extra={"run": "r1", "steps": 3})
    sparsity = torch.log10(torch.rand(N) + 1e-6)
    folder = save_sae(sae, tmp_path / "sae", sparsity_log10=sparsity,
                      extra_files={"train_config.json": {"lr": 1e-4}, "notes.txt": "hello"})
    loaded = load_sae(folder)
    assert loaded.cfg == sae.cfg
    for name, p in sae.named_parameters():
        assert torch.equal(p, getattr(loaded, name)), name
    x = activations()
    assert torch.equal(loaded(x), sae(x))
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(read_sparsity(folder), sparsity)
    assert torch.equal(load_file(str(folder / "sparsity.safetensors"))["sparsity"], sparsity)
    assert json.loads((folder / "train_config.json").read_text()) == {"lr": 1e-4}
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


@pytest.mark.parametrize("arch", ["jumprelu", "standard", "gated"])
def test_non_topk_architecture_is_refused(tmp_path, arch):
    folder = write_saelens_v6_folder(tmp_path / "sl", saelens_weights(), arch=arch)
    with pytest.raises(CheckpointError, match=f"architecture '{arch}' is not a top-k SAE"):
        load_sae(folder)


def test_missing_cfg_keys_are_named(tmp_path):
    folder = write_saelens_v6_folder(tmp_path / "sl", saelens_weights())
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["k"], cfg["d_sae"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'d_sae', 'k'") as err:
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


def test_saelab_key_disagreeing_with_saelens_fields(tmp_path):
    folder = save_sae(random_sae(), tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["k"] = K + 1
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="saelab.k=6 disagrees"):
        load_sae(folder)


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
    with pytest.raises(CheckpointError, match="notes.txt: could not be read"):
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
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_sae(tmp_path / "evil.pt")
    assert not marker.exists()
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


def test_url_offline_names_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    url = "https://127.0.0.1:9/sparse-autoencoder/gpt2-small/resid_post_mlp_v5_32k/autoencoders/8.pt"
    with pytest.raises(CheckpointError, match="download failed") as err:
        load_sae(url)
    assert url in str(err.value)
    with pytest.raises(CheckpointError, match="127.0.0.1:9"):
        download(url, timeout=2.0)
    assert not list((tmp_path / "cache").rglob("*.pt")), "a failed download left a file in the cache"


def test_url_download_is_cached_and_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    served = tmp_path / "served" / "sparse-autoencoder" / "gpt2-small" / "resid_delta_mlp_v5_32k" / "autoencoders"
    served.mkdir(parents=True)
    sd = openai_state_dict()
    torch.save(sd, served / "7.pt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/{served.relative_to(tmp_path / 'served').as_posix()}/7.pt"
    try:
        sae = load_sae(url)
    finally:
        server.shutdown()
        server.server_close()
    assert sae.cfg.hook_name == "blocks.7.hook_mlp_out"
    assert sae.cfg.extra["source"]["url"] == url
    cached = download(url)  # the server is gone: this must come from the cache
    assert cached.is_relative_to(tmp_path / "cache" / "downloads")
    assert cached.read_bytes() == (served / "7.pt").read_bytes()
    x = activations()
    torch.testing.assert_close(load_sae(url)(x), openai_reference(sd, x)[0], atol=1e-5, rtol=1e-5)


def test_url_must_name_a_pt_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="only OpenAI sparse_autoencoder .pt files"):
        load_sae("https://127.0.0.1:9/some/folder/cfg.json")
    with pytest.raises(CheckpointError, match="not a downloadable checkpoint URL"):
        load_sae("https://127.0.0.1:9/a/../../etc/x.pt")
