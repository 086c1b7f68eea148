"""SAELens itself reads saelab's SAE folders and saelab reads SAELens' own, with equal outputs, for
top-k (with and without LayerNorm input) and standard (ReLU) SAEs. Needs the real sae-lens package:
importable here, or a venv with it named by $SAELAB_SAELENS_PYTHON (sae-lens pins its own torch)."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.sae import ReLUSAE, SAEConfig, TopKSAE, load_sae, relu_config, save_sae

pytestmark = pytest.mark.peers

SAELENS_SIDE = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    folder = sys.argv[1]
    x = load_file(f"{folder}/x.safetensors")["x"]
    out = {}
    for name in ("topk", "topk_ln", "relu"):
        sae = SAE.load_from_disk(f"{folder}/ours_{name}")  # saelab's folders, as SAELens reads them
        z = sae.encode(x)
        out[f"{name}_z"], out[f"{name}_x_hat"] = z, sae.decode(z)
    torch.manual_seed(0)
    for name, sae in (("topk", TopKSAE(TopKSAEConfig(d_in=16, d_sae=64, k=4))),
                      ("relu", StandardSAE(StandardSAEConfig(d_in=16, d_sae=64)))):
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_(0, 0.3)
        sae.save_model(f"{folder}/theirs_{name}")  # SAELens' own folders, for saelab to read
        z = sae.encode(x)
        out[f"theirs_{name}_z"], out[f"theirs_{name}_x_hat"] = z, sae.decode(z)
    save_file({k: v.detach().contiguous() for k, v in out.items()}, f"{folder}/saelens_out.safetensors")
""")


def saelens_python() -> str | None:
    if importlib.util.find_spec("sae_lens") is not None:
        return sys.executable
    return os.environ.get("SAELAB_SAELENS_PYTHON") or None


def _random(sae):
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    return sae


def test_saelens_reads_ours_and_we_read_theirs(tmp_path):
    python = saelens_python()
    if python is None:
        pytest.skip("sae-lens not installed here; set SAELAB_SAELENS_PYTHON to a venv's python that has it")
    torch.manual_seed(1)
    ours = {"topk": _random(TopKSAE(SAEConfig(d_in=16, n_latents=64, k=4, hook_name="blocks.0.hook_resid_post"))),
            "topk_ln": _random(TopKSAE(SAEConfig(d_in=16, n_latents=64, k=4, input_norm="layernorm",
                                                 hook_name="blocks.0.hook_resid_post"))),
            "relu": _random(ReLUSAE(relu_config(16, 64)))}
    for name, sae in ours.items():
        save_sae(sae, tmp_path / f"ours_{name}")
    x = torch.randn(32, 16) * 2 + 0.5
    save_file({"x": x}, tmp_path / "x.safetensors")
    run = subprocess.run([python, "-c", SAELENS_SIDE, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = load_file(tmp_path / "saelens_out.safetensors")
    with torch.no_grad():
        for name, sae in ours.items():  # SAELens on our folders = saelab
            assert torch.allclose(theirs[f"{name}_z"], sae.encode(x), atol=1e-5), name
            assert torch.allclose(theirs[f"{name}_x_hat"], sae.decode(sae.encode(x)), atol=1e-5), name
        for name in ("topk", "relu"):  # saelab on SAELens' folders = SAELens
            sae = load_sae(tmp_path / f"theirs_{name}")
            assert isinstance(sae, ReLUSAE) == (name == "relu")
            assert torch.allclose(sae.encode(x), theirs[f"theirs_{name}_z"], atol=1e-5), name
            assert torch.allclose(sae.decode(sae.encode(x)), theirs[f"theirs_{name}_x_hat"], atol=1e-5), name
