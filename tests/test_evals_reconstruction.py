"""Known answer: nMSE in the raw activation space and in the SAE's own (normalized) input space."""

import math

import pytest
import torch

from saelab.evals.reconstruction import reconstruction_metrics
from saelab.sae.topk import LN_EPS, SAEConfig, TopKSAE

ROWS = [[3.0, -1.0, 1.0, -3.0], [12.0, 8.0, 10.0, 10.0], [0.0, 1.0, 5.0, 2.0]]


def _identity_sae(input_norm: str) -> TopKSAE:
    """k = 1 and identity weights: the SAE keeps the largest coordinate of its (normalized) input."""
    sae = TopKSAE(SAEConfig(d_in=4, n_latents=4, k=1, input_norm=input_norm))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    return sae


def _nmse(xs, x_hats):
    """sum ||x - x_hat||^2 / sum ||x - mean x||^2, in plain Python."""
    d = len(xs[0])
    mean = [sum(x[j] for x in xs) / len(xs) for j in range(d)]
    sse = sum((x[j] - h[j]) ** 2 for x, h in zip(xs, x_hats) for j in range(d))
    return sse / sum((x[j] - mean[j]) ** 2 for x in xs for j in range(d))


def _by_hand():
    """The LayerNorm SAE of _identity_sae on ROWS: (x, x_hat, x_n, x_hat_n) per row."""
    out = []
    for x in ROWS:
        mu = sum(x) / 4
        std = math.sqrt(sum((v - mu) ** 2 for v in x) / 3)  # unbiased, as OpenAI's LN
        x_n = [(v - mu) / (std + LN_EPS) for v in x]
        top = max(range(4), key=lambda j: x_n[j])
        x_hat_n = [x_n[j] if j == top else 0.0 for j in range(4)]
        x_hat = [v * std + mu for v in x_hat_n]  # de-normalized without eps
        out.append((x, x_hat, x_n, x_hat_n))
    return out


def test_layernorm_sae_nmse_in_both_spaces_known_answer():
    rows = _by_hand()
    raw = _nmse([r[0] for r in rows], [r[1] for r in rows])
    normalized = _nmse([r[2] for r in rows], [r[3] for r in rows])
    # Kept coordinates (3, 2 and 3 of the centred rows) leave errors of squared norm 11, 4, 5 over
    # a total variance of 748/3 in raw space; the normalized space divides each row's error by its
    # variance (20/3, 8/3, 14/3), and every normalized row has squared norm 3 (unbiased std).
    assert raw == pytest.approx(20 / (748 / 3), rel=1e-6)
    assert normalized == pytest.approx((33 / 20 + 3 / 2 + 15 / 14) / 5.352099, rel=1e-5)  # 9 - 3 ||mean||^2
    x = torch.tensor(ROWS)
    res, freq = reconstruction_metrics(_identity_sae("layernorm"), [x[:2], x[2:]])
    assert res.nmse == pytest.approx(raw, rel=1e-6)
    assert res.nmse_sae_input == pytest.approx(normalized, rel=1e-6)
    assert res.to_dict()["nmse_sae_input"] == res.nmse_sae_input
    assert res.l0 == 1 and freq.tolist() == [2 / 3, 0, 1 / 3, 0]


def test_without_input_normalization_the_two_spaces_agree():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g) * 3 + 5
    sae = _identity_sae("none")
    res, _ = reconstruction_metrics(sae, x.split(7))
    kept = torch.zeros_like(x).scatter_(1, x.argmax(1, keepdim=True), x.max(1, keepdim=True).values)
    assert res.nmse == res.nmse_sae_input
    assert res.nmse == pytest.approx(_nmse(x.tolist(), kept.tolist()), rel=1e-6)
