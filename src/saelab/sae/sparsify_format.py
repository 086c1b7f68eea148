"""Read and write SAE folders in the layout of EleutherAI's sparsify (``eai-sparsify`` 1.3.3).

One SAE is a folder with ``cfg.json`` (``SparseCoderConfig`` fields plus ``d_in``:
``activation, expansion_factor, normalize_decoder, num_latents, k, multi_topk, skip_connection,
transcode, d_in``) and ``sae.safetensors`` (``encoder.weight [n, d]``, ``encoder.bias [n]``,
``W_dec [n, d]``, ``b_dec [d]``; written by ``safetensors.torch.save_model``, no metadata). saelab
adds ``saelab.json`` (its SAEConfig: model, hook, context, BOS and position-0 settings, which
sparsify's cfg.json has no field for); sparsify ignores it, saelab reads it back checked against
cfg.json.
sparsify's trainer saves one such folder per hookpoint, named by the module path under the model's
``base_model`` (``layers.9``, ``layers.9.mlp``, ``h.9.attn``, ...), beside its ``config.json``
(the run's settings: ``model``, ``dataset``, ``ctx_len``, ``hookpoints``, ...).

The math is saelab's with one difference in order: sparsify computes ``TopK(ReLU(pre))``, saelab
``ReLU(TopK(pre))``. They differ only when fewer than k pre-activations are positive; then both keep
every positive one and fill the rest with zeros, so dense latents and reconstructions are equal and only
the indices reported for the zero-valued slots may differ. sparsify keeps no input normalization, so an
SAE with ``input_norm='layernorm'`` cannot be written in this layout.

Hookpoints map to TransformerLens hook names by what the module outputs (sparsify hooks module
outputs): a decoder layer -> ``blocks.L.hook_resid_post``; its MLP -> ``hook_mlp_out``; its attention
-> ``hook_attn_out``. Module names per family are those ``saelab.models.hooks`` hooks: GPT-2
``h.L`` / ``.attn`` / ``.mlp``; Llama-like ``layers.L`` / ``.self_attn`` / ``.mlp``; GPT-NeoX
``layers.L`` / ``.attention`` / ``.mlp``. ``blocks.L.hook_resid_pre`` (L >= 1) is written as the
output of layer L-1, which is the same tensor. Other hookpoints load with an empty hook name and the
module path kept in ``cfg.extra['sparsify_hookpoint']``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from saelab.errors import CheckpointError, ConfigError
from saelab.sae.config import SPARSIFY_WEIGHTS_FILENAME
from saelab.sae.saelens_format import build_sae, own_config, read_cfg_json, read_safetensors
from saelab.sae.topk import SAEConfig, TopKSAE
from saelab.utils.atomic import atomic_path
from saelab.utils.words import as_json, listed_names, plural

SPARSIFY_CFG_FILENAME = "cfg.json"
SPARSIFY_RUN_CONFIG_FILENAME = "config.json"
"""The trainer's run settings, beside the per-hookpoint folders."""
SAELAB_CFG_FILENAME = "saelab.json"
"""saelab's full SAEConfig beside sparsify's two files (sparsify reads only those): the model, hook,
BOS and position-0 settings a sparsify cfg.json has no field for, so that a round trip evaluates alike."""
SPARSIFY_VERSION = "1.3.3"
"""The sparsify release whose layout this module reads and writes."""

# sparsify's SparseCoderConfig defaults, used for keys an older or hand-made cfg.json leaves out.
_DEFAULTS = {"activation": "topk", "expansion_factor": 32, "num_latents": 0, "k": 32}
# Settings that only steer sparsify's training; read back verbatim so a round trip keeps cfg.json.
_TRAINING_ONLY = ("expansion_factor", "normalize_decoder", "multi_topk")
_WEIGHT_SHAPES = {"encoder.weight": "nd", "encoder.bias": "n", "W_dec": "nd", "b_dec": "d"}

# family -> (layer list, attention module, mlp module), as named under HF's base_model.
FAMILY_MODULES = {
    "gpt2": ("h", "attn", "mlp"),
    "llama": ("layers", "self_attn", "mlp"),
    "gpt_neox": ("layers", "attention", "mlp"),
}
# Model names (lower case) whose family is known without loading them, for writing hookpoint folders.
_FAMILY_HINTS = (("gpt2", "gpt2"), ("gpt-2", "gpt2"), ("pythia", "gpt_neox"), ("neox", "gpt_neox"),
                 ("llama", "llama"), ("smollm", "llama"), ("mistral", "llama"), ("qwen", "llama"),
                 ("gemma", "llama"))
_HOOKPOINT_RE = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(h|layers)\.(\d+)(?:\.([a-z_]+))?$")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_([a-z_]+)$")


# ---- hookpoints <-> hook names -------------------------------------------------------------------------


def hookpoint_to_hook(hookpoint: str) -> str | None:
    """TransformerLens hook name for a sparsify hookpoint (``layers.9.mlp`` -> ``blocks.9.hook_mlp_out``),
    or None for a module saelab has no hook for."""
    match = _HOOKPOINT_RE.match(hookpoint)
    if match is None:
        return None
    layers, layer, sub = match.groups()
    if sub is None:
        return f"blocks.{layer}.hook_resid_post"
    if sub == "mlp":
        return f"blocks.{layer}.hook_mlp_out"
    attention = {mods[1] for mods in FAMILY_MODULES.values() if mods[0] == layers}
    return f"blocks.{layer}.hook_attn_out" if sub in attention else None


def family_of(model_name: str) -> str | None:
    """The layer layout ('gpt2', 'llama', 'gpt_neox') a model name implies, or None if unknown."""
    name = model_name.lower()
    if name == "default":  # saelab's offline default, SmolLM2 (Llama layout)
        return "llama"
    return next((family for hint, family in _FAMILY_HINTS if hint in name), None)


def hook_to_hookpoint(hook_name: str, family: str) -> str:
    """sparsify hookpoint (module path) whose output is ``hook_name`` in a model of ``family``."""
    if family not in FAMILY_MODULES:
        raise ConfigError(f"family must be one of {sorted(FAMILY_MODULES)}, got {family!r}")
    layers, attn, mlp = FAMILY_MODULES[family]
    match = _HOOK_RE.match(hook_name)
    kind = match.group(2) if match else None
    layer = int(match.group(1)) if match else -1
    if kind == "resid_post":
        return f"{layers}.{layer}"
    if kind == "resid_pre" and layer >= 1:
        return f"{layers}.{layer - 1}"  # the same tensor as the previous layer's output
    if kind in ("mlp_out", "attn_out"):
        return f"{layers}.{layer}.{mlp if kind == 'mlp_out' else attn}"
    raise ConfigError(
        f"hook {hook_name!r} is not the output of a module, so sparsify cannot name it; expected "
        "blocks.L.hook_resid_post, hook_mlp_out, hook_attn_out, or hook_resid_pre with L >= 1"
    )


# ---- reading -------------------------------------------------------------------------------------------


def is_sparsify_folder(folder: Path) -> bool:
    """Whether ``folder`` holds one sparsify SAE (its weights file has sparsify's name)."""
    return (folder / SPARSIFY_WEIGHTS_FILENAME).is_file()


def sparsify_hookpoint_folders(folder: Path) -> list[Path]:
    """The per-hookpoint SAE folders of a sparsify trainer's save folder, in natural order."""
    found = [p for p in folder.iterdir() if p.is_dir() and is_sparsify_folder(p)]
    return sorted(found, key=lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)])


def _int_field(raw: dict[str, Any], key: str, path: Path, minimum: int) -> int:
    value = raw.get(key, _DEFAULTS.get(key))
    if value is None:
        raise CheckpointError(f"{path}: missing required key {as_json(key)} (sparsify writes it beside its config)")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointError(f"{path}: {as_json(key)} must be an integer >= {minimum}, got {as_json(value)}")
    return value


def _sparsify_shape(raw: dict[str, Any], path: Path) -> tuple[int, int, int]:
    """(d_in, n_latents, k) from a sparsify cfg.json, refusing what saelab's TopKSAE cannot hold."""
    activation = raw.get("activation", _DEFAULTS["activation"])
    if activation != "topk":
        raise CheckpointError(f"{path}: cfg.json has activation {as_json(activation)}; saelab reads top-k SAEs "
                              '(sparsify activation "topk")')
    if raw.get("transcode", False) is not False:
        raise CheckpointError(f"{path}: cfg.json has transcode={as_json(raw['transcode'])}: a transcoder predicts a "
                              "module's output from its input; saelab reads autoencoders (transcode false)")
    if raw.get("skip_connection", False) is not False:
        raise CheckpointError(f"{path}: cfg.json has skip_connection={as_json(raw['skip_connection'])} (a W_skip "
                              "matrix); saelab's TopKSAE has no skip connection")
    for key in ("normalize_decoder", "multi_topk"):
        if not isinstance(raw.get(key, False), bool):
            raise CheckpointError(f"{path}: {as_json(key)} must be true or false, got {as_json(raw[key])}")
    d_in = _int_field(raw, "d_in", path, 1)
    num_latents = _int_field(raw, "num_latents", path, 0)
    n = num_latents or d_in * _int_field(raw, "expansion_factor", path, 1)
    _int_field(raw, "expansion_factor", path, 1)  # kept for writing back, so it must be valid too
    k = _int_field(raw, "k", path, 1)
    if k > n:
        raise CheckpointError(f"{path}: k={k} exceeds the number of latents {n}")
    return d_in, n, k


def _checked_weights(state: dict[str, torch.Tensor], d: int, n: int, path: Path) -> dict[str, torch.Tensor]:
    missing = [key for key in _WEIGHT_SHAPES if key not in state]
    if missing:
        hint = " (saved without a decoder)" if missing == ["W_dec"] else ""
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing)}{hint}; found {listed_names(sorted(state))}")
    if "W_skip" in state:
        raise CheckpointError(f"{path}: holds W_skip (a skip connection); saelab's TopKSAE has none")
    sizes = {"n": n, "d": d}
    for key, dims in _WEIGHT_SHAPES.items():
        t, shape = state[key], tuple(sizes[c] for c in dims)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)} but cfg.json (d_in={d}, "
                                  f"{n} {plural(n, 'latent')}) implies {shape}")
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: {key} has dtype {t.dtype}, expected a floating-point tensor")
    return state


def _run_provenance(folder: Path) -> dict[str, Any]:
    """Model, dataset and context length from the trainer's config.json beside the SAE folder, if any."""
    path = folder.parent / SPARSIFY_RUN_CONFIG_FILENAME
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}  # optional: a missing or unreadable run config only costs provenance
    if not isinstance(run, dict):
        return {}
    fields: dict[str, Any] = {}
    for ours, theirs, kind in (("model_name", "model", str), ("dataset", "dataset", str),
                               ("context_size", "ctx_len", int)):
        value = run.get(theirs)
        if isinstance(value, kind) and not isinstance(value, bool) and (kind is str or value > 0):
            fields[ours] = value
    return fields


def read_sparsify_folder(folder: Path, *, device="cpu", dtype: torch.dtype = torch.float32) -> TopKSAE:
    """Load one sparsify SAE folder (``cfg.json`` + ``sae.safetensors``) as a TopKSAE."""
    cfg_path, weights_path = folder / SPARSIFY_CFG_FILENAME, folder / SPARSIFY_WEIGHTS_FILENAME
    raw = read_cfg_json(cfg_path, f"a sparsify SAE config beside {SPARSIFY_WEIGHTS_FILENAME}")
    if "d_sae" in raw and "num_latents" not in raw:
        raise CheckpointError(f"{cfg_path}: a SAELens config (d_sae) beside sparsify's weights file "
                              f"{SPARSIFY_WEIGHTS_FILENAME}; expected sparsify's cfg.json (num_latents, k, d_in)")
    d, n, k = _sparsify_shape(raw, cfg_path)
    state = _checked_weights(read_safetensors(weights_path, "sparsify SAE weights"), d, n, weights_path)
    hook_name = hookpoint_to_hook(folder.name)
    # Training-only settings are kept so that writing the SAE again reproduces its cfg.json.
    kept = {key: raw[key] for key in _TRAINING_ONLY if key in raw}
    extra: dict[str, Any] = {"source": {"format": "sparsify", "path": str(folder)}, "sparsify_hookpoint": folder.name,
                             "sparsify_cfg": kept}
    # sparsify packs documents joined by EOS, adds no BOS per context, and trains on every position.
    cfg = SAEConfig(d_in=d, n_latents=n, k=k, hook_name=hook_name or "", prepend_bos=False, exclude_first=False,
                    extra=extra, **_run_provenance(folder))
    if (folder / SAELAB_CFG_FILENAME).exists():  # written by saelab: its own settings, checked against cfg.json
        cfg = _own_config_beside(folder / SAELAB_CFG_FILENAME, cfg, hook_name is not None)
    # encoder.weight [n, d] transposed is W_enc [d, n] in the latent-major storage TopKSAE uses itself.
    weights = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"],
               "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    return build_sae(cfg, weights, device=device, dtype=dtype, path=weights_path)


def _own_config_beside(path: Path, from_sparsify: SAEConfig, hook_from_folder: bool) -> SAEConfig:
    """The SAEConfig saelab wrote beside a sparsify SAE, with this read's source and sparsify settings."""
    checked = {"d_in": 'cfg.json\'s "d_in"', "n_latents": 'cfg.json\'s "num_latents"', "k": 'cfg.json\'s "k"',
               "input_norm": "the sparsify format (no input normalization)"}
    remedy = f"delete {path.name} to read the sparsify files alone"
    own = own_config(read_cfg_json(path, "saelab's SAE config"), from_sparsify, str(path), checked, remedy)
    hook = own.hook_name or from_sparsify.hook_name
    if hook_from_folder and _as_module_output(hook) != from_sparsify.hook_name:
        raise CheckpointError(f"{path}: hook_name={as_json(own.hook_name)} is not the tensor the folder name "
                              f"(sparsify's hookpoint) names, {as_json(from_sparsify.hook_name)}; {remedy}")
    return dataclasses.replace(own, hook_name=hook, extra={**own.extra, **from_sparsify.extra})


def _as_module_output(hook_name: str) -> str:
    """The hook name as a module's output: blocks.L.hook_resid_pre (L >= 1) is blocks.(L-1).hook_resid_post."""
    match = _HOOK_RE.match(hook_name)
    if match and match.group(2) == "resid_pre" and int(match.group(1)) >= 1:
        return f"blocks.{int(match.group(1)) - 1}.hook_resid_post"
    return hook_name


def read_sparsify_hookpoints(folder: Path, *, device="cpu", dtype: torch.dtype = torch.float32
                             ) -> dict[str, TopKSAE]:
    """Every SAE of a sparsify trainer's save folder, keyed by TransformerLens hook name (by the
    sparsify hookpoint where no hook name maps)."""
    subfolders = sparsify_hookpoint_folders(folder)
    if not subfolders:
        raise CheckpointError(f"{folder}: no sparsify SAE folders inside (expected subfolders such as layers.9 "
                              f"holding {SPARSIFY_CFG_FILENAME} and {SPARSIFY_WEIGHTS_FILENAME})")
    saes = {}
    for sub in subfolders:
        sae = read_sparsify_folder(sub, device=device, dtype=dtype)
        saes[sae.cfg.hook_name or sub.name] = sae
    return saes


# ---- writing -------------------------------------------------------------------------------------------


def sparsify_cfg_dict(sae: TopKSAE) -> dict[str, Any]:
    """``cfg.json`` as sparsify 1.3.3 writes it: SparseCoderConfig fields in order, then ``d_in``."""
    c = sae.cfg
    if c.input_norm != "none":
        raise ConfigError(f"SAE has input_norm={c.input_norm!r}; the sparsify format has no input "
                          "normalization (save it in the SAELens format instead)")
    norms = sae.W_dec.detach().float().norm(dim=1)
    kept = c.extra.get("sparsify_cfg") if isinstance(c.extra.get("sparsify_cfg"), dict) else {}
    kept = {key: kept[key] for key in _TRAINING_ONLY if key in kept}
    return {
        "activation": "topk",
        # Unused by sparsify when num_latents is set; the true ratio where it is a whole number.
        "expansion_factor": c.n_latents // c.d_in if c.n_latents % c.d_in == 0 else _DEFAULTS["expansion_factor"],
        # Unit rows stored in bfloat16 or float16 read back within that dtype's rounding of 1.
        "normalize_decoder": bool(torch.allclose(norms, torch.ones_like(norms),
                                                 atol=max(1e-4, torch.finfo(sae.W_dec.dtype).eps))),
        "num_latents": c.n_latents,
        "k": c.k,
        "multi_topk": False,
        **kept,  # as read from a sparsify cfg.json (key order is fixed by the dict literal)
        "skip_connection": False,
        "transcode": False,
        "d_in": c.d_in,
    }


def _sparsify_payloads(sae: TopKSAE) -> dict[str, bytes]:
    cfg_text = json.dumps(sparsify_cfg_dict(sae))  # sparsify's json.dump: one line, no indent
    tensors = {"encoder.weight": sae.W_enc.detach().T, "encoder.bias": sae.b_enc.detach(),
               "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()}
    tensors = {key: t.to("cpu").contiguous() for key, t in tensors.items()}
    weights = save_safetensors(tensors)  # save_model adds metadata only for tensors it drops: none here
    own = json.dumps(sae.cfg.to_dict(), indent=2) + "\n"
    return {SPARSIFY_WEIGHTS_FILENAME: weights, SAELAB_CFG_FILENAME: own.encode("utf-8"),
            SPARSIFY_CFG_FILENAME: cfg_text.encode("utf-8")}


def _write_files(folder: Path, payloads: dict[str, bytes]) -> None:
    """Write every file to a temporary first and rename them in place together, cfg.json last."""
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        cfg_tmp = stack.enter_context(atomic_path(folder / SPARSIFY_CFG_FILENAME))
        for name, data in payloads.items():
            if name != SPARSIFY_CFG_FILENAME:
                stack.enter_context(atomic_path(folder / name)).write_bytes(data)
        cfg_tmp.write_bytes(payloads[SPARSIFY_CFG_FILENAME])
        (folder / SPARSIFY_CFG_FILENAME).unlink(missing_ok=True)


def write_sparsify_folder(sae: TopKSAE, folder: str | os.PathLike) -> Path:
    """Write ``sae`` as one sparsify SAE folder; sparsify's ``SparseCoder.load_from_disk`` reads it."""
    folder = Path(folder)
    _write_files(folder, _sparsify_payloads(sae))
    return folder


def write_sparsify_hookpoints(saes: Mapping[str, TopKSAE], folder: str | os.PathLike, *,
                              family: str | None = None) -> Path:
    """Write SAEs keyed by hook name as a sparsify trainer's save folder: one subfolder per hookpoint
    (``SparseCoder.load_many`` reads it) and a ``config.json`` with the model, dataset and context length.

    ``family`` ('gpt2', 'llama', 'gpt_neox') picks the module names; by default it follows from the
    SAEs' model name when that is a known one.
    """
    if not saes:
        raise ConfigError("write_sparsify_hookpoints needs at least one SAE")
    first = next(iter(saes.values())).cfg
    family = family or family_of(first.model_name)
    if family is None:
        raise ConfigError(f"cannot tell the layer layout of model {first.model_name!r}; pass family= one of "
                          f"{sorted(FAMILY_MODULES)}")
    # Everything that can fail on bad input is checked before the folder is touched.
    payloads: dict[str, dict[str, bytes]] = {}
    for hook, sae in saes.items():
        hookpoint = hook_to_hookpoint(hook, family)
        if hookpoint in payloads:
            raise ConfigError(f"two SAEs map to sparsify hookpoint {hookpoint!r} (hook {hook!r} is the same tensor)")
        payloads[hookpoint] = _sparsify_payloads(sae)
    run = {"model": first.model_name, "dataset": first.dataset, "ctx_len": first.context_size,
           "hookpoints": list(payloads), "sae": {k: v for k, v in sparsify_cfg_dict(next(iter(saes.values()))).items()
                                                  if k != "d_in"}}
    for hookpoint, files in payloads.items():
        _write_files(Path(folder) / hookpoint, files)
    with atomic_path(Path(folder) / SPARSIFY_RUN_CONFIG_FILENAME) as tmp:
        tmp.write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    return Path(folder)


__all__ = [
    "FAMILY_MODULES",
    "SAELAB_CFG_FILENAME",
    "SPARSIFY_CFG_FILENAME",
    "SPARSIFY_VERSION",
    "SPARSIFY_WEIGHTS_FILENAME",
    "family_of",
    "hook_to_hookpoint",
    "hookpoint_to_hook",
    "is_sparsify_folder",
    "read_sparsify_folder",
    "read_sparsify_hookpoints",
    "sparsify_cfg_dict",
    "sparsify_hookpoint_folders",
    "write_sparsify_folder",
    "write_sparsify_hookpoints",
]
