"""The sparse top-k encoder against plain dense autograd: values and gradients of every input."""

import pytest
import torch

from saelab.sae.kernels import sparse_topk_encode


def _dense_reference(x, b_dec, W, b, k_big, dead_idx, k_aux):
    pre = (x - b_dec) @ W + b
    v, i = pre.topk(k_big, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    za = None
    if dead_idx is not None:
        dead = torch.zeros(pre.shape[1], dtype=torch.bool)
        dead[dead_idx] = True
        av, ai = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
        za = torch.zeros_like(pre).scatter(-1, ai, torch.relu(av))
    return z, za


def _densify(vals, idx, n):
    return torch.zeros(vals.shape[0], n, dtype=vals.dtype).scatter(-1, idx, vals)


@pytest.mark.parametrize("chunk_rows", [5, 1024])
@pytest.mark.parametrize("with_aux", [False, True])
@pytest.mark.parametrize("sorted_out", [False, True])
@pytest.mark.parametrize("latent_major", [False, True])
def test_sparse_encode_matches_dense_autograd(chunk_rows, with_aux, sorted_out, latent_major):
    torch.manual_seed(0)
    B, D, n, k = 37, 12, 50, 6
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(D, dtype=torch.float64, requires_grad=True)
    W = torch.randn(D, n, dtype=torch.float64)
    W = (W.t().contiguous().t() if latent_major else W).requires_grad_()  # TopKSAE's layout, or plain
    b = (0.3 * torch.randn(n, dtype=torch.float64)).requires_grad_()
    dead_idx = torch.arange(0, n, 4) if with_aux else None
    out = sparse_topk_encode(x, b_dec, W, b, k, dead_idx=dead_idx, k_aux=5, sorted_out=sorted_out,
                             chunk_rows=chunk_rows)
    z_ref, za_ref = _dense_reference(x, b_dec, W, b, k, dead_idx, 5)

    z = _densify(out.vals_BK, out.idx_BK, n)
    assert torch.allclose(z, z_ref, atol=1e-12)
    if sorted_out:
        assert (out.vals_BK[:, :-1] >= out.vals_BK[:, 1:]).all()
    # Arbitrary downstream loss touching the kept values (and the AuxK values): compare gradients.
    proj = torch.randn(n, 3, dtype=torch.float64)
    loss = (z @ proj).pow(2).sum()
    ref_loss = (z_ref @ proj).pow(2).sum()
    if with_aux:
        za = _densify(out.aux_vals_BA, out.aux_idx_BA, n)
        assert torch.allclose(za, za_ref, atol=1e-12)
        loss = loss + (za @ proj).sin().sum()
        ref_loss = ref_loss + (za_ref @ proj).sin().sum()
    grads = torch.autograd.grad(loss, (x, b_dec, W, b))
    ref_grads = torch.autograd.grad(ref_loss, (x, b_dec, W, b))
    for name, g, rg in zip(("x", "b_dec", "W_enc", "b_enc"), grads, ref_grads):
        assert torch.allclose(g, rg, rtol=1e-10, atol=1e-12), name
    # Only some inputs needing gradients (training: x is data) gives the same numbers for those.
    x.requires_grad_(False)
    again = sparse_topk_encode(x, b_dec, W, b, k, dead_idx=dead_idx, k_aux=5, sorted_out=sorted_out,
                               chunk_rows=chunk_rows)
    loss2 = (_densify(again.vals_BK, again.idx_BK, n) @ proj).pow(2).sum()
    if with_aux:
        loss2 = loss2 + (_densify(again.aux_vals_BA, again.aux_idx_BA, n) @ proj).sin().sum()
    for g, rg in zip(torch.autograd.grad(loss2, (b_dec, W, b)), ref_grads[1:]):
        assert torch.allclose(g, rg, rtol=1e-10, atol=1e-12)


def test_relu_clipped_values_get_no_gradient():
    # All pre-activations negative: every kept value is clipped to 0 and nothing may flow back.
    x = torch.ones(4, 3, dtype=torch.float64, requires_grad=True)
    b_dec = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    W = -torch.rand(3, 10, dtype=torch.float64).requires_grad_()
    b = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    out = sparse_topk_encode(x, b_dec, W, b, 2)
    assert (out.vals_BK == 0).all()
    gx, gbd, gW, gb = torch.autograd.grad(out.vals_BK.sum() * 1.0 + 0 * W.sum(), (x, b_dec, W, b), allow_unused=True)
    assert gx.abs().sum() == 0 and gbd.abs().sum() == 0 and gb.abs().sum() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_kernel_matches_cpu_reference(dtype, tol):
    """The same kernel on the GPU (float32 and bf16) against the float64 CPU dense reference."""
    torch.manual_seed(0)
    B, D, n, k = 256, 64, 512, 16
    x = torch.randn(B, D, dtype=torch.float64)
    b_dec = 0.1 * torch.randn(D, dtype=torch.float64)
    W = torch.randn(D, n, dtype=torch.float64) / D**0.5
    b = 0.1 * torch.randn(n, dtype=torch.float64)
    dead_idx = torch.arange(0, n, 3)
    z_ref, za_ref = _dense_reference(x, b_dec, W, b, k, dead_idx, 8)

    dev = [t.to("cuda", dtype).requires_grad_() for t in (x, b_dec, W, b)]
    out = sparse_topk_encode(*dev, k, dead_idx=dead_idx.cuda(), k_aux=8)
    z = _densify(out.vals_BK.double().cpu(), out.idx_BK.cpu(), n)
    # Compare where both selections agree (bf16 rounding can swap near-ties at the k-th place).
    agree = (z != 0) == (z_ref != 0)
    assert agree.float().mean() > 0.99
    assert torch.allclose(z[agree], z_ref[agree], rtol=tol, atol=tol)
    (out.vals_BK.float().pow(2).sum() + out.aux_vals_BA.float().sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad.float()).all() for t in dev)
