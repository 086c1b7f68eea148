"""The sparse top-k encoder against plain dense autograd: values and gradients of every input."""

import pytest
import torch

import saelab.sae.kernels as kernels
from saelab.sae.kernels import AUX_DENSE_FACTOR, sparse_decode, sparse_topk_encode

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
    return torch.zeros(vals.shape[0], n, dtype=vals.dtype, device=vals.device).scatter(-1, idx, vals)


def _densify_aux(out, n):
    """AuxK output of either form as dense [B, n] latents."""
    za = torch.zeros(out.vals_BK.shape[0], n, dtype=out.aux_vals_BA.dtype, device=out.aux_vals_BA.device)
    if out.aux_dense:
        return za.index_copy(1, out.aux_idx_BA, out.aux_vals_BA)
    return za.index_put((out.aux_rows_E, out.aux_idx_BA), out.aux_vals_BA)  # an entry appears once


# Dead sets: none, a mix of dead and alive latents (13 > k_aux), fewer dead than k_aux, exactly k_aux,
# an empty dead set (n_dead = 0: AuxK off), fewer alive latents than k (the main top-k reaches into
# the dead block), and every latent dead (no alive block).
DEAD_SETS = {"none": None, "mix": torch.arange(0, 50, 4), "few": torch.tensor([3, 17, 40]),
             "k_aux": torch.tensor([0, 9, 18, 27, 49]), "empty": torch.zeros(0, dtype=torch.long),
             "most": torch.cat([torch.arange(0, 20), torch.arange(23, 50)]), "all": torch.arange(50)}


@pytest.mark.parametrize("n,k,dead_count", [(512, 4, 0), (512, 16, 0), (512, 4, 100), (1024, 32, 300), (2048, 5, 64),
                                             (8192, 32, 300)])
@pytest.mark.parametrize("sorted_out", [False, True])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("device,grouped_on_gpu,chunk_rows", [
    ("cpu", False, None), pytest.param("cuda", False, None, marks=CUDA), pytest.param("cuda", True, None, marks=CUDA),
    pytest.param("cuda", True, 7, marks=CUDA)])
def test_wide_encode_matches_torch_topk(n, k, dead_count, sorted_out, ties, device, grouped_on_gpu, chunk_rows,
                                        monkeypatch):
    """Widths where the encoder's top-k splits each row into column groups (n >= 8 k, with and without a
    dead block, k_aux = 32): the kept values equal torch.topk's on the dense pre-activations, also when
    many pre-activations are equal (rounded to a coarse grid), and the indices point at those values.
    On a GPU with torch.topk and with the grouped top-k, over whole batches and in chunks of 7 rows."""
    monkeypatch.setattr(kernels, "GPU_GROUPED_TOPK_MIN_N", 0 if grouped_on_gpu else float("inf"))
    torch.manual_seed(3)
    B, D = 24, 8
    x = torch.randn(B, D, dtype=torch.float64)
    W = torch.randn(D, n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    if ties:  # pre-activations on a grid of 0.5: many equal values around every row's k-th
        x, W, b = x.round(), W.round(), (2 * b).round() / 2
    dead_idx = torch.randperm(n)[:dead_count].sort().values.to(device) if dead_count else None
    x, W, b = x.to(device), W.to(device), b.to(device)
    out = sparse_topk_encode(x, torch.zeros(D, dtype=torch.float64, device=device), W, b, k, dead_idx=dead_idx,
                             k_aux=32,
                             sorted_out=sorted_out, chunk_rows=chunk_rows)
    pre = x @ W + b
    ref = pre.topk(k, dim=-1).values.relu()
    got = out.vals_BK if sorted_out else out.vals_BK.sort(dim=-1, descending=True).values
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)  # (addmm rounds differently; with ties all is exact)
    assert torch.allclose(pre.gather(1, out.idx_BK).relu(), out.vals_BK, rtol=0, atol=1e-12)
    assert (out.idx_BK.sort(dim=-1).values.diff(dim=-1) > 0).all()  # k distinct latents per row
    if dead_idx is not None:
        ref_aux = pre[:, dead_idx].topk(min(32, dead_count), dim=-1).values.relu()
        aux = _densify_aux(out, n)[:, dead_idx].sort(dim=-1, descending=True).values[:, :ref_aux.shape[1]]
        assert torch.allclose(aux, ref_aux, rtol=0, atol=1e-12)


@pytest.mark.parametrize("aux_dense", [False, True])
@pytest.mark.parametrize("k_aux", [4, 20])  # 20: AuxK keeps every dead latent, with no top-k
def test_non_finite_input_gives_non_finite_values_with_auxk(aux_dense, k_aux):
    """A NaN or inf in the input makes its row's pre-activations non-finite, padding columns of the
    live and dead blocks included (0 * inf is NaN): the kept values must come out non-finite (which
    the trainer turns into NonFiniteError), not an out-of-range latent index."""
    torch.manual_seed(0)
    n, D = 100, 6
    x = torch.randn(4, D)
    x[1, 2], x[2, 0] = float("nan"), float("inf")
    dead_idx = torch.arange(0, n, 7)  # 15 dead: both blocks have padding columns
    out = sparse_topk_encode(x, torch.zeros(D), torch.randn(D, n), torch.zeros(n), 5, dead_idx=dead_idx, k_aux=k_aux,
                             aux_dense=aux_dense)
    assert out.idx_BK.max() < n and out.idx_BK.min() >= 0
    assert (~out.vals_BK[1:3].isfinite()).any(dim=1).all() and out.vals_BK[[0, 3]].isfinite().all()
    assert (~_densify_aux(out, n)[1:3].isfinite()).any(dim=1).all()


@pytest.mark.parametrize("chunk_rows", [5, 1024])
@pytest.mark.parametrize("dead", list(DEAD_SETS))
@pytest.mark.parametrize("aux_dense", [False, True, None])
@pytest.mark.parametrize("sorted_out", [False, True])
@pytest.mark.parametrize("latent_major", [False, True])
# 2: fewer than k dead latents ("few") and more than k_aux; 30: most rows' positive dead values fit, AuxK
# needs no top-k there
@pytest.mark.parametrize("k_aux", [2, 5, 30])
def test_sparse_encode_matches_dense_autograd(chunk_rows, dead, aux_dense, sorted_out, latent_major, k_aux):
    torch.manual_seed(0)
    B, D, n, k = 37, 12, 50, 6
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(D, dtype=torch.float64, requires_grad=True)
    W = torch.randn(D, n, dtype=torch.float64)
    W = (W.t().contiguous().t() if latent_major else W).requires_grad_()  # TopKSAE's layout, or plain
    b = (0.3 * torch.randn(n, dtype=torch.float64)).requires_grad_()
    dead_idx = DEAD_SETS[dead]
    with_aux = dead_idx is not None and dead_idx.numel() > 0

    def encode():
        return sparse_topk_encode(x, b_dec, W, b, k, dead_idx=dead_idx, k_aux=k_aux, sorted_out=sorted_out,
                                  aux_dense=aux_dense, chunk_rows=chunk_rows)

    def reference():
        return _dense_reference(x, b_dec, W, b, k, dead_idx if with_aux else None,
                                min(k_aux, 0 if dead_idx is None else dead_idx.numel()))

    out = encode()
    z_ref, za_ref = reference()
    assert (out.aux_vals_BA is not None) == with_aux
    if with_aux:
        za = reference()[1]  # the rule counts the nonzero AuxK values per row
        by_size = dead_idx.numel() <= AUX_DENSE_FACTOR * (za != 0).sum() / B
        assert out.aux_dense == (aux_dense if aux_dense is not None else by_size)
    z = _densify(out.vals_BK, out.idx_BK, n)
    assert torch.allclose(z, z_ref, atol=1e-12)
    if sorted_out:
        assert (out.vals_BK[:, :-1] >= out.vals_BK[:, 1:]).all()
    # Arbitrary downstream loss touching the kept values (and the AuxK values): compare gradients.
    proj = torch.randn(n, 3, dtype=torch.float64)

    def aux_loss(za):
        return (za @ proj).sin().sum()

    def loss_of(z, za):
        return (z @ proj).pow(2).sum() + (0 if za is None else aux_loss(za))

    if with_aux:
        assert torch.allclose(_densify_aux(out, n), za_ref, atol=1e-12)
    loss = loss_of(z, _densify_aux(out, n) if with_aux else None)
    ref_loss = loss_of(z_ref, za_ref)
    grads = torch.autograd.grad(loss, (x, b_dec, W, b))
    ref_grads = torch.autograd.grad(ref_loss, (x, b_dec, W, b))
    for name, g, rg in zip(("x", "b_dec", "W_enc", "b_enc"), grads, ref_grads):
        assert torch.allclose(g, rg, rtol=1e-10, atol=1e-12), name
    if with_aux:  # the AuxK values alone (main values unused) get their own gradients right
        aux_grads = torch.autograd.grad(aux_loss(_densify_aux(encode(), n)), (x, b_dec, W, b))
        ref_aux = torch.autograd.grad(aux_loss(reference()[1]), (x, b_dec, W, b))
        for name, g, rg in zip(("x", "b_dec", "W_enc", "b_enc"), aux_grads, ref_aux):
            assert torch.allclose(g, rg, rtol=1e-10, atol=1e-12), ("aux only", name)
    # Only some inputs needing gradients (training: x is data) gives the same numbers for those.
    x.requires_grad_(False)
    again = encode()
    loss2 = loss_of(_densify(again.vals_BK, again.idx_BK, n), _densify_aux(again, n) if with_aux else None)
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
@pytest.mark.parametrize("aux_dense", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_kernel_matches_cpu_reference(dtype, tol, aux_dense):
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
    out = sparse_topk_encode(*dev, k, dead_idx=dead_idx.cuda(), k_aux=8, aux_dense=aux_dense)
    z = _densify(out.vals_BK.double().cpu(), out.idx_BK.cpu(), n)
    # Compare where both selections agree (bf16 rounding can swap near-ties at the k-th place).
    agree = (z != 0) == (z_ref != 0)
    assert agree.float().mean() > 0.99
    assert torch.allclose(z[agree], z_ref[agree], rtol=tol, atol=tol)
    (out.vals_BK.float().pow(2).sum() + out.aux_vals_BA.float().sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad.float()).all() for t in dev)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sparse_decode_matches_cpu_reference():
    torch.manual_seed(0)
    B, S, n, d = 64, 16, 300, 32
    idx = torch.stack([torch.randperm(n)[:S] for _ in range(B)])
    vals, W, g = torch.randn(B, S, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64), torch.randn(B, d)
    ref_vals, ref_W = vals.clone().requires_grad_(), W.clone().requires_grad_()
    (_densify(ref_vals, idx, n) @ ref_W).backward(g.double())
    cv, cW = vals.float().cuda().requires_grad_(), W.float().cuda().requires_grad_()
    out = sparse_decode(cv, idx.cuda(), cW)
    assert torch.allclose(out.double().cpu(), _densify(vals, idx, n) @ W, rtol=1e-4, atol=1e-4)
    out.backward(g.cuda())
    assert torch.allclose(cv.grad.double().cpu(), ref_vals.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(cW.grad.double().cpu(), ref_W.grad, rtol=1e-4, atol=1e-4)


def test_aux_form_is_chosen_by_size():
    """Dense AuxK while n_dead <= AUX_DENSE_FACTOR * (nonzero AuxK values per row), entries beyond:
    on the CPU the entry form keeps only the nonzero values (both forms exact, tested above)."""
    B, n, k_aux = 8, 64, 4
    x, b_dec, b = torch.eye(B), torch.zeros(B), torch.zeros(n)  # pre-activations = W's rows
    for n_dead, dense in ((AUX_DENSE_FACTOR, True), (AUX_DENSE_FACTOR + 1, False)):
        # Row r: live latents at 2 + r / 10, dead ones at -1 but one (r mod n_dead) at 1: one of its
        # k_aux AuxK values survives the ReLU.
        dead = torch.arange(n_dead)
        W = 2 + torch.arange(B * n, dtype=torch.float32).view(B, n) / (10 * B * n)
        W[:, dead] = -1
        W[torch.arange(B), torch.arange(B) % n_dead] = 1
        out = sparse_topk_encode(x, b_dec, W, b, 3, dead_idx=dead, k_aux=k_aux)
        assert out.aux_dense == dense
        want = torch.zeros(B, n_dead).index_put((torch.arange(B), torch.arange(B) % n_dead), torch.tensor(1.0))
        assert torch.equal(_densify_aux(out, n)[:, dead], want)
        if not dense:  # only the nonzero values, one per row, in row order
            assert torch.equal(out.aux_vals_BA, torch.ones(B)) and torch.equal(out.aux_rows_E, torch.arange(B))
    # Off the CPU the entry form keeps every one of the k_aux values per row (finding the nonzero ones
    # would wait for the device), and the rule counts k_aux: dense while n_dead <= factor * k_aux.
    av = torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.25, 0.0]])
    ai = torch.tensor([[3, 1], [0, 2], [1, 4]])
    for n_dead, dense in ((2 * 4, True), (2 * 4 + 1, False)):
        dead = torch.arange(10, 10 + n_dead)
        vals, lat, rows = kernels._aux_form([kernels._AuxPart(0, av, ai)], dead, 3, None, 4.0, drop_zeros=False)
        assert (rows is None) == dense, n_dead
        if not dense:  # all B * k_aux entries, zeros included, row by row
            assert torch.equal(vals, av.reshape(-1)) and torch.equal(lat, dead[ai.reshape(-1)])
            assert torch.equal(rows, torch.tensor([0, 0, 1, 1, 2, 2]))
    # With drop_zeros the same values give 2 entries (2 / 3 per row): dense only while n_dead <= 4 * 2 / 3.
    parts = [kernels._AuxPart(0, av[:2], ai[:2]), kernels._AuxPart(2, av[2:], ai[2:])]  # two chunks of rows
    vals, lat, rows = kernels._aux_form(parts, torch.arange(10, 15), 3, None, 4.0, drop_zeros=True)
    assert torch.equal(vals, torch.tensor([0.5, 0.25])) and torch.equal(rows, torch.tensor([0, 2]))
    assert torch.equal(lat, torch.tensor([13, 11]))
    # A factor of inf (benchmarks force the dense form so) is dense even with no nonzero value.
    none = [kernels._AuxPart(0, torch.zeros(3, 2), ai)]
    assert kernels._aux_form(none, torch.arange(10, 19), 3, None, float("inf"), True)[2] is None
    # Told the form, it keeps it.
    assert not sparse_topk_encode(x, b_dec, W, b, 3, dead_idx=dead[:2], k_aux=k_aux, aux_dense=False).aux_dense
    assert sparse_topk_encode(x, b_dec, W, b, 3, dead_idx=dead, k_aux=k_aux, aux_dense=True).aux_dense


@pytest.mark.parametrize("sliced", [False, True])
def test_sparse_decode_matches_dense_autograd(sliced):
    """sparse_decode against z @ W_dec with z dense: the output and the gradients of the values and
    of every decoder row (rows picked by several entries, by none, and a row's entries in any order);
    ``sliced``: the first columns of wider [B, S] tensors, as training decodes the top-k of a top-4k."""
    torch.manual_seed(0)
    B, S, n, d = 29, 7, 40, 11
    idx = torch.stack([torch.randperm(n)[:S + 3] for _ in range(B)])
    vals = torch.randn(B, S + 3, dtype=torch.float64)
    if not sliced:
        idx, vals = idx[:, :S].contiguous(), vals[:, :S].contiguous()
    vals.requires_grad_()
    W = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    v, i = (vals[:, :S], idx[:, :S]) if sliced else (vals, idx)
    out = sparse_decode(v, i, W)
    ref = _densify(v, i, n) @ W
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn(B, d, dtype=torch.float64)
    grads = torch.autograd.grad(out, (vals, W), g)
    ref_grads = torch.autograd.grad(ref, (vals, W), g)
    for name, got, want in zip(("vals", "W_dec"), grads, ref_grads):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), name
    assert grads[1][torch.isin(torch.arange(n), i.unique(), invert=True)].abs().sum() == 0


@pytest.mark.parametrize("n_entries", [0, 1, 60])
def test_decode_entries_matches_dense_autograd(n_entries):
    """decode_entries (AuxK's entry form: rows of any number of entries, some none) against z @ W_dec
    with z dense: the output and the gradients of the values and of every decoder row."""
    torch.manual_seed(0)
    B, n, d = 13, 40, 11
    cells = torch.randperm(B * n)[:n_entries].sort().values  # distinct (row, latent) cells in row order
    rows, idx = cells // n, cells % n
    vals = torch.randn(n_entries, dtype=torch.float64, requires_grad=True)
    W = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    out = kernels.decode_entries(vals, idx, rows, B, W)
    ref = torch.zeros(B, n, dtype=torch.float64).index_put((rows, idx), vals) @ W
    assert out.shape == (B, d) and torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn(B, d, dtype=torch.float64)
    for name, got, want in zip(("vals", "W_dec"), torch.autograd.grad(out, (vals, W), g),
                               torch.autograd.grad(ref, (vals, W), g)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), name


@pytest.mark.parametrize("chunk_rows", [5, 64])  # 64: the batch's 37 rows in one chunk
@pytest.mark.parametrize("dead", ["mix", "few", "most"])  # "few": k_aux keeps every dead latent
@pytest.mark.parametrize("aux_dense", [False, True])
def test_auxk_as_on_a_gpu_matches_dense_autograd(dead, aux_dense, chunk_rows):
    """Off the CPU, AuxK keeps all k_aux values of each row, zeros too (finding the nonzero ones would
    wait for the device): that path, run here on the CPU, against dense autograd, values and gradients."""
    torch.manual_seed(0)
    B, D, n, k = 37, 12, 50, 6
    x, b_dec = torch.randn(B, D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    W, b = torch.randn(D, n, dtype=torch.float64), 0.3 * torch.randn(n, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, b_dec, W, b)]
    dead_idx = DEAD_SETS[dead]
    k_aux = min(5, dead_idx.numel())
    out = kernels.EncodeOutput(*kernels._SparseTopKEncode.apply(
        *inputs, k, dead_idx, k_aux, aux_dense, kernels.GPU_AUX_DENSE_FACTOR, False, chunk_rows, False))
    assert out.aux_dense == aux_dense and (aux_dense or out.aux_vals_BA.numel() == B * k_aux)
    z, za = _densify(out.vals_BK, out.idx_BK, n), _densify_aux(out, n)
    z_ref, za_ref = _dense_reference(*inputs, k, dead_idx, k_aux)
    assert torch.allclose(z, z_ref, atol=1e-12) and torch.allclose(za, za_ref, atol=1e-12)
    proj = torch.randn(n, 3, dtype=torch.float64)
    grads = torch.autograd.grad(((z @ proj).pow(2) + (za @ proj).sin()).sum(), inputs)
    ref_grads = torch.autograd.grad(((z_ref @ proj).pow(2) + (za_ref @ proj).sin()).sum(), inputs)
    for name, g, rg in zip(("x", "b_dec", "W_enc", "b_enc"), grads, ref_grads):
        assert torch.allclose(g, rg, rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("chunk_rows", [None, 2])  # 2: the first chunk's AuxK goes without a top-k, the second not
@pytest.mark.parametrize("aux_dense", [False, True])
def test_auxk_keeps_k_aux_values_where_more_are_positive(aux_dense, chunk_rows):
    """Rows with k_aux - 1, k_aux and k_aux + 1 positive dead pre-activations: AuxK keeps all of them in
    the first two and only the top k_aux in the third (the rows without more than k_aux go without a
    top-k), as torch.topk then ReLU does."""
    n, k_aux = 12, 3
    dead = torch.arange(2, 12)
    x, b_dec, b = torch.eye(3), torch.zeros(3), torch.zeros(n)  # pre-activations = W's rows
    W = -torch.ones(3, n)
    W[:, :2] = 5  # the two live latents hold the main top-2
    for row, positive in enumerate((k_aux - 1, k_aux, k_aux + 1)):
        W[row, dead[1:1 + positive]] = torch.arange(1, positive + 1, dtype=torch.float32)
    out = sparse_topk_encode(x, b_dec, W, b, 2, dead_idx=dead, k_aux=k_aux, aux_dense=aux_dense, chunk_rows=chunk_rows)
    want = W[:, dead].topk(k_aux, dim=-1)
    want = torch.zeros(3, dead.numel()).scatter_(1, want.indices, want.values.relu())
    assert torch.equal(_densify_aux(out, n)[:, dead], want)
    assert (want != 0).sum(1).tolist() == [k_aux - 1, k_aux, k_aux]


def test_auxk_with_every_value_clipped_decodes_to_zero():
    """Every dead latent's pre-activation negative: the entry form holds no entry, AuxK decodes to 0
    and sends no gradient, and the main selection's gradients are those of dense autograd."""
    torch.manual_seed(0)
    B, D, n, k = 9, 5, 30, 3
    x = torch.randn(B, D, dtype=torch.float64)
    W = torch.randn(D, n, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n, dtype=torch.float64)
    dead = torch.arange(20, 30)
    b[dead] = -1e3
    b.requires_grad_()
    b_dec = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    out = sparse_topk_encode(x, b_dec, W, b, k, dead_idx=dead, k_aux=4)
    assert not out.aux_dense and out.aux_vals_BA.numel() == 0
    W_dec = torch.randn(n, D, dtype=torch.float64, requires_grad=True)
    aux = kernels.decode_aux(out, W_dec)
    assert torch.equal(aux, torch.zeros(B, D, dtype=torch.float64))
    loss = (sparse_decode(out.vals_BK, out.idx_BK, W_dec) - x).pow(2).sum() + aux.sum()
    z_ref, _ = _dense_reference(x, b_dec, W, b, k, None, 0)
    ref = (z_ref @ W_dec - x).pow(2).sum()
    for g, rg in zip(torch.autograd.grad(loss, (W, b, b_dec, W_dec)), torch.autograd.grad(ref, (W, b, b_dec, W_dec))):
        assert torch.allclose(g, rg, rtol=1e-10, atol=1e-12)


def test_main_topk_takes_a_dead_latent_above_a_negative_kth_live_value():
    """A row whose live pre-activations are all negative: a dead latent at -1 (AuxK keeps nothing of the
    row, its ReLU is 0) is above the row's k-th live value, and the main top-k selects it as torch.topk
    does, though every kept value is 0 after ReLU."""
    n, k = 12, 2
    dead = torch.arange(4, 12)
    W = torch.tensor([[-5.0, -6, -7, -8] + [-10.0] * 8, [3.0, 2, 1, 0.5] + [-10.0] * 8])  # pre-activations = W's rows
    W[0, dead[5]] = -1.0
    out = sparse_topk_encode(torch.eye(2), torch.zeros(2), W, torch.zeros(n), k, dead_idx=dead, k_aux=3)
    for row in range(2):
        assert set(out.idx_BK[row].tolist()) == set(W[row].topk(k).indices.tolist()), row
    assert out.idx_BK[0].tolist().count(int(dead[5])) == 1 and (out.vals_BK[0] == 0).all()


@pytest.mark.parametrize("one_dead_wins", [False, True])
def test_main_topk_with_dead_latents_below_every_kth_live_value(one_dead_wins):
    """Dead latents whose pre-activations stay below each row's k-th live one (as latents dead for a
    whole window do): the main top-k is the dense one, of live latents only; a single dead
    pre-activation above it in one row is selected there."""
    torch.manual_seed(0)
    B, D, n, k, k_aux = 24, 8, 60, 4, 6
    x = torch.randn(B, D, dtype=torch.float64)
    W = torch.randn(D, n, dtype=torch.float64)
    b = torch.zeros(n, dtype=torch.float64)
    dead = torch.arange(0, n, 5)
    b[dead] = -50.0  # below any live pre-activation
    if one_dead_wins:
        b[dead[3]] = 0.0
        x[7] = 10 * W[:, dead[3]] / W[:, dead[3]].norm()  # row 7 points along that dead latent's column
    W.requires_grad_(), b.requires_grad_()
    b_dec = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    out = sparse_topk_encode(x, b_dec, W, b, k, dead_idx=dead, k_aux=k_aux, chunk_rows=8)
    z_ref, za_ref = _dense_reference(x, b_dec, W, b, k, dead, k_aux)
    z = _densify(out.vals_BK, out.idx_BK, n)
    assert torch.allclose(z, z_ref, atol=1e-12)
    assert bool((z[7, dead[3]] > 0)) == one_dead_wins
    assert torch.allclose(_densify_aux(out, n), za_ref, atol=1e-12)
    proj = torch.randn(n, 3, dtype=torch.float64)
    loss = (z @ proj).pow(2).sum() + (_densify_aux(out, n) @ proj).sin().sum()
    ref = (z_ref @ proj).pow(2).sum() + (za_ref @ proj).sin().sum()
    for g, rg in zip(torch.autograd.grad(loss, (W, b, b_dec)), torch.autograd.grad(ref, (W, b, b_dec))):
        assert torch.allclose(g, rg, rtol=1e-10, atol=1e-12)



def _screen_inputs(seed=0, B=300, d=96, n=2048, latent_major=False):
    """float32 inputs whose rows have a few large dimensions (as a residual stream's) and whose latents'
    norms differ, as a trained encoder's do; W stored latent-major as TopKSAE stores it, or not."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g) * torch.where(torch.arange(d) < 4, 20.0, 1.0)
    W = torch.randn(d, n, generator=g) / d ** 0.5 * (0.5 + torch.rand(n, generator=g))
    if latent_major:
        W = W.t().contiguous().t()
    return [t.requires_grad_() for t in (x, torch.randn(d, generator=g) * 0.1, W, torch.randn(n, generator=g) * 0.1)]


@pytest.fixture
def screened(monkeypatch):
    """The screen on for blocks of 512 latents or more, on any CPU (its hardware check is about speed only),
    and every _Screen the encoder builds, to count the rows each stage took."""
    monkeypatch.setattr(kernels, "CPU_BF16_SCREEN_MIN_N", 512)
    monkeypatch.setattr(kernels, "_native_bf16_gemm", lambda: True)
    screens = []
    init = kernels._Screen.__init__

    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        screens.append(self)
    monkeypatch.setattr(kernels._Screen, "__init__", recorded)
    return screens


@pytest.mark.parametrize("dead_count", [0, 150])
@pytest.mark.parametrize("sorted_out", [False, True])
@pytest.mark.parametrize("chunk_rows,latent_major", [(None, False), (64, True)])  # 64: 5 chunks, the last short
def test_bf16_screen_matches_dense_autograd(screened, dead_count, sorted_out, chunk_rows, latent_major):
    """The screened top-k (a bfloat16 GEMM, its candidates recomputed in float32, a bound on its error)
    selects what the float64 top-k selects wherever the k-th and next value are apart by more than
    float32's error, with the selected latents' float32 values; the gradients are dense autograd's."""
    x, b_dec, W, b = _screen_inputs(latent_major=latent_major)
    k, k_aux, n = 8, 16, W.shape[1]
    dead_idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:dead_count].sort().values
    out = sparse_topk_encode(x, b_dec, W, b, k, dead_idx=dead_idx if dead_count else None, k_aux=k_aux,
                             sorted_out=sorted_out, chunk_rows=chunk_rows)
    assert len(screened) == 1 and screened[0].rows == x.shape[0] and screened[0].settled == x.shape[0]
    x64, b_dec64, W64, b64 = (t.detach().double().requires_grad_() for t in (x, b_dec, W, b))
    pre = (x64 - b_dec64) @ W64 + b64
    top = pre.detach().topk(k + 1, dim=1).values
    clear = top[:, k - 1] - top[:, k] > 1e-4
    assert clear.float().mean() > 0.9
    assert torch.equal(out.idx_BK[clear].sort(1).values, pre.detach().topk(k, dim=1).indices[clear].sort(1).values)
    if sorted_out:
        assert (out.vals_BK[clear, :-1] >= out.vals_BK[clear, 1:]).all()
    ref_vals = pre.gather(1, out.idx_BK).relu()
    assert torch.allclose(out.vals_BK.double()[clear], ref_vals.detach()[clear], rtol=1e-5, atol=1e-5)
    if dead_count:
        _, za_ref = _dense_reference(x64.detach(), b_dec64.detach(), W64.detach(), b64.detach(), k, dead_idx, k_aux)
        assert torch.allclose(_densify_aux(out, n).double()[clear], za_ref[clear], rtol=1e-5, atol=1e-5)
    weights = torch.randn(out.vals_BK.shape, generator=torch.Generator().manual_seed(2))
    (out.vals_BK * weights).sum().backward()
    (ref_vals * weights.double()).sum().backward()
    for got, want in ((x, x64), (b_dec, b_dec64), (W, W64), (b, b64)):
        assert torch.allclose(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)


def test_bf16_screen_takes_more_candidates_where_bfloat16_ties(screened):
    """Row 0's pre-activations tie in bfloat16 across 200 latents that float32 tells apart: the first 72
    candidates cannot settle it, the next 264 do; the selection is float64's. A screen that ignored its bound,
    or dropped the second stage's result, would select other latents."""
    g = torch.Generator().manual_seed(0)
    B, d, n, k, T = 4, 96, 2048, 8, 200
    x = torch.randn(B, d, generator=g).bfloat16().float()
    W = torch.randn(d, n, generator=g).bfloat16().float() * 0.01
    base = x[0].sign()
    W[:, :T] = base[:, None] * (1 + 2.0 ** -10 * torch.rand(d, T, generator=g))
    assert torch.equal(W[:, :T].bfloat16(), base[:, None].bfloat16().expand(d, T))
    out = sparse_topk_encode(x, torch.zeros(d), W, torch.zeros(n), k)
    assert screened[0].settled == screened[0].rows == B
    ref = (x.double() @ W.double()).topk(k, dim=1)
    assert torch.equal(out.idx_BK.sort(1).values, ref.indices.sort(1).values)


def test_bf16_screen_bound_holds_and_open_rows_take_float32():
    """The bound the screen settles rows by covers every entry's bfloat16 error (measured against float64), rows
    of large norm included; a row it leaves open (a NaN) gets the float32 top-k, the others the same selection.
    Values near float32's underflow, which the bfloat16 instructions flush to zero, are left open too."""
    x, b_dec, W, b = (t.detach() for t in _screen_inputs(seed=3))
    xc = x - b_dec
    xc[5] = float("nan")
    xc[10:20] *= 1e4
    screen = kernels._Screen(W, b, W.shape[1], xc, 64)
    W_used, b_used = screen.W, screen.b
    exact = xc.double() @ W_used.double() + b_used.double()
    xh = xc.to(torch.bfloat16)
    approx = (torch.addmm(b_used.to(torch.bfloat16), xh, W_used.to(torch.bfloat16))).double()
    finite = exact.isfinite().all(1)
    err = (approx - exact).abs() - 2 * kernels._BF16_U * approx.abs()
    assert (err[finite] <= screen._row_bound(xc, xh).double()[finite, None]).all()
    vals, idx = zip(*(screen.topk(xc[lo:lo + 64], 8, sorted_out=True) for lo in range(0, xc.shape[0], 64)))
    vals, idx = torch.cat(vals), torch.cat(idx)
    assert 0 < screen.settled < screen.rows == xc.shape[0]
    assert vals[5].isnan().any()
    ref_v, ref_i = torch.addmm(b_used, xc, W_used).topk(8, dim=1)
    assert torch.equal(idx[finite].sort(1).values, ref_i[finite].sort(1).values)
    assert torch.allclose(vals[finite], ref_v[finite], rtol=1e-5, atol=1e-4)
    g = torch.Generator().manual_seed(4)  # every product subnormal: the bfloat16 GEMM returns zeros
    x_tiny, W_tiny = torch.randn(64, 96, generator=g) * 1e-20, torch.randn(96, 2048, generator=g) * 1e-19
    tiny = kernels._Screen(W_tiny, torch.zeros(2048), 2048, x_tiny, 64)
    _, idx = tiny.topk(x_tiny, 8, sorted_out=True)
    assert torch.equal(idx.sort(1).values, (x_tiny.double() @ W_tiny.double()).topk(8, dim=1).indices.sort(1).values)


def test_bf16_screen_leaves_a_nan_row_to_float32_and_k_0_alone(screened):
    """A NaN in a row reaches its values (the trainer's non-finite check needs it), as without the screen; k = 0
    selects nothing, without a screen."""
    x, b_dec, W, b = (t.detach() for t in _screen_inputs())
    x[7, 50] = float("nan")
    out = sparse_topk_encode(x, b_dec, W, b, 8)
    assert screened[0].settled == x.shape[0] - 1 and out.vals_BK[7].isnan().any()
    assert out.vals_BK[torch.arange(x.shape[0]) != 7].isfinite().all()
    screened.clear()
    assert sparse_topk_encode(x, b_dec, W, b, 0).vals_BK.shape == (x.shape[0], 0) and not screened
