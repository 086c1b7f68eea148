"""The ReLU + L1 baseline SAE: its loss and gradients against plain dense autograd, training on real
activations, the SAELens 'standard' round trip, and train + eval from the CLI on a tiny real cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saelab.cli import main
from saelab.data import ActivationCache
from saelab.errors import ConfigError
from saelab.pipeline import HarvestConfig, harvest, train_from_cache
from saelab.sae import ReLUSAE, SAEConfig, TopKSAE, load_sae, relu_config, save_sae
from saelab.train import TrainConfig, train_sae
from saelab.train.losses import l1_coefficient_at, training_loss

HOOK = "blocks.1.hook_resid_post"
N = 96


def wiki_jsonl(data_dir: Path, path: Path, first: int, n: int) -> Path:
    import lzma

    with lzma.open(data_dir / "wiki-en" / "wiki_eval.jsonl.xz", "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(first + n)][first:]
    path.write_text("".join(json.dumps({"text": json.loads(line)["text"]}) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def cache_dir(tiny_gpt2, tiny_dir, data_dir, tmp_path_factory) -> Path:
    """3,000 real residual-stream rows of the tiny GPT-2 on Wikipedia (its saved folder named as the model)."""
    base = tmp_path_factory.mktemp("relu")
    corpus = wiki_jsonl(data_dir, base / "train.jsonl", 0, 3)
    cfg = HarvestConfig(model=str(tiny_dir), hook=HOOK, corpus=str(corpus), n_tokens=3000, context_size=32,
                        buffer_tokens=8192)
    harvest(cfg, base / "acts", lm=tiny_gpt2, progress=False)
    return base / "acts"


@pytest.fixture(scope="module")
def acts(cache_dir) -> torch.Tensor:
    return ActivationCache(cache_dir).read(0, 3000)


def perturbed_relu_sae(d: int, input_norm: str, dtype=torch.float64, seed: int = 0) -> ReLUSAE:
    """A ReLU SAE with decoder rows of varied norms and nonzero biases (some latents fire, some do not)."""
    g = torch.Generator().manual_seed(seed)
    sae = ReLUSAE(relu_config(d, N, input_norm=input_norm), dtype=dtype)
    with torch.no_grad():
        sae.W_dec.mul_(0.3 + 2 * torch.rand(N, 1, generator=g, dtype=dtype))
        sae.W_enc.add_(0.1 * torch.randn(d, N, generator=g, dtype=dtype))
        sae.b_enc.copy_(0.3 * torch.randn(N, generator=g, dtype=dtype))
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=g, dtype=dtype))
    return sae


def dense_reference_loss(params: dict[str, torch.Tensor], x: torch.Tensor, input_norm: str, lam: float,
                         normalizer: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ReLU + L1 loss written out in plain dense PyTorch: (loss, latents)."""
    if input_norm == "layernorm":
        centred = x - x.mean(dim=-1, keepdim=True)
        x = centred / (centred.std(dim=-1, keepdim=True) + 1e-5)
    z = torch.clamp((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"], min=0)
    x_hat = z @ params["W_dec"] + params["b_dec"]
    mse = ((x - x_hat) ** 2).sum(dim=-1).mean() / normalizer
    decoder_norms = params["W_dec"].pow(2).sum(dim=-1).sqrt()
    l1 = (z * decoder_norms).sum(dim=-1).mean() / math.sqrt(x.shape[-1] * normalizer)
    return mse + lam * l1, z


@pytest.mark.parametrize("input_norm", ["none", "layernorm"])
def test_loss_and_every_gradient_match_dense_autograd(acts, input_norm):
    x = acts[:512].double()
    sae = perturbed_relu_sae(x.shape[1], input_norm)
    cfg = TrainConfig(architecture="relu", l1_coefficient=3.0, n_latents=N, batch_size=512, total_tokens=512 * 40)
    normalizer = 7.5
    for step in (0, None):  # inside the warmup (lambda / 2 at step 0 of 40) and after it
        lam = l1_coefficient_at(cfg, step)
        sae.zero_grad(set_to_none=True)
        out = training_loss(sae, x, cfg, normalizer, None, step=step)
        out.loss.backward()

        params = {name: p.detach().clone().requires_grad_(True) for name, p in sae.named_parameters()}
        expected, z = dense_reference_loss(params, x, input_norm, lam, normalizer)
        expected.backward()
        torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
        for name, p in sae.named_parameters():
            torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-10, atol=1e-12, msg=name)
        fired = (z > 0).double().sum(dim=-1)
        assert 0 < fired.mean() < N and out.l0 == pytest.approx(fired.mean().item())
        # The SAE's public methods give the same latents and reconstruction.
        torch.testing.assert_close(sae.encode(x), z.detach())
        x_hat, vals, idx = sae.forward_with_latents(x)
        torch.testing.assert_close(torch.zeros_like(vals).scatter_(-1, idx, vals), z.detach())
        torch.testing.assert_close(sae.decode(sae.encode(x)), x_hat)
    assert l1_coefficient_at(cfg, 0) == pytest.approx(3.0 / 2) and l1_coefficient_at(cfg, 1) == 3.0


def test_training_on_real_activations_lowers_the_loss_and_l1_makes_it_sparse(cache_dir, tmp_path):
    def run(lam: float, name: str) -> tuple[list[dict], ReLUSAE]:
        cfg = TrainConfig(architecture="relu", l1_coefficient=lam, n_latents=N, batch_size=250, total_tokens=3000,
                          init_rows=1000, log_every=1, lr=3e-3, decay_fraction=0.2)
        sae = train_from_cache(cache_dir, tmp_path / name, cfg, progress=False)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return rows, sae

    rows, sae = run(1.0, "l1_1")
    assert isinstance(sae, ReLUSAE) and {"l1", "l0", "nmse"} <= set(rows[0])
    # lambda is at full strength from the first step (warmup: 5 % of 12 steps, at least one).
    assert rows[-1]["loss"] < 0.85 * rows[0]["loss"] and rows[-1]["nmse"] < rows[0]["nmse"]
    assert all(r["auxk"] == 0 for r in rows)
    weak_rows, _ = run(0.1, "l1_01")
    assert rows[-1]["l0"] < 0.75 * weak_rows[-1]["l0"], (rows[-1]["l0"], weak_rows[-1]["l0"])
    loaded = load_sae(tmp_path / "l1_1" / "sae")
    assert isinstance(loaded, ReLUSAE) and loaded.cfg.k == N


def test_interrupted_relu_run_resumes_to_the_uninterrupted_result(cache_dir, tmp_path):
    """The checkpoint rebuilds a ReLUSAE (not a TopKSAE); the trainer hands the loss its step (lambda warmup)."""
    cache = ActivationCache(cache_dir)
    cfg = TrainConfig(architecture="relu", l1_coefficient=1.0, n_latents=N, batch_size=100, total_tokens=3000,
                      init_rows=1000, log_every=1, checkpoint_every=100, ema_decay=0.9)

    def batches_from(start):
        return cache.batches(100, shuffle=True, seed=0, start_batch=start)

    whole = train_sae(cfg, batches_from, tmp_path / "whole", d_in=cache.d, progress=False)
    train_sae(cfg, batches_from, tmp_path / "split", d_in=cache.d, progress=False, stop_after_steps=1)
    resumed = train_sae(cfg, batches_from, tmp_path / "split", d_in=cache.d, progress=False)
    assert type(whole) is ReLUSAE and type(resumed) is ReLUSAE  # the EMA's SAE keeps the class too
    for name, p in whole.named_parameters():
        assert torch.equal(getattr(resumed, name), p), name
    # 30 steps: lambda warms up over round(1.5) = 2 of them, so step 0 has lambda / 2 and step 1 on lambda.
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    for row, lam in zip(rows[:3], (0.5, 1.0, 1.0)):
        assert row["loss"] == pytest.approx(row["nmse"] + lam * row["l1"], rel=1e-5), row


def test_saelens_standard_round_trip(acts, tmp_path):
    sae = perturbed_relu_sae(acts.shape[1], "none", dtype=torch.float32)
    folder = save_sae(sae, tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "standard" and "k" not in cfg and "rescale_acts_by_decoder_norm" not in cfg
    back = load_sae(folder)
    assert type(back) is ReLUSAE
    for name, p in sae.named_parameters():
        assert torch.equal(getattr(back, name), p), name
    x = acts[:256]
    assert torch.equal(back(x), sae(x))
    with pytest.raises(ConfigError, match="sparsify"):
        save_sae(sae, tmp_path / "sp", format="sparsify")


@pytest.mark.parametrize("rescale", [False, True])
def test_folder_written_by_saelens_loads_as_relu(acts, tmp_path, rescale):
    """A SAELens standard SAE (no saelab key; b_dec not subtracted; optionally rescaled by decoder norms)."""
    g = torch.Generator().manual_seed(3)
    d = acts.shape[1]
    w = {"W_enc": 0.2 * torch.randn(d, N, generator=g), "W_dec": torch.randn(N, d, generator=g),
         "b_enc": 0.1 * torch.randn(N, generator=g), "b_dec": torch.randn(d, generator=g)}
    folder = tmp_path / "sl"
    folder.mkdir()
    save_file(w, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": d, "d_sae": N, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": rescale,
        "metadata": {"sae_lens_version": "6.5.1", "hook_name": HOOK, "model_name": "tiny", "context_size": 32},
    }))
    sae = load_sae(folder, dtype=torch.float64)
    assert isinstance(sae, ReLUSAE) and sae.cfg.k == N and sae.cfg.hook_name == HOOK
    x = acts[:256].double()
    w64 = {k: v.double() for k, v in w.items()}
    pre = x @ w64["W_enc"] + w64["b_enc"]  # SAELens' StandardSAE.encode / decode, written out
    norms = w64["W_dec"].norm(dim=-1)
    z = torch.relu(pre * norms) / norms if rescale else torch.relu(pre)
    torch.testing.assert_close(sae(x), z @ w64["W_dec"] + w64["b_dec"], rtol=1e-10, atol=1e-10)


def test_relu_sae_refuses_a_top_k_config():
    with pytest.raises(ConfigError, match="k must equal n_latents"):
        ReLUSAE(SAEConfig(d_in=8, n_latents=16, k=4))
    with pytest.raises(ConfigError, match="l1_coefficient"):
        TrainConfig(architecture="relu", l1_coefficient=-1.0)
    with pytest.raises(ConfigError, match="architecture"):
        TrainConfig(architecture="gated")
    assert not isinstance(TopKSAE(relu_config(8, 16)), ReLUSAE)


def run_cli(capsys, *argv: str) -> dict:
    capsys.readouterr()
    code = main([*argv])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    return json.loads(out)


def test_cli_trains_and_evaluates_a_relu_sae(cache_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    trained = run_cli(capsys, "train", "--activations", str(cache_dir), "--out", str(run), "--architecture", "relu",
                      "--l1-coefficient", "5", "--n-latents", "128", "--batch-size", "250", "--total-tokens", "3000",
                      "--init-rows", "1000", "--log-every", "2", "--no-progress")
    # it printed "k": 128, a k the command refuses for a ReLU SAE
    assert trained == {"sae": str(run / "sae"), "n_latents": 128, "activation": "relu", "k": None}
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert json.loads((run / "sae" / "cfg.json").read_text())["architecture"] == "standard"
    eval_corpus = wiki_jsonl(data_dir, tmp_path / "eval.jsonl", 3, 2)
    metrics = run_cli(capsys, "eval", str(run), "--corpus", str(eval_corpus), "--recon-tokens", "1024",
                      "--downstream-tokens", "512", "--no-progress")
    for key in ("nmse", "l0", "dead_frac", "delta_ce"):
        assert math.isfinite(metrics[key]), key
    # The L0 of a ReLU SAE depends on the data: here lambda = 5 leaves few latents firing on this tiny
    # model's activations after 12 steps (L0 ~0.06, nMSE ~1.0), but some do, never all.
    assert 0 < metrics["l0"] < 128 and metrics["nmse"] > 0
    report = (run / "report.md").read_text()  # no k nor AuxK where the SAE has none; the seed, typed or not
    assert "| latents n / sparsity | 128 / ReLU, L1 coefficient 5.0 |" in report and "k_aux" not in report
    assert "| seed | 0 |" in report


def test_fired_marks_the_latents_with_a_positive_value():
    """Dead-latent tracking's input: TopK's (values, indices) with some kept values clipped to 0, and a
    ReLU SAE's dense latents; both against a boolean index of the positive entries."""
    torch.manual_seed(0)
    topk, relu = TopKSAE(SAEConfig(16, 64, 4)), ReLUSAE(relu_config(16, 64))
    x = torch.randn(32, 16)
    for sae in (topk, relu):
        vals, idx, _ = sae.encode_topk(x)
        # Latents 0-9 never fire; elsewhere some entries are clipped to 0.
        vals = vals.masked_fill((idx.expand_as(vals) < 10) | (torch.rand_like(vals) < 0.3), 0.0)
        expected = torch.zeros(64, dtype=torch.bool)
        expected[idx.expand_as(vals)[vals > 0]] = True
        assert 0 < int(expected.sum()) < 64
        assert torch.equal(sae.fired(vals, idx), expected.float()), type(sae).__name__
