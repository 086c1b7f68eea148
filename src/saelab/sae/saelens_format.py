"""Read and write SAE folders in the layout SAELens uses.

A folder holds ``cfg.json``, ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
``b_enc [d_sae]``, ``b_dec [d_in]``) and optionally ``sparsity.safetensors`` (``sparsity`` = log10 feature
density). ``cfg.json`` follows SAELens >= 6: flat SAE fields (``architecture="topk"``, ``k``, ``d_in``, ``d_sae``,
``normalize_activations``, ...) plus a ``metadata`` block (``model_name``, ``hook_name``, ``context_size``, ...).
We add our full :class:`SAEConfig` under a ``saelab`` key, which SAELens ignores.

Reading also accepts folders SAELens wrote itself (no ``saelab`` key), including the pre-6.0 layout
(``hook_point``, ``activation_fn_str="topk"`` with ``activation_fn_kwargs.k``). ``architecture="standard"``
(a ReLU SAE, pre-6.0: ``activation_fn_str="relu"``) is read and written as a :class:`ReLUSAE`. SAELens options our
:class:`TopKSAE` lacks but that are exact reparametrizations (``apply_b_dec_to_input=False``,
``rescale_acts_by_decoder_norm=True``) are folded into the weights so outputs match SAELens.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from saelab.errors import CheckpointError
from saelab.sae.config import WEIGHTS_FILENAME
from saelab.sae.relu import SAELENS_ARCHITECTURE, ReLUSAE
from saelab.sae.topk import SAEConfig, TopKSAE
from saelab.utils.atomic import atomic_path
from saelab.utils.tensors import all_finite
from saelab.utils.words import as_json, listed_names

CFG_FILENAME = "cfg.json"
SPARSITY_FILENAME = "sparsity.safetensors"
RESERVED_FILENAMES = (CFG_FILENAME, WEIGHTS_FILENAME, SPARSITY_FILENAME)

# SAELens reads the ``metadata`` block only when metadata.sae_lens_version >= 6.0.0; without it the file is
# treated as the pre-6.0 flat layout and the block is dropped. This names the layout we write, nothing more.
SAELENS_LAYOUT_VERSION = "6.0.0"

_NORM_TO_SAELENS = {"none": "none", "layernorm": "layer_norm"}
# Pre-6.0 SAELens wrote normalize_activations as a bool; True meant "expected_average_only_in".
_SAELENS_IDENTITY_NORMS = (None, False, "none", "expected_average_only_in")
_WEIGHT_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")
# Keys SAELens < 6 kept at the top level; >= 6 keeps them in "metadata".
_PRE6_METADATA_KEYS = ("model_name", "hook_name", "hook_point", "context_size", "prepend_bos", "dataset_path",
                       "seqpos_slice", "hook_head_index", "model_class_name", "model_from_pretrained_kwargs")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- writing -----------------------------------------------------------------------------------------


def saelens_cfg_dict(sae: TopKSAE) -> dict[str, Any]:
    """The ``cfg.json`` contents for ``sae``: SAELens' TopKSAEConfig (or, for a ReLU SAE, StandardSAEConfig)
    fields, metadata, and our config."""
    c = sae.cfg
    relu = isinstance(sae, ReLUSAE)  # SAELens' StandardSAEConfig has neither k nor rescale_acts_by_decoder_norm
    return {
        "architecture": SAELENS_ARCHITECTURE if relu else "topk",
        "d_in": c.d_in,
        "d_sae": c.n_latents,
        **({} if relu else {"k": c.k}),
        "dtype": _dtype_name(sae.W_enc.dtype),
        "device": "cpu",  # the weights are written from the CPU; where it trained is no loader's concern
        "apply_b_dec_to_input": True,  # our encoder always subtracts b_dec (the paper's b_pre)
        "normalize_activations": _NORM_TO_SAELENS[c.input_norm],
        "reshape_activations": "none",
        **({} if relu else {"rescale_acts_by_decoder_norm": False}),
        "metadata": {
            **c.metadata.to_dict(),
            "sae_lens_version": SAELENS_LAYOUT_VERSION,
            "sae_lens_training_version": None,
            "model_class_name": "HookedTransformer",
            # Our activations are the HF modules' outputs, which equal TransformerLens hooks only when
            # TL skips weight processing; SAELens' own trainer records the same kwarg by default.
            "model_from_pretrained_kwargs": {"center_writing_weights": False},
        },
        "saelab": c.to_dict(),
    }


def _extra_file_bytes(name: str, content: Any) -> bytes:
    if not isinstance(name, str) or not name or name != os.path.basename(name) or name.startswith("."):
        raise ValueError(f"extra_files name {name!r} must be a plain file name (no folders, not hidden)")
    if name in RESERVED_FILENAMES:
        raise ValueError(f"extra_files name {name!r} is reserved for the SAE itself")
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        return content.encode("utf-8")
    if isinstance(content, (dict, list)):
        return (json.dumps(content, indent=2) + "\n").encode("utf-8")
    raise TypeError(f"extra_files[{name!r}] must be bytes, str, dict or list, got {type(content).__name__}")


def write_saelens_folder(
    sae: TopKSAE,
    folder: str | os.PathLike,
    *,
    sparsity_log10: torch.Tensor | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write ``sae`` to ``folder``; every file atomic, ``cfg.json`` last (it marks the folder complete)."""
    folder = Path(folder)
    # Everything that can fail on bad input is checked before the folder is touched.
    cfg_text = json.dumps(saelens_cfg_dict(sae), indent=2) + "\n"
    extras = {name: _extra_file_bytes(name, content) for name, content in (extra_files or {}).items()}
    if sparsity_log10 is not None:
        if tuple(sparsity_log10.shape) != (sae.n_latents,):
            raise ValueError(
                f"sparsity_log10 has shape {tuple(sparsity_log10.shape)}, expected ({sae.n_latents},) (one per latent)"
            )
        sparsity = {"sparsity": sparsity_log10.detach().to("cpu", torch.float32).contiguous()}
    tensors = {name: getattr(sae, name).detach().to("cpu").contiguous() for name in _WEIGHT_KEYS}

    # Serialized in memory: a failed write (full disk) then raises OSError, not a serializer error.
    payloads = {WEIGHTS_FILENAME: save_safetensors(tensors)}
    if sparsity_log10 is not None:
        payloads[SPARSITY_FILENAME] = save_safetensors(sparsity)
    payloads.update(extras)

    folder.mkdir(parents=True, exist_ok=True)
    # Every file is first written in full to a temporary beside it, so a failure (a full disk) leaves an
    # existing SAE in the folder untouched. Only then is the old completion marker dropped and the files
    # renamed into place, cfg.json last (the stack renames in reverse), so a reader never pairs an old
    # cfg.json with new weights.
    with contextlib.ExitStack() as stack:
        cfg_tmp = stack.enter_context(atomic_path(folder / CFG_FILENAME))
        for name, data in payloads.items():
            stack.enter_context(atomic_path(folder / name)).write_bytes(data)
        cfg_tmp.write_text(cfg_text, encoding="utf-8")
        (folder / CFG_FILENAME).unlink(missing_ok=True)
        if sparsity_log10 is None:
            (folder / SPARSITY_FILENAME).unlink(missing_ok=True)  # a stale one would describe other weights
    return folder


# ---- reading -----------------------------------------------------------------------------------------


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; expected the {what}") from None
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); expected the {what}") from e


def read_cfg_json(path: Path, what: str = "a SAELens SAE config") -> dict[str, Any]:
    """A JSON object file (``what`` it should hold names it in errors)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; expected {what} (cfg.json is written last, so the folder may be "
                              "incomplete)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); expected {what}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _positive_int(raw: dict[str, Any], key: str, path: Path) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{path}: {as_json(key)} must be a positive integer, got {as_json(value)}")
    return value


def saelens_architecture(raw: dict[str, Any], path: Path) -> str:
    """'topk' or 'standard' (a ReLU SAE) from a SAELens cfg.json; any other architecture is refused."""
    architecture = raw.get("architecture")
    if architecture is None:  # pre-6.0 layout: top-k was an activation function of the standard SAE
        act = raw.get("activation_fn", raw.get("activation_fn_str", "relu"))
        architecture = {"topk": "topk", "relu": SAELENS_ARCHITECTURE}.get(act, act)
    if architecture not in ("topk", SAELENS_ARCHITECTURE):
        raise CheckpointError(
            f"{path}: architecture {as_json(architecture)} is not a top-k SAE or a ReLU SAE; saelab loads SAELens "
            f"architectures \"topk\" and {as_json(SAELENS_ARCHITECTURE)}"
        )
    return architecture


# SAEConfig fields the SAELens metadata block holds: (ours, theirs, JSON type).
_METADATA_FIELDS = (("model_name", "model_name", str), ("hook_name", "hook_name", str),
                    ("dataset", "dataset_path", str), ("context_size", "context_size", int),
                    ("prepend_bos", "prepend_bos", bool))
_KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false"}


def _config_from_saelens(raw: dict[str, Any], path: Path) -> tuple[SAEConfig, bool, bool]:
    """SAEConfig from SAELens fields, plus (apply_b_dec_to_input, rescale_acts_by_decoder_norm)."""
    act_kwargs = raw.get("activation_fn_kwargs") if isinstance(raw.get("activation_fn_kwargs"), dict) else {}
    raw = {**raw}
    if saelens_architecture(raw, path) == SAELENS_ARCHITECTURE:
        raw["k"] = raw.get("d_sae")  # a ReLU SAE keeps every positive latent: k = n (sae/relu.py)
    elif "k" not in raw and "k" in act_kwargs:
        raw["k"] = act_kwargs["k"]
    missing = [key for key in ("d_in", "d_sae", "k") if key not in raw]
    if missing:
        raise CheckpointError(f"{path}: missing required key(s) {', '.join(map(as_json, missing))} for a SAELens SAE")
    d_in, d_sae, k = (_positive_int(raw, key, path) for key in ("d_in", "d_sae", "k"))

    norm = raw.get("normalize_activations", "none")
    extra: dict[str, Any] = {"source": {"format": "saelens", "path": str(path.parent)}}
    if norm == "layer_norm":
        input_norm = "layernorm"
    elif norm in _SAELENS_IDENTITY_NORMS:
        # SAELens' load_from_disk also runs these as the identity (a scale factor is folded in upstream).
        input_norm = "none"
        if norm not in (None, False, "none"):
            extra["saelens_normalize_activations"] = norm
    else:
        raise CheckpointError(
            f"{path}: normalize_activations={as_json(norm)} is not supported (expected \"none\" or \"layer_norm\")"
        )
    if raw.get("reshape_activations", "none") not in ("none", None):
        extra["saelens_reshape_activations"] = raw["reshape_activations"]

    meta = {key: raw[key] for key in _PRE6_METADATA_KEYS if key in raw}
    if isinstance(raw.get("metadata"), dict):
        meta.update(raw["metadata"])
    if "hook_name" not in meta and "hook_point" in meta:
        meta["hook_name"] = meta["hook_point"]
    seqpos = meta.get("seqpos_slice")
    start = seqpos[0] if isinstance(seqpos, (list, tuple)) and seqpos else None
    fields: dict[str, Any] = {
        "d_in": d_in,
        "n_latents": d_sae,
        "k": k,
        "input_norm": input_norm,
        "exclude_first": isinstance(start, int) and start >= 1,
        "extra": extra,
    }
    if meta.get("hook_head_index") is not None:
        raise CheckpointError(f"{path}: metadata.hook_head_index={as_json(meta['hook_head_index'])}: an SAE on one "
                              "attention head's slice of a hook; saelab's SAEs read whole hooks")
    for ours, theirs, kind in _METADATA_FIELDS:
        value = meta.get(theirs)
        if value is None:
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"{path}: metadata.{theirs} must be {_KIND_NAMES[kind]}, got {as_json(value)}")
        fields[ours] = value
    try:
        cfg = SAEConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    apply_b_dec = raw.get("apply_b_dec_to_input", True)
    rescale = raw.get("rescale_acts_by_decoder_norm", False)
    return cfg, bool(apply_b_dec), bool(rescale)


def own_config(value: Any, from_format: SAEConfig, where: str, checked: dict[str, str], remedy: str) -> SAEConfig:
    """saelab's full SAEConfig as recorded beside a foreign format's fields (``value``, read at ``where``),
    each field in ``checked`` (ours -> the foreign field that holds it) equal to the foreign reading
    ``from_format``: a file edited on one side only is refused (``remedy`` says how), not half-read."""
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} must be a JSON object holding an SAEConfig")
    try:
        cfg = SAEConfig.from_dict(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} is not a valid SAEConfig ({e})") from e
    for ours, theirs in checked.items():
        if getattr(cfg, ours) != getattr(from_format, ours):
            raise CheckpointError(f"{where}: {ours}={as_json(getattr(cfg, ours))} disagrees with {theirs} (which "
                                  f"means {as_json(getattr(from_format, ours))}); {remedy}")
    return cfg


def _own_config(raw: dict[str, Any], from_saelens: SAEConfig, path: Path) -> SAEConfig:
    """Our full SAEConfig from the ``saelab`` key, checked against every SAELens field beside it."""
    checked = {"d_in": '"d_in"', "n_latents": '"d_sae"', "k": '"k"', "input_norm": '"normalize_activations"'}
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    checked |= {ours: f'"metadata.{theirs}"' for ours, theirs, _ in _METADATA_FIELDS if meta.get(theirs) is not None}
    if meta.get("seqpos_slice") is not None:
        checked["exclude_first"] = '"metadata.seqpos_slice"'
    return own_config(raw["saelab"], from_saelens, f'{path}: "saelab"', checked,
                      'edit both, or delete the "saelab" key to read the SAELens fields alone')


def _check_weights(state: dict[str, torch.Tensor], cfg: SAEConfig, path: Path) -> None:
    missing = [key for key in _WEIGHT_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{path}: missing tensor(s) {', '.join(missing)}; found {listed_names(sorted(state))}"
        )
    d, n = cfg.d_in, cfg.n_latents
    expected = {"W_enc": (d, n), "W_dec": (n, d), "b_enc": (n,), "b_dec": (d,)}
    for key, shape in expected.items():
        t = state[key]
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(t.shape)} but cfg.json (d_in={d}, d_sae={n}) implies {shape}"
            )
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: {key} has dtype {t.dtype}, expected a floating-point tensor")
    scale = state.get("scaling_factor", state.get("finetuning_scaling_factor"))
    if scale is not None and not torch.all(scale == 1):
        raise CheckpointError(f"{path}: a finetuning scaling factor other than 1 is not supported")


def build_sae(cfg: SAEConfig, weights: dict[str, torch.Tensor], *, device, dtype, path: Path,
              sae_class: type[TopKSAE] = TopKSAE) -> TopKSAE:
    """A ``sae_class`` SAE holding ``weights`` (W_enc, W_dec, b_enc, b_dec), placed on ``device`` in ``dtype``."""
    # Built on CPU and then given the loaded tensors: a meta-device build would skip the random init
    # but costs seconds of one-off torch imports, more than the init itself at SAE sizes.
    sae = sae_class(cfg, dtype=dtype, device="cpu", init=False)
    sae.load_state_dict({k: weights[k].to(dtype) for k in _WEIGHT_KEYS}, assign=True)
    sae = sae.to(device)
    if not all(all_finite(p) for p in sae.parameters()):
        raise CheckpointError(f"{path}: weights contain NaN or inf")
    return sae


def read_saelens_folder(folder: Path, *, device="cpu", dtype: torch.dtype = torch.float32) -> TopKSAE:
    """Load a SAELens-layout folder (ours or SAELens' own) as a TopKSAE, or a ReLUSAE for architecture 'standard'."""
    cfg_path, weights_path = folder / CFG_FILENAME, folder / WEIGHTS_FILENAME
    raw = read_cfg_json(cfg_path)
    if "num_latents" in raw and "d_sae" not in raw:
        raise CheckpointError(f"{cfg_path}: a sparsify config (num_latents) beside SAELens' weights file "
                              f"{WEIGHTS_FILENAME}; expected a SAELens cfg.json (d_in, d_sae, k)")
    cfg, apply_b_dec, rescale = _config_from_saelens(raw, cfg_path)
    sae_class = ReLUSAE if saelens_architecture(raw, cfg_path) == SAELENS_ARCHITECTURE else TopKSAE
    if "saelab" in raw:
        cfg = _own_config(raw, cfg, cfg_path)
    state = read_safetensors(weights_path, f"SAE weights {', '.join(_WEIGHT_KEYS)}")
    _check_weights(state, cfg, weights_path)
    if apply_b_dec and not rescale:  # our own layout: no arithmetic, so round trips are bit-identical
        return build_sae(cfg, state, device=device, dtype=dtype, path=weights_path, sae_class=sae_class)
    # The folds are done in float64 so they add no rounding of their own.
    W_enc, W_dec = state["W_enc"].double(), state["W_dec"].double()
    b_enc, b_dec = state["b_enc"].double(), state["b_dec"].double()
    if not apply_b_dec:
        # SAELens computes x @ W_enc + b_enc; we compute (x - b_dec) @ W_enc + b_enc'. Equal when:
        b_enc = b_enc + b_dec @ W_enc
    if rescale:
        # SAELens scales pre-activations by |W_dec row| and divides them out again before decoding;
        # moving the scale into the weights gives the same TopK choice (or ReLU: a positive scale
        # commutes with it) and the same output.
        norms = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    weights = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    return build_sae(cfg, weights, device=device, dtype=dtype, path=weights_path, sae_class=sae_class)


def read_sparsity(folder: str | os.PathLike) -> torch.Tensor | None:
    """The ``sparsity`` tensor (log10 feature density) of a SAELens folder, or None if it has none."""
    path = Path(folder) / SPARSITY_FILENAME
    if not path.exists():
        return None
    state = read_safetensors(path, "log10 feature density under key 'sparsity'")
    if "sparsity" not in state:
        raise CheckpointError(f"{path}: missing tensor 'sparsity'; found {listed_names(sorted(state))}")
    return state["sparsity"]


__all__ = [
    "CFG_FILENAME",
    "SPARSITY_FILENAME",
    "WEIGHTS_FILENAME",
    "read_saelens_folder",
    "read_sparsity",
    "saelens_cfg_dict",
    "write_saelens_folder",
]
