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

import itertools
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from saelab.data.tokens import batched
from saelab.errors import ConfigError, NonFiniteError, ShapeMismatchError
from saelab.utils.tensors import all_finite
from saelab.utils.words import plural


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


@dataclass(frozen=True)
class _Held:
    """Everything a stream's further output depends on besides its input, as of one moment: rows ``[:n]`` of
    ``rows`` (the shuffle buffer's contents), the rows of the last model batch not yet in the buffer, the
    generator's state and the counters. Replaced whole by one assignment, so a KeyboardInterrupt between two
    statements never leaves half of an update; while a round hands out its batches (copies of the buffer's
    rows) it stays as of the round's start, which the same round repeated reproduces."""

    rows: torch.Tensor | None
    n: int
    pending: torch.Tensor | None
    generator: torch.Tensor | None
    contexts_seen: int = 0
    tokens_seen: int = 0
    rows_emitted: int = 0


STATE_TENSORS = ("buffer", "pending", "generator")
"""The tensors of :meth:`ActivationStream.state`."""


class ActivationStream:
    """Iterate over shuffled activation batches [batch_size, D] harvested from ``model`` at ``hook``.

    ``model``: anything following :class:`ActivationModel`; if it has a ``device`` attribute the
    token batches are moved there. ``hook``: the hook name passed to ``model.activations``.
    ``contexts``: 1-D LongTensors of equal length (e.g. from ``pack_contexts``) or a LongTensor
    [N, T]; iterating the stream again iterates ``contexts`` again. ``cfg``: a :class:`StreamConfig`;
    keyword arguments override its fields (``ActivationStream(lm, hook, ctx, batch_size=4096)``).

    ``tokens_seen`` counts rows harvested so far in the current iteration (after exclude_first);
    ``contexts_seen`` counts contexts run through the model; ``rows_emitted`` rows handed out in
    finished rounds. :meth:`state` and :meth:`restore` save and restore where an iteration stands, so
    an interrupted harvest continues without running the model again over the contexts already read.
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
        self._held = self._fresh()
        self._restored = False

    @property
    def tokens_seen(self) -> int:
        return self._held.tokens_seen

    @property
    def contexts_seen(self) -> int:
        return self._held.contexts_seen

    @property
    def rows_emitted(self) -> int:
        return self._held.rows_emitted

    def _fresh(self) -> _Held:
        gen = torch.Generator().manual_seed(self.seed) if self.buffer_tokens else None
        return _Held(None, 0, None, gen.get_state() if gen is not None else None)

    # --- saving and restoring where an iteration stands ------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The settings a saved state holds only for (JSON-serializable)."""
        return {"hook": self.hook, "d": self.d, "batch_size": self.batch_size, "lm_batch_size": self.lm_batch_size,
                "exclude_first": self.exclude_first, "buffer_tokens": self.buffer_tokens, "seed": self.seed,
                "max_tokens": self.max_tokens, "dtype": str(self.dtype), "store_dtype": str(self.store_dtype),
                "drop_last": self.drop_last}

    def state(self) -> dict[str, Any]:
        """Where the current iteration stands: ``settings``, ``counters`` (contexts_seen, tokens_seen,
        rows_emitted) and CPU ``tensors`` (buffer, pending, generator). During a round it is the state as of the
        round's start, so a stream restored from it hands out that round again: the rows it has handed out are
        those ``rows_emitted`` counts plus some of the next rows, at most the buffer's and pending rows."""
        h = self._held
        empty = torch.empty(0, self.d, dtype=self.store_dtype)
        tensors = {
            "buffer": h.rows[:h.n].to("cpu", copy=True).contiguous() if h.rows is not None else empty,
            "pending": h.pending.to("cpu", copy=True).contiguous() if h.pending is not None else empty,
            "generator": h.generator.clone() if h.generator is not None else torch.empty(0, dtype=torch.uint8),
        }
        counters = {"contexts_seen": h.contexts_seen, "tokens_seen": h.tokens_seen, "rows_emitted": h.rows_emitted}
        return {"settings": self.settings(), "counters": counters, "tensors": tensors}

    def restore(self, state: dict[str, Any]) -> None:
        """Make the next iteration continue from ``state`` (from :meth:`state`), skipping the contexts it had
        read without running the model on them. ValueError, and nothing changed, when it does not fit."""
        settings, counters, tensors = state["settings"], state["counters"], state["tensors"]
        for key, want in self.settings().items():
            if settings.get(key) != want:
                raise ValueError(f"it was saved with {key} {settings.get(key)!r}, not {want!r}")
        if not all(isinstance(counters.get(k), int) and not isinstance(counters[k], bool) and counters[k] >= 0
                   for k in ("contexts_seen", "tokens_seen", "rows_emitted")):
            raise ValueError(f"its counters {counters!r} are not counts")
        buf, pending, gen_state = (tensors[k] for k in STATE_TENSORS)
        for name, t in (("buffer", buf), ("pending", pending)):
            if t.dim() != 2 or t.shape[1] != self.d or t.dtype != self.store_dtype:
                raise ValueError(f"its {name} is {t.dtype} {tuple(t.shape)}, "
                                 f"expected [rows, {self.d}] {self.store_dtype}")
        if buf.shape[0] > self.buffer_tokens:
            raise ValueError(f"its buffer holds {buf.shape[0]} rows, more than buffer_tokens {self.buffer_tokens}")
        if counters["rows_emitted"] + buf.shape[0] + pending.shape[0] != counters["tokens_seen"]:
            raise ValueError("its rows emitted, buffered and pending do not add up to the rows harvested")
        if self.max_tokens is not None and counters["tokens_seen"] > self.max_tokens:
            raise ValueError(f"it has harvested {counters['tokens_seen']} rows, more than max_tokens {self.max_tokens}")
        generator = None
        if self.buffer_tokens:
            generator = gen_state.clone()
            try:
                torch.Generator().set_state(generator)  # a state torch does not take is refused here
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"its generator state is not one torch takes ({e})") from e
        device = self.device or getattr(self.model, "device", None) or torch.device("cpu")
        self._held = _Held(buf.to(device), buf.shape[0], pending.to(device) if pending.shape[0] else None,
                           generator, counters["contexts_seen"], counters["tokens_seen"], counters["rows_emitted"])
        self._restored = True

    # --- harvesting ----------------------------------------------------------------------------

    def _done(self, tokens_seen: int) -> bool:
        return self.max_tokens is not None and tokens_seen >= self.max_tokens

    def _harvest(self, start: _Held) -> Iterator[tuple[torch.Tensor, int]]:
        """Yield ([rows, D] activations in store_dtype, how many contexts they come from), in harvest order, up to
        max_tokens, from the context after the ``start.contexts_seen`` already read (skipped without the model)."""
        if self._done(start.tokens_seen):
            return
        contexts, skip = self.contexts, start.contexts_seen
        if skip:  # a restored iteration: the contexts before it are read past, not run through the model
            contexts = contexts[skip:] if isinstance(contexts, torch.Tensor) and contexts.dim() == 2 \
                else itertools.islice(iter(contexts), skip, None)
        model_device = getattr(self.model, "device", None)
        bar = tqdm(total=self.max_tokens, initial=start.tokens_seen, unit="tok", unit_scale=True,
                   desc=f"harvest {self.hook}", disable=not self.progress)
        tokens_seen, contexts_seen = start.tokens_seen, start.contexts_seen
        try:
            for tokens_BT in batched(contexts, self.lm_batch_size):
                if not tokens_BT.shape[0]:  # a tensor of contexts skipped to its end splits into one empty batch
                    return
                if model_device is not None:
                    tokens_BT = tokens_BT.to(model_device)
                with torch.no_grad():
                    acts_BTD = self.model.activations(tokens_BT, self.hook)
                acts_ND = self._check(acts_BTD, tokens_BT, contexts_seen)
                if self.max_tokens is not None:
                    acts_ND = acts_ND[: self.max_tokens - tokens_seen]
                tokens_seen += acts_ND.shape[0]
                contexts_seen += tokens_BT.shape[0]
                bar.update(acts_ND.shape[0])
                yield acts_ND, tokens_BT.shape[0]
                if self._done(tokens_seen):
                    return
        finally:
            bar.close()

    def _check(self, acts_BTD: torch.Tensor, tokens_BT: torch.Tensor, contexts_seen: int) -> torch.Tensor:
        B, T = tokens_BT.shape
        if acts_BTD.shape != (B, T, self.d):
            raise ShapeMismatchError(
                f"model.activations at hook {self.hook!r} returned shape {tuple(acts_BTD.shape)}, "
                f"expected {(B, T, self.d)} for tokens of shape {(B, T)}"
            )
        if self.exclude_first:
            acts_BTD = acts_BTD[:, 1:]
        acts_ND = acts_BTD.detach().reshape(-1, self.d)
        where = f"activations at hook {self.hook!r}, harvest batch {contexts_seen // self.lm_batch_size} (contexts "
        where += f"{contexts_seen}..{contexts_seen + B - 1})"
        if not all_finite(acts_ND):
            n_bad = int((~torch.isfinite(acts_ND)).any(dim=1).sum())
            raise NonFiniteError(f"NaN or inf in {where}: {n_bad} of {acts_ND.shape[0]} "
                                 f"{plural(acts_ND.shape[0], 'row')}")
        if acts_ND.dtype != self.store_dtype:
            acts_ND = acts_ND.to(self.store_dtype)
            if not all_finite(acts_ND):
                raise NonFiniteError(
                    f"{where} overflow store_dtype {self.store_dtype}; use torch.bfloat16 or torch.float32"
                )
        return acts_ND

    def _take(self, acts_ND: torch.Tensor, n_contexts: int, device: torch.device) -> None:
        """Hold a model batch as pending rows (the held pending rows are all used before the next batch)."""
        h = self._held
        self._held = replace(h, pending=acts_ND.to(device), contexts_seen=h.contexts_seen + n_contexts,
                             tokens_seen=h.tokens_seen + acts_ND.shape[0])

    # --- emitting --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[torch.Tensor]:
        if not self._restored:
            self._held = self._fresh()
        self._restored = False  # a restored state serves one iteration; the next starts over
        if self.buffer_tokens == 0:
            return self._iter_in_order()
        return self._iter_shuffled()

    def _out(self, rows_ND: torch.Tensor) -> torch.Tensor:
        return rows_ND.to(self.dtype)

    def _iter_in_order(self) -> Iterator[torch.Tensor]:
        B = self.batch_size

        def emit() -> Iterator[torch.Tensor]:
            h = self._held
            n_full = h.pending.shape[0] // B * B
            if not n_full:  # split would hand out one empty batch, which a writer's messages count as a batch
                return
            for batch_BD in h.pending[:n_full].split(B):
                yield self._out(batch_BD)  # pending is a fresh tensor from torch.cat
            self._held = replace(h, pending=h.pending[n_full:], rows_emitted=h.rows_emitted + n_full)

        if self._held.pending is not None:  # restored
            yield from emit()
        for acts_ND, n_contexts in self._harvest(self._held):
            h = self._held
            device = self.device if self.device is not None else acts_ND.device
            rows_ND = acts_ND.to(device, copy=True) if h.pending is None else \
                torch.cat([h.pending, acts_ND.to(device)])
            self._held = replace(h, pending=rows_ND, contexts_seen=h.contexts_seen + n_contexts,
                                 tokens_seen=h.tokens_seen + acts_ND.shape[0])
            yield from emit()
        pending = self._held.pending
        if pending is not None and pending.shape[0] and not self.drop_last:
            yield self._out(pending)

    def _iter_shuffled(self) -> Iterator[torch.Tensor]:
        gen = torch.Generator()
        cap, B = self.buffer_tokens, self.batch_size
        n_emit = (cap // 2) // B * B
        buf_CD: torch.Tensor | None = None

        def fill() -> Iterator[torch.Tensor]:
            """Move the pending rows into the buffer, with a round each time it is full."""
            nonlocal buf_CD
            while True:
                h = self._held
                has_pending = h.pending is not None and h.pending.shape[0] > 0
                if h.n < cap and not has_pending:
                    return
                if buf_CD is None:
                    source = h.pending if has_pending else h.rows
                    buf_CD = torch.empty(cap, self.d, dtype=self.store_dtype,
                                         device=self.device if self.device is not None else source.device)
                if h.rows is not None and h.rows is not buf_CD:  # restored rows: into the buffer first
                    buf_CD[: h.n] = h.rows[: h.n]
                    self._held = h = replace(h, rows=buf_CD)
                if h.n < cap:
                    take = min(cap - h.n, h.pending.shape[0])
                    buf_CD[h.n : h.n + take] = h.pending[:take]  # past the held rows: the held state stays true
                    self._held = replace(h, rows=buf_CD, n=h.n + take, pending=h.pending[take:])
                    continue
                gen.set_state(h.generator)
                perm = torch.randperm(cap, generator=gen).to(buf_CD.device)
                for idx in perm[:n_emit].split(B):
                    yield self._out(buf_CD.index_select(0, idx))  # a copy: the buffer is reused
                kept_KD = buf_CD.index_select(0, perm[n_emit:])
                # The kept rows are held from their copy until the buffer holds them too.
                self._held = h = replace(h, rows=kept_KD, n=kept_KD.shape[0], generator=gen.get_state(),
                                         rows_emitted=h.rows_emitted + n_emit)
                buf_CD[: h.n] = kept_KD
                self._held = replace(h, rows=buf_CD)

        yield from fill()  # a restored stream's pending rows
        for acts_ND, n_contexts in self._harvest(self._held):
            device = buf_CD.device if buf_CD is not None else self.device if self.device is not None else acts_ND.device
            self._take(acts_ND, n_contexts, device)
            yield from fill()
        h = self._held
        if h.rows is None or h.n == 0:
            return
        gen.set_state(h.generator)
        perm = torch.randperm(h.n, generator=gen).to(h.rows.device)
        for idx in perm.split(B):
            if idx.numel() < B and self.drop_last:
                return
            yield self._out(h.rows.index_select(0, idx))
