"""Harvest activations from a language model into a stream of shuffled [batch, d] rows.

Any model with ``.activations(tokens_BT, hook) -> [B, T, D]`` (a forward that may stop after the
hooked layer) and ``.hook_width(hook) -> D`` can be harvested; see :class:`ActivationModel`.

Shuffle scheme. Consecutive tokens of a context are strongly correlated, so rows go through a
buffer of ``buffer_tokens`` rows before they are emitted:

1. fill the buffer to capacity C with harvested rows (in harvest order);
2. draw a random permutation of the C rows; emit the rows at the first E positions, where E is
   the largest multiple of ``batch_size`` <= C/2, as E / batch_size batches;
3. move the C - E rows not emitted to the front of the buffer, refill the rest, go to 2;
4. when the contexts run out, permute what is left and emit it all.

Every harvested row is emitted exactly once. A row stays for a geometric number of rounds, so a
batch mixes tokens from roughly the last 2C harvested rows. Each round costs two gathers of E rows
(the emitted rows and the kept rows), all in torch, with no Python loop over tokens. The
permutations come from a generator seeded with ``seed``, so a stream is reproducible.

The buffer is kept in ``store_dtype`` (float32 by default: exact). float16 halves its memory at a
relative rounding error of about 5e-4 and overflows above 65504; bfloat16 keeps the range at a
relative error of about 4e-3. Rows are checked for NaN/inf before (and after) the cast.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from saelab.data.tokens import batched
from saelab.errors import ConfigError, NonFiniteError, ShapeMismatchError
from saelab.utils.tensors import all_finite


@runtime_checkable
class ActivationModel(Protocol):
    """What :class:`ActivationStream` needs from a language model."""

    def activations(self, tokens_BT: torch.Tensor, hook: str) -> torch.Tensor:
        """Activations at ``hook`` for every position, shape [B, T, D]."""
        ...

    def hook_width(self, hook: str) -> int:
        """D, the width of the activations at ``hook``."""
        ...


@dataclass
class StreamConfig:
    """How an :class:`ActivationStream` batches, shuffles and limits the rows it harvests."""

    batch_size: int = 4096
    """Rows per emitted batch."""
    lm_batch_size: int = 32
    """Contexts per model forward."""
    exclude_first: bool = True
    """Drop position 0 of every context (BOS, the attention sink, whose activations are outliers an
    SAE should not be trained on)."""
    buffer_tokens: int = 262_144
    """Shuffle buffer capacity in rows; 0 emits rows in harvest order. Must be 0 or >= 2 * batch_size."""
    seed: int = 0
    """Seed of the shuffle."""
    max_tokens: int | None = None
    """Stop after this many rows have been harvested (rows, i.e. after exclude_first)."""
    dtype: torch.dtype = torch.float32
    """Dtype of the emitted batches."""
    store_dtype: torch.dtype = torch.float32
    """Dtype of the shuffle buffer (see the module docstring)."""
    device: torch.device | str | None = None
    """Where the buffer lives; default: the device the model returns activations on."""
    drop_last: bool = True
    """Drop the final batch if it has fewer than ``batch_size`` rows."""
    progress: bool = True
    """Show a tqdm bar counting harvested rows."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lm_batch_size < 1:
            raise ConfigError(f"lm_batch_size must be >= 1, got {self.lm_batch_size}")
        if self.buffer_tokens < 0 or 0 < self.buffer_tokens < 2 * self.batch_size:
            raise ConfigError(f"buffer_tokens must be 0 (no shuffle) or >= 2 * batch_size = {2 * self.batch_size}, "
                              f"got {self.buffer_tokens}")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ConfigError(f"max_tokens must be >= 0 or None, got {self.max_tokens}")


class ActivationStream:
    """Iterate over shuffled activation batches [batch_size, D] harvested from ``model`` at ``hook``.

    ``model``: anything following :class:`ActivationModel`; if it has a ``device`` attribute the
    token batches are moved there. ``hook``: the hook name passed to ``model.activations``.
    ``contexts``: 1-D LongTensors of equal length (e.g. from ``pack_contexts``) or a LongTensor
    [N, T]; iterating the stream again iterates ``contexts`` again. ``cfg``: a :class:`StreamConfig`;
    keyword arguments override its fields (``ActivationStream(lm, hook, ctx, batch_size=4096)``).

    ``tokens_seen`` counts rows harvested so far in the current iteration (after exclude_first);
    ``contexts_seen`` counts contexts run through the model.
    """

    def __init__(self, model: ActivationModel, hook: str, contexts: Iterable[torch.Tensor],
                 cfg: StreamConfig | None = None, **fields) -> None:
        cfg = replace(cfg or StreamConfig(), **fields)
        self.cfg, self.model, self.hook, self.contexts = cfg, model, hook, contexts
        # The settings as attributes: the harvest and shuffle code below reads them on every batch.
        self.batch_size, self.lm_batch_size, self.exclude_first = cfg.batch_size, cfg.lm_batch_size, cfg.exclude_first
        self.buffer_tokens, self.seed, self.max_tokens = cfg.buffer_tokens, cfg.seed, cfg.max_tokens
        self.dtype, self.store_dtype, self.drop_last, self.progress = cfg.dtype, cfg.store_dtype, cfg.drop_last, cfg.progress
        self.device = torch.device(cfg.device) if cfg.device is not None else None
        self.d = int(model.hook_width(hook))
        self.tokens_seen = 0
        self.contexts_seen = 0

    # --- harvesting ----------------------------------------------------------------------------

    def _harvest(self) -> Iterator[torch.Tensor]:
        """Yield [rows, D] activations in store_dtype, in harvest order, up to max_tokens."""
        self.tokens_seen = 0
        self.contexts_seen = 0
        if self.max_tokens == 0:
            return
        model_device = getattr(self.model, "device", None)
        bar = tqdm(total=self.max_tokens, unit="tok", unit_scale=True, desc=f"harvest {self.hook}",
                   disable=not self.progress)
        try:
            for batch_idx, tokens_BT in enumerate(batched(self.contexts, self.lm_batch_size)):
                if model_device is not None:
                    tokens_BT = tokens_BT.to(model_device)
                with torch.no_grad():
                    acts_BTD = self.model.activations(tokens_BT, self.hook)
                acts_ND = self._check(acts_BTD, tokens_BT, batch_idx)
                if self.max_tokens is not None:
                    acts_ND = acts_ND[: self.max_tokens - self.tokens_seen]
                self.tokens_seen += acts_ND.shape[0]
                self.contexts_seen += tokens_BT.shape[0]
                bar.update(acts_ND.shape[0])
                yield acts_ND
                if self.max_tokens is not None and self.tokens_seen >= self.max_tokens:
                    return
        finally:
            bar.close()

    def _check(self, acts_BTD: torch.Tensor, tokens_BT: torch.Tensor, batch_idx: int) -> torch.Tensor:
        B, T = tokens_BT.shape
        if acts_BTD.shape != (B, T, self.d):
            raise ShapeMismatchError(
                f"model.activations at hook {self.hook!r} returned shape {tuple(acts_BTD.shape)}, "
                f"expected {(B, T, self.d)} for tokens of shape {(B, T)}"
            )
        if self.exclude_first:
            acts_BTD = acts_BTD[:, 1:]
        acts_ND = acts_BTD.detach().reshape(-1, self.d)
        where = f"activations at hook {self.hook!r}, harvest batch {batch_idx} (contexts {self.contexts_seen}.."
        where += f"{self.contexts_seen + B - 1})"
        if not all_finite(acts_ND):
            n_bad = int((~torch.isfinite(acts_ND)).any(dim=1).sum())
            raise NonFiniteError(f"NaN or inf in {where}: {n_bad} of {acts_ND.shape[0]} rows")
        if acts_ND.dtype != self.store_dtype:
            acts_ND = acts_ND.to(self.store_dtype)
            if not all_finite(acts_ND):
                raise NonFiniteError(
                    f"{where} overflow store_dtype {self.store_dtype}; use torch.bfloat16 or torch.float32"
                )
        return acts_ND

    # --- emitting --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.buffer_tokens == 0:
            return self._iter_in_order()
        return self._iter_shuffled()

    def _out(self, rows_ND: torch.Tensor) -> torch.Tensor:
        return rows_ND.to(self.dtype)

    def _iter_in_order(self) -> Iterator[torch.Tensor]:
        pending: list[torch.Tensor] = []
        n_pending = 0
        for acts_ND in self._harvest():
            if self.device is not None:
                acts_ND = acts_ND.to(self.device)
            pending.append(acts_ND)
            n_pending += acts_ND.shape[0]
            if n_pending < self.batch_size:
                continue
            rows_ND = torch.cat(pending)
            n_full = n_pending // self.batch_size * self.batch_size
            for batch_BD in rows_ND[:n_full].split(self.batch_size):
                yield self._out(batch_BD)  # rows_ND is a fresh tensor from torch.cat
            pending = [rows_ND[n_full:]]
            n_pending -= n_full
        if n_pending and not self.drop_last:
            yield self._out(torch.cat(pending))

    def _iter_shuffled(self) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        cap, B = self.buffer_tokens, self.batch_size
        n_emit = (cap // 2) // B * B
        buf_CD: torch.Tensor | None = None
        n = 0  # rows filled
        for acts_ND in self._harvest():
            if buf_CD is None:
                device = self.device if self.device is not None else acts_ND.device
                buf_CD = torch.empty(cap, self.d, dtype=self.store_dtype, device=device)
            acts_ND = acts_ND.to(buf_CD.device)
            while acts_ND.shape[0]:
                take = min(cap - n, acts_ND.shape[0])
                buf_CD[n : n + take] = acts_ND[:take]
                acts_ND = acts_ND[take:]
                n += take
                if n < cap:
                    break
                perm = torch.randperm(cap, generator=gen).to(buf_CD.device)
                for idx in perm[:n_emit].split(B):
                    yield self._out(buf_CD.index_select(0, idx))  # a copy: the buffer may be reused
                kept = perm[n_emit:]
                buf_CD[: kept.numel()] = buf_CD.index_select(0, kept)  # gathered before written
                n = kept.numel()
        if buf_CD is None or n == 0:
            return
        perm = torch.randperm(n, generator=gen).to(buf_CD.device)
        for idx in perm.split(B):
            if idx.numel() < B and self.drop_last:
                return
            yield self._out(buf_CD.index_select(0, idx))
