"""Known-answer tests pinning the reconstruction metric definitions."""

import torch

from saelab.evals.downstream import ce_and_kl
from saelab.evals.reconstruction import DENSE_THRESHOLD, ReconstructionAccumulator, nmse


def test_nmse_known_answer():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 2.0], [2.0, -2.0]])  # mean (2, 0); total SS = 1+1+4+4 = 10
    x_hat = x + torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 2.0]])  # SSE = 1 + 4 = 5
    assert nmse(x, x_hat) == 0.5
    # Predicting the mean everywhere gives exactly 1; it is NOT normalized by sum(x^2) (= 26 here).
    assert abs(nmse(x, x.mean(0).expand_as(x)) - 1.0) < 1e-12


def _accumulate(x, x_hat, vals, idx, batch):
    acc = ReconstructionAccumulator(n_latents=6, d_in=x.shape[1])
    for i in range(0, x.shape[0], batch):
        acc.update(x[i:i + batch], x_hat[i:i + batch], vals[i:i + batch], idx[i:i + batch])
    return acc.result()


def test_nmse_independent_of_batch_size():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 5, generator=g) * 3 + 10  # a large mean, as real residual streams have
    x_hat = x + 0.3 * torch.randn(100, 5, generator=g)
    vals = torch.rand(100, 2, generator=g)
    idx = torch.randint(0, 6, (100, 2), generator=g)
    ref = nmse(x, x_hat)
    for batch in (1, 7, 32, 100):
        assert abs(_accumulate(x, x_hat, vals, idx, batch).nmse - ref) < 1e-9


def test_l0_dead_dense_known_answer():
    x = torch.randn(4, 3)
    # Latent 0 fires on every token, 1 on one token in four (both above the 10% dense threshold),
    # 2..5 never (dead). Zero kept values do not count as firing.
    idx = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 4]])
    vals = torch.tensor([[1.0, 2.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    res = _accumulate(x, x, vals, idx, batch=3)
    assert res.l0 == (2 + 1 + 1 + 1) / 4
    assert res.dead_frac == 4 / 6  # latents 2..5 only ever had value 0: never fired
    assert DENSE_THRESHOLD == 0.1 and res.dense_frac == 2 / 6
    assert res.n_tokens == 4


def test_ce_and_kl_known_answer():
    # Vocabulary of 2, one context of 3 tokens: two predictions (positions 0 and 1).
    tokens = torch.tensor([[0, 1, 0]])
    clean = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [9.0, 9.0]]])  # last position predicts nothing
    edited = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, -1.0]]])
    ce_c, ce_e, kl = ce_and_kl(clean, edited, tokens)
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    assert torch.allclose(ce_c, torch.stack([torch.log(torch.tensor(2.0)), -torch.log(p[0])]))
    assert torch.allclose(ce_e, torch.log(torch.tensor([2.0, 2.0])))
    expected_kl = (p * (p.log() - torch.log(torch.tensor([0.5, 0.5])))).sum()
    assert torch.allclose(kl, torch.stack([torch.tensor(0.0), expected_kl]), atol=1e-7)
    # first_pos=1 leaves out the prediction made at position 0.
    ce_c1, _, kl1 = ce_and_kl(clean, edited, tokens, first_pos=1)
    assert ce_c1.shape == (1,) and torch.allclose(kl1, expected_kl.reshape(1))


def test_rows_that_do_not_vary_have_no_nmse():
    """One row, identical rows, or rows one LayerNorm makes identical: nMSE's denominator is 0, so it is refused
    naming the space, where it read inf (or a huge number from rounding)."""
    import pytest

    from saelab.errors import NonFiniteError
    from saelab.evals.reconstruction import reconstruction_metrics
    from saelab.sae.topk import SAEConfig, TopKSAE

    torch.manual_seed(0)
    plain = TopKSAE(SAEConfig(d_in=8, n_latents=16, k=4))
    layernorm = TopKSAE(SAEConfig(d_in=8, n_latents=16, k=4, input_norm="layernorm"))
    one_vector = torch.randn(1, 8) * torch.arange(1.0, 6.0)[:, None]  # 5 rows along one direction
    for sae, rows, space, n in ((plain, torch.randn(1, 8), "eval activations", "1 row"),
                                (plain, torch.ones(5, 8), "eval activations", "5 rows"),
                                (layernorm, one_vector, "eval activations after the SAE's input normalization",
                                 "5 rows")):
        with pytest.raises(NonFiniteError, match=rf"^{space}: nMSE is undefined where the rows do not vary around "
                                                 rf"their mean \({n}; .*expected at least 2 rows that differ$"):
            reconstruction_metrics(sae, [rows])
    with pytest.raises(NonFiniteError, match="rows: nMSE is undefined"):
        nmse(torch.ones(3, 2), torch.zeros(3, 2))
    assert reconstruction_metrics(layernorm, [torch.randn(5, 8)])[0].nmse_sae_input > 0  # rows that differ
