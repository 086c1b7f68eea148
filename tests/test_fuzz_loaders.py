"""Fuzz the loaders with damaged files: every case loads, or fails with a SaelabError naming the input.

Real files first, each written by saelab's own writers (or laid out as the foreign tool writes it): a
SAELens folder with sparsity, a sparsify folder, an OpenAI v5 ``.pt``, an activation cache, a training
run stopped after two steps (its ``checkpoint.pt``) and an evaluation's latent frequencies. Then, per
target file, CASES_PER_TARGET seeded random damages: a truncation at a random length, 1-8 bytes changed at random offsets, or, for
JSON files, one value replaced by one of the wrong type, sign or size. After
each load the files on disk must be byte-for-byte what they were (loaders never write).
TOTAL_CASES cases in all; the seed is fixed, so a failure reproduces.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from saelab.data.cache import ActivationCache, write_activation_cache
from saelab.errors import SaelabError
from saelab.run_folder import LATENT_FREQUENCIES, LatentFrequencies, read_latent_frequencies, write_latent_frequencies
from saelab.sae import SAEConfig, TopKSAE, load_sae, read_sparsity, save_sae
from saelab.train import TrainConfig, train_sae
from saelab.train.checkpoint import load_checkpoint

SEED = 20261202
CASES_PER_TARGET = 40
D, N, K = 24, 96, 6


def _sae(seed: int, **cfg) -> TopKSAE:
    sae = TopKSAE(SAEConfig(d_in=D, n_latents=N, k=K, model_name="gpt2", hook_name="blocks.3.hook_resid_post", **cfg))
    sae.reset_parameters(generator=torch.Generator().manual_seed(seed))
    return sae


def _openai_state_dict() -> dict:
    """Keys, shapes and extras as OpenAI's Autoencoder.state_dict() (sparse_autoencoder/model.py)."""
    g = torch.Generator().manual_seed(3)
    dec = torch.randn(D, N, generator=g)
    return {"pre_bias": torch.randn(D, generator=g), "latent_bias": torch.randn(N, generator=g),
            "stats_last_nonzero": torch.zeros(N, dtype=torch.long), "latents_activation_frequency": torch.rand(N),
            "latents_mean_square": torch.rand(N), "encoder.weight": dec.T.contiguous(), "decoder.weight": dec,
            "activation": "TopK", "activation_state_dict": {"k": K, "postact_fn": "ReLU"}}


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("originals")
    save_sae(_sae(1, input_norm="layernorm"), base / "saelens", sparsity_log10=torch.linspace(-5, 0, N))
    save_sae(_sae(2), base / "layers.3", format="sparsify")
    torch.save(_openai_state_dict(), base / "openai.pt")
    g = torch.Generator().manual_seed(4)
    rows = (torch.randn(1024, D, generator=g) + torch.randn(D, generator=g)).split(128)
    cache = write_activation_cache(rows, base / "acts", meta={"hook_name": "blocks.3.hook_resid_post"},
                                   shard_rows=256, progress=False)
    cfg = TrainConfig(n_latents=N, k=K, batch_size=128, total_tokens=1024, init_rows=256, checkpoint_every=2,
                      log_every=1, lr=1e-2, warmup_steps=2)
    train_sae(cfg, lambda start: cache.batches(128, start_batch=start), base / "run", d_in=D, progress=False,
              stop_after_steps=2, device="cpu")
    assert (base / "run" / "checkpoint.pt").is_file()
    frequencies = torch.rand(N, generator=g, dtype=torch.float64)
    write_latent_frequencies(base / "eval", LatentFrequencies(frequencies, "0123456789abcdef0123",
                                                              {"model": "gpt2", "n_tokens": 1024}))
    return base


# target name -> (folder to copy, file inside it to damage, the load to run on the copy)
TARGETS: dict[str, tuple[str, str, Callable[[Path], object]]] = {
    "saelens cfg.json": ("saelens", "cfg.json", load_sae),
    "saelens sae_weights.safetensors": ("saelens", "sae_weights.safetensors", load_sae),
    "saelens sparsity.safetensors": ("saelens", "sparsity.safetensors", read_sparsity),
    "sparsify cfg.json": ("layers.3", "cfg.json", load_sae),
    "sparsify sae.safetensors": ("layers.3", "sae.safetensors", load_sae),
    "openai .pt": (".", "openai.pt", lambda folder: load_sae(folder / "openai.pt")),
    "training checkpoint.pt": ("run", "checkpoint.pt", load_checkpoint),
    "cache manifest.json": ("acts", "manifest.json", lambda folder: ActivationCache(folder).read()),
    "cache shard": ("acts", "shard_00000.npy", lambda folder: ActivationCache(folder).read()),
    "eval latent_frequencies.safetensors": ("eval", LATENT_FREQUENCIES, read_latent_frequencies),
}
TOTAL_CASES = len(TARGETS) * CASES_PER_TARGET


ODD_VALUES = (None, True, 0, -1, 3.5, 10**30, float("inf"), "", "x", [], [1, None], {}, {"a": 1})


def replace_json_value(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Valid JSON with one value somewhere in the tree replaced by an odd one (wrong type, sign, size)."""
    tree = json.loads(data)
    paths, stack = [], [((), tree)]
    while stack:
        path, node = stack.pop()
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            paths.append((*path, key))
            stack.append(((*path, key), child))
    path, value = rng.choice(paths), rng.choice(ODD_VALUES)
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return json.dumps(tree).encode(), f"{'.'.join(map(str, path))} set to {value!r}"


def damage(data: bytes, rng: random.Random, is_json: bool) -> tuple[bytes, str]:
    if is_json and rng.random() < 0.5:
        return replace_json_value(data, rng)
    if rng.random() < 0.4:
        cut = rng.randrange(len(data))
        return data[:cut], f"truncated to {cut} of {len(data)} bytes"
    # Parsers break on headers (safetensors, .npy) and trailers (the zip directory of a .pt): a third
    # of the changes fall in the first 512 bytes, a third in the last 512, a third anywhere.
    lo, hi = rng.choice([(0, len(data)), (0, min(512, len(data))), (max(0, len(data) - 512), len(data))])
    out = bytearray(data)
    offsets = sorted(rng.randrange(lo, hi) for _ in range(rng.randint(1, 8)))
    for i in offsets:
        out[i] ^= rng.randrange(1, 256)
    return bytes(out), f"bytes changed at {offsets}"


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", list(TARGETS))
def test_damaged_files_end_in_saelab_errors(originals, tmp_path, target):
    folder_name, file_name, load = TARGETS[target]
    load(originals / folder_name)  # the undamaged original loads
    rng = random.Random(f"{SEED}:{target}")
    problems, outcomes = [], {"loaded": 0, "refused": 0}
    for case in range(CASES_PER_TARGET):
        # The damaged copy keeps the original's folder name (sparsify reads the hookpoint from it).
        folder = tmp_path / f"case{case}" / folder_name
        shutil.copytree(originals / folder_name, folder)
        data, how = damage((folder / file_name).read_bytes(), rng, file_name.endswith(".json"))
        (folder / file_name).write_bytes(data)
        before = snapshot(folder)
        label = f"{target}, case {case}: {how}"
        try:
            loaded = load(folder)
            if isinstance(loaded, TopKSAE):  # what loads must also run (in float64: a changed exponent
                # may leave a finite weight near float32's limit, which a float32 forward overflows)
                x = torch.randn(4, loaded.d_in, generator=torch.Generator().manual_seed(case), dtype=torch.float64)
                assert torch.isfinite(loaded.double()(x)).all(), "non-finite output"
            outcomes["loaded"] += 1
        except SaelabError as e:
            outcomes["refused"] += 1
            if file_name not in str(e) and str(folder) not in str(e):
                problems.append(f"{label}: message does not name the input: {e}")
        except Exception as e:  # noqa: BLE001 - exactly what the fuzz looks for
            problems.append(f"{label}: {type(e).__name__}: {str(e)[:200]}")
        if snapshot(folder) != before:
            problems.append(f"{label}: files on disk changed")
        shutil.rmtree(tmp_path / f"case{case}")
    assert not problems, "\n".join(problems)
    assert outcomes["refused"] > 0, outcomes  # the damage reached the loader's checks


def test_case_count():
    assert TOTAL_CASES == 400
