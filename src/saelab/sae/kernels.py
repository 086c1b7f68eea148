"""Sparse top-k encoder: one dense GEMM forward, a backward that touches only selected latents.

The encoder forward is ``pre = (x - b_dec) @ W_enc + b_enc`` followed by a top-k. Dense autograd
would keep the [B, n] pre-activations and run two more [B, d] x [d, n] GEMMs in the backward
(gradients of W_enc and of the input), although only B*k entries of d(loss)/d(pre) are nonzero.
Here, with xc = x - b_dec:

- forward runs the GEMM in row chunks and keeps only the top-k (and the AuxK top-k among dead
  latents) of each chunk, so the [B, n] matrix never exists whole (peak memory: one chunk);
- backward, with g the gradient of the kept values (ReLU mask applied):
    d b_enc[j]    = sum of g over selections of latent j            (index_add)
    d W_enc[:, j] = sum over selections (b, j) of g * xc[b]         (embedding_bag, rows grouped by latent)
    d b_dec       = -sum_b d xc[b] = -W_enc @ d b_enc                 (one mat-vec: the rows' sum is all
                                                                      b_dec needs, so d xc is not formed)
    d x[b]        = sum over selections (b, j) of g * W_enc[:, j]   (embedding_bag; only if x needs it)
  which is O(B * k * d) instead of O(B * n * d).

``TopKSAE`` stores W_enc latent-major (each latent's column contiguous in memory), so
``W_enc.t()`` is a plain [n, d] table for embedding_bag and the [n, d] gradient transposes back to
W_enc's own strides without a copy. Any layout works; others pay a transpose per step.

Every output and gradient is checked against plain dense autograd in tests/test_kernels.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_ROWS = 1024


class EncodeOutput(NamedTuple):
    vals_BK: torch.Tensor
    """Kept values after ReLU ([B, k_big], sorted descending when k_big > k)."""
    idx_BK: torch.Tensor
    """Their latent indices."""
    aux_vals_BA: torch.Tensor | None
    """AuxK values (top k_aux among dead latents, after ReLU) or None."""
    aux_idx_BA: torch.Tensor | None
    """Their latent indices (in the full latent space)."""


def _group_by_latent(idx_flat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets) such that idx_flat[order] is sorted and offsets[j] starts latent j's run."""
    order = idx_flat.argsort()
    counts = torch.bincount(idx_flat, minlength=n)
    offsets = torch.zeros(n, dtype=torch.long, device=idx_flat.device)
    offsets[1:] = counts.cumsum(0)[:-1]
    return order, offsets


class _SparseTopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD, b_dec_D, W_enc_DN, b_enc_N, k_big, dead_idx, k_aux, chunk_rows, sorted_out):
        xc_BD = x_BD - b_dec_D
        B = xc_BD.shape[0]
        vals, idx = [], []
        aux_vals, aux_idx = [], []
        # One buffer for every chunk: a fresh [chunk, n] allocation per chunk is a fresh mmap whose
        # page faults cost ~10 % of the GEMM on CPU.
        buf = xc_BD.new_empty(min(chunk_rows, B), W_enc_DN.shape[1])
        for lo in range(0, B, chunk_rows):
            xs = xc_BD[lo:lo + chunk_rows]
            pre = torch.addmm(b_enc_N, xs, W_enc_DN, out=buf[:xs.shape[0]])
            v, i = pre.topk(k_big, dim=-1, sorted=sorted_out)
            vals.append(v)
            idx.append(i)
            if dead_idx is not None:
                av, ai = pre.index_select(1, dead_idx).topk(k_aux, dim=-1, sorted=False)
                aux_vals.append(av)
                aux_idx.append(dead_idx[ai])
        vals_BK = torch.relu(torch.cat(vals))
        idx_BK = torch.cat(idx)
        if dead_idx is not None:
            aux_vals_BA, aux_idx_BA = torch.relu(torch.cat(aux_vals)), torch.cat(aux_idx)
        else:
            aux_vals_BA = aux_idx_BA = xc_BD.new_empty(B, 0)
            aux_idx_BA = aux_idx_BA.long()
        ctx.save_for_backward(xc_BD, W_enc_DN, vals_BK, idx_BK, aux_vals_BA, aux_idx_BA)
        ctx.mark_non_differentiable(idx_BK, aux_idx_BA)
        return vals_BK, idx_BK, aux_vals_BA, aux_idx_BA

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):
        xc_BD, W_enc_DN, vals_BK, idx_BK, aux_vals_BA, aux_idx_BA = ctx.saved_tensors
        n = W_enc_DN.shape[1]
        g_parts, i_parts = [], []
        if g_vals is not None:
            g_parts.append(g_vals * (vals_BK > 0))  # ReLU: no gradient where the kept value was clipped
            i_parts.append(idx_BK)
        if g_aux is not None and aux_idx_BA.shape[1] > 0:
            g_parts.append(g_aux * (aux_vals_BA > 0))
            i_parts.append(aux_idx_BA)
        if not g_parts:
            return (None,) * 9
        g = torch.cat(g_parts, dim=1)
        idx = torch.cat(i_parts, dim=1)
        B, S = idx.shape
        idx_flat, g_flat = idx.reshape(-1), g.reshape(-1)

        grad_x = grad_b_dec = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, W_enc_DN.t().contiguous(), per_sample_weights=g, mode="sum")
        if ctx.needs_input_grad[2]:
            order, offsets = _group_by_latent(idx_flat, n)
            rows = torch.arange(B, device=idx.device).repeat_interleave(S)
            grad_W = F.embedding_bag(rows[order], xc_BD, offsets, mode="sum",
                                     per_sample_weights=g_flat[order]).t()
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_b = torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, idx_flat, g_flat)
            if ctx.needs_input_grad[1]:
                grad_b_dec = -(W_enc_DN @ grad_b)
            if not ctx.needs_input_grad[3]:
                grad_b = None
        return grad_x, grad_b_dec, grad_W, grad_b, None, None, None, None, None


def sparse_topk_encode(x_BD: torch.Tensor, b_dec_D: torch.Tensor, W_enc_DN: torch.Tensor, b_enc_N: torch.Tensor,
                       k: int, *, dead_idx: torch.Tensor | None = None, k_aux: int = 0, sorted_out: bool = False,
                       chunk_rows: int = DEFAULT_CHUNK_ROWS) -> EncodeOutput:
    """Top-k (then ReLU) of ``(x - b_dec) @ W_enc + b_enc`` with a sparse backward.

    ``dead_idx`` (latent indices) adds AuxK: the top ``k_aux`` pre-activations among those
    latents. ``sorted_out`` sorts the kept values descending (needed to slice Multi-TopK's top-k).
    """
    if dead_idx is not None:
        k_aux = min(k_aux, dead_idx.numel())
        if k_aux == 0:
            dead_idx = None
    vals, idx, aux_vals, aux_idx = _SparseTopKEncode.apply(x_BD, b_dec_D, W_enc_DN, b_enc_N, k, dead_idx, k_aux,
                                                           chunk_rows, sorted_out)
    if dead_idx is None:
        return EncodeOutput(vals, idx, None, None)
    return EncodeOutput(vals, idx, aux_vals, aux_idx)
