"""Read OpenAI's released GPT-2 small top-k SAEs (``sparse_autoencoder``, v5_32k / v5_128k).

A checkpoint is ``torch.save(Autoencoder.state_dict())``: ``encoder.weight [n, d]``, ``decoder.weight [d, n]``,
``pre_bias [d]``, ``latent_bias [n]``, buffers ``stats_last_nonzero``, ``latents_activation_frequency``,
``latents_mean_square`` (all ``[n]``), plus ``activation`` (the class name, ``"TopK"``) and
``activation_state_dict`` (``{"k": int, "postact_fn": "ReLU"}``).

Their ``Autoencoder.from_state_dict`` turns input normalization on exactly when the activation is ``"TopK"``:
``LN(x)`` = ``(x - mean) / (std_unbiased + 1e-5)`` before encoding, ``x_hat * std + mean`` after decoding.
That is :class:`TopKSAE` with ``input_norm="layernorm"``. Between the two:
``z = postact(TopK(encoder(x - pre_bias) + latent_bias))``, ``x_hat = decoder(z) + pre_bias``.

Checkpoints are untrusted: they are read with ``torch.load(weights_only=True)``, which refuses to run code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from saelab.errors import CheckpointError, NotThatKindOfFileError
from saelab.sae.saelens_format import build_sae
from saelab.sae.topk import SAEConfig, TopKSAE
from saelab.utils.torch_files import (SNIFF_BYTES, key_names, load_plain_tensors, may_be_torch_file,
                                     refused_by_weights_only, safetensors_header_end, shown_loaded, torch_load_reason)
from saelab.utils.words import listed_names

OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/sparse-autoencoder/gpt2-small"
OPENAI_LOCATION_TO_HOOK = {
    "resid_post_mlp": "hook_resid_post",
    "resid_post_attn": "hook_resid_mid",
    "resid_delta_attn": "hook_attn_out",
    "resid_delta_mlp": "hook_mlp_out",
}
OPENAI_V5_SIZES = {"32k": 2**15, "128k": 2**17}
GPT2_SMALL_LAYERS = 12
_REQUIRED_KEYS = ("encoder.weight", "decoder.weight", "pre_bias", "latent_bias")
# Matches the tail of the release URL, and of its mirror in our download cache.
_RELEASE_PATH = re.compile(
    r"(?P<location>" + "|".join(OPENAI_LOCATION_TO_HOOK) + r")_v5_(?P<size>32k|128k)/autoencoders/(?P<layer>\d+)\.pt$"
)


def openai_v5_url(layer: int, location: str = "resid_post_mlp", size: str = "32k") -> str:
    """URL of OpenAI's v5 GPT-2 small SAE for ``layer`` (0-11), ``location`` and ``size`` ('32k' or '128k')."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < GPT2_SMALL_LAYERS:
        raise ValueError(f"layer must be an integer in 0..{GPT2_SMALL_LAYERS - 1} (GPT-2 small), got {layer!r}")
    if location not in OPENAI_LOCATION_TO_HOOK:
        raise ValueError(f"location must be one of {sorted(OPENAI_LOCATION_TO_HOOK)}, got {location!r}")
    if size not in OPENAI_V5_SIZES:
        raise ValueError(f"size must be one of {sorted(OPENAI_V5_SIZES)}, got {size!r}")
    return f"{OPENAI_BASE_URL}/{location}_v5_{size}/autoencoders/{layer}.pt"


def openai_hook_name(layer: int, location: str) -> str:
    """TransformerLens hook an OpenAI SAE location reads, e.g. (8, 'resid_post_mlp') -> 'blocks.8.hook_resid_post'."""
    if location not in OPENAI_LOCATION_TO_HOOK:
        raise ValueError(f"location must be one of {sorted(OPENAI_LOCATION_TO_HOOK)}, got {location!r}")
    return f"blocks.{layer}.{OPENAI_LOCATION_TO_HOOK[location]}"


def _provenance(path: Path, url: str | None) -> dict[str, Any]:
    """Layer and location from the release path (URL or cached copy), when it has that shape."""
    found = _RELEASE_PATH.search(url or path.as_posix())
    extra: dict[str, Any] = {"source": {"format": "openai_v5", "path": str(path), **({"url": url} if url else {})}}
    if not found:
        return {"extra": extra}
    layer, location = int(found["layer"]), found["location"]
    extra.update(openai_location=location, openai_layer=layer, openai_size=found["size"])
    return {"hook_name": openai_hook_name(layer, location), "extra": extra}


OPENAI_CHECKPOINT = "an OpenAI sparse_autoencoder .pt checkpoint"


def load_untrusted_checkpoint(path: Path, what: str = OPENAI_CHECKPOINT, not_torch: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)``; any failure is a CheckpointError naming ``path`` and ``what`` was
    expected; ``not_torch``, if given, what a file that is no torch checkpoint at all was expected to be."""
    try:
        with open(path, "rb") as f:
            head, size = f.read(SNIFF_BYTES), os.fstat(f.fileno()).st_size
        header_end = safetensors_header_end(head)
        if header_end is not None:
            cut = f" cut short ({size:,} bytes, its header alone {header_end:,})" if header_end > size else ""
            raise NotThatKindOfFileError(f"{path}: a safetensors file{cut}, not a torch checkpoint; expected "
                                         f"{not_torch or what}")
        # torch saves a zip, or a pickle before 1.6; an empty file, or one cut within the zip's signature, is left
        # to torch.load, whose reason names it
        if head and not may_be_torch_file(head[:4]):
            raise NotThatKindOfFileError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle); "
                                         f"expected {not_torch or what}")
        return load_plain_tensors(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; expected {what}") from None
    except CheckpointError:
        raise
    except Exception as e:  # truncated zip, corrupt pickle, or a pickle that references code (refused)
        how_read = " (read with weights_only=True: pickles that reference code are refused, never run)"
        raise CheckpointError(f"{path}: could not be read as a plain tensor checkpoint ({torch_load_reason(e, path)}); "
                              f"expected {what}{how_read if refused_by_weights_only(e, path) else ''}") from e


def read_openai_v5_state(path: Path, not_torch: str | None = None) -> Mapping[str, Any]:
    """The state dict of an OpenAI v5 ``.pt`` file, checked to be a mapping with the model's tensors;
    ``not_torch``: as in load_untrusted_checkpoint."""
    state = load_untrusted_checkpoint(path, not_torch=not_torch)
    if not isinstance(state, Mapping):
        raise NotThatKindOfFileError(
            f"{path}: holds a {type(state).__name__}, expected an OpenAI sparse_autoencoder state dict"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in state]
    if missing:
        raise NotThatKindOfFileError(
            f"{path}: not an OpenAI sparse_autoencoder checkpoint: missing {', '.join(missing)} (found "
            f"{listed_names(key_names(state, len(state)), 6)})"
        )
    return state


def _tensor(state: Mapping[str, Any], key: str, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    t = state[key]
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise CheckpointError(f"{path}: {key!r} must be a floating-point tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{path}: {key!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def _top_k(state: Mapping[str, Any], n: int, path: Path) -> int:
    activation = state.get("activation", "ReLU")  # their loader's default when the key is absent
    if activation != "TopK":
        raise CheckpointError(
            f"{path}: activation {shown_loaded(activation)} is not supported; saelab loads OpenAI top-k SAEs "
            "(activation 'TopK')"
        )
    act_state = state.get("activation_state_dict")
    if not isinstance(act_state, Mapping) or "k" not in act_state:
        raise CheckpointError(f"{path}: 'activation_state_dict' with key 'k' is required for a TopK activation")
    k, postact = act_state["k"], act_state.get("postact_fn")
    if isinstance(k, torch.Tensor) and k.numel() == 1 and not k.is_floating_point():  # 1.7 or nan: refused below
        k = int(k.item())
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= n:
        raise CheckpointError(f"{path}: activation_state_dict k={shown_loaded(k)} must be an integer in 1..{n}")
    if postact != "ReLU":
        raise CheckpointError(
            f"{path}: postact_fn {shown_loaded(postact)} is not supported; saelab's TopK applies ReLU to the kept "
            "values"
        )
    return k


def read_openai_v5(path: Path, *, device="cpu", dtype: torch.dtype = torch.float32, url: str | None = None,
                   not_torch: str | None = None) -> TopKSAE:
    """Load an OpenAI v5 ``.pt`` checkpoint as a TopKSAE (``input_norm='layernorm'``); ``not_torch``: as in
    load_untrusted_checkpoint."""
    state = read_openai_v5_state(path, not_torch)
    enc = state["encoder.weight"]
    if not isinstance(enc, torch.Tensor) or enc.ndim != 2:
        raise CheckpointError(f"{path}: 'encoder.weight' must be a 2-D tensor [n_latents, d_model]")
    n, d = enc.shape
    enc = _tensor(state, "encoder.weight", (n, d), path)
    dec = _tensor(state, "decoder.weight", (d, n), path)
    pre_bias = _tensor(state, "pre_bias", (d,), path)
    latent_bias = _tensor(state, "latent_bias", (n,), path)
    k = _top_k(state, n, path)
    cfg = SAEConfig(
        d_in=d,
        n_latents=n,
        k=k,
        input_norm="layernorm",  # their from_state_dict: normalize = (activation == "TopK")
        model_name="gpt2",
        context_size=64,  # the paper's GPT-2 context length
        dataset="Skylion007/openwebtext",  # as SAELens records for its copies of these SAEs
        **_provenance(path, url),
    )
    weights = {"W_enc": enc.T, "W_dec": dec.T, "b_enc": latent_bias, "b_dec": pre_bias}
    return build_sae(cfg, {key: t.contiguous() for key, t in weights.items()}, device=device, dtype=dtype, path=path)


__all__ = [
    "OPENAI_BASE_URL",
    "OPENAI_LOCATION_TO_HOOK",
    "OPENAI_V5_SIZES",
    "openai_hook_name",
    "openai_v5_url",
    "load_untrusted_checkpoint",
    "read_openai_v5",
    "read_openai_v5_state",
]
