"""The training loop: paper recipe, dead-latent tracking, checkpoints, resume, progress.

Data arrives through ``batches_from(start_batch)``, a function returning an iterator of
[batch_size, d_in] activation batches beginning at batch ``start_batch``. An on-disk
activation cache provides this exactly, which is what makes an interrupted run resume to the
same result it would have reached without the interruption. Under data parallelism each process
trains on its own rows of every batch (``ddp.local_rows``); a source that can read those rows alone
(``own_rows_from``: ActivationCache.batches with ``part``) spares each process the rest.

``train_sae`` trains one SAE; ``train_many`` trains several (a sweep) from one pass over the
data, each in its own run folder. Under torchrun both are data-parallel (train/distributed.py).

Devices: ``device`` (None: CUDA when available, else the CPU) holds the SAE, the optimizer state,
the dead-latent counters, the EMA and the batches. On a GPU, batches are read one or two ahead on
a background thread and pinned, so their copy to the GPU is asynchronous and the cache reads
overlap training. Checkpoints hold CPU tensors, so a run resumes on any device.
"""

from __future__ import annotations

import json
import math
import queue
import signal
import sys
import threading
import time
import contextlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from saelab.errors import (ConfigError, CorpusError, NonFiniteActivationsError, NonFiniteError, ShapeMismatchError,
                           first_line)
from saelab.run_folder import SAE_DIR
from saelab.sae.relu import sae_class
from saelab.sae.topk import SAEConfig, TopKSAE
from saelab.train import checkpoint as ckpt
from saelab.train import distributed as ddp
from saelab.train.config import TrainConfig, check_warmup
from saelab.train.init import init_from_data
from saelab.train.metric_sinks import MetricSink, check_log_targets, close_sinks, open_sinks
from saelab.train.losses import training_loss
from saelab.utils.atomic import append_line
from saelab.utils.folder_lock import RunLock, remove_stale_temp_files
from saelab.utils.host_memory import hold_freed_memory, release_freed_memory
from saelab.utils.torch_files import shown_loaded
from saelab.utils.tensors import all_finite

BatchSource = Callable[[int], Iterator[torch.Tensor]]
INACTIVE_WINDOW = 262_144
"""Tokens after which a latent that has not fired is reported as inactive in the metrics log
(a short-run companion to the dead window that AuxK uses)."""
FUSED_ADAM_DEVICES = ("cpu", "cuda")
"""Device types with a fused Adam kernel (one kernel per parameter: ~9x faster than the per-op
update on CPU); elsewhere Adam runs its default implementation."""
EMA_FORMAT = "zero-start, bias-corrected"
"""How the checkpoint's EMA was kept (an EMA started at the initial weights, as before, is refused)."""


@contextmanager
def _interrupt_between_steps():
    """Ctrl-C (SIGINT) and `kill` (SIGTERM) stop training between two steps, never inside one, so
    the checkpoint written on the way out holds a whole step. A second Ctrl-C stops at once.
    Yields a one-item list that is non-empty once a stop was asked for."""
    asked: list[int] = []

    def handler(signum, frame):
        if asked and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"signal {signum}")
        asked.append(signum)

    try:
        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals stay as they are
        yield asked
        return
    try:
        yield asked
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextmanager
def prefetched(batches: Iterator[torch.Tensor], device: torch.device, depth: int = 2):
    """``batches`` read ``depth`` ahead on a background thread, in the same order; CPU batches
    are pinned there when ``device`` is CUDA, so the trainer's copy to the GPU is asynchronous.
    On the CPU the iterator is used as it is (its cores are busy training). An error raised while
    reading is raised again in the consumer."""
    if device.type == "cpu":
        yield batches
        return
    pin = device.type == "cuda"
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def offer(item) -> bool:  # False once the consumer has gone
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in batches:
                if pin and x.device.type == "cpu" and not x.is_pinned():
                    x = x.pin_memory()
                if not offer((x, None)):
                    return
            offer((end, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            offer((end, e))
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def consume() -> Iterator[torch.Tensor]:
        while True:
            x, err = slots.get()
            if x is end:
                if err is not None:
                    raise err
                return
            yield x

    worker = threading.Thread(target=produce, name="saelab-prefetch", daemon=True)
    worker.start()
    try:
        yield consume()
    finally:
        stop.set()
        worker.join(timeout=30)


@contextmanager
def tf32_matmuls(tf32: bool):
    """float32 matmuls in TF32 (10-bit mantissa, tensor cores) inside the block, as asked."""
    if not tf32:
        yield
        return
    cublas = torch.backends.cuda.matmul
    try:  # the per-backend setting (torch >= 2.9): readable whichever API the user set TF32 with
        old = cublas.fp32_precision
    except AttributeError:
        old = None
    if old is None:
        old_global = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
    else:
        cublas.fp32_precision = "tf32"
    try:
        yield
    finally:
        if old is None:
            torch.set_float32_matmul_precision(old_global)
        else:
            cublas.fp32_precision = old


def _check_batch_shape(x: torch.Tensor, d_in: int, what: str) -> None:
    if x.ndim != 2 or x.shape[1] != d_in:
        raise ShapeMismatchError(f"{what} has shape {tuple(x.shape)}; expected [rows, d_in={d_in}]")


def _check_batch(x: torch.Tensor, d_in: int, what: str) -> None:
    _check_batch_shape(x, d_in, what)
    if not all_finite(x):
        raise NonFiniteActivationsError(f"{what} contains NaN or inf activations")


def _non_finite_rows(x_bD: torch.Tensor) -> bool:
    """Whether some process's rows (``x_bD``: this process's) hold a NaN or inf (asked once their sum was not
    finite: finite values can overflow it), decided for every process at once."""
    bad = (~torch.isfinite(x_bD)).any().to(torch.float32).reshape(1)
    return bool(ddp.all_reduce_sum(bad).item() > 0)


def own_rows(batches: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """This process's rows of each batch (``ddp.local_rows``), cut before the prefetch pins and copies them."""
    try:
        for x in batches:
            yield ddp.local_rows(x)
    finally:
        close = getattr(batches, "close", None)  # a cache's reader lets go of its chunk now
        if close is not None:
            close()


def take_rows(batches: Iterator[torch.Tensor], n_rows: int, d_in: int) -> torch.Tensor:
    """The first n_rows rows of a batch iterator (the initialisation sample)."""
    rows, got = [], 0
    for b in batches:
        _check_batch(b, d_in, "initialisation batch")
        rows.append(b.float())
        got += b.shape[0]
        if got >= n_rows:
            break
    if not rows:
        raise CorpusError("the activation source yielded no rows; is the corpus empty?")
    return torch.cat(rows)[:n_rows]


def _stored_transposed(p: torch.Tensor) -> bool:
    return p.dim() == 2 and p.shape[0] != p.shape[1] and not p.is_contiguous() and p.t().is_contiguous()


class Trainer:
    """Optimizer state, dead-latent tracking, the EMA and the optimizer step of one SAE.

    ``device`` (None: CUDA when available, else the CPU; under torchrun this process's GPU) is
    where the SAE is moved and where every training tensor lives. ``allow_tf32`` runs the SAE's
    float32 matmuls in TF32 on CUDA (ignored elsewhere); False leaves torch's own setting as it is:
    full float32 unless the calling program turned TF32 on (``torch.set_float32_matmul_precision``).
    """

    def __init__(self, cfg: TrainConfig, sae: TopKSAE, normalizer: float, *,
                 device: str | torch.device | None = None, allow_tf32: bool = False):
        self.cfg = cfg
        self.device = ddp.process_device(device)
        self.allow_tf32 = bool(allow_tf32) and self.device.type == "cuda"
        self.sae = sae.to(self.device)  # before the optimizer views below, which share its storage
        self.normalizer = normalizer
        # (parameter, the tensor the optimizer updates): a matrix stored transposed (W_enc is
        # latent-major) goes to Adam as its contiguous transpose, a view of the same storage, since
        # fused Adam copies a non-contiguous parameter and its states on every step.
        self._opt_params = [(p, nn.Parameter(p.detach().t()) if _stored_transposed(p) else p)
                            for p in sae.parameters()]
        self.opt = torch.optim.Adam(
            [v for _, v in self._opt_params], lr=cfg.effective_lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps, fused=self.device.type in FUSED_ADAM_DEVICES,
        )
        self.step = 0
        self.tokens_since_fired = torch.zeros(sae.n_latents, dtype=torch.long, device=self.device)
        self.revivals = torch.zeros((), dtype=torch.long, device=self.device)  # a tensor: no sync per step
        # The EMA starts at zero and is divided by 1 - decay^step when used (Adam's bias correction,
        # as OpenAI's EmaModel does): an average of the trained weights only, none of the init.
        self.ema = {n: torch.zeros_like(p) for n, p in sae.named_parameters()} if cfg.ema_decay else None

    def state_dict(self) -> dict[str, Any]:
        """The training state; its tensors stay on the device (save_checkpoint moves them to the CPU)."""
        return {"step": self.step, "sae": self.sae.state_dict(), "optimizer": self.opt.state_dict(),
                "tokens_since_fired": self.tokens_since_fired, "revivals": self.revivals,
                "normalizer": self.normalizer, "ema": self.ema,
                "ema_format": EMA_FORMAT if self.ema is not None else None,
                "sae_config": json.dumps(self.sae.cfg.to_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a training state written on any device (tensors are moved to this trainer's)."""
        self.step = int(state["step"])
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["optimizer"])  # Adam moves its moments to each parameter's device
        for _, v in self._opt_params:  # Adam itself would only fail, obscurely, at the next step
            for key, t in self.opt.state.get(v, {}).items():
                if torch.is_tensor(t) and t.dim() and t.shape != v.shape:
                    raise ValueError(f"optimizer state {shown_loaded(key)} has shape {tuple(t.shape)}, its parameter "
                                     f"{tuple(v.shape)}")
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device, torch.long)
        if "revivals" in state:  # absent from checkpoints of older versions
            self.revivals = torch.as_tensor(state["revivals"]).to(self.device, torch.long).reshape(())
        self.normalizer = float(state["normalizer"])
        self.ema = self._ema_from(state)

    def _ema_from(self, state: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        ema = state["ema"]
        if (ema is None) != (self.cfg.ema_decay is None):
            raise ValueError(f"the checkpoint {'has no' if ema is None else 'has an'} EMA of the weights, "
                             f"this run's ema_decay is {self.cfg.ema_decay}")
        if ema is None:
            return None
        if state.get("ema_format") != EMA_FORMAT:
            raise ValueError("its EMA of the weights was kept by an older saelab (started at the initial "
                             "weights, without bias correction)")
        out = {}
        for name, p in self.sae.named_parameters():
            if tuple(ema[name].shape) != tuple(p.shape):
                raise ValueError(f"EMA {name} has shape {tuple(ema[name].shape)}, the SAE {tuple(p.shape)}")
            out[name] = torch.empty_like(p).copy_(ema[name])  # the parameter's device, dtype and strides
        return out

    def train_step(self, x_BD: torch.Tensor) -> dict[str, float]:
        """One step on a global batch (each process uses its own slice when data-parallel)."""
        return self.train_own_rows(ddp.local_rows(x_BD))

    def train_own_rows(self, x_bD: torch.Tensor) -> dict[str, float]:
        """One step on this process's rows of a global batch (``ddp.local_rows``'s slice; in one process, the
        whole batch)."""
        x_bD = x_bD.to(self.device, non_blocking=True)
        with tf32_matmuls(self.allow_tf32):
            out, stats = self._forward_backward(x_bD)
            self._update()
        fired = ddp.all_reduce_sum(self.sae.fired(out.vals_BK, out.idx_BK)) > 0
        # A revival: a latent dead at this step's start (the set AuxK trained) fires again. The AuxK loss
        # alone cannot show revivals: a latent leaves the dead set, and that loss, once it fires.
        self.revivals += (fired & (self.tokens_since_fired >= self.cfg.effective_dead_tokens)).sum()
        self.tokens_since_fired += x_bD.shape[0] * ddp.world_size()  # the global batch's rows: equal shares
        self.tokens_since_fired[fired] = 0
        self.step += 1
        return stats

    def _forward_backward(self, x_bD: torch.Tensor):
        """The loss's gradients on this process's rows ``x_bD`` in the SAE's .grad, and the step's statistics
        as floats (averaged over the processes when data-parallel), read after the backward. On a GPU a step
        waits for the device twice: for the dead set's size (the encoder's blocks are sized by it) and here."""
        cfg, sae = self.cfg, self.sae
        dead = self.tokens_since_fired >= cfg.effective_dead_tokens if cfg.auxk else None
        out = training_loss(sae, x_bD, cfg, self.normalizer, dead, step=self.step)
        sae.zero_grad(set_to_none=True)
        out.loss.backward()
        ddp.average_gradients(sae.parameters())
        named = out.stats()
        # The batch's sum rides on the statistics' one read-back: a check of its own would make the GPU wait
        # before the forward, for the last step's update too.
        named["batch_sum"] = x_bD.detach().sum(dtype=torch.float32)
        values = torch.stack(list(named.values()))
        if ddp.is_distributed():
            values = ddp.all_reduce_sum(values.double()) / ddp.world_size()
        stats = dict(zip(named, values.tolist()))
        # Checked before any weight moves; the average over processes, so that every process stops.
        if not math.isfinite(stats.pop("batch_sum")) and _non_finite_rows(x_bD):
            raise NonFiniteActivationsError(f"activation batch {self.step} contains NaN or inf activations")
        if not math.isfinite(stats["loss"]):
            raise NonFiniteError(f"training loss became {stats['loss']} at step {self.step}")
        return out, stats

    def _update(self) -> None:
        """Adam step at this step's learning rate, decoder constraints, EMA."""
        cfg, sae = self.cfg, self.sae
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        if cfg.project_decoder_grad:
            sae.project_decoder_grad()
        for p, v in self._opt_params:
            if v is not p:
                v.grad = None if p.grad is None else p.grad.t().contiguous()
        self.opt.step()
        if cfg.unit_norm_decoder:
            sae.normalize_decoder()
        if self.ema is not None:
            with torch.no_grad():
                for name, p in sae.named_parameters():
                    self.ema[name].lerp_(p.detach(), 1 - cfg.ema_decay)

    def gradients(self, x_BD: torch.Tensor) -> None:
        """The loss's gradients on a batch into the SAE's .grad, without a step (for diagnostics)."""
        with tf32_matmuls(self.allow_tf32):
            self._forward_backward(ddp.local_rows(x_BD).to(self.device))

    def second_moment(self, param: torch.Tensor) -> torch.Tensor | None:
        """Adam's bias-corrected second moment of ``param``, in its layout (None before any step)."""
        for p, view in self._opt_params:
            if p is param and "exp_avg_sq" in self.opt.state.get(view, {}):
                v = self.opt.state[view]["exp_avg_sq"]
                return (v if view is p else v.t()) / (1 - self.cfg.adam_beta2 ** self.step)
        return None

    def dead_fraction(self, window: int) -> float:
        return (self.tokens_since_fired >= window).float().mean().item()

    def ema_weights(self) -> dict[str, torch.Tensor] | None:
        """The bias-corrected EMA: sum_s w_s decay^(t-s) (1 - decay) / (1 - decay^t) over the t steps
        done, a weighted average of the trained weights (None when EMA is off or no step was done)."""
        if self.ema is None or self.step == 0:
            return None
        correction = 1 - self.cfg.ema_decay ** self.step
        return {name: t / correction for name, t in self.ema.items()}

    def final_sae(self) -> TopKSAE:
        """The trained SAE, or its EMA when EMA is on (the EMA is what the paper evaluates), on the
        training device."""
        weights = self.ema_weights()
        if weights is None:
            self.sae.zero_grad(set_to_none=True)  # the last step's: as large as the weights
            return self.sae
        out = type(self.sae)(self.sae.cfg, init=False, dtype=self.sae.W_dec.dtype, device=self.device)
        out.load_state_dict(weights)
        if self.cfg.unit_norm_decoder:
            out.normalize_decoder()
        return out


class TrainingRun:
    """One SAE training into its run folder: lock, init or resume, log, checkpoint, finish.

    The writing process (rank 0) holds the run folder's lock from here until :meth:`close` (a
    second writer is refused, naming this pid) and removes temporary files killed runs left. On the
    CPU, glibc's malloc keeps freed memory for reuse until then (saelab.utils.host_memory: each step's
    large temporaries reuse the last step's pages; ``SAELAB_RETAIN_FREED_MEMORY=0`` opts out).
    ``train_config.json`` is written only once initialisation or resumption succeeded.
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, d_in: int, meta: dict[str, Any] | None,
                 init_sample: Callable[[], torch.Tensor], overwrite: bool = False,
                 device: str | torch.device | None = None, allow_tf32: bool = False,
                 log_to: Sequence[str] = (), log_group: str | None = None, data: dict[str, Any] | None = None):
        self.cfg, self.run_dir, self.d_in = cfg, Path(run_dir), d_in
        self.sinks: list[MetricSink] = []  # TensorBoard / W&B (metric_sinks), fed the rows of metrics.jsonl
        self.writer = ddp.rank() == 0  # one process writes files
        self.device = ddp.process_device(device)  # a bad device is refused before the folder is touched
        sae_cfg = _sae_config(cfg, d_in, meta)
        config = {"train": cfg.to_dict(), "sae": sae_cfg.to_dict(), **({"data": data} if data else {})}
        self._lock = RunLock(self.run_dir).acquire() if self.writer else None
        self._holds_memory = self.device.type == "cpu"
        if self._holds_memory:
            hold_freed_memory()
        try:
            if self.writer:
                ckpt.settle_cut_off_replacement(self.run_dir)
                remove_stale_temp_files(self.run_dir, self.run_dir / SAE_DIR)
            ddp.wait_for_every_rank()  # the others read the folder as rank 0 left it: one decision to resume
            # seconds earlier calls spent up to the checkpoint resumed from, so train_seconds is the run's total
            self.seconds_before = 0.0
            if ckpt.check_run_dir(self.run_dir, config, overwrite=overwrite):
                self.seconds_before = ckpt.recorded_train_seconds(ckpt.read_status(self.run_dir))
                self.trainer = self._resume(sae_cfg, allow_tf32)
            else:
                self.trainer = self._start(sae_cfg, init_sample, allow_tf32)
            if self.writer:
                ckpt.commit_run_dir(self.run_dir, config, overwrite=overwrite)
                ckpt.truncate_metrics(self.run_dir, self.trainer.step)
                self.sinks = open_sinks(log_to, self.run_dir, self.trainer.step, cfg.to_dict(), log_group)
        except BaseException:
            self.close(failed=True)
            raise
        self.t0, self.steps_this_call = time.perf_counter(), 0
        self.saved_step = self.trainer.step  # the step a rerun resumes from (0: none saved yet)
        self.saved_seconds = self.seconds_before  # train_seconds at that step
        self._status("training")
        self.finished = False

    def _start(self, sae_cfg: SAEConfig, init_sample: Callable[[], torch.Tensor], allow_tf32: bool) -> Trainer:
        """A fresh SAE: random draws on the CPU (the same numbers on every device), data init on the device."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        sae = sae_class(cfg.architecture)(sae_cfg, init=False, device=self.device)
        gen = torch.Generator().manual_seed(cfg.seed)
        sae.reset_parameters(gen)
        if not cfg.tied_init:
            w = torch.empty_like(sae.W_enc, device="cpu")  # W_enc's strides: the same draw order as before
            torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)
            with torch.no_grad():
                sae.W_enc.copy_(w)
        normalizer = init_from_data(sae, init_sample().to(self.device), use_geometric_median=cfg.geometric_median_init,
                                    decoder_from_data=cfg.effective_decoder_init == "data",
                                    max_cos=cfg.decoder_init_max_cos, noise=cfg.decoder_init_noise,
                                    scale_encoder=cfg.scale_encoder_init, generator=gen)
        ddp.broadcast_parameters(sae)
        normalizer = ddp.broadcast_float(normalizer, self.device)
        return Trainer(cfg, sae, normalizer, device=self.device, allow_tf32=allow_tf32)

    def _resume(self, sae_cfg: SAEConfig, allow_tf32: bool) -> Trainer:
        """The checkpoint's training state (saved on any device) on this run's device."""
        cfg = self.cfg
        state = ckpt.load_checkpoint(self.run_dir, map_location="cpu")
        try:
            sae = sae_class(cfg.architecture)(sae_cfg, init=False, device=self.device)
            trainer = Trainer(cfg, sae, float(state["normalizer"]), device=self.device, allow_tf32=allow_tf32)
            trainer.load_state_dict(state)
            if tuple(trainer.tokens_since_fired.shape) != (cfg.n_latents,) or not 0 <= trainer.step <= cfg.total_steps:
                raise ValueError(f"step {trainer.step} or the latent count does not fit this run's config")
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            raise ckpt.cannot_resume(self.run_dir / ckpt.CHECKPOINT, "it does not hold a training state of this "
                                     f"run ({type(e).__name__}: {' '.join(str(e).split())})") from e
        return trainer

    @property
    def step(self) -> int:
        return self.trainer.step

    @property
    def done(self) -> bool:
        return self.trainer.step >= self.cfg.total_steps

    @property
    def train_seconds(self) -> float:
        """Seconds spent training this run, over every call that worked on it."""
        return round(self.seconds_before + time.perf_counter() - self.t0, 2)

    def _status(self, state: str, step: int | None = None, **extra: Any) -> None:
        if self.writer:
            ckpt.write_status(self.run_dir, state, step=self.step if step is None else step,
                              total_steps=self.cfg.total_steps, **{"train_seconds": self.train_seconds, **extra})

    def checkpoint(self) -> None:
        """The training state to checkpoint.pt and the step reached to status.json."""
        if self.writer:
            ckpt.save_checkpoint(self.run_dir, self.trainer.state_dict())
        self.saved_step, self.saved_seconds = self.trainer.step, self.train_seconds
        self._status("training")

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        """One step on this process's rows of the next batch (in one process, the whole batch)."""
        cfg, tr = self.cfg, self.trainer
        x = x.to(self.device, non_blocking=True)
        _check_batch_shape(x, self.d_in, f"activation batch {tr.step}")  # its values: with the step's statistics
        stats = tr.train_own_rows(x.float())
        self.steps_this_call += 1
        if (tr.step % cfg.log_every == 0 or tr.step == cfg.total_steps) and self.writer:
            elapsed = time.perf_counter() - self.t0
            row = {"step": tr.step, "tokens": tr.step * cfg.batch_size, **stats, "lr": cfg.lr_at(tr.step - 1),
                   "dead_frac": tr.dead_fraction(cfg.effective_dead_tokens), "inactive_frac": tr.dead_fraction(INACTIVE_WINDOW),
                   "revivals": int(tr.revivals.item()),
                   "tokens_per_s": self.steps_this_call * cfg.batch_size / max(elapsed, 1e-9)}
            append_line(self.run_dir / ckpt.METRICS, json.dumps(row))
            for sink in self.sinks:
                sink.log(tr.step, row)
            stats = {**stats, "inactive_frac": row["inactive_frac"]}
        if tr.step % cfg.checkpoint_every == 0:
            self.checkpoint()
        return stats

    def interrupt(self) -> None:
        self.checkpoint()
        self._status("interrupted")

    def fail(self, err: BaseException) -> None:
        """Record a run stopped by an error: its state since the last checkpoint may be the error's
        (a diverged step), so no checkpoint is written; the same command resumes from the last one."""
        self._status("failed", step=self.saved_step, train_seconds=self.saved_seconds, error=first_line(err))

    def finish(self) -> TopKSAE:
        from saelab.sae.io import write_sae  # lazy: io pulls safetensors

        self.checkpoint()
        final = self.trainer.final_sae()
        if self.writer:
            write_sae(final, self.run_dir / SAE_DIR)  # the run's one writer: save_sae refuses a run's sae/
        self._status("finished")
        self.finished = True
        return final

    def close(self, failed: bool = False) -> None:
        """Release the run folder (idempotent). ``failed``: the run never started, so a folder this
        run created is removed again if nothing else was written into it."""
        sinks, self.sinks = self.sinks, []
        try:
            close_sinks(sinks)
        finally:
            if self._holds_memory:
                self._holds_memory = False
                release_freed_memory()
            if self._lock is not None:
                self._lock.release(remove_created_dir=failed)

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _sae_config(cfg: TrainConfig, d_in: int, meta: dict[str, Any] | None) -> SAEConfig:
    """The SAE's shape and provenance: ``meta`` keys that SAEConfig names are its fields, any other
    (e.g. model_source) joins the training config in ``extra``."""
    meta = dict(meta or {})
    fields = set(SAEConfig.__dataclass_fields__) - {"d_in", "n_latents", "k", "input_norm", "extra"}
    extra = {"train": cfg.to_dict(), **{k: v for k, v in meta.items() if k not in fields}}
    k = cfg.n_latents if cfg.architecture == "relu" else cfg.k  # a ReLU SAE keeps every positive latent
    return SAEConfig(d_in=d_in, n_latents=cfg.n_latents, k=k, input_norm=cfg.input_norm, extra=extra,
                     **{k: v for k, v in meta.items() if k in fields})


def _check_runs(cfgs: Sequence[TrainConfig], run_dirs: Sequence[str | Path]) -> None:
    if len({c.batch_size for c in cfgs}) != 1:
        raise ConfigError(f"runs trained together must share batch_size, got {sorted({c.batch_size for c in cfgs})}")
    if len(cfgs) != len(run_dirs):
        raise ConfigError(f"{len(cfgs)} configs but {len(run_dirs)} run folders; expected one folder per config")
    folders = [Path(d).resolve() for d in run_dirs]
    if len(set(folders)) != len(folders):
        twice = sorted({str(f) for f in folders if folders.count(f) > 1})
        raise ConfigError(f"run folder(s) {twice} given to several runs; expected one folder per run")
    ddp.check_batch_split(cfgs[0].batch_size)  # before any run folder is written


def train_many(cfgs: Sequence[TrainConfig], batches_from: BatchSource, run_dirs: Sequence[str | Path], *,
               d_in: int, meta: dict[str, Any] | None = None, overwrite: bool = False, progress: bool = True,
               stop_after_steps: int | None = None, device: str | torch.device | None = None,
               allow_tf32: bool = False, log_to: Sequence[str] = (),
               data: dict[str, Any] | None = None, own_rows_from: BatchSource | None = None) -> list[TopKSAE]:
    """Train several SAEs from ONE pass over the data: every batch feeds every unfinished run.

    The runs must share batch_size; they may differ in n, k, lr, total_tokens and anything else.
    Each resumes from its own checkpoint (written on any device). ``stop_after_steps`` ends the
    call early (as an interruption would) after that many batches, a pause: an overwrite's earlier runs
    stay set aside until a later call finishes the new ones. ``device`` (None: CUDA when
    available, else the CPU) is where training runs; ``allow_tf32`` lets CUDA run the SAE's float32
    matmuls in TF32. ``log_to`` also logs each run's metrics to "tensorboard" (RUN/tensorboard/)
    and/or "wandb" (train/metric_sinks.py); a sweep's W&B runs are grouped by their parent folder.
    The SAEs are returned on that device. ``data`` records what the runs train on (train_config.json's
    "data": a resume on other data is refused, checkpoint.data_changes).

    Data-parallel, each process trains on its own rows of every batch. ``own_rows_from``: the same batches
    as ``batches_from``, each cut to this process's rows (``ddp.local_rows``'s slice) as it is read, e.g.
    ActivationCache.batches with ``part=(rank, world_size)``, so that no process reads, pins or copies the
    others' rows; None: cut from ``batches_from``'s batches (before they are pinned). The initialisation
    sample is still read whole from ``batches_from``, by every process.
    """
    log_to = check_log_targets(log_to)  # a missing package is reported before anything is touched
    for cfg in cfgs:  # the settings each run trains with (not checked as they were built)
        check_warmup(cfg)
    log_group = Path(run_dirs[0]).resolve().parent.name if len(run_dirs) > 1 else None
    _check_runs(cfgs, run_dirs)
    dev = ddp.process_device(device)
    sample: list[torch.Tensor] = []

    def init_sample() -> torch.Tensor:  # drawn once, shared by every run
        # Whole batches, in every process: the geometric median and the data directions need every row of
        # the sample at once, and each process computes the same initialisation (then takes rank 0's).
        if not sample:
            sample.append(take_rows(batches_from(0), max(c.effective_init_rows for c in cfgs), d_in))
        return sample[0]

    ddp.wait_for_every_rank()  # every rank has read the run folders before rank 0 moves their files
    with _replacing_runs(run_dirs, overwrite):  # the earlier runs stay until every new one has ended
        runs: list[TrainingRun] = []
        try:
            for c, d in zip(cfgs, run_dirs):
                runs.append(TrainingRun(c, d, d_in=d_in, meta=meta, data=data,
                                        init_sample=lambda c=c: init_sample()[:c.effective_init_rows],
                                        overwrite=overwrite, device=dev, allow_tf32=allow_tf32, log_to=log_to,
                                        log_group=log_group))
            sample.clear()  # initialisation is done: do not hold the sample through training
            _say_how_runs_start(runs)
            own = own_rows_from or (lambda start: own_rows(batches_from(start)))
            return _train_loop(runs, own, dev, progress, stop_after_steps)
        finally:
            for r in runs:
                r.close()


def _say_how_runs_start(runs: list[TrainingRun]) -> None:
    """A resume is said, not silent (a line, also under --no-progress), and so are tokens left untrained."""
    for r in runs:
        if r.writer and 0 < r.step < r.cfg.total_steps:
            print(f"saelab: resuming {r.run_dir} from its checkpoint at step {r.step:,} of {r.cfg.total_steps:,}",
                  file=sys.stderr)
        left_over = r.cfg.total_tokens - r.cfg.total_steps * r.cfg.batch_size
        if r.writer and r.step == 0 and left_over:  # whole batches only: the rest is not trained on
            print(f"saelab: note: --total-tokens {r.cfg.total_tokens:,} is not a multiple of --batch-size "
                  f"{r.cfg.batch_size:,}; {r.run_dir.name} trains {r.cfg.total_steps:,} steps "
                  f"({r.cfg.total_steps * r.cfg.batch_size:,} tokens)", file=sys.stderr)


@contextmanager
def _replacing_runs(run_dirs: Sequence[str | Path], overwrite: bool) -> Iterator[None]:
    """With ``overwrite``: each run folder's earlier run is replaced only once its new run has finished (a
    stop_after_steps pause keeps it set aside). Without: a resumed paused overwrite is completed the same way."""
    with contextlib.ExitStack() as replacing:
        if ddp.rank() == 0:  # one process moves files
            for d in run_dirs:
                replacing.enter_context(ckpt.replacing_run(Path(d)) if overwrite else ckpt.resuming_run(Path(d)))
        yield


def _train_loop(runs: list[TrainingRun], own_rows_from: BatchSource, dev: torch.device, progress: bool,
                stop_after_steps: int | None) -> list[TopKSAE]:
    start = min(r.step for r in runs)
    last = max(r.cfg.total_steps for r in runs)
    label = "train" if len(runs) == 1 else f"train x{len(runs)}"
    bar = tqdm(total=last, initial=start, unit="step", desc=label, disable=not progress or ddp.rank() != 0)
    batch_idx = start
    try:
        with _interrupt_between_steps() as stop_asked, prefetched(own_rows_from(start), dev) as batches:
            for x in batches:
                if stop_asked:
                    raise KeyboardInterrupt(f"signal {stop_asked[0]}")
                if batch_idx >= last or (stop_after_steps is not None and batch_idx - start >= stop_after_steps):
                    break
                x = x.to(dev, non_blocking=True)  # once for every run
                for r in runs:
                    if r.step == batch_idx and not r.done:  # a run ahead after a resume waits for its batch
                        stats = r.train_step(x)
                        if len(runs) == 1:
                            bar.set_postfix(nmse=f"{stats['nmse']:.3f}", l0=f"{stats['l0']:.1f}")
                batch_idx += 1
                bar.update(1)
        return [_end(r, batch_idx, stop_after_steps) for r in runs]
    except BaseException as e:
        _stop(runs, e)
        raise
    finally:
        bar.close()


def _stop(runs: list[TrainingRun], err: BaseException) -> None:
    """Leave every run resumable when a call ends early: a run whose steps are all done is finished
    (its training is not thrown away), the others interrupted (Ctrl-C, SIGTERM: a checkpoint now) or
    failed (an error: their last checkpoint stands)."""
    for r in runs:
        if r.finished:
            continue
        try:
            if r.done:
                r.finish()
            elif isinstance(err, KeyboardInterrupt):
                r.interrupt()
            else:
                r.fail(err)
        except Exception:  # e.g. the full disk that stopped the loop: the first error is the one to report
            with contextlib.suppress(Exception):
                r.fail(err)


def _end(r: TrainingRun, batch_idx: int, stop_after_steps: int | None) -> TopKSAE:
    if r.done:
        return r.finish()
    if stop_after_steps is not None:
        r.interrupt()
        return r.trainer.sae
    raise CorpusError(f"the activation source ran out after {batch_idx} batches; run {r.run_dir} needs "
                      f"{r.cfg.total_steps} (total_tokens={r.cfg.total_tokens:,})")


def train_sae(cfg: TrainConfig, batches_from: BatchSource, run_dir: str | Path, *, d_in: int,
              meta: dict[str, Any] | None = None, overwrite: bool = False, progress: bool = True,
              stop_after_steps: int | None = None, device: str | torch.device | None = None,
              allow_tf32: bool = False, log_to: Sequence[str] = (), data: dict[str, Any] | None = None,
              own_rows_from: BatchSource | None = None) -> TopKSAE:
    """Train one top-k SAE into ``run_dir``, resuming from its checkpoint when there is one.

    ``meta`` fills the SAE's provenance (model_name, hook_name, context_size, prepend_bos,
    exclude_first, dataset). ``stop_after_steps`` ends the call early with a checkpoint, as an
    interruption would (the run then resumes on the next call, on any device); a paused ``overwrite``
    keeps the earlier run set aside until the call that finishes the new one. ``device``: None =
    CUDA when available, else the CPU; ``allow_tf32``: TF32 matmuls on CUDA. The SAE is returned on
    that device. ``log_to``: ("tensorboard",), ("wandb",) or both also log the metrics there.
    ``own_rows_from``: this process's rows of the same batches (data-parallel; see train_many).
    """
    return train_many([cfg], batches_from, [run_dir], d_in=d_in, meta=meta, overwrite=overwrite,
                      progress=progress, stop_after_steps=stop_after_steps, device=device,
                      allow_tf32=allow_tf32, log_to=log_to, data=data, own_rows_from=own_rows_from)[0]
