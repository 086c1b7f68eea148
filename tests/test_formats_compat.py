"""Files written before the package layout changed still load, and give the same results."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from saelab.data import ActivationCache
from saelab.run_folder import open_sae

OLD = Path(__file__).parent / "fixtures" / "v0_1_0"


def test_sae_and_activation_cache_from_0_1_0_load_unchanged():
    expected = load_file(OLD / "expected.safetensors")
    sae, run = open_sae(OLD / "sae")
    assert run is None and sae.cfg.hook_name == "blocks.9.hook_resid_post" and sae.n_latents == 32
    cache = ActivationCache(OLD / "activations")
    assert (cache.n_rows, cache.d) == (96, 16)
    rows = torch.cat(list(cache.batches(32, shuffle=False))).float()
    assert torch.equal(rows, expected["x"].half().float())  # the cache stores float16
    with torch.no_grad():
        assert torch.allclose(sae.encode(expected["x"]), expected["z"], atol=1e-6)
        assert torch.allclose(sae(expected["x"]), expected["x_hat"], atol=1e-6)
