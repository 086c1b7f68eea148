"""The training loop: paper recipe, dead-latent tracking, checkpoints, resume, progress.

Data arrives through ``batches_from(start_batch)``, a function returning an iterator of
[batch_size, d_in] activation batches beginning at batch ``start_batch``. An on-disk
activation cache provides this exactly, which is what makes an interrupted run resume to the
same result it would have reached without the interruption.

``train_sae`` trains one SAE; ``train_many`` trains several (a sweep) from one pass over the
data, each in its own run folder. Under torchrun both are data-parallel (train/distributed.py).
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from saelab.errors import CorpusError, NonFiniteError, ShapeMismatchError
from saelab.sae.topk import SAEConfig, TopKSAE
from saelab.train import checkpoint as ckpt
from saelab.train import distributed as ddp
from saelab.train.config import TrainConfig
from saelab.train.init import init_from_data
from saelab.train.losses import training_loss
from saelab.utils.atomic import append_line

BatchSource = Callable[[int], Iterator[torch.Tensor]]
INACTIVE_WINDOW = 262_144
"""Tokens after which a latent that has not fired is reported as inactive in the metrics log
(a short-run companion to the dead window that AuxK uses)."""


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


def _check_batch(x: torch.Tensor, d_in: int, what: str) -> None:
    if x.ndim != 2 or x.shape[1] != d_in:
        raise ShapeMismatchError(f"{what} has shape {tuple(x.shape)}; expected [rows, d_in={d_in}]")
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"{what} contains NaN or inf activations")


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
    """Optimizer state, dead-latent tracking and the optimizer step of one SAE."""

    def __init__(self, cfg: TrainConfig, sae: TopKSAE, normalizer: float):
        self.cfg = cfg
        self.sae = sae
        self.normalizer = normalizer
        # (parameter, the tensor the optimizer updates): a matrix stored transposed (W_enc is
        # latent-major) goes to Adam as its contiguous transpose, a view of the same storage, since
        # fused Adam copies a non-contiguous parameter and its states on every step.
        self._opt_params = [(p, nn.Parameter(p.detach().t()) if _stored_transposed(p) else p)
                            for p in sae.parameters()]
        self.opt = torch.optim.Adam(
            [v for _, v in self._opt_params], lr=cfg.effective_lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps, fused=True,  # one fused kernel per parameter: ~9x faster than the per-op update on CPU
        )
        self.step = 0
        self.tokens_since_fired = torch.zeros(sae.n_latents, dtype=torch.long)
        self.ema = {n: p.detach().clone() for n, p in sae.named_parameters()} if cfg.ema_decay else None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "sae": self.sae.state_dict(), "optimizer": self.opt.state_dict(),
                "tokens_since_fired": self.tokens_since_fired, "normalizer": self.normalizer, "ema": self.ema,
                "sae_config": json.dumps(self.sae.cfg.to_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["optimizer"])
        for _, v in self._opt_params:  # Adam itself would only fail, obscurely, at the next step
            for key, t in self.opt.state.get(v, {}).items():
                if torch.is_tensor(t) and t.dim() and t.shape != v.shape:
                    raise ValueError(f"optimizer state {key!r} has shape {tuple(t.shape)}, its parameter "
                                     f"{tuple(v.shape)}")
        self.tokens_since_fired = state["tokens_since_fired"]
        self.normalizer = float(state["normalizer"])
        self.ema = state["ema"]

    def train_step(self, x_BD: torch.Tensor) -> dict[str, float]:
        """One step on a global batch (each process uses its own slice when data-parallel)."""
        cfg, sae = self.cfg, self.sae
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        dead = self.tokens_since_fired >= cfg.effective_dead_tokens if cfg.auxk else None
        out = training_loss(sae, ddp.local_rows(x_BD), cfg, self.normalizer, dead)
        if not torch.isfinite(out.loss):
            raise NonFiniteError(f"training loss became {out.loss.item()} at step {self.step}")
        sae.zero_grad(set_to_none=True)
        out.loss.backward()
        ddp.average_gradients(sae.parameters())
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

        fired = torch.zeros(sae.n_latents, dtype=torch.float32)
        fired[out.idx_BK[out.vals_BK > 0]] = 1.0
        fired = ddp.all_reduce_sum(fired) > 0
        self.tokens_since_fired += x_BD.shape[0]
        self.tokens_since_fired[fired] = 0
        self.step += 1
        stats = torch.tensor([out.loss.item(), out.nmse, out.auxk, out.multi_topk, out.l0], dtype=torch.float64)
        stats = ddp.all_reduce_sum(stats) / ddp.world_size()
        return dict(zip(("loss", "nmse", "auxk", "multi_topk", "l0"), stats.tolist()))

    def dead_fraction(self, window: int) -> float:
        return (self.tokens_since_fired >= window).float().mean().item()

    def final_sae(self) -> TopKSAE:
        """The trained SAE, or its EMA when EMA is on (the EMA is what the paper evaluates)."""
        if self.ema is None:
            return self.sae
        out = TopKSAE(self.sae.cfg, init=False)
        out.load_state_dict(self.ema)
        if self.cfg.unit_norm_decoder:
            out.normalize_decoder()
        return out


class TrainingRun:
    """One SAE training into its run folder: init or resume, log, checkpoint, finish."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, d_in: int, meta: dict[str, Any] | None,
                 init_sample: Callable[[], torch.Tensor], overwrite: bool = False):
        self.cfg, self.run_dir, self.d_in = cfg, Path(run_dir), d_in
        self.writer = ddp.rank() == 0  # one process writes files
        sae_cfg = SAEConfig(d_in=d_in, n_latents=cfg.n_latents, k=cfg.k, input_norm=cfg.input_norm,
                            extra={"train": cfg.to_dict()}, **dict(meta or {}))
        resume = ckpt.prepare_run_dir(self.run_dir, {"train": cfg.to_dict(), "sae": sae_cfg.to_dict()},
                                      overwrite=overwrite, write=self.writer)
        torch.manual_seed(cfg.seed)
        sae = TopKSAE(sae_cfg)
        if resume:
            state = ckpt.load_checkpoint(self.run_dir)
            try:
                self.trainer = Trainer(cfg, sae, float(state["normalizer"]))
                self.trainer.load_state_dict(state)
                if tuple(self.trainer.tokens_since_fired.shape) != (cfg.n_latents,) or \
                        not 0 <= self.trainer.step <= cfg.total_steps:
                    raise ValueError(f"step {self.trainer.step} or the latent count does not fit this run's config")
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
                raise ckpt.cannot_resume(self.run_dir / ckpt.CHECKPOINT, "it does not hold a training state of this "
                                         f"run ({type(e).__name__}: {' '.join(str(e).split())})") from e
            if self.writer:
                ckpt.truncate_metrics(self.run_dir, self.trainer.step)
        else:
            gen = torch.Generator().manual_seed(cfg.seed)
            sae.reset_parameters(gen)
            if not cfg.tied_init:
                torch.nn.init.kaiming_uniform_(sae.W_enc, a=math.sqrt(5), generator=gen)
            normalizer = init_from_data(sae, init_sample(), use_geometric_median=cfg.geometric_median_init,
                                        decoder_from_data=cfg.effective_decoder_init == "data",
                                        max_cos=cfg.decoder_init_max_cos, noise=cfg.decoder_init_noise,
                                        scale_encoder=cfg.scale_encoder_init, generator=gen)
            self.trainer = Trainer(cfg, sae, normalizer)
        self._status("training")
        self.t0, self.steps_this_call = time.perf_counter(), 0

    @property
    def step(self) -> int:
        return self.trainer.step

    @property
    def done(self) -> bool:
        return self.trainer.step >= self.cfg.total_steps

    def _status(self, state: str, **extra: Any) -> None:
        if self.writer:
            ckpt.write_status(self.run_dir, state, step=self.step, total_steps=self.cfg.total_steps, **extra)

    def checkpoint(self) -> None:
        if self.writer:
            ckpt.save_checkpoint(self.run_dir, self.trainer.state_dict())

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        cfg, tr = self.cfg, self.trainer
        _check_batch(x, self.d_in, f"activation batch {tr.step}")
        stats = tr.train_step(x.float())
        self.steps_this_call += 1
        if (tr.step % cfg.log_every == 0 or tr.step == cfg.total_steps) and self.writer:
            elapsed = time.perf_counter() - self.t0
            row = {"step": tr.step, "tokens": tr.step * cfg.batch_size, **stats, "lr": cfg.lr_at(tr.step - 1),
                   "dead_frac": tr.dead_fraction(cfg.effective_dead_tokens), "inactive_frac": tr.dead_fraction(INACTIVE_WINDOW),
                   "tokens_per_s": self.steps_this_call * cfg.batch_size / max(elapsed, 1e-9)}
            append_line(self.run_dir / ckpt.METRICS, json.dumps(row))
            stats = {**stats, "inactive_frac": row["inactive_frac"]}
        if tr.step % cfg.checkpoint_every == 0:
            self.checkpoint()
        return stats

    def interrupt(self) -> None:
        self.checkpoint()
        self._status("interrupted")

    def finish(self) -> TopKSAE:
        from saelab.sae.io import save_sae  # lazy: io pulls safetensors

        self.checkpoint()
        final = self.trainer.final_sae()
        if self.writer:
            save_sae(final, self.run_dir / ckpt.SAE_DIR)
        self._status("finished", train_seconds=round(time.perf_counter() - self.t0, 2))
        return final


def train_many(cfgs: Sequence[TrainConfig], batches_from: BatchSource, run_dirs: Sequence[str | Path], *,
               d_in: int, meta: dict[str, Any] | None = None, overwrite: bool = False, progress: bool = True,
               stop_after_steps: int | None = None) -> list[TopKSAE]:
    """Train several SAEs from ONE pass over the data: every batch feeds every unfinished run.

    The runs must share batch_size; they may differ in n, k, lr, total_tokens and anything else.
    Each resumes from its own checkpoint. ``stop_after_steps`` ends the call early (as an
    interruption would) after that many batches.
    """
    if len({c.batch_size for c in cfgs}) != 1:
        raise ValueError(f"runs trained together must share batch_size, got {sorted({c.batch_size for c in cfgs})}")
    if len(cfgs) != len(run_dirs):
        raise ValueError(f"{len(cfgs)} configs but {len(run_dirs)} run folders")
    sample: list[torch.Tensor] = []

    def init_sample() -> torch.Tensor:  # drawn once, shared by every run
        if not sample:
            sample.append(take_rows(batches_from(0), max(c.effective_init_rows for c in cfgs), d_in))
        return sample[0]

    runs = [TrainingRun(c, d, d_in=d_in, meta=meta, init_sample=lambda c=c: init_sample()[:c.effective_init_rows],
                        overwrite=overwrite) for c, d in zip(cfgs, run_dirs)]
    sample.clear()  # initialisation is done: do not hold the sample through training
    start = min(r.step for r in runs)
    last = max(c.total_steps for c in cfgs)
    label = "train" if len(runs) == 1 else f"train x{len(runs)}"
    bar = tqdm(total=last, initial=start, unit="step", desc=label, disable=not progress or ddp.rank() != 0)
    batch_idx = start
    try:
        with _interrupt_between_steps() as stop_asked:
            for x in batches_from(start):
                if stop_asked:
                    raise KeyboardInterrupt(f"signal {stop_asked[0]}")
                if batch_idx >= last or (stop_after_steps is not None and batch_idx - start >= stop_after_steps):
                    break
                for r in runs:
                    if r.step == batch_idx and not r.done:  # a run ahead after a resume waits for its batch
                        stats = r.train_step(x)
                        if len(runs) == 1:
                            bar.set_postfix(nmse=f"{stats['nmse']:.3f}", l0=f"{stats['l0']:.1f}")
                batch_idx += 1
                bar.update(1)
    except KeyboardInterrupt:
        for r in runs:
            r.interrupt()
        bar.close()
        raise
    bar.close()
    results = []
    for r in runs:
        if r.done:
            results.append(r.finish())
        elif stop_after_steps is not None:
            r.interrupt()
            results.append(r.trainer.sae)
        else:
            raise CorpusError(f"the activation source ran out after {batch_idx} batches; run {r.run_dir} needs "
                              f"{r.cfg.total_steps} (total_tokens={r.cfg.total_tokens:,})")
    return results


def train_sae(cfg: TrainConfig, batches_from: BatchSource, run_dir: str | Path, *, d_in: int,
              meta: dict[str, Any] | None = None, overwrite: bool = False, progress: bool = True,
              stop_after_steps: int | None = None) -> TopKSAE:
    """Train one top-k SAE into ``run_dir``, resuming from its checkpoint when there is one.

    ``meta`` fills the SAE's provenance (model_name, hook_name, context_size, prepend_bos,
    exclude_first, dataset). ``stop_after_steps`` ends the call early with a checkpoint, as an
    interruption would (the run then resumes on the next call).
    """
    return train_many([cfg], batches_from, [run_dir], d_in=d_in, meta=meta, overwrite=overwrite,
                      progress=progress, stop_after_steps=stop_after_steps)[0]
