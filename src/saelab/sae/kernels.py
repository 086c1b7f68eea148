"""Sparse top-k encoder: one dense GEMM forward, a backward that touches only selected latents.

The encoder forward is ``pre = (x - b_dec) @ W_enc + b_enc`` followed by a top-k. Dense autograd
would keep the [B, n] pre-activations and run two more [B, d] x [d, n] GEMMs in the backward
(gradients of W_enc and of the input), although only B*k entries of d(loss)/d(pre) are nonzero.
Here, with xc = x - b_dec:

- forward runs the GEMM in row chunks and keeps only the top-k of each chunk, so the [B, n]
  matrix never exists whole (peak memory: one chunk); with AuxK it runs as two GEMMs, over the
  live latents' columns and over the dead ones' (each gathered once per call), so the AuxK top-k
  reads a contiguous block instead of gathering the dead columns of every chunk, and the main
  top-k merges the live block's top-k with the dead block's (on CPU about 10 % off the encoder's
  forward and backward with a quarter of the latents dead, no change with 3 %; not measured on
  a GPU, where the gathered copy of W_enc is a transient [n, d] allocation per step). On the CPU,
  where no row of a chunk has more than k_aux positive dead pre-activations, AuxK takes them
  without a top-k, and the main top-k takes from the dead block only those above a row's k-th
  live value. On a CPU with a native bfloat16 GEMM, a block of CPU_BF16_SCREEN_MIN_N latents or more
  (all of them without AuxK, the live ones with it) takes its top-k from a bfloat16 GEMM whose
  candidates are recomputed in float32 under a rigorous error bound (``_Screen``): the float32
  selection and values, 3-37 % off a training step at n = 4,096 to 32,768 (CPU_BF16_SCREEN_MIN_N);
- backward, with g the gradient of the kept values (ReLU mask applied):
    d b_enc[j]    = sum of g over selections of latent j            (in entry order, as d W_enc)
    d W_enc[:, j] = sum over selections (b, j) of g * xc[b]         (embedding_bag, rows grouped by latent)
    d b_dec       = -sum_b d xc[b] = -W_enc @ d b_enc                 (one mat-vec: the rows' sum is all
                                                                      b_dec needs, so d xc is not formed)
    d x[b]        = sum over selections (b, j) of g * W_enc[:, j]   (embedding_bag; only if x needs it)
  which is O(B * k * d) instead of O(B * n * d).

The decoder side (``sparse_decode``) is embedding_bag forward; its backward groups the entries by
latent once and takes both gradients in that order: the values' from embedding_bag's own per-entry
kernel, W_dec's as one embedding_bag over the gradient's rows, like d W_enc.

AuxK has two forms, chosen by size (``aux_dense``). Entries: each row's nonzero AuxK values (on the
CPU; all k_aux per row on other devices) as flat (value, latent, row) triples, decoded and
backpropagated like the main selection (embedding_bag passes over the entries). In training most
AuxK values are 0 after the ReLU: a dead latent's pre-activation is mostly negative (the quickstart
keeps 1-3 % of its top 256, about 4 per row), so the entry form's passes are short. Dense: when the
entries per row are many against the dead set (n_dead <= AUX_DENSE_FACTOR * entries per row on the
CPU, GPU_AUX_DENSE_FACTOR * k_aux on other devices), a [B, n_dead] matrix holding the top k_aux per
row (zeros elsewhere), decoded with one GEMM ``[B, n_dead] @ W_dec[dead]`` and backpropagated with
GEMMs on the dead columns (d W_enc[:, dead] = xc^T G, d x = G W_enc[:, dead]^T): a GEMM over n_dead
columns costs less than embedding_bag over the entries until n_dead is several times their number.

``TopKSAE`` stores W_enc latent-major (each latent's column contiguous in memory), so
``W_enc.t()`` is a plain [n, d] table for embedding_bag and the [n, d] gradient transposes back to
W_enc's own strides without a copy. Any layout works; others pay a transpose per step.

Every output and gradient is checked against plain dense autograd in tests/test_kernels.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_ROWS = 2048
"""Rows per encoder chunk on CPU: fewer, larger GEMMs. 2-core CPU, batch 4,096, medians of 4 rounds
(``benchmarks/auxk_cost.py --n 8192 32768 --dead 0.03 0.1 --rounds 4 --variant rows1024=DEFAULT_CHUNK_ROWS:1024``),
plain / AuxK step, 1,024 -> 2,048 rows: 288 / 323 -> 283 / 311 ms (n = 8,192, 3 % dead), 1,081 / 1,148 ->
1,049 / 1,098 ms (n = 32,768, 3 %); 4,096 rows gained nothing more at n = 8,192. A [2,048, n] float32
chunk is 64 MiB at n = 8,192, 256 MiB at 32,768."""
GPU_MIN_CHUNK_ROWS = 1024
GPU_CHUNK_ELEMENTS = 2**27
"""On a GPU (any device but the CPU) a chunk holds up to this many pre-activations (512 MiB in float32; a whole batch of 4,096
at n = 32,768), at least GPU_MIN_CHUNK_ROWS rows: a GPU step waits mostly on the host's work of
launching kernels, so fewer chunks shorten it (H200, batch 4,096, benchmarks/auxk_cost.py, whole batch
vs chunks of 1,024 rows at n = 8,192: AuxK steps 7 -> 5 ms at 10 % dead, 11 -> 10 ms at 24 %)."""
GPU_GROUPED_TOPK_MIN_N = 16384
"""On a GPU, the grouped top-k (``_topk``) for blocks of this many latents or more; torch.topk below,
where its extra kernels cost about what they save. H200, TF32, batch 4,096, k = 32, k_aux = 256
(benchmarks/auxk_cost.py, the same rounds; plain / AuxK step at 3-38 % dead): vs torch.topk
everywhere, n = 131,072 13.0-13.3 -> 8.2-8.9 ms / 16.5-21.9 -> 12.0-19.2 ms; vs grouped from 32,768
latents, n = 32,768 3.9-4.6 -> 3.7-4.0 ms / 7.4-7.9 -> 6.0-7.1 ms (its live block of 20,000-32,000
latents goes grouped too), n = 131,072 at 24 % dead 18.2 -> 19.2 ms (the dead block of 31,457 too)."""
AUX_DENSE_FACTOR = 6
"""Dense AuxK while n_dead <= AUX_DENSE_FACTOR * (AuxK entries per row). Measured on a quiet 2-core CPU with a whole
training step, k_aux = 256, batch 4,096 (benchmarks/auxk_cost.py --aux-form dense / sparse): the
dense form costs 0.15 (n = 8,192) to 0.25 ms (n = 32,768) per dead latent, the sparse one a near
fixed 200-450 ms (B * k_aux entries); they break even near 5 k_aux at n = 8,192 and 8 k_aux at 32,768."""
GPU_AUX_DENSE_FACTOR = 64
"""AUX_DENSE_FACTOR on a GPU, whose GEMMs make the dense form cheap for much larger dead sets. H200, TF32,
k_aux = 256, batch 4,096 (benchmarks/auxk_cost.py): an AuxK step dense / sparse 6 / 10 ms at 3,113 dead
latents (n = 8,192), 7 / 10 ms at 12,452 (n = 32,768), 13 / 16 ms at 13,107 (n = 131,072), 17 / 16 ms
at 31,457 and 22 / 16 ms at 49,807."""


CPU_BF16_SCREEN_MIN_N = 4096
"""On a CPU with bfloat16 hardware, a block of this many latents or more takes its top-k by screening
(``_Screen``): the same selection, exact float32 values, from a GEMM 2-2.5x faster. Whole training steps,
2-core CPU with AVX512-BF16, batch 4,096, medians of 3 (``benchmarks/auxk_cost.py --n 32768 8192 --dead 0.03
0.24 --rounds 3 --warmup-steps 30 --variant float32=CPU_BF16_SCREEN_MIN_N:inf`` with the threshold at 8,192,
then ``--n 4096 8192`` at 4,096), plain / AuxK step, float32 -> screened:
1,062 / 1,117 -> 672 / 862 ms at n = 32,768 (3 % dead; 1,044 / 1,241 -> 753 / 1,114 ms at 24 %), 273 / 303 ->
226 / 275 ms at n = 8,192, 158 / 177 -> 146 / 171 ms at n = 4,096 (whose AuxK live block, under 4,096, is not
screened). Below that the candidates' recomputation weighs more against the GEMM it saves (not measured)."""
SCREEN_MARGIN = 64
"""Candidates per row beyond k (4x as many for rows the bound leaves open): at n = 32,768 the bound settles
about 92 % of rows with the first 64, 99 % with the next; steps with 32 or 128 took 16 % and 9 % longer."""
SCREEN_OUTLIER_DIMS = 32
"""Input dimensions the bound takes one by one (those of most energy): a residual stream's few large
dimensions would loosen a bound taken over the whole row."""
_BF16_U = 2.0 ** -8
"""bfloat16's unit roundoff: rounding a float32 to it moves it by at most this much of its magnitude."""
_SMALLEST_NORMAL = 2.0 ** -126


class EncodeOutput(NamedTuple):
    vals_BK: torch.Tensor
    """Kept values after ReLU ([B, k_big], sorted descending when ``sorted_out``)."""
    idx_BK: torch.Tensor
    """Their latent indices."""
    aux_vals_BA: torch.Tensor | None
    """AuxK values (top k_aux among dead latents, after ReLU) or None: [B, n_dead] with zeros outside
    each row's top k_aux (dense form), or [E], one per entry (entry form)."""
    aux_idx_BA: torch.Tensor | None
    """Their latent indices (in the full latent space): the [n_dead] dead latents, one per column of
    aux_vals_BA (dense form), or [E], each entry's latent (entry form)."""
    aux_rows_E: torch.Tensor | None = None
    """Entry form: each entry's row, ascending (None in the dense form)."""

    @property
    def aux_dense(self) -> bool:
        return self.aux_vals_BA is not None and self.aux_rows_E is None


def decode_aux(enc: EncodeOutput, W_dec_ND: torch.Tensor) -> torch.Tensor:
    """The AuxK reconstruction sum_j aux_val_j * W_dec[j] (no bias), in either form."""
    if enc.aux_dense:
        return _DenseRowsDecode.apply(enc.aux_vals_BA, W_dec_ND, enc.aux_idx_BA)
    return decode_entries(enc.aux_vals_BA, enc.aux_idx_BA, enc.aux_rows_E, enc.vals_BK.shape[0], W_dec_ND)


def sparse_decode(vals_BS: torch.Tensor, idx_BS: torch.Tensor, W_dec_ND: torch.Tensor) -> torch.Tensor:
    """sum_s vals[b, s] * W_dec[idx[b, s]] ([B, d], no bias), differentiable in vals and W_dec.

    The same numbers as ``F.embedding_bag(idx, W_dec, per_sample_weights=vals)``; its backward sums
    W_dec's gradient latent by latent (one stable sort of int32 keys, one embedding_bag over the
    gradient's rows), about half the time of embedding_bag's generic dense backward on CPU: the
    whole decode, forward and backward, 1.1x (256 entries per row) to 1.25x (32) faster."""
    return _SparseDecode.apply(vals_BS, W_dec_ND, idx_BS, None, idx_BS.shape[0])


def decode_entries(vals_E: torch.Tensor, idx_E: torch.Tensor, rows_E: torch.Tensor, n_rows: int,
                   W_dec_ND: torch.Tensor) -> torch.Tensor:
    """[n_rows, d]: row b is the sum of vals[e] * W_dec[idx[e]] over the entries e of row b (``rows_E``
    ascending; a row may have none). ``sparse_decode`` for rows of any number of entries."""
    return _SparseDecode.apply(vals_E, W_dec_ND, idx_E, rows_E, n_rows)


def _row_offsets(rows_E: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Where each row's entries start in ascending ``rows_E`` (embedding_bag's offsets)."""
    return torch.searchsorted(rows_E, torch.arange(n_rows, dtype=rows_E.dtype, device=rows_E.device))


class _SparseDecode(torch.autograd.Function):
    """sparse_decode ([B, S] entries, ``rows`` None) and decode_entries (flat entries of ``rows``)."""

    @staticmethod
    def forward(ctx, vals, W_ND, idx, rows, n_rows):
        ctx.save_for_backward(vals, W_ND, idx, rows)
        ctx.n_rows = n_rows
        if rows is None:
            return F.embedding_bag(idx, W_ND, per_sample_weights=vals, mode="sum")
        return F.embedding_bag(idx, W_ND, _row_offsets(rows, n_rows), per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g_BD):
        vals, W_ND, idx, rows = ctx.saved_tensors
        g_BD = g_BD.contiguous()
        groups = _LatentGroups(idx.reshape(-1), W_ND.shape[0], ctx.n_rows, rows_E=rows)
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:  # the dot product of each entry's decoder row with its row's gradient
            # Taken in latent order: consecutive entries share a decoder row, which stays in cache;
            # in row order each entry fetches a row from anywhere in W_dec (2x slower at 1 M entries
            # over 7,864 rows of 576 on CPU).
            offsets = (torch.arange(0, idx.numel(), idx.shape[-1], device=idx.device) if rows is None
                       else _row_offsets(rows, ctx.n_rows))
            per_entry = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                g_BD, W_ND, groups.latent, offsets, groups.row, 0)
            grad_vals = torch.empty_like(per_entry).index_copy_(0, groups.order, per_entry).view(vals.shape)
        if ctx.needs_input_grad[1]:
            grad_W = groups.sum_rows(vals.reshape(-1), g_BD)
        return grad_vals, grad_W, None, None, None


class _LatentGroups:
    """Entries (entry e picks latent idx_flat[e] for a row: e // S of a [B, S] selection, or rows_E[e])
    grouped by latent: ``order`` sorts them by latent (stably), ``sorted_keys`` / ``latent`` and ``row``
    are their latents and rows in that order, ``offsets[j]`` starts latent j's run."""

    def __init__(self, idx_flat: torch.Tensor, n: int, n_rows: int, *, rows_E: torch.Tensor | None = None):
        # A stable sort of int32 keys: about half the time of argsort on int64 ones on CPU.
        keys = idx_flat.to(torch.int32) if n < 2**31 else idx_flat
        self.sorted_keys, self.order = keys.sort(stable=True)
        if rows_E is None:
            self.row = torch.div(self.order, idx_flat.numel() // max(n_rows, 1), rounding_mode="floor")
        else:
            self.row = rows_E[self.order]
        self.n_rows = n_rows
        # Where each latent's run starts; unlike bincount, searchsorted needs no host sync on a GPU.
        self.offsets = torch.searchsorted(self.sorted_keys, torch.arange(n, dtype=keys.dtype, device=keys.device))

    @property
    def latent(self) -> torch.Tensor:
        """The entries' latents in latent order (only the values' gradient needs them as int64)."""
        return self.sorted_keys.long()

    def sum_rows(self, w_flat: torch.Tensor, rows_BD: torch.Tensor) -> torch.Tensor:
        """[n, d]: out[j] = sum over entries e of latent j of w_flat[e] * rows_BD[row of e]. Each latent's
        sum runs in entry order, on a GPU too (no atomic adds), so a run repeats bit for bit."""
        return F.embedding_bag(self.row, rows_BD, self.offsets, mode="sum", per_sample_weights=w_flat[self.order])

    def sums(self, w_flat: torch.Tensor) -> torch.Tensor:
        """[n]: out[j] = sum of w_flat over latent j's entries, in entry order (index_add_ would use
        atomic adds on a GPU, whose order varies from run to run)."""
        return self.sum_rows(w_flat, w_flat.new_ones(self.n_rows, 1)).squeeze(1)


def _add_to_rows_(dst_ND: torch.Tensor, rows_R: torch.Tensor, src_RD: torch.Tensor) -> torch.Tensor:
    """dst[rows] += src for DISTINCT rows. index_add_ does the same, but on CPU a contiguous 2-D
    index_add_ takes a sort-based scatter path: ~0.2 s for 245 rows of [8192, 576] (vs ~1 ms here)."""
    return dst_ND.index_copy_(0, rows_R, dst_ND.index_select(0, rows_R).add_(src_RD))


class _DenseRowsDecode(torch.autograd.Function):
    """z_BR @ W[rows] for distinct rows; its backward adds the rows' gradient without index_add_
    (see _add_to_rows_)."""

    @staticmethod
    def forward(ctx, z_BR, W_ND, rows_R):
        W_rows = W_ND.index_select(0, rows_R)
        ctx.save_for_backward(z_BR, W_rows, rows_R)
        ctx.n_rows = W_ND.shape[0]
        return z_BR @ W_rows

    @staticmethod
    def backward(ctx, g_BD):
        z_BR, W_rows, rows_R = ctx.saved_tensors
        grad_z = g_BD @ W_rows.t() if ctx.needs_input_grad[0] else None
        grad_W = None
        if ctx.needs_input_grad[1]:
            grad_W = g_BD.new_zeros(ctx.n_rows, g_BD.shape[1]).index_copy_(0, rows_R, z_BR.t() @ g_BD)
        return grad_z, grad_W, None


GEMM_ALIGN = 64
"""The split encoder pads each block of columns to a multiple of this: on CPU a GEMM whose output
rows have an odd length runs ~15-20 % slower ([1,024 x 576] @ [576 x 31,785] vs 31,744 columns)."""


def _topk(pre: torch.Tensor, k: int, sorted_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``pre.topk(k, dim=-1)`` (the same values; indices may differ only among equal values), faster on CPU.

    Each row's n columns are split into G = n / g strided groups (column c in group c mod G); the k
    groups with the largest maxima hold every top-k value: the top k group maxima are k distinct
    entries >= the k-th of them, so the k-th largest entry is >= it too, and an entry above it lies
    in a group whose maximum is above it. One elementwise max over g slices of [rows, G] (contiguous,
    so it vectorizes), a top-k over G maxima and one over the k * g candidates replace the top-k
    over n. The top-k over the G maxima is taken the same way while G is wide enough (n = 8,192,
    k = 32: 1,024 maxima in 8 groups of 128). Per 1,024 rows on 2 threads (benchmarks/kernel_micro.py),
    torch.topk -> this: 15.1 -> 9.9 ms for k = 32 of 8,192 (12.0 with one level of groups), 43.9 ->
    17.4 ms of 32,768 (19.1 with one level); AuxK's k = 256 of ~7,900 takes about half torch.topk's time.
    On a GPU it takes over from n = GPU_GROUPED_TOPK_MIN_N."""
    rows, n = pre.shape
    g = 8 if n >= 32 * k else 4 if n >= 8 * k else 1
    if (pre.device.type != "cpu" and n < GPU_GROUPED_TOPK_MIN_N) or g == 1 or n % g or k == 0:
        return pre.topk(k, dim=-1, sorted=sorted_out)
    G = n // g
    slices = pre.view(rows, g, G)
    _, group = _topk(slices.amax(dim=1), k)
    cand = slices.gather(2, group.unsqueeze(1).expand(-1, g, -1)).view(rows, g * k)
    vals, pos = cand.topk(k, dim=-1, sorted=sorted_out)
    return vals, group.gather(1, pos % k) + (pos // k) * G


class _Block(NamedTuple):
    """Some latents' encoder columns as one GEMM operand: ``W`` [D, padded] latent-major (their rows
    of W_enc.t() gathered, zero past len(cols)), ``b`` their biases, ``buf`` the chunk's output (None where
    ``screen`` takes the block's top-k)."""
    cols: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor
    buf: torch.Tensor | None
    screen: "_Screen | None" = None

    @classmethod
    def gather(cls, W_DN: torch.Tensor, b_N: torch.Tensor, cols: torch.Tensor, rows: int,
               screen_for: tuple[torch.Tensor, int] | None = None) -> "_Block":
        """``screen_for``: (the batch, k) where the block's top-k of k may be screened (_Screen.wanted)."""
        m = cols.numel()
        padded = m + (-m % GEMM_ALIGN)
        W = W_DN.new_empty(padded, W_DN.shape[0])
        torch.index_select(W_DN.t(), 0, cols, out=W[:m])
        W[m:] = 0
        b = b_N.new_zeros(padded)
        torch.index_select(b_N, 0, cols, out=b[:m])
        if screen_for is not None and _Screen.wanted(W_DN, m, screen_for[1]):
            return cls(cols, W.t(), b, None, _Screen(W.t(), b, m, screen_for[0], rows))
        return cls(cols, W.t(), b, W.new_empty(rows, padded))

    def pre(self, xs: torch.Tensor) -> torch.Tensor:
        """The chunk's pre-activations, -inf in the padding columns (set after the GEMM, so that a
        NaN or inf in the input cannot make a padding column win a top-k; only a block whose real
        pre-activations are nearly all -inf could tie with them)."""
        out = torch.addmm(self.b, xs, self.W, out=self.buf[:xs.shape[0]])
        out[:, self.cols.numel():] = float("-inf")
        return out

    def topk(self, xs: torch.Tensor, k: int, sorted_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, positions in the block) of the top k of the chunk's pre-activations."""
        return self.screen.topk(xs, k, sorted_out) if self.screen else _topk(self.pre(xs), k, sorted_out)


def _native_bf16_gemm() -> bool:
    """Whether this CPU runs bfloat16 GEMMs in hardware (AVX512-BF16 or AMX) through oneDNN, accumulating in
    float32: elsewhere they are emulated, or run by PyTorch's generic kernel, both slower than float32.
    (mkldnn's own bf16 check accepts any AVX-512 CPU.) The switch torch.backends.mkldnn.enabled is read each call."""
    cpu = torch.cpu
    hardware = any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))
    return hardware and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


class _Screen:
    """The top-k of a block's pre-activations from a bfloat16 GEMM, with the float32 selection and values.

    Each row's top k + SCREEN_MARGIN bfloat16 pre-activations are the candidates; their float32 values are
    recomputed one dot product each, and the row keeps their top k when a rigorous bound on the bfloat16
    error shows no other latent can reach its k-th: every other latent's bfloat16 value is at most the
    last candidate's, so its float32 value is at most that plus the bound. Rows the bound does not settle
    (a NaN among them) run the float32 GEMM. With x = x_hi + x_lo and W = W_hi + W_lo their bfloat16
    parts and remainders, per row: |x.w + b - fl(x_hi.w_hi + b_hi)| <= sum over the outlier dimensions
    of |x_hi,i| max_j |W_lo,ij| + ||x_hi,rest|| max_j ||W_lo,j|| + ||x_lo|| max_j ||W_j|| (1 + 2u)
    + float32 accumulation (twice gamma_d, for the GEMM and the recomputation) + the bias' rounding + what
    flushing subnormals to zero moves (2^-126 per input, product and sum), and the output's rounding
    2u |value|, u = 2^-8."""

    def __init__(self, W_DP: torch.Tensor, b_P: torch.Tensor, m: int, xc_BD: torch.Tensor, rows: int):
        self.W, self.b, self.m = W_DP, b_P, m
        self.table = W_DP.t() if W_DP.t().is_contiguous() else W_DP.t().contiguous()  # [P, D] rows for the dots
        self.Wh, self.bh = W_DP.to(torch.bfloat16), b_P.to(torch.bfloat16)
        self.buf = self.Wh.new_empty(rows, W_DP.shape[1])
        self.outliers = torch.linalg.vector_norm(xc_BD, dim=0).topk(min(SCREEN_OUTLIER_DIMS, W_DP.shape[0])).indices
        rest = torch.ones(W_DP.shape[0], dtype=torch.bool).index_fill_(0, self.outliers, False)
        self.rest = rest.nonzero().squeeze(1)
        W_lo = W_DP - self.Wh  # float32, exact: one [D, P] temporary
        self.lo_outliers = W_lo.index_select(0, self.outliers).abs().amax(1)
        # the remainders' whole columns bound their rest (a copy of the rest would cost more than it tightens)
        self.lo_rest = torch.linalg.vector_norm(W_lo, dim=0).max()
        self.norm = torch.linalg.vector_norm(W_DP, dim=0).max()
        self.slack = 2 * _BF16_U * b_P.abs().max()
        # The bfloat16 instructions flush subnormal inputs, products and sums to zero: a flushed W entry moves
        # the dot product by under 2^-126 |x_i|, a flushed x entry by under 2^-126 |w_i|, a product or sum by
        # under 2^-126 (the smallest normal float32).
        self.flush_W = _SMALLEST_NORMAL * W_DP.shape[0] * self.Wh.abs().max().float()
        self.flush = _SMALLEST_NORMAL * (2 * W_DP.shape[0] + 2)
        self.settled = self.rows = 0  # rows the bound settled, of all rows screened (for benchmarks)

    @staticmethod
    def wanted(W_DN: torch.Tensor, m: int, k: int) -> bool:
        return (W_DN.device.type == "cpu" and W_DN.dtype == torch.float32 and m >= CPU_BF16_SCREEN_MIN_N
                and 1 <= k and k + SCREEN_MARGIN < m and _native_bf16_gemm())

    def _row_bound(self, xs: torch.Tensor, xh: torch.Tensor) -> torch.Tensor:
        xhf = xh.float()
        gamma = 2 * xs.shape[1] * 2.0 ** -24 / (1 - xs.shape[1] * 2.0 ** -24)
        return (xhf[:, self.outliers].abs() @ self.lo_outliers
                + torch.linalg.vector_norm(xhf[:, self.rest], dim=1) * self.lo_rest
                + torch.linalg.vector_norm(xs - xhf, dim=1) * self.norm * (1 + 2 * _BF16_U)
                + 2 * gamma * torch.linalg.vector_norm(xs, dim=1) * self.norm * (1 + _BF16_U) + self.slack
                + _SMALLEST_NORMAL * xhf.abs().sum(1) + self.flush_W + self.flush)

    def topk(self, xs: torch.Tensor, k: int, sorted_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, positions in the block) of each row's top k, as ``_topk`` of the float32 pre-activations.
        Rows the bound leaves open get 4x the candidates, then the float32 GEMM: a row's GEMM costs about
        six times the recomputation of 4 * SCREEN_MARGIN candidates at n = 32,768."""
        xh = xs.to(torch.bfloat16)
        approx = torch.addmm(self.bh, xh, self.Wh, out=self.buf[:xs.shape[0]])
        approx[:, self.m:] = float("-inf")  # the block's padding
        bound = self._row_bound(xs, xh)
        vals, idx, open_ = self._candidates_top(xs, approx, bound, k + SCREEN_MARGIN, k, sorted_out)
        rows = open_.nonzero().squeeze(1)
        if rows.numel() and k + 4 * SCREEN_MARGIN < self.m:
            v, i, still = self._candidates_top(xs[rows], approx[rows], bound[rows], k + 4 * SCREEN_MARGIN, k,
                                               sorted_out)
            vals[rows], idx[rows] = v, i
            rows = rows[still]
        if rows.numel():
            pre = torch.addmm(self.b, xs[rows], self.W)
            pre[:, self.m:] = float("-inf")
            vals[rows], idx[rows] = _topk(pre, k, sorted_out)
        self.settled += xs.shape[0] - rows.numel()
        self.rows += xs.shape[0]
        return vals, idx

    def _candidates_top(self, xs: torch.Tensor, approx: torch.Tensor, bound: torch.Tensor, c: int, k: int,
                        sorted_out: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top k of each row's c best bfloat16 candidates, recomputed in float32, and which rows the
        bound leaves open (a NaN among them)."""
        R = xs.shape[0]
        cand_v, cand_i = _topk(approx, c)
        exact = torch.ops.aten._embedding_bag_per_sample_weights_backward(  # each candidate's dot product
            xs, self.table, cand_i.reshape(-1), torch.arange(0, R * c, c), torch.arange(R).repeat_interleave(c),
            0).view(R, c).add_(self.b[cand_i]).masked_fill_(cand_i >= self.m, float("-inf"))
        vals, pos = exact.topk(k, dim=1, sorted=sorted_out)
        last = cand_v.amin(1).float()  # every other latent's bfloat16 value is at most this
        open_ = ~(last + 2 * _BF16_U * last.abs() + bound < vals.amin(1))
        return vals, cand_i.gather(1, pos), open_


def _topk_of_split_chunk(xs: torch.Tensor, lo: int, live: _Block, dead: _Block, k_big: int, k_aux: int,
                         sorted_out: bool, try_entries: bool):
    """Top-k_big over all latents, and AuxK over the dead ones, of one chunk (rows from ``lo`` of the
    batch) whose pre-activations come from two GEMMs, live columns then dead ones: the dead block is
    contiguous, so AuxK needs no column gather, and the main top-k takes the live block's top-k_big
    merged with the dead block's candidates. Returns (values, latents, AuxK as an _AuxPart: its
    entries when ``try_entries`` (on the CPU only) and no row has more than k_aux values that the ReLU
    keeps)."""
    n_dead = dead.cols.numel()
    pre_dead = dead.pre(xs)
    keep_all = k_aux >= n_dead  # AuxK keeps every dead latent: no selection, only the main candidates
    aux = _entries_kept_by_relu(pre_dead[:, :n_dead], k_aux, lo) if try_entries else None
    dv = di = None  # the dead block's candidates for the main top-k
    if keep_all and aux is None:  # a new tensor: pre_dead is the next chunk's buffer
        aux = _AuxPart(lo, pre_dead[:, :n_dead].relu(), None)
    elif aux is None:  # its top max(k_aux, k_big) holds both its AuxK selection and its main candidates
        dv, di = _topk(pre_dead, min(max(k_aux, k_big), n_dead))
        if k_aux < dv.shape[1]:
            av, pos = dv.topk(k_aux, dim=-1, sorted=False)
            aux = _AuxPart(lo, av.relu(), di.gather(1, pos))
        else:
            aux = _AuxPart(lo, dv.relu(), di)
    lv, li = live.topk(xs, min(k_big, live.cols.numel()), sorted_out and aux.is_entries)  # may be final
    if dv is None:
        merged = _merge_dead_winners(lv, live.cols[li], k_big, aux, dead.cols, sorted_out) if aux.is_entries else None
        if merged is not None:
            return *merged, aux
        dv, di = _topk(pre_dead, min(k_big, n_dead))
    if dv.shape[1] > k_big:
        dv, pos = dv.topk(k_big, dim=-1, sorted=False)
        di = di.gather(1, pos)
    cand_v, cand_i = torch.cat([lv, dv], dim=1), torch.cat([live.cols[li], dead.cols[di]], dim=1)
    v, pos = cand_v.topk(k_big, dim=-1, sorted=sorted_out)
    return v, cand_i.gather(1, pos), aux


class _AuxPart(NamedTuple):
    """One chunk's AuxK values, its rows from ``lo`` of the batch: its entries (``vals`` [E], nonzero;
    ``local`` their positions in the dead block; ``rows`` ascending, in the chunk), or each row's top
    k_aux after ReLU (``vals`` [R, A]; ``local`` their positions, None where column j is position j;
    ``rows`` None)."""
    lo: int
    vals: torch.Tensor
    local: torch.Tensor | None
    rows: torch.Tensor | None = None

    @property
    def is_entries(self) -> bool:
        return self.rows is not None

    def kept(self, drop_zeros: bool) -> torch.Tensor | None:
        """Which values the entry form keeps, for ``entries``: a mask of the nonzero ones with
        ``drop_zeros`` (!= 0 keeps a NaN); None where it keeps them all."""
        return None if self.is_entries or not drop_zeros else self.vals != 0

    def fill(self, dense_BN: torch.Tensor) -> None:
        """Write the values into the batch's dense form."""
        if self.is_entries:
            dense_BN.index_put_((self.rows + self.lo, self.local), self.vals)
            return
        rows = dense_BN[self.lo:self.lo + self.vals.shape[0]]
        if self.local is None:
            rows.copy_(self.vals)
        else:
            rows.scatter_(1, self.local, self.vals)

    def entries(self, kept: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, positions in the dead block, rows of the batch) row by row: those of ``kept`` (the
        mask from ``kept()``), else all of them (keeping only the nonzero ones off the CPU would wait
        for the device)."""
        if self.is_entries:
            return self.vals, self.local, self.rows + self.lo
        av, A = self.vals, self.vals.shape[1]
        pos = kept.view(-1).nonzero().squeeze(1) if kept is not None else torch.arange(av.numel(), device=av.device)
        local = pos % A if self.local is None else self.local.reshape(-1)[pos]
        return av.reshape(-1)[pos], local, torch.div(pos, A, rounding_mode="floor") + self.lo


def _entries_kept_by_relu(pre_RA: torch.Tensor, k_aux: int, lo: int) -> _AuxPart | None:
    """The entries of ``pre_RA`` that the ReLU leaves nonzero (positive, or NaN: a non-finite input must
    reach the loss, which the trainer checks); None when a row has more than k_aux of them. Otherwise
    they are exactly the nonzero values of each row's top k_aux after ReLU, found without that top-k:
    in training a row has 1-30 of them among hundreds of dead latents, and the top-256 of 819 took
    about half of AuxK's time at n = 8,192 with 10 % dead."""
    kept = ~(pre_RA <= 0)
    if k_aux < pre_RA.shape[1] and kept.sum(dim=1).max() > k_aux:  # counted first: a sum costs less than
        return None                                                # a nonzero; on the CPU only: no device to wait for
    rows, cols = kept.nonzero(as_tuple=True)
    return _AuxPart(lo, pre_RA[rows, cols], cols, rows)


def _merge_dead_winners(lv_RK: torch.Tensor, li_RK: torch.Tensor, k_big: int, entries: _AuxPart,
                        dead_cols: torch.Tensor, sorted_out: bool):
    """The main top-k (values, latents) of a chunk from its live block's top-k (``lv_RK``, latents
    ``li_RK``) and the dead block's ``entries`` (its values above 0, and NaN) above each row's k-th live
    value; None when a row's k-th live value is below 0 or it has fewer than k_big live latents (a dead
    value at most 0 could then be selected). Latents dead for a window rarely pass a row's k-th live
    value: the dead block's own top-k would cost a pass over it for a few candidates."""
    if lv_RK.shape[1] < k_big:
        return None
    kth = lv_RK.amin(dim=1)
    if not bool((kth >= 0).all()):
        return None
    win = (~(entries.vals <= kth[entries.rows])).nonzero().squeeze(1)  # ~(<=): a NaN wins, as in torch.topk
    if win.numel() == 0:
        return lv_RK, li_RK
    rows = entries.rows[win]  # ascending: each row's winners go after its k_big live candidates
    starts = _row_offsets(rows, lv_RK.shape[0])
    slot = k_big + torch.arange(win.numel(), device=rows.device) - starts[rows]
    width = k_big + int(torch.diff(starts, append=starts.new_tensor([win.numel()])).max())
    cand_v = torch.cat([lv_RK, lv_RK.new_full((lv_RK.shape[0], width - k_big), float("-inf"))], dim=1)
    cand_i = torch.cat([li_RK, li_RK.new_zeros(li_RK.shape[0], width - k_big)], dim=1)
    cand_v[rows, slot] = entries.vals[win]
    cand_i[rows, slot] = dead_cols[entries.local[win]]
    v, pos = cand_v.topk(k_big, dim=-1, sorted=sorted_out)
    return v, cand_i.gather(1, pos)


def _aux_form(aux_parts: list[_AuxPart], dead_idx: torch.Tensor, B: int, aux_dense: bool | None,
              dense_factor: float, drop_zeros: bool):
    """AuxK's values in the form that costs less (see EncodeOutput): (values, latents, rows or None).

    ``aux_parts``: the chunks' values. With ``drop_zeros`` (on the CPU) the entry form keeps only the
    nonzero values: in training most AuxK values are 0 (1-3 % of the top 256 positive at n = 8,192 in
    the quickstart), and a zero adds nothing to the decode or to any gradient. The dense form is
    chosen (``aux_dense`` None) while n_dead <= dense_factor * entries per row: a GEMM over n_dead
    columns costs less than embedding_bag passes over that many entries per row until n_dead is several
    times their number."""
    n_dead = dead_idx.numel()
    # each mask built once: it decides the form, then selects the entries (a dense form told needs neither)
    kept = [part.kept(drop_zeros and aux_dense is not True) for part in aux_parts]
    if aux_dense is None:
        per_row = sum(part.vals.numel() if mask is None else int(mask.sum())
                      for part, mask in zip(aux_parts, kept)) / max(B, 1)
        aux_dense = dense_factor == float("inf") or n_dead <= dense_factor * per_row  # inf: dense even at 0
    if aux_dense:
        return _dense_aux(aux_parts, B, n_dead), dead_idx, None
    vals, local, rows = (torch.cat(column) for column in zip(*(p.entries(m) for p, m in zip(aux_parts, kept))))
    return vals, dead_idx[local], rows


def _dense_aux(aux_parts: list[_AuxPart], B: int, n_dead: int) -> torch.Tensor:
    """[B, n_dead]: the chunks' AuxK values in the dense form. Where every chunk kept each dead latent
    (k_aux >= n_dead, as on a GPU at a small dead set) their values already are its rows: no zeros to
    write first."""
    if all(not part.is_entries and part.local is None for part in aux_parts):
        vals = [part.vals for part in aux_parts]
        return vals[0] if len(vals) == 1 else torch.cat(vals)
    dense = aux_parts[0].vals.new_zeros(B, n_dead)
    for part in aux_parts:
        part.fill(dense)
    return dense


def _live_columns(is_live: torch.Tensor, n_live: int) -> torch.Tensor:
    """The indices where ``is_live`` holds (``n_live`` of them), ascending. nonzero's output size is data,
    so off the CPU it waits for the device; a stable argsort of the mask does not, and runs on every
    backend and torch version (nonzero_static has no CUDA kernel before torch 2.6). On the CPU nonzero
    is 4-10x faster than the argsort."""
    if is_live.device.type == "cpu":
        return is_live.nonzero().squeeze(1)
    return is_live.to(torch.uint8).argsort(descending=True, stable=True)[:n_live]


class _SparseTopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD, b_dec_D, W_enc_DN, b_enc_N, k_big, dead_idx, k_aux, aux_dense, dense_factor, drop_zeros,
                chunk_rows, sorted_out):
        xc_BD = x_BD - b_dec_D
        B, n = xc_BD.shape[0], W_enc_DN.shape[1]
        rows = min(chunk_rows, B)
        vals, idx, aux_parts = [], [], []
        # One buffer (per block) for every chunk: a fresh [chunk, n] allocation per chunk is a fresh
        # mmap whose page faults cost ~10 % of the GEMM on CPU.
        if dead_idx is None:
            screen = _Screen(W_enc_DN, b_enc_N, n, xc_BD, rows) if _Screen.wanted(W_enc_DN, n, k_big) else None
            buf = None if screen else xc_BD.new_empty(rows, n)
            for lo in range(0, B, chunk_rows):
                xs = xc_BD[lo:lo + chunk_rows]
                if screen:
                    v, i = screen.topk(xs, k_big, sorted_out)
                else:
                    v, i = _topk(torch.addmm(b_enc_N, xs, W_enc_DN, out=buf[:xs.shape[0]]), k_big, sorted_out)
                vals.append(v)
                idx.append(i)
        else:
            is_live = torch.ones(n, dtype=torch.bool, device=dead_idx.device).index_fill_(0, dead_idx, False)
            live = _Block.gather(W_enc_DN, b_enc_N, _live_columns(is_live, n - dead_idx.numel()), rows,
                                 screen_for=(xc_BD, k_big))
            dead = _Block.gather(W_enc_DN, b_enc_N, dead_idx, rows)
            try_entries = drop_zeros  # on the CPU, until a chunk has a row with more than k_aux: the next likely too
            for lo in range(0, B, chunk_rows):
                v, i, aux = _topk_of_split_chunk(xc_BD[lo:lo + chunk_rows], lo, live, dead, k_big, k_aux,
                                                 sorted_out, try_entries)
                vals.append(v)
                idx.append(i)
                aux_parts.append(aux)
                try_entries = aux.is_entries
        vals_BK = torch.relu(torch.cat(vals))
        idx_BK = torch.cat(idx)
        if dead_idx is None:
            aux_vals_BA, aux_idx, aux_rows = xc_BD.new_empty(B, 0), idx_BK.new_empty(0), None
        else:
            aux_vals_BA, aux_idx, aux_rows = _aux_form(aux_parts, dead_idx, B, aux_dense, dense_factor, drop_zeros)
        ctx.aux_dense = dead_idx is not None and aux_rows is None
        ctx.save_for_backward(xc_BD, W_enc_DN, vals_BK, idx_BK, aux_vals_BA, aux_idx, aux_rows)
        ctx.mark_non_differentiable(idx_BK, aux_idx, *([] if aux_rows is None else [aux_rows]))
        return vals_BK, idx_BK, aux_vals_BA, aux_idx, aux_rows

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, *_g_indices):
        xc_BD, W_enc_DN, vals_BK, idx_BK, aux_vals, aux_idx, aux_rows = ctx.saved_tensors
        need_x, need_b_dec, need_W, need_b = ctx.needs_input_grad[:4]
        parts = []  # (gradient of the kept values, their latents, their rows or None for [B, S])
        if g_vals is not None:
            parts.append((g_vals * (vals_BK > 0), idx_BK, None))  # ReLU: no gradient where a value was clipped
        g_dense = None
        if g_aux is not None and aux_vals.numel() > 0:
            g_a = g_aux * (aux_vals > 0)  # zero outside the top k_aux too (those values are 0)
            if ctx.aux_dense:
                g_dense = g_a
            else:
                parts.append((g_a, aux_idx, aux_rows))
        grad_x, grad_W, grad_b = _sparse_grads(xc_BD, W_enc_DN, parts, need_x, need_W)
        if g_dense is not None:  # dense AuxK: GEMMs on the dead latents' columns
            dead = aux_idx
            if need_x:
                grad_x = torch.addmm(grad_x, g_dense, W_enc_DN.index_select(1, dead).t())
            if need_W:
                _add_to_rows_(grad_W, dead, g_dense.t() @ xc_BD)
            grad_b.index_add_(0, dead, g_dense.sum(0))
        grad_b_dec = -(W_enc_DN @ grad_b) if need_b_dec else None
        return (grad_x, grad_b_dec, grad_W.t() if need_W else None, grad_b if need_b else None) + (None,) * 8


def _bag_sum(g: torch.Tensor, idx: torch.Tensor, rows_E: torch.Tensor | None, table_ND: torch.Tensor,
             n_rows: int) -> torch.Tensor:
    """[n_rows, d]: sum of g * table[idx] over each row's entries ([B, S] entries, or flat ones of rows_E)."""
    if rows_E is None:
        return F.embedding_bag(idx, table_ND, per_sample_weights=g, mode="sum")
    return F.embedding_bag(idx, table_ND, _row_offsets(rows_E, n_rows), per_sample_weights=g, mode="sum")


def _sparse_grads(xc_BD: torch.Tensor, W_enc_DN: torch.Tensor, parts: list, need_x: bool, need_W: bool):
    """Gradients of the selected entries (``parts``: values' gradient, latents, rows as in _bag_sum):
    d x [B, d] (or None), d W_enc as a latent-major [n, d] table (or None), d b_enc [n]; zeros when
    nothing is selected."""
    (B, d), n = xc_BD.shape, W_enc_DN.shape[1]
    parts = [part for part in parts if part[0].numel() > 0]
    if not parts:
        grad_W = xc_BD.new_zeros(n, d) if need_W else None
        return (torch.zeros_like(xc_BD) if need_x else None), grad_W, xc_BD.new_zeros(n)
    grad_x = None
    if need_x:
        W_ND = W_enc_DN.t().contiguous()
        grad_x = sum(_bag_sum(g, idx, rows, W_ND, B) for g, idx, rows in parts)
    if len(parts) == 1:
        g, idx, rows = parts[0]
    else:  # one grouping for all entries: each part's rows made explicit
        g = torch.cat([p[0].reshape(-1) for p in parts])
        idx = torch.cat([p[1].reshape(-1) for p in parts])
        rows = torch.cat([_entry_rows(p[1], p[2]) for p in parts])
    groups = _LatentGroups(idx.reshape(-1), n, B, rows_E=rows)
    g_flat = g.reshape(-1)
    grad_W = groups.sum_rows(g_flat, xc_BD) if need_W else None
    return grad_x, grad_W, groups.sums(g_flat)


def _entry_rows(idx: torch.Tensor, rows_E: torch.Tensor | None) -> torch.Tensor:
    """Each entry's row: rows_E, or e // S for a [B, S] selection."""
    if rows_E is not None:
        return rows_E
    return torch.div(torch.arange(idx.numel(), device=idx.device), idx.shape[1], rounding_mode="floor")


def sparse_topk_encode(x_BD: torch.Tensor, b_dec_D: torch.Tensor, W_enc_DN: torch.Tensor, b_enc_N: torch.Tensor,
                       k: int, *, dead_idx: torch.Tensor | None = None, k_aux: int = 0, sorted_out: bool = False,
                       aux_dense: bool | None = None, chunk_rows: int | None = None) -> EncodeOutput:
    """Top-k (then ReLU) of ``(x - b_dec) @ W_enc + b_enc`` with a sparse backward.

    ``dead_idx`` (distinct latent indices, on the data's device: a repeated one would cut live latents
    off the main top-k) adds AuxK: the top ``k_aux`` pre-activations among those latents, after ReLU,
    in dense form when ``aux_dense``, in entry form when not (see EncodeOutput). By default the form
    is chosen by size: dense while n_dead <= AUX_DENSE_FACTOR * (positive AuxK values per row) on the
    CPU, whose entry form keeps only those; GPU_AUX_DENSE_FACTOR * k_aux on other devices, whose entry
    form keeps all k_aux per row (finding the positive ones there would wait for the device once more
    per step; not yet measured). ``sorted_out`` sorts the kept values descending (needed to slice
    Multi-TopK's top-k). ``chunk_rows``: rows per encoder GEMM (default DEFAULT_CHUNK_ROWS on the CPU;
    on other devices as many as GPU_CHUNK_ELEMENTS allows).
    """
    if dead_idx is not None:
        k_aux = min(k_aux, dead_idx.numel())
        if k_aux == 0:
            dead_idx = None
    cpu = x_BD.device.type == "cpu"
    factor = AUX_DENSE_FACTOR if cpu else GPU_AUX_DENSE_FACTOR
    if chunk_rows is None:
        chunk_rows = DEFAULT_CHUNK_ROWS if cpu else max(GPU_MIN_CHUNK_ROWS, GPU_CHUNK_ELEMENTS // W_enc_DN.shape[1])
    vals, idx, aux_vals, aux_idx, aux_rows = _SparseTopKEncode.apply(
        x_BD, b_dec_D, W_enc_DN, b_enc_N, k, dead_idx, k_aux, aux_dense, factor, cpu, chunk_rows, sorted_out)
    if dead_idx is None:
        return EncodeOutput(vals, idx, None, None)
    return EncodeOutput(vals, idx, aux_vals, aux_idx, aux_rows)
