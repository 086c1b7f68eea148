import pytest
import torch

from saelab.utils.tensors import all_finite


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_agrees_with_the_elementwise_check(dtype, device):
    """Finite values (also ones whose sum overflows the dtype) are finite; one NaN, +inf or -inf
    anywhere, or +inf and -inf together (a NaN sum), is not."""
    big = torch.finfo(dtype).max
    finite = [torch.randn(64, 9, dtype=dtype), torch.full((4, 3), big, dtype=dtype),
              torch.tensor([big, -big, big], dtype=dtype), torch.zeros(0, 5, dtype=dtype)]
    for t in finite:
        t = t.to(device)
        assert all_finite(t) and bool(torch.isfinite(t).all())
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(64, 9, dtype=dtype)
        t[17, 4] = bad
        assert not all_finite(t.to(device))
    both = torch.randn(8, dtype=dtype)
    both[1], both[6] = float("inf"), float("-inf")
    assert not all_finite(both.to(device))


def test_all_finite_of_integers_and_complex():
    assert all_finite(torch.arange(10))
    assert all_finite(torch.tensor([1 + 2j, 3j]))
    assert not all_finite(torch.tensor([1 + 2j, complex(0, float("inf"))]))
