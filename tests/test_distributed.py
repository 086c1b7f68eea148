"""Data-parallel training (torchrun, gloo, 2 CPU processes) equals single-process training (the NCCL
version on 2 GPUs is in tests/test_cuda.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saelab.data import ActivationStream, token_contexts, write_activation_cache
from saelab.sae import load_sae
from saelab.utils.folder_lock import LOCK, RunLock

TRAIN_ARGS = ["--n-latents", "128", "--k", "8", "--batch-size", "256", "--total-tokens", "4096", "--init-rows", "1024",
              "--lr", "0.01", "--warmup-steps", "2", "--dead-tokens", "512", "--k-aux", "16", "--checkpoint-every", "8",
              "--log-every", "4", "--no-progress"]


def _cache(tmp_path: Path, tiny_gpt2, data_dir, model_name: str = "tiny-gpt2") -> Path:
    tokens = token_contexts(data_dir / "wiki-en" / "wiki_eval.jsonl.xz", tiny_gpt2.tokenize, 33,
                            n_contexts=140, bos_token_id=tiny_gpt2.bos_token_id)
    stream = ActivationStream(tiny_gpt2, "blocks.1.hook_resid_post", tokens, batch_size=256, buffer_tokens=1024,
                              progress=False)
    meta = {"model_name": model_name, "hook_name": "blocks.1.hook_resid_post", "context_size": 33}
    write_activation_cache(stream, tmp_path / "acts", meta=meta, dtype="float32", progress=False)
    return tmp_path / "acts"


def _run(cmd: list[str], *, gpus: bool = False, returncode: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not gpus:  # the CPU test stays on gloo and the CPU on a GPU machine too
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == (returncode == 0), proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # ~18 s on 2 cores: two processes and a reference run; .ci/run runs the slow tests
def test_two_process_training_equals_single_process(tmp_path, tiny_gpt2, data_dir):
    cache = _cache(tmp_path, tiny_gpt2, data_dir)
    _run([sys.executable, "-m", "saelab", "train", "--activations", str(cache), "--out", str(tmp_path / "single"),
          *TRAIN_ARGS])
    ddp_run = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29517",
                    "-m", "saelab", "train", "--activations", str(cache), "--out", str(tmp_path / "ddp"), *TRAIN_ARGS])
    assert ddp_run.stdout.count('"n_latents"') == 1  # the result printed once, not once per process
    single, ddp = load_sae(tmp_path / "single" / "sae"), load_sae(tmp_path / "ddp" / "sae")
    for (name, a), b in zip(single.named_parameters(), ddp.parameters()):
        # Same global batches; only the order of float summation differs between the two.
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (name, (a - b).abs().max().item())
    # AuxK was active (dead window of 2 steps), so its reductions are covered too.
    log = (tmp_path / "ddp" / "metrics.jsonl").read_text()
    assert '"auxk": 0.0,' not in log.splitlines()[-1]


def test_batch_that_does_not_split_is_refused_before_the_run_folder(tmp_path, tiny_gpt2, data_dir):
    cache = _cache(tmp_path, tiny_gpt2, data_dir)
    args = [a if a != "256" else "255" for a in TRAIN_ARGS]  # --batch-size 255 over 2 processes
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29518",
                 "-m", "saelab", "train", "--activations", str(cache), "--out", str(tmp_path / "odd"), *args],
                returncode=1)
    assert "saelab train: error: --batch-size 255 does not split evenly over 2 processes" in proc.stderr
    assert not (tmp_path / "odd").exists()


@pytest.mark.slow  # ~20 s on 2 cores; .ci/run runs the slow tests
def test_sweep_evaluates_once_under_torchrun(tmp_path, tiny_gpt2, tiny_dir, data_dir):
    """sweep --eval under torchrun: the processes train together, then one of them evaluates."""
    cache = _cache(tmp_path, tiny_gpt2, data_dir, model_name=str(tiny_dir))  # the model evaluation loads
    args = [a for a in TRAIN_ARGS if a not in ("--n-latents", "128")]
    ev = ["--eval", "--eval-corpus", str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"),
          "--eval-recon-tokens", "512", "--eval-downstream-tokens", "128"]
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29519",
                 "-m", "saelab", "sweep", "--activations", str(cache), "--out", str(tmp_path / "sweep"),
                 "--grid", "n_latents=64,128", *args, *ev])
    assert proc.stdout.count('"n64"') == 1
    for run in ("n64", "n128"):
        assert (tmp_path / "sweep" / run / "metrics.json").is_file()
    assert (tmp_path / "sweep" / "scaling.md").is_file()


@pytest.mark.slow  # ~15 s on 2 cores: 20,000 files; .ci/run runs the slow tests
def test_a_killed_overwrite_is_put_back_before_any_process_reads_the_run(tmp_path, tiny_gpt2, data_dir):
    """The same train under torchrun after an overwrite of its run was killed: rank 0 puts the earlier run back
    while the others wait, so every process finds that finished run (one that read the killed overwrite's
    partial files would train alone, waiting for the others)."""
    from test_run_lock import _kill_mid_overwrite, snapshot

    cache, run = _cache(tmp_path, tiny_gpt2, data_dir), tmp_path / "run"
    train = ["-m", "saelab", "train", "--activations", str(cache), "--out", str(run), *TRAIN_ARGS]
    _run([sys.executable, *train])
    before = snapshot(run)
    _kill_mid_overwrite(run)
    logs = run / "tensorboard"  # the killed overwrite's many files: rank 0 takes a while to remove them
    logs.mkdir()
    for i in range(20000):
        (logs / f"events.{i}").touch()
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29521", *train])
    assert "an overwrite of this run was cut off; its earlier results are back in place" in proc.stderr
    assert f"{run} already holds this finished run" in proc.stderr
    assert snapshot(run) == before


OWN_ROWS = """
import sys
import torch, torch.distributed as dist
from saelab.data import ActivationCache
from saelab.pipeline import train_from_cache
from saelab.train import TrainConfig
from saelab.train.distributed import init_from_env
from saelab.train.trainer import TrainingRun

init_from_env()
cache, out = ActivationCache(sys.argv[1]), sys.argv[2]
seen, step = [], TrainingRun.train_step


def seen_step(run, x):  # the real step, its input kept
    seen.append(x.clone())
    return step(run, x)


TrainingRun.train_step = seen_step
cfg = TrainConfig(n_latents=128, k=8, batch_size=256, total_tokens=2048, init_rows=1024, lr=0.01, seed=3)
train_from_cache(cache, out, cfg, device="cpu", progress=False)
r = dist.get_rank()
whole = list(cache.batches(256, seed=3))[:len(seen)]  # the global batches, read in one process
own = [tuple(x.shape) == (128, cache.d) and torch.equal(x, w[r * 128:(r + 1) * 128]) for x, w in zip(seen, whole)]
with open(f"{sys.argv[3]}/rank{r}.txt", "w") as f:
    f.write(f"{len(seen)} steps; rows {sorted({x.shape[0] for x in seen})}; own rows {sum(own)}")
"""


def test_each_process_reads_and_trains_on_its_own_rows_alone(tmp_path, tiny_gpt2, data_dir):
    """Trained from a cache, each process is handed only its rows of every global batch (the half ddp.local_rows
    takes), as read from the cache: on a GPU only they are pinned and copied there. It used to get the whole batch."""
    cache = _cache(tmp_path, tiny_gpt2, data_dir)
    script = tmp_path / "own_rows.py"
    script.write_text(OWN_ROWS)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29523", str(script),
          str(cache), str(tmp_path / "run"), str(tmp_path)])
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.txt").read_text() == "8 steps; rows [128]; own rows 8", r


def test_the_gpu_of_a_process_without_local_rank_is_its_rank_modulo_the_gpus():
    """A group started without LOCAL_RANK (torch.multiprocessing.spawn) used to put every process on GPU 0."""
    from saelab.errors import ConfigError
    from saelab.train.distributed import gpu_index

    assert gpu_index({"LOCAL_RANK": "1"}, 5, 4) == 1  # torchrun's LOCAL_RANK wins
    assert [gpu_index({}, rank, 4) for rank in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]  # 2 machines x 4 GPUs
    assert gpu_index({"RANK": "3"}, 3, 1) == 0  # one GPU visible to each process
    with pytest.raises(ConfigError, match=r"^LOCAL_RANK='x' is not a whole number; expected this process's index on "
                                          r"its machine, as torchrun sets it$"):
        gpu_index({"LOCAL_RANK": "x"}, 0, 2)



def test_a_rank_or_world_size_that_is_no_number_is_named(monkeypatch, tmp_path, capsys):
    """RANK=x or WORLD_SIZE=two (a launcher script's typo) ended in int()'s traceback; now one line naming it."""
    from saelab.cli import main
    from saelab.errors import ConfigError
    from saelab.train.distributed import init_from_env, own_gpu

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match=r"^RANK='x' is not a whole number; expected this process's rank"):
        own_gpu()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match=r"^WORLD_SIZE='two' is not a whole number; expected the number of"):
        init_from_env()
    assert main(["train", "--activations", str(tmp_path / "none"), "--out", str(tmp_path / "run")]) == 2
    assert "error: WORLD_SIZE='two' is not a whole number" in capsys.readouterr().err
    # With a group to join, on a machine without CUDA too: torch's rendezvous read RANK with a bare int()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--activations", str(tmp_path / "none"), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("saelab train: error: RANK='x' is not a whole number; expected this process's "
                                       "rank, as torchrun sets it\n")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "y")
    with pytest.raises(ConfigError, match=r"^LOCAL_RANK='y' is not a whole number; expected this process's index"):
        init_from_env()

NON_FINITE_ON_RANK_1 = """
import sys
import torch, torch.distributed as dist
from saelab.errors import NonFiniteError
from saelab.train.distributed import init_from_env
from saelab.sae.topk import SAEConfig, TopKSAE
from saelab.train import TrainConfig
from saelab.train.trainer import Trainer

init_from_env()  # saelab's own joining and leaving of the group, as under `saelab train`
data = torch.randn(256, 24, generator=torch.Generator().manual_seed(0))
sae = TopKSAE(SAEConfig(24, 128, 8))
sae.reset_parameters(torch.Generator().manual_seed(0))
trainer = Trainer(TrainConfig(n_latents=128, k=8, batch_size=128, total_tokens=256, lr=1e-2), sae, normalizer=9.0,
                  device="cpu")
trainer.train_step(data[:128])
if dist.get_rank() == 1:  # only this process's half of the batch gives an infinite loss
    with torch.no_grad():
        sae.W_dec[:, 0] = float("inf")
try:
    trainer.train_step(data[128:])
    outcome = "trained on"
except NonFiniteError as e:
    outcome = str(e)
with open(f"{sys.argv[1]}/rank{dist.get_rank()}.txt", "w") as f:  # one file each: the two stdouts interleave
    f.write(outcome)
"""


def test_a_non_finite_loss_in_one_process_stops_every_process(tmp_path):
    """The non-finite check reads the loss averaged over the processes: all of them stop at that step
    (one stopping alone would leave the others waiting in the gradient all-reduce)."""
    script = tmp_path / "non_finite.py"
    script.write_text(NON_FINITE_ON_RANK_1)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29520", str(script),
          str(tmp_path)])
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.txt").read_text() == "training loss became inf at step 1", r


OWN_GROUP = """
import sys
import torch, torch.distributed as dist
from saelab.data import ActivationCache
from saelab.train import TrainConfig, train_sae

backend, cache, out = sys.argv[1:]
dist.init_process_group(backend)  # the caller's own group, no set_device: NCCL alone carries no CPU tensor
acts = ActivationCache(cache)
cfg = TrainConfig(n_latents=128, k=8, batch_size=256, total_tokens=2048, init_rows=1024, lr=0.01, dead_tokens=512,
                  k_aux=16)
train_sae(cfg, lambda start: acts.batches(256, shuffle=True, start_batch=start), out, d_in=acts.d, progress=False,
          device="cuda" if backend == "nccl" else "cpu")
dist.destroy_process_group()
"""


@pytest.mark.slow  # ~20 s on 2 cores; .ci/run runs the slow tests
@pytest.mark.parametrize("backend", [
    "gloo", pytest.param("nccl", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"))])
def test_training_in_a_group_the_caller_started(backend, tmp_path, tiny_gpt2, data_dir):
    """A library user's own process group, NCCL alone included: saelab's waits use tensors the group carries."""
    cache = _cache(tmp_path, tiny_gpt2, data_dir)
    script = tmp_path / "own_group.py"
    script.write_text(OWN_GROUP)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29521", str(script),
          backend, str(cache), str(tmp_path / "run")], gpus=backend == "nccl")
    assert load_sae(tmp_path / "run" / "sae").cfg.n_latents == 128


@pytest.mark.slow  # ~20 s on 2 cores; .ci/run runs the slow tests
def test_a_refusal_in_one_process_ends_every_process_at_once(tmp_path, tiny_gpt2, data_dir):
    """Rank 0 alone takes the run folder's lock; where another saelab holds it, rank 0 refuses while rank 1
    waits for it. Rank 0 used to wait 60 s at exit for rank 1, which then printed gloo's traceback."""
    cache = _cache(tmp_path, tiny_gpt2, data_dir)
    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(run).acquire()  # another saelab writing this folder
    try:
        proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29522",
                     "-m", "saelab", "train", "--activations", str(cache), "--out", str(run), *TRAIN_ARGS],
                    returncode=1)
    finally:
        lock.release()
    assert f"saelab train: error: run folder {run} is being written by another process" in proc.stderr
    assert re.search(r"saelab train: error: process 1 of 2: another process of this run stopped \(its error says "
                     r"why\); the wait for it ended in: [^\n]+\n", proc.stderr), proc.stderr[-3000:]
    assert "monitoredBarrier" not in proc.stderr  # rank 0 left at once
    assert "[rank1]: Traceback" not in proc.stderr
    assert [p.name for p in run.iterdir()] == [LOCK]  # the folder as the other saelab has it
