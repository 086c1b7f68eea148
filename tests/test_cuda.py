"""Devices. On a CUDA GPU (skipped without one): the sparse kernel against dense autograd there, a short
training run equal to the same run on the CPU, resume on the GPU and across devices, TF32, pinned cache
batches, harvesting from a GPU model, and data parallelism over 2 GPUs (NCCL). On any machine: the CPU
side (device="cpu" explicitly, CPU checkpoints, CUDA refused where absent, the batch prefetcher) and the
measurement that justifies the CPU-vs-GPU tolerance.

Tolerance (TOL). A float32 run on the GPU differs from the same run on the CPU only by float rounding:
cuBLAS and MKL sum in different orders and CUDA's index_add is atomic, which moves results by about
1e-7 of their size per operation. test_tolerance_covers_rounding_differences measures what that does
to this 16-step run (AuxK active, EMA on): every input perturbed by 1e-6 of its size (about 10x float32
rounding) moves the weights by ~1.3e-6 at most, and TOL = (rtol 1e-4, atol 1e-5) is asserted to leave
at least 4x room over that. It is also the tolerance of the gloo data-parallel test (tests/test_distributed.py).
"""

from __future__ import annotations

import copy
import inspect
import json
import sys
import threading
from pathlib import Path

import pytest
import torch

from saelab.data import ActivationCache, ActivationStream, token_contexts, write_activation_cache
from saelab.errors import ConfigError
from saelab.sae import load_sae
from saelab.sae.kernels import sparse_topk_encode
from saelab.sae.topk import SAEConfig, TopKSAE
from saelab.train import TrainConfig, Trainer, train_sae
from saelab.train.checkpoint import CHECKPOINT, load_checkpoint, to_cpu
from saelab.train.trainer import prefetched
from test_kernels import _dense_reference, _densify_aux

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
TOL = dict(rtol=1e-4, atol=1e-5)
D = 24


def _data(rows: int = 2048, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(96, D, generator=g)
    codes = torch.rand(rows, 96, generator=g) * (torch.rand(rows, 96, generator=g) < 0.05)
    return codes @ basis + 3.0 + 0.01 * torch.randn(rows, D, generator=g)


def _source(data: torch.Tensor, batch: int = 128):
    def batches_from(start):
        for i in range(start * batch, data.shape[0] - batch + 1, batch):
            yield data[i:i + batch]
    return batches_from


def _cfg(**kw) -> TrainConfig:
    """16 steps with AuxK active (dead window of 4 steps) and an EMA: every piece of state moves."""
    base = dict(n_latents=128, k=8, batch_size=128, total_tokens=2048, init_rows=512, checkpoint_every=4,
                log_every=2, lr=1e-2, warmup_steps=2, dead_tokens=512, k_aux=16, ema_decay=0.9)
    return TrainConfig(**{**base, **kw})


def _train(tmp_path: Path, name: str, device: str, data: torch.Tensor | None = None, **kw) -> TopKSAE:
    data = _data() if data is None else data
    cfg = _cfg(**{k: v for k, v in kw.items() if k not in ("stop_after_steps", "allow_tf32")})
    return train_sae(cfg, _source(data), tmp_path / name, d_in=D, progress=False, device=device,
                     **{k: v for k, v in kw.items() if k in ("stop_after_steps", "allow_tf32")})


def _assert_close(a: TopKSAE, b: TopKSAE, **tol) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        p, q = p.detach().cpu(), q.detach().cpu()
        assert torch.allclose(p, q, **(tol or TOL)), (name, (p - q).abs().max().item())


def _nmse(sae: TopKSAE, data: torch.Tensor) -> float:
    x = data.to(sae.W_dec.device)
    with torch.no_grad():
        return ((sae(x) - x).pow(2).sum(1).mean() / (x - x.mean(0)).pow(2).sum(1).mean()).item()


# ---- on any machine ------------------------------------------------------------------------------------


def test_tolerance_covers_rounding_differences(tmp_path):
    data = _data()
    g = torch.Generator().manual_seed(1)
    a = _train(tmp_path, "a", "cpu", data)
    b = _train(tmp_path, "b", "cpu", data * (1 + 1e-6 * torch.randn(data.shape, generator=g)))
    _assert_close(a, b, rtol=TOL["rtol"] / 4, atol=TOL["atol"] / 4)


def test_training_with_device_cpu_keeps_everything_on_the_cpu(tmp_path):
    sae = _train(tmp_path, "run", "cpu", stop_after_steps=6)
    assert {p.device.type for p in sae.parameters()} == {"cpu"}
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)  # no map_location needed: CPU tensors
    tensors = [t for t in _tensors(state)]
    assert tensors and {t.device.type for t in tensors} == {"cpu"}
    trainer = Trainer(_cfg(), TopKSAE(SAEConfig(D, 128, 8), init=False), 1.0, device="cpu")
    trainer.load_state_dict(load_checkpoint(tmp_path / "run", map_location=torch.device("cpu")))
    assert trainer.step == 6 and trainer.opt.defaults["fused"]
    assert {t.device.type for t in _tensors(trainer.state_dict())} == {"cpu"}
    for key in ("sae", "tokens_since_fired", "ema"):  # the restored state is the saved one, bit for bit
        for x, y in zip(_tensors(to_cpu(trainer.state_dict()[key])), _tensors(state[key])):
            assert torch.equal(x, y), key


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_checkpoint_resumes_with_map_location(tmp_path):
    full = _train(tmp_path, "full", "cpu")
    _train(tmp_path, "cut", "cpu", stop_after_steps=5)
    assert load_checkpoint(tmp_path / "cut", map_location="cpu")["step"] == 5
    resumed = _train(tmp_path, "cut", "cpu")
    _assert_close(full, resumed, rtol=0, atol=0)  # on one device: bit for bit


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_cuda_refused_with_one_line_where_absent(tmp_path):
    def refused(call):
        with pytest.raises(ConfigError) as err:
            call()
        msg = str(err.value)
        assert "'cuda'" in msg and "CUDA is not available" in msg and "\n" not in msg, msg

    refused(lambda: _train(tmp_path, "run", "cuda"))
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
    refused(lambda: Trainer(_cfg(), TopKSAE(SAEConfig(D, 128, 8)), 1.0, device="cuda"))
    cache = write_activation_cache(iter(_data(512).split(128)), tmp_path / "acts", meta={}, dtype="float32",
                                   progress=False)
    refused(lambda: next(cache.batches(64, device="cuda")))
    with pytest.raises(ConfigError, match="pin_memory=True needs CUDA"):
        next(cache.batches(64, pin_memory=True))
    for name in ("gpu0", "meta", "cuda:-1"):  # meta: a torch device that saelab's kernels do not run on
        with pytest.raises(ConfigError, match=rf"^device='{name}': expected auto, cpu, cuda or cuda:N$"):
            _train(tmp_path, "run", name)


def test_prefetcher_keeps_order_stops_early_and_raises_reader_errors():
    other = torch.device("meta")  # any device but the CPU takes the background-thread path
    batches = [torch.full((2, 3), float(i)) for i in range(7)]
    with prefetched(iter(batches), other) as got:
        assert [b[0, 0].item() for b in got] == list(range(7))

    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield torch.full((2, 3), float(i))
                i += 1
        finally:
            closed.set()

    with prefetched(endless(), other) as got:
        assert [next(got)[0, 0].item() for _ in range(3)] == [0, 1, 2]
    assert closed.wait(10)  # the reader stopped and closed its source when the consumer left

    def failing():
        yield torch.zeros(2, 3)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"), prefetched(failing(), other) as got:
        list(got)


def test_evaluation_runs_the_sae_on_the_model_device():
    """evaluate and the paper suite splice the SAE into the model's forward, so it must be on the model's
    device (an SAE loads on the CPU, the model on CUDA when available): one loaded for the job is moved
    there, one the caller gave is copied there and stays where it was."""
    from types import SimpleNamespace

    from saelab.pipeline import _beside_model

    elsewhere = SimpleNamespace(device=torch.device("meta"))  # any device but the CPU
    given = TopKSAE(SAEConfig(D, 128, 8))
    on_model = _beside_model(given, elsewhere, given=True)
    assert on_model is not given and on_model.W_dec.is_meta and given.W_dec.device.type == "cpu"
    loaded = TopKSAE(SAEConfig(D, 128, 8))
    assert _beside_model(loaded, elsewhere, given=False) is loaded and loaded.W_dec.is_meta
    same = TopKSAE(SAEConfig(D, 128, 8))
    assert _beside_model(same, SimpleNamespace(device=torch.device("cpu")), given=True) is same


def test_browser_runs_the_saes_it_loads_on_the_model_device(tmp_path, gpt2_tokenizer):
    """browse, families and the Neuronpedia export encode with the SAE: one they load from a path goes to
    the model's device (else a GPU model's activations come back to the CPU for the encoder); one the
    caller gave stays where it is."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from saelab.explore.browser import BrowseConfig
    from saelab.explore.browser.build import SAESource
    from saelab.explore.browser.make import load_model_beside, open_sources
    from saelab.models import LanguageModel
    from saelab.sae import save_sae

    save_sae(TopKSAE(SAEConfig(D, 128, 8)), tmp_path / "sae")
    given = SAESource("given", "mem", TopKSAE(SAEConfig(D, 64, 8)))
    sources, loaded_here = open_sources([tmp_path / "sae", given])
    assert [s.name for s in loaded_here] == ["sae"]
    with torch.device("meta"):  # any device but the CPU
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=D, n_head=4, vocab_size=50257, n_positions=64))
    lm = LanguageModel(model, gpt2_tokenizer, "meta-gpt2")
    assert load_model_beside(lm, BrowseConfig(), sources, loaded_here, "blocks.0.hook_resid_post")[0] is lm
    assert sources[0].sae.W_dec.is_meta and given.sae.W_dec.device.type == "cpu"


@pytest.mark.parametrize("entry", ["downstream_metrics", "evaluate_core", "ablation_sparsity", "steer", "run_with_saes"])
def test_sae_beside_a_model_on_another_device_is_refused_in_one_line(entry, tiny_gpt2):
    """The library functions that splice an SAE into a model's forward name both devices up front
    (a model on CUDA and an SAE as it loads, on the CPU, would otherwise fail inside the forward)."""
    from saelab.evals.ablation_sparsity import AblationSparsityConfig, run_ablation_sparsity
    from saelab.evals.core import evaluate_core
    from saelab.evals.downstream import downstream_metrics
    from saelab.explore.spliced import run_with_saes
    from saelab.explore.steering import steer

    sae = TopKSAE(SAEConfig(64, 128, 8, hook_name="blocks.1.hook_resid_post")).to("meta")  # not the model's
    tokens = torch.randint(0, 1000, (2, 16))
    call = {
        "downstream_metrics": lambda: downstream_metrics(tiny_gpt2, sae, tokens, progress=False),
        "evaluate_core": lambda: evaluate_core(sae, tiny_gpt2, progress=False),
        "ablation_sparsity": lambda: run_ablation_sparsity(tiny_gpt2, sae, tokens, AblationSparsityConfig()),
        "steer": lambda: steer(tiny_gpt2, sae, 3, value=1.0),
        "run_with_saes": lambda: run_with_saes(tiny_gpt2, tokens, sae),
    }[entry]
    with pytest.raises(ConfigError, match=r"^the SAE is on meta but model tiny-gpt2 is on cpu; move it with "
                                          r"sae.to\('cpu'\)$"):
        call()


# ---- on a CUDA GPU -------------------------------------------------------------------------------------


def _aux_forms() -> list:
    takes = "aux_dense" in inspect.signature(sparse_topk_encode).parameters
    return [None, False, True] if takes else [None]


@CUDA
@pytest.mark.parametrize("chunk_rows", [5, 1024, None])
@pytest.mark.parametrize("dead", ["none", "mix", "few"])
@pytest.mark.parametrize("aux_dense", _aux_forms())
@pytest.mark.parametrize("sorted_out", [False, True])
def test_sparse_kernel_on_cuda_matches_dense_autograd(chunk_rows, dead, aux_dense, sorted_out):
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    B, n, k, k_aux = 37, 50, 6, 5
    x = torch.randn(B, 12, dtype=torch.float64, generator=g).to(dev).requires_grad_()
    b_dec = torch.randn(12, dtype=torch.float64, generator=g).to(dev).requires_grad_()
    W = torch.randn(n, 12, dtype=torch.float64, generator=g).to(dev).t().requires_grad_()  # TopKSAE's layout
    b = (0.3 * torch.randn(n, dtype=torch.float64, generator=g)).to(dev).requires_grad_()
    dead_idx = {"none": None, "mix": torch.arange(0, n, 4), "few": torch.tensor([3, 17, 40])}[dead]
    dead_idx = None if dead_idx is None else dead_idx.to(dev)
    kw = {} if aux_dense is None else {"aux_dense": aux_dense}
    out = sparse_topk_encode(x, b_dec, W, b, k, dead_idx=dead_idx, k_aux=k_aux, sorted_out=sorted_out,
                             chunk_rows=chunk_rows, **kw)
    with torch.device(dev):  # the CPU test's reference, its tensors made on the GPU
        z_ref, za_ref = _dense_reference(x, b_dec, W, b, k, dead_idx,
                                         0 if dead_idx is None else min(k_aux, dead_idx.numel()))
    z = torch.zeros(B, n, dtype=torch.float64, device=dev).scatter(-1, out.idx_BK, out.vals_BK)
    assert out.vals_BK.device.type == "cuda" and torch.allclose(z, z_ref, atol=1e-12)
    if sorted_out:
        assert (out.vals_BK[:, :-1] >= out.vals_BK[:, 1:]).all()
    proj = torch.randn(n, 3, dtype=torch.float64, generator=g).to(dev)
    loss, ref_loss = (z @ proj).pow(2).sum(), (z_ref @ proj).pow(2).sum()
    if dead_idx is not None:
        za = _densify_aux(out, n)
        assert torch.allclose(za, za_ref, atol=1e-12)
        loss, ref_loss = loss + (za @ proj).sin().sum(), ref_loss + (za_ref @ proj).sin().sum()
    grads = torch.autograd.grad(loss, (x, b_dec, W, b))
    ref_grads = torch.autograd.grad(ref_loss, (x, b_dec, W, b))
    for name, gr, rg in zip(("x", "b_dec", "W_enc", "b_enc"), grads, ref_grads):
        assert gr.device.type == "cuda" and torch.allclose(gr, rg, rtol=1e-10, atol=1e-12), name


@CUDA
@pytest.mark.parametrize("aux_dense", [False, True])
def test_the_sparse_kernels_never_wait_for_the_gpu(aux_dense):
    """The encoder with AuxK (its live and dead blocks, the grouped top-k, either AuxK form) and the
    decoders, forward and backward, only queue work: a host wait would stall the launches of the
    rest of the step (torch's sync debug mode raises at the first op that waits)."""
    from saelab.sae.kernels import decode_aux, sparse_decode

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    B, d, n, k, k_aux = 256, 32, 20480, 8, 64  # a live block of 17,480 latents: the grouped top-k
    x = torch.randn(B, d, device=dev, generator=g)
    b_dec = torch.randn(d, device=dev, generator=g).requires_grad_()
    W_enc = torch.randn(n, d, device=dev, generator=g).t().requires_grad_()
    b_enc = torch.randn(n, device=dev, generator=g).requires_grad_()
    W_dec = torch.randn(n, d, device=dev, generator=g).requires_grad_()
    dead_idx = torch.randperm(n, device=dev, generator=g)[:3000].sort().values
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        enc = sparse_topk_encode(x, b_dec, W_enc, b_enc, k, dead_idx=dead_idx, k_aux=k_aux, aux_dense=aux_dense)
        loss = sparse_decode(enc.vals_BK, enc.idx_BK, W_dec).square().sum() + decode_aux(enc, W_dec).square().sum()
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert enc.aux_dense == aux_dense and torch.isfinite(W_enc.grad).all() and W_dec.grad.abs().sum() > 0


@CUDA
@pytest.mark.parametrize("decoder_init", ["random", "data"])
def test_training_on_cuda_equals_the_cpu_run(tmp_path, decoder_init):
    # decoder_init="data": the sample's pairwise cosines stay >= 7.9e-5 away from max_cos 0.75 (checked on
    # the CPU), far beyond rounding, so both devices pick the same directions.
    cpu = _train(tmp_path, "cpu", "cpu", decoder_init=decoder_init)
    gpu = _train(tmp_path, "gpu", "cuda", decoder_init=decoder_init)
    assert {p.device for p in gpu.parameters()} == {torch.device("cuda", torch.cuda.current_device())}
    _assert_close(cpu, gpu)
    rows = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("cpu", "gpu")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
    for a, b in zip(*rows):
        assert a["nmse"] == pytest.approx(b["nmse"], rel=1e-4) and a["l0"] == pytest.approx(b["l0"], abs=0.05)
    assert any(r["auxk"] > 0 for r in rows[1])  # AuxK ran on the GPU
    assert load_sae(tmp_path / "gpu" / "sae").W_dec.device.type == "cpu"  # the saved SAE loads anywhere
    assert json.loads((tmp_path / "gpu" / "sae" / "cfg.json").read_text())["device"] == "cpu"  # as a CPU run's


@CUDA
def test_resume_on_gpu_and_across_devices(tmp_path):
    full_gpu = _train(tmp_path, "full_gpu", "cuda")
    full_cpu = _train(tmp_path, "full_cpu", "cpu")
    # Interrupted on the GPU, resumed on the GPU.
    _train(tmp_path, "gg", "cuda", stop_after_steps=5)
    state = torch.load(tmp_path / "gg" / CHECKPOINT, weights_only=True)  # CPU tensors, no map_location
    assert {t.device.type for t in _tensors(state)} == {"cpu"} and state["step"] == 5
    trainer = Trainer(_cfg(), TopKSAE(SAEConfig(D, 128, 8), init=False), 1.0, device="cuda")
    trainer.load_state_dict(state)
    assert trainer.tokens_since_fired.is_cuda and all(t.is_cuda for t in trainer.ema.values())
    assert all(t.is_cuda for s in trainer.opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    for key in ("sae", "tokens_since_fired", "ema", "optimizer"):  # restored bit for bit
        for x, y in zip(_tensors(to_cpu(trainer.state_dict()[key])), _tensors(state[key])):
            assert torch.equal(x.float(), y.float()), key
    # Resumed on the GPU: bit for bit, like a second uninterrupted GPU run (the step sums in a fixed
    # order, no atomic float adds).
    for other in (_train(tmp_path, "gg", "cuda"), _train(tmp_path, "full_gpu_again", "cuda")):
        for (name, p), q in zip(full_gpu.named_parameters(), other.parameters()):
            assert torch.equal(p.detach().cpu(), q.detach().cpu()), name
    # Started on the GPU, finished on the CPU; and the other way round.
    _train(tmp_path, "gc", "cuda", stop_after_steps=5)
    _assert_close(full_cpu, _train(tmp_path, "gc", "cpu"))
    _train(tmp_path, "cg", "cpu", stop_after_steps=7)
    _assert_close(full_gpu, _train(tmp_path, "cg", "cuda"))


def _tf32_setting() -> str:
    try:
        return torch.backends.cuda.matmul.fp32_precision
    except AttributeError:  # torch < 2.9
        return torch.get_float32_matmul_precision()


def test_tf32_block_restores_the_setting():
    from saelab.train.trainer import tf32_matmuls

    before = _tf32_setting()
    with tf32_matmuls(True):
        assert _tf32_setting() in ("tf32", "high")
    assert _tf32_setting() == before


@CUDA
def test_tf32_stays_within_tolerance_and_is_restored(tmp_path):
    data = _data()
    setting = _tf32_setting()
    fp32 = _train(tmp_path, "fp32", "cuda", data)
    tf32 = _train(tmp_path, "tf32", "cuda", data, allow_tf32=True)
    assert _tf32_setting() == setting  # the user's setting is back
    # TF32 rounds matmul inputs to 10 mantissa bits (2^-11 relative). Emulated on the CPU by perturbing
    # the data that much, it flips some top-k choices (weights move by up to 0.06) but moves this run's
    # final nMSE by < 0.5 %; 2 % leaves 4x room.
    assert _nmse(tf32, data) == pytest.approx(_nmse(fp32, data), rel=0.02)


@CUDA
def test_cache_batches_pinned_and_on_cuda_equal_the_cpu_batches(tmp_path):
    cache = write_activation_cache(iter(_data(1000).split(100)), tmp_path / "acts", meta={}, dtype="float16",
                                   shard_rows=256, progress=False)
    cpu = list(cache.batches(96, seed=3, drop_last=False))
    pinned = list(cache.batches(96, seed=3, drop_last=False, pin_memory=True))
    gpu = list(cache.batches(96, seed=3, drop_last=False, device="cuda"))
    assert len(cpu) == len(pinned) == len(gpu) == 11
    assert all(p.is_pinned() and torch.equal(p, c) for p, c in zip(pinned, cpu))
    assert all(q.is_cuda and torch.equal(q.cpu(), c) for q, c in zip(gpu, cpu))
    resumed = list(cache.batches(96, seed=3, drop_last=False, device="cuda", start_batch=4))
    assert all(torch.equal(q.cpu(), c) for q, c in zip(resumed, cpu[4:]))


@CUDA
def test_harvest_from_a_gpu_model_writes_the_cpu_cache(tmp_path, tiny_gpt2, data_dir):
    from saelab.models import LanguageModel

    hook = "blocks.1.hook_resid_post"
    contexts = token_contexts(data_dir / "wiki-en" / "wiki_eval.jsonl.xz", tiny_gpt2.tokenize, 33, n_contexts=40,
                              bos_token_id=tiny_gpt2.bos_token_id)
    gpu_lm = LanguageModel(copy.deepcopy(tiny_gpt2.model).to("cuda"), tiny_gpt2.tokenizer, "tiny-gpt2")
    caches = {}
    for name, lm in (("cpu", tiny_gpt2), ("gpu", gpu_lm)):
        stream = ActivationStream(lm, hook, contexts, batch_size=128, buffer_tokens=512, progress=False)
        caches[name] = write_activation_cache(stream, tmp_path / name, meta={"hook_name": hook}, dtype="float32",
                                              progress=False)
    a, b = ActivationCache(tmp_path / "cpu").read(), ActivationCache(tmp_path / "gpu").read()
    assert a.shape == b.shape == (40 * 32, 64) and b.device.type == "cpu"
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)  # same rows in the same (shuffled) order



@CUDA
@pytest.mark.parametrize("buffer_tokens", [512, 0, 2048])
def test_a_gpu_harvest_resumed_after_ctrl_c_writes_the_uninterrupted_shards(tmp_path, tiny_gpt2, data_dir,
                                                                           monkeypatch, buffer_tokens):
    """The stream's state saved at a Ctrl-C holds the GPU's shuffle buffer (copied to the host) and goes back
    to the GPU on the resume: the same shards as an uninterrupted GPU harvest, each context run once. 2048: the
    buffer (of 1,280 rows in all) never fills, so the Ctrl-C comes before any row was written."""
    from saelab.models import LanguageModel
    from test_data import shard_bytes

    hook = "blocks.1.hook_resid_post"
    contexts = token_contexts(data_dir / "wiki-en" / "wiki_eval.jsonl.xz", tiny_gpt2.tokenize, 33, n_contexts=40,
                              bos_token_id=tiny_gpt2.bos_token_id)
    gpu_lm = LanguageModel(copy.deepcopy(tiny_gpt2.model).to("cuda"), tiny_gpt2.tokenizer, "tiny-gpt2")
    forward, calls = gpu_lm.activations, []

    def harvest(folder, stop_at=0):
        def counted(tokens_BT, h):  # the real forward, counted; a Ctrl-C on call stop_at
            if len(calls) + 1 == stop_at:
                raise KeyboardInterrupt
            calls.append(tokens_BT.shape[0])
            return forward(tokens_BT, h)

        monkeypatch.setattr(gpu_lm, "activations", counted)
        stream = ActivationStream(gpu_lm, hook, contexts, batch_size=64, lm_batch_size=4,
                                  buffer_tokens=buffer_tokens, progress=False)
        write_activation_cache(stream, folder, meta={"hook_name": hook}, dtype="float32", shard_rows=128,
                               resume=True, progress=False)

    harvest(tmp_path / "ref")
    assert sum(calls) == 40
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        harvest(tmp_path / "c", stop_at=7)
    assert (tmp_path / "c" / "stream_state.safetensors").is_file()
    harvest(tmp_path / "c")
    assert sum(calls) == 40  # the resume ran the model only over the contexts not read before
    assert shard_bytes(tmp_path / "c") == shard_bytes(tmp_path / "ref")

@CUDA
@CUDA
def test_training_on_a_gpu_reads_the_cache_as_stored_into_page_locked_memory(tmp_path):
    """float16 rows travel as they are (half the bytes), assembled pinned (no second copy on the host)."""
    from saelab.pipeline import _cache_batches

    cache = write_activation_cache(iter(_data(512).split(128)), tmp_path / "acts", meta={}, dtype="float16",
                                   progress=False)
    x = next(_cache_batches(cache, _cfg(batch_size=64), "cuda")(0))
    assert x.dtype == torch.float16 and x.is_pinned() and x.device.type == "cpu"
    x = next(_cache_batches(cache, _cfg(batch_size=64), "cpu")(0))
    assert x.dtype == torch.float32 and not x.is_pinned()


@TWO_GPUS
def test_an_sae_on_the_second_gpu_is_refused_beside_a_model_on_the_first():
    """``cuda`` names the current GPU (cuda:0 here), as torch places a tensor sent there: not cuda:1."""
    from saelab.utils.device import same_device

    sae = TopKSAE(SAEConfig(D, 128, 8)).to("cuda:1")
    assert same_device("cuda", "cuda:0") and not same_device("cuda", "cuda:1")
    with pytest.raises(ConfigError, match=r"the SAE is on cuda:1 but the model is on cuda"):
        sae.check_device(torch.device("cuda"), "the model")


@TWO_GPUS
def test_two_gpu_training_equals_one_gpu(tmp_path, tiny_gpt2, data_dir):
    from test_distributed import TRAIN_ARGS, _cache, _run

    cache = _cache(tmp_path, tiny_gpt2, data_dir)
    _run([sys.executable, "-m", "saelab", "train", "--activations", str(cache), "--out", str(tmp_path / "single"),
          "--device", "cuda", *TRAIN_ARGS], gpus=True)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29518",
          "-m", "saelab", "train", "--activations", str(cache), "--out", str(tmp_path / "ddp"), "--device", "cuda",
          *TRAIN_ARGS], gpus=True)
    single, ddp = load_sae(tmp_path / "single" / "sae"), load_sae(tmp_path / "ddp" / "sae")
    _assert_close(single, ddp)  # same global batches; NCCL and cuBLAS change only the summation order
    log = (tmp_path / "ddp" / "metrics.jsonl").read_text()
    assert '"auxk": 0.0,' not in log.splitlines()[-1]
