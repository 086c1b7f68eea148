"""Training recipe: losses and gradients against a dense reference, constraints, resume."""

import json
import time

import pytest
import torch

from saelab.errors import NonFiniteError, RunExistsError
from saelab.sae.topk import SAEConfig, TopKSAE
from saelab.train import TrainConfig, train_sae
from saelab.train.init import geometric_median
from saelab.utils.atomic import write_json
from saelab.sae.kernels import AUX_DENSE_FACTOR, sparse_topk_encode
from saelab.train.losses import training_loss


def test_geometric_median_known_answers():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])  # collinear: the middle point
    assert torch.allclose(geometric_median(pts), torch.tensor([1.0, 0.0]), atol=1e-4)
    square = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0], [0.0, 0.0]])
    assert torch.allclose(geometric_median(square + 5), torch.tensor([5.0, 5.0]), atol=1e-5)


def _dense_reference_loss(sae, x, cfg, normalizer, dead):
    """The same objective written with dense [B, n] latents and plain autograd."""
    x_n, _ = sae.normalize_input(x)
    pre = (x_n - sae.b_dec) @ sae.W_enc + sae.b_enc

    def dense_topk(p, k):
        v, i = p.topk(k, dim=-1)
        return torch.zeros_like(p).scatter(-1, i, torch.relu(v))

    z = dense_topk(pre, sae.cfg.k)
    err = x_n - (z @ sae.W_dec + sae.b_dec)
    loss = err.pow(2).sum(-1).mean() / normalizer
    if cfg.multi_topk:
        z4 = dense_topk(pre, sae.cfg.k * cfg.multi_topk_factor)
        loss = loss + cfg.multi_topk_coef * (x_n - (z4 @ sae.W_dec + sae.b_dec)).pow(2).sum(-1).mean() / normalizer
    if cfg.auxk and dead is not None and dead.any():
        k_aux = min(cfg.k_aux, int(dead.sum()))
        za = dense_topk(pre.masked_fill(~dead, float("-inf")), k_aux)
        za = torch.nan_to_num(za)
        r = err.detach()
        aux = (r - za @ sae.W_dec).pow(2).sum(-1).mean() / (r - r.mean(0)).pow(2).sum(-1).mean()
        loss = loss + cfg.auxk_coef * aux
    return loss


@pytest.mark.parametrize("input_norm", ["none", "layernorm"])
@pytest.mark.parametrize("auxk,multi", [(False, False), (True, False), (False, True), (True, True)])
def test_loss_and_gradients_match_dense_reference(input_norm, auxk, multi):
    torch.manual_seed(0)
    d, n, k = 16, 64, 4
    sae = TopKSAE(SAEConfig(d, n, k, input_norm=input_norm), dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    x = torch.randn(32, d, dtype=torch.float64) * 2 + 1
    cfg = TrainConfig(n_latents=n, k=k, batch_size=32, total_tokens=32, auxk=auxk, k_aux=8,
                      multi_topk=multi, multi_topk_factor=4)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::3] = True
    out = training_loss(sae, x, cfg, normalizer=3.0, dead_mask_N=dead)
    _assert_matches_dense_reference(sae, x, cfg, dead, out.loss)
    if auxk:  # AuxK must train the encoder of dead latents (their columns get gradient)
        aux_only = training_loss(sae, x, cfg, 3.0, dead).loss - training_loss(sae, x, cfg, 3.0, None).loss
        g_enc = torch.autograd.grad(aux_only, sae.W_enc)[0]
        assert g_enc[:, dead].abs().sum() > 0


def _assert_matches_dense_reference(sae, x, cfg, dead, loss):
    """The loss and the gradient of every parameter equal the dense-autograd objective's."""
    grads = torch.autograd.grad(loss, list(sae.parameters()), retain_graph=True)
    ref = _dense_reference_loss(sae, x, cfg, 3.0, dead)
    ref_grads = torch.autograd.grad(ref, list(sae.parameters()))
    assert torch.allclose(loss, ref, rtol=1e-10, atol=1e-12)
    for name, g, rg in zip([n for n, _ in sae.named_parameters()], grads, ref_grads):
        assert torch.allclose(g, rg, rtol=1e-8, atol=1e-12), name


@pytest.mark.parametrize("k_aux,n_dead", [(8, 22), (1, 22), (8, 5), (8, 8), (8, 0)])
def test_auxk_forms_match_dense_reference(k_aux, n_dead):
    """training_loss with AuxK in dense form (n_dead <= AUX_DENSE_FACTOR * nonzero AuxK values per row:
    22 of 64 with k_aux 8, fewer dead than k_aux, exactly k_aux) and entry form (22 dead, k_aux 1),
    and with no dead latent: loss and the gradient of every parameter equal the dense-autograd objective."""
    torch.manual_seed(1)
    d, n, k = 16, 64, 4
    sae = TopKSAE(SAEConfig(d, n, k), dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    x = torch.randn(32, d, dtype=torch.float64) * 2 + 1
    cfg = TrainConfig(n_latents=n, k=k, batch_size=32, total_tokens=32, k_aux=k_aux)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n)[:n_dead]] = True
    out = training_loss(sae, x, cfg, normalizer=3.0, dead_mask_N=dead)
    assert (out.auxk > 0) == (n_dead > 0)
    enc = sparse_topk_encode(x, sae.b_dec, sae.W_enc, sae.b_enc, k, dead_idx=dead.nonzero().squeeze(1), k_aux=k_aux)
    if n_dead:  # the form the cases above mean
        pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc)[:, dead]
        per_row = (pre.topk(min(k_aux, n_dead), dim=-1).values > 0).sum() / x.shape[0]
        assert enc.aux_dense == (n_dead <= AUX_DENSE_FACTOR * per_row) == (k_aux > 1)
    _assert_matches_dense_reference(sae, x, cfg, dead, out.loss)


def test_trainer_steps_match_plain_adam_on_dense_loss():
    """Trainer (sparse kernel, fused Adam on the transposed view of W_enc) = the recipe written plainly."""
    from saelab.train.trainer import Trainer

    torch.manual_seed(0)
    d, n, k = 12, 192, 2  # more latents than selections per batch, so some go dead and AuxK runs
    cfg = TrainConfig(n_latents=n, k=k, batch_size=64, total_tokens=64 * 6, lr=1e-2, warmup_steps=1,
                      dead_tokens=64, k_aux=8)
    sae = TopKSAE(SAEConfig(d, n, k))
    ref = TopKSAE(SAEConfig(d, n, k))
    ref.load_state_dict(sae.state_dict())
    assert not sae.W_enc.is_contiguous()  # latent-major storage: the case the optimizer view handles
    trainer = Trainer(cfg, sae, normalizer=2.0)
    opt = torch.optim.Adam(ref.parameters(), lr=cfg.effective_lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                           eps=cfg.adam_eps)
    fired_since = torch.zeros(n, dtype=torch.long)
    revivals = 0
    for step in range(6):
        x = torch.randn(64, d) * 2 + 0.5
        dead = fired_since >= cfg.effective_dead_tokens
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        with torch.no_grad():  # latents that fire in this step's forward
            v, i = ((x - ref.b_dec) @ ref.W_enc + ref.b_enc).topk(k, dim=-1)
        opt.zero_grad()
        _dense_reference_loss(ref, x, cfg, 2.0, dead).backward()
        ref.project_decoder_grad()
        opt.step()
        ref.normalize_decoder()
        fired_now = torch.zeros(n, dtype=torch.bool)
        fired_now[i[v > 0]] = True
        revivals += int((fired_now & dead).sum())
        fired_since += 64
        fired_since[fired_now] = 0
        trainer.train_step(x)
        assert torch.equal(trainer.tokens_since_fired, fired_since)
        assert int(trainer.revivals) == revivals  # dead latents of this step that fired in it
        for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
            assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), (step, name)
    assert (trainer.tokens_since_fired >= cfg.effective_dead_tokens).any()  # AuxK was exercised
    correction = 1 - cfg.adam_beta2 ** 6
    for p, q in ((sae.W_enc, ref.W_enc), (sae.W_dec, ref.W_dec)):  # W_enc: Adam holds it transposed
        assert torch.allclose(trainer.second_moment(p), opt.state[q]["exp_avg_sq"] / correction, rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("decoder_from_data", [False, True])
def test_encoder_scale_init_is_least_squares_optimal(decoder_from_data):
    from saelab.train.init import init_from_data

    data = _data(rows=4096)

    def initial_nmse(scale: bool, factor: float = 1.0) -> float:
        sae = TopKSAE(SAEConfig(24, 128, 8))
        sae.reset_parameters(torch.Generator().manual_seed(0))
        norm = init_from_data(sae, data, decoder_from_data=decoder_from_data, scale_encoder=scale,
                              generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            sae.W_enc.mul_(factor)
            return ((data - sae(data)).pow(2).sum(1).mean() / norm).item()

    best = initial_nmse(True)
    assert best < initial_nmse(False)
    assert best <= min(initial_nmse(True, 0.9), initial_nmse(True, 1.1)) + 1e-6  # a minimum along the scale


def test_distinct_directions_skip_near_duplicates():
    from saelab.train.init import distinct_directions

    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 16, generator=g)
    rows = torch.cat([base, base + 0.01 * torch.randn(50, 16, generator=g), 3 * base])  # each direction thrice
    got = distinct_directions(rows, 200, 0.9, generator=torch.Generator().manual_seed(1))
    assert got.shape[0] == 50  # one of each triple: the pool ran out of distinct directions
    assert torch.allclose(got.norm(dim=1), torch.ones(50))
    cos = got @ got.T
    assert (cos - torch.eye(50)).max() <= 0.9
    assert ((got @ (base / base.norm(dim=1, keepdim=True)).T).max(dim=1).values > 0.99).all()  # real directions
    assert distinct_directions(rows, 120, 1.0).shape[0] == 120  # max_cos = 1 keeps duplicates


def test_data_init_rows_are_distinct_and_schedule_defaults():
    from saelab.train.init import init_from_data

    data = _data(rows=4096)
    sae = TopKSAE(SAEConfig(24, 64, 4))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    random_rows = sae.W_dec.detach().clone()
    init_from_data(sae, data, decoder_from_data=True, max_cos=0.8, noise=0.0, generator=torch.Generator().manual_seed(1))
    cos = sae.W_dec @ sae.W_dec.T
    assert (cos - torch.eye(64)).max() <= 0.8 + 1e-6 and torch.allclose(sae.W_enc, sae.W_dec.T)
    centred = data - sae.b_dec
    assert ((sae.W_dec @ (centred / centred.norm(dim=1, keepdim=True)).T).max(dim=1).values > 0.999).all()
    noisy = TopKSAE(SAEConfig(24, 64, 4))
    noisy.W_dec.data.copy_(random_rows)
    init_from_data(noisy, data, decoder_from_data=True, max_cos=0.8, noise=1.0, generator=torch.Generator().manual_seed(1))
    mixed = sae.W_dec + random_rows
    assert torch.allclose(noisy.W_dec, mixed / mixed.norm(dim=1, keepdim=True), atol=1e-6)

    cfg = TrainConfig(n_latents=8192, k=32, batch_size=4096, total_tokens=262_144)
    assert cfg.effective_decoder_init == "data" and cfg.effective_dead_tokens == 32_768
    assert TrainConfig(n_latents=32768, k=32).effective_decoder_init == "random"
    assert cfg.effective_init_rows == 32_768
    assert TrainConfig(n_latents=32768, decoder_init="data").effective_init_rows == 131_072
    assert TrainConfig(n_latents=32768).effective_init_rows == 32_768  # random rows: b_pre and normalizer only
    assert TrainConfig(total_tokens=10**10).effective_dead_tokens == 10_000_000
    assert TrainConfig(n_latents=128).effective_lr == 1e-2  # the cap
    with pytest.raises(ValueError, match="decoder_init"):
        TrainConfig(decoder_init="kmeans")


def test_decoder_constraints():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(8, 32, 4))
    w_enc = sae.W_enc.detach().clone()
    g = torch.randn_like(sae.W_dec)
    sae.W_dec.grad = g.clone()
    sae.project_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    W = sae.W_dec.detach()  # unit rows: the projection removes (g . w) w from each row
    assert torch.allclose(sae.W_dec.grad, g - (g * W).sum(1, keepdim=True) * W, atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32))
    assert torch.equal(sae.W_enc, w_enc)  # encoder untouched by decoder constraints


def _source(data, batch):
    def batches_from(start):
        for i in range(start * batch, data.shape[0] - batch + 1, batch):
            yield data[i:i + batch]
    return batches_from


def _data(rows=2048, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(96, d, generator=g)
    codes = torch.rand(rows, 96, generator=g) * (torch.rand(rows, 96, generator=g) < 0.05)
    return codes @ basis + 3.0 + 0.01 * torch.randn(rows, d, generator=g)


def _cfg(**kw):
    base = dict(n_latents=128, k=8, batch_size=128, total_tokens=2048, init_rows=512, checkpoint_every=4,
                log_every=2, lr=1e-2, warmup_steps=2, dead_tokens=512, k_aux=16, ema_decay=0.9)
    base.update(kw)
    return TrainConfig(**base)


def test_training_reduces_nmse_and_logs(tmp_path):
    data = _data()
    sae = train_sae(_cfg(), _source(data, 128), tmp_path / "run", d_in=24, progress=False,
                    meta={"hook_name": "blocks.0.hook_resid_post", "model_name": "synthetic"})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 16
    assert rows[-1]["nmse"] < 0.75 * rows[0]["nmse"] and rows[-1]["nmse"] < 0.25
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "finished"
    assert sae.cfg.hook_name == "blocks.0.hook_resid_post"
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    data = _data()
    full = train_sae(_cfg(), _source(data, 128), tmp_path / "a", d_in=24, progress=False)
    # Stop after 5 steps (checkpoint at 4 and at the stop), then resume in a fresh call.
    train_sae(_cfg(), _source(data, 128), tmp_path / "b", d_in=24, progress=False, stop_after_steps=5)
    status = json.loads((tmp_path / "b" / "status.json").read_text())
    assert status["state"] == "interrupted" and status["train_seconds"] > 0
    # The run's training time counts every call: the resumed call adds to what the first recorded.
    write_json(tmp_path / "b" / "status.json", {**status, "train_seconds": 1000.0})
    t = time.perf_counter()
    resumed = train_sae(_cfg(), _source(data, 128), tmp_path / "b", d_in=24, progress=False)
    this_call = time.perf_counter() - t
    assert 1000 < json.loads((tmp_path / "b" / "status.json").read_text())["train_seconds"] < 1000 + this_call
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # nothing logged twice


def test_finished_run_is_not_overwritten(tmp_path):
    data = _data(rows=1024)
    cfg = _cfg(total_tokens=1024)
    train_sae(cfg, _source(data, 128), tmp_path / "run", d_in=24, progress=False)
    before = (tmp_path / "run" / "sae" / "sae_weights.safetensors").read_bytes()
    with pytest.raises(RunExistsError, match="finished run"):
        train_sae(cfg, _source(data, 128), tmp_path / "run", d_in=24, progress=False)
    with pytest.raises(RunExistsError, match=r"finished run trained with other settings \(train.k 8 -> 4\);"):
        train_sae(_cfg(total_tokens=1024, k=4), _source(data, 128), tmp_path / "run", d_in=24, progress=False)
    assert (tmp_path / "run" / "sae" / "sae_weights.safetensors").read_bytes() == before
    with pytest.raises(RunExistsError, match="different config"):
        train_sae(_cfg(k=4), _source(data, 128), tmp_path / "other", d_in=24, progress=False,
                  stop_after_steps=1)
        train_sae(_cfg(k=8), _source(data, 128), tmp_path / "other", d_in=24, progress=False)


def test_resume_may_change_when_it_saves_and_logs_but_not_what_it_trains(tmp_path):
    data = _data()
    full = train_sae(_cfg(), _source(data, 128), tmp_path / "a", d_in=24, progress=False)
    train_sae(_cfg(), _source(data, 128), tmp_path / "b", d_in=24, progress=False, stop_after_steps=5)
    with pytest.raises(RunExistsError, match=r"differs in train.lr 0.01 -> 0.02\); resume it with the same"):
        train_sae(_cfg(lr=2e-2, log_every=3), _source(data, 128), tmp_path / "b", d_in=24, progress=False)
    resumed = train_sae(_cfg(checkpoint_every=2, log_every=3), _source(data, 128), tmp_path / "b", d_in=24,
                        progress=False)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    recorded = json.loads((tmp_path / "b" / "train_config.json").read_text())["train"]
    assert (recorded["checkpoint_every"], recorded["log_every"]) == (2, 3)


def test_resume_may_change_a_setting_that_acts_on_nothing_in_the_run(tmp_path):
    """k_aux with AuxK off, lr_base beside a given lr: the same SAE trains, so the run resumes (it was refused as
    a different config); a setting that acts is still refused."""
    data = _data()
    full = train_sae(_cfg(auxk=False), _source(data, 128), tmp_path / "a", d_in=24, progress=False)
    train_sae(_cfg(auxk=False), _source(data, 128), tmp_path / "b", d_in=24, progress=False, stop_after_steps=5)
    with pytest.raises(RunExistsError, match=r"differs in train.auxk false -> true\)"):
        train_sae(_cfg(k_aux=32), _source(data, 128), tmp_path / "b", d_in=24, progress=False)
    resumed = train_sae(_cfg(auxk=False, k_aux=32, lr_base=1e-3), _source(data, 128), tmp_path / "b", d_in=24,
                        progress=False)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_a_relu_config_s_k_acts_on_nothing(tmp_path):
    """A ReLU SAE has no k, and a run of it compares with another less its k (unused_settings); 'auto' decoder init
    read that k (k = 8: random, 32: data), so a paused k = 8 run resumed as k = 32 took another init's record, and
    two fresh runs differing in k alone trained apart."""
    data = _data()
    relu = dict(architecture="relu", lr=1e-3, auxk=False, decoder_init="auto")
    fresh = train_sae(_cfg(k=32, **relu), _source(data, 128), tmp_path / "k32", d_in=24, progress=False)
    other_k = train_sae(_cfg(k=8, **relu), _source(data, 128), tmp_path / "k8", d_in=24, progress=False)
    train_sae(_cfg(k=8, **relu), _source(data, 128), tmp_path / "paused", d_in=24, progress=False, stop_after_steps=5)
    resumed = train_sae(_cfg(k=32, **relu), _source(data, 128), tmp_path / "paused", d_in=24, progress=False)
    for (name, p), q, r in zip(fresh.named_parameters(), other_k.parameters(), resumed.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r), name


def test_tokens_past_the_last_whole_batch_are_named(tmp_path, capsys):
    data = _data(rows=1024)
    train_sae(_cfg(total_tokens=1000), _source(data, 128), tmp_path / "run", d_in=24, progress=False)
    assert ("--total-tokens 1,000 is not a multiple of --batch-size 128; run trains 7 steps (896 tokens)"
            in capsys.readouterr().err)
    train_sae(_cfg(total_tokens=1024), _source(data, 128), tmp_path / "whole", d_in=24, progress=False)
    assert "not a multiple" not in capsys.readouterr().err


def test_nan_activations_are_refused(tmp_path):
    data = _data(rows=1024)
    data[700, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="activation batch 5"):
        train_sae(_cfg(total_tokens=1024, init_rows=256), _source(data, 128), tmp_path / "run", d_in=24,
                  progress=False)


def test_a_non_finite_loss_stops_the_step_before_any_weight_moves():
    """Finite activations, an SAE whose decoder holds an inf: the loss is inf; the step raises and leaves
    every weight and the optimizer as they were (the statistics are read once, after the backward)."""
    from saelab.train.trainer import Trainer

    data = _data()
    sae = TopKSAE(SAEConfig(24, 128, 8))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    trainer = Trainer(_cfg(), sae, normalizer=9.0, device="cpu")
    trainer.train_step(data[:128])
    with torch.no_grad():
        sae.W_dec[:, 0] = float("inf")
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    steps = [state["step"].item() for state in trainer.opt.state.values()]
    with pytest.raises(NonFiniteError, match=r"^training loss became inf at step 1$"):
        trainer.train_step(data[128:256])
    for name, p in sae.named_parameters():
        assert torch.equal(p, before[name]), name
    assert [state["step"].item() for state in trainer.opt.state.values()] == steps and trainer.step == 1


def test_a_batch_with_a_nan_stops_the_step_before_any_weight_moves():
    """The batch's values are checked with the step's statistics, read once after the backward: the error
    names the batch, and no weight, optimizer state or firing count has moved."""
    from saelab.errors import NonFiniteActivationsError
    from saelab.train.trainer import Trainer

    data = _data()
    sae = TopKSAE(SAEConfig(24, 128, 8))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    trainer = Trainer(_cfg(), sae, normalizer=9.0, device="cpu")
    trainer.train_step(data[:128])
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    fired_before = trainer.tokens_since_fired.clone()
    bad = data[128:256].clone()
    bad[7, 2] = float("nan")
    with pytest.raises(NonFiniteActivationsError, match=r"^activation batch 1 contains NaN or inf activations$"):
        trainer.train_step(bad)
    for name, p in sae.named_parameters():
        assert torch.equal(p, before[name]), name
    assert torch.equal(trainer.tokens_since_fired, fired_before) and trainer.step == 1
    big = data[128:256].clone()
    big[:, 0] = 3e38  # finite values whose sum overflows: not called NaN or inf activations (the loss is inf)
    with pytest.raises(NonFiniteError, match=r"^training loss became inf at step 1$"):
        trainer.train_step(big)


def _count_host_reads(monkeypatch) -> list[str]:
    """Each read of a tensor's value into Python (on a GPU, a wait for the device), by the method used."""
    reads: list[str] = []
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            reads.append(_name)
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def test_a_training_step_reads_the_device_once(tmp_path, monkeypatch):
    """A step with AuxK off reads back only its statistics (the batch's finiteness among them): on a GPU any
    other read makes the device wait mid-step. (With AuxK on, a GPU waits once more, for the dead set's size;
    the CPU's AuxK entry form reads more, where there is nothing to wait for.)"""
    from saelab.train.trainer import TrainingRun

    data = _data()
    cfg = _cfg(n_latents=1024, total_tokens=2048, dead_tokens=1 << 20, log_every=1000, checkpoint_every=1000,
               ema_decay=None)
    run = TrainingRun(cfg, tmp_path / "run", d_in=24, meta=None, init_sample=lambda: data[:512], device="cpu")
    try:
        run.train_step(data[:128])
        reads = _count_host_reads(monkeypatch)
        run.train_step(data[128:256])
        assert reads == ["tolist"]
    finally:
        monkeypatch.undo()
        run.close()


def test_a_trained_sae_keeps_no_gradients(tmp_path):
    """The returned SAE's parameters hold no .grad from the last step (which would double its memory)."""
    for ema in (None, 0.9):
        sae = train_sae(_cfg(ema_decay=ema), _source(_data(), 128), tmp_path / f"run{ema}", d_in=24,
                        progress=False)
        assert all(p.grad is None for p in sae.parameters()), ema


def test_ema_is_the_bias_corrected_average_of_the_trained_weights():
    """The EMA starts at zero and is divided by 1 - decay^t (OpenAI's EmaModel), so the saved SAE is a
    weighted average of the weights training produced, with none of the initialisation in it."""
    from saelab.train.trainer import Trainer

    data, decay, steps = _data(), 0.999, 12
    cfg = _cfg(ema_decay=decay, total_tokens=steps * 128)
    sae = TopKSAE(SAEConfig(24, 128, 8))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    trainer = Trainer(cfg, sae, normalizer=9.0, device="cpu")
    trained = []
    for b in range(steps):
        trainer.train_step(data[b * 128:(b + 1) * 128])
        trained.append({name: p.detach().double().clone() for name, p in sae.named_parameters()})
    final = dict(trainer.final_sae().named_parameters())
    for name in ("W_enc", "b_enc", "b_dec", "W_dec"):
        average = sum((1 - decay) * decay ** (steps - 1 - s) * trained[s][name] for s in range(steps))
        average = average / (1 - decay ** steps)
        if name == "W_dec":  # the saved decoder keeps unit-norm rows
            average = average / average.norm(dim=1, keepdim=True)
        assert torch.allclose(final[name].double(), average, rtol=1e-5, atol=1e-6), name


def test_ema_sae_of_a_short_run_is_trained_not_its_init(tmp_path):
    data = _data()

    def nmse(model):
        with torch.no_grad():
            return ((model(data) - data).pow(2).sum(1).mean() / (data - data.mean(0)).pow(2).sum(1).mean()).item()

    init = train_sae(_cfg(ema_decay=None), _source(data, 128), tmp_path / "init", d_in=24, progress=False,
                     device="cpu", stop_after_steps=0)
    trained = train_sae(_cfg(ema_decay=None), _source(data, 128), tmp_path / "plain", d_in=24, progress=False,
                        device="cpu")
    ema = train_sae(_cfg(ema_decay=0.999), _source(data, 128), tmp_path / "ema", d_in=24, progress=False,
                    device="cpu")
    # 16 steps at decay 0.999: an EMA started at the initial weights would still be 98 % init.
    gap = nmse(init) - nmse(trained)
    assert gap > 0.03 and nmse(ema) < nmse(trained) + 0.25 * gap, (nmse(init), nmse(trained), nmse(ema))
    from saelab.sae import load_sae

    saved = load_sae(tmp_path / "ema" / "sae")  # the file holds the EMA SAE
    for name, p in ema.named_parameters():
        assert torch.equal(p.cpu(), getattr(saved, name)), name


def test_checkpoint_with_an_uncorrected_ema_is_refused(tmp_path):
    from saelab.errors import CheckpointError
    from saelab.train.checkpoint import CHECKPOINT

    data = _data()
    train_sae(_cfg(), _source(data, 128), tmp_path / "run", d_in=24, progress=False, device="cpu", stop_after_steps=3)
    path = tmp_path / "run" / CHECKPOINT
    state = torch.load(path, weights_only=True)
    assert state["ema_format"] is not None
    del state["ema_format"]  # as written before the EMA was bias-corrected (it started at the init weights)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="EMA of the weights was kept by an older saelab"):
        train_sae(_cfg(), _source(data, 128), tmp_path / "run", d_in=24, progress=False, device="cpu")
