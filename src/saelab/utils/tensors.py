"""Checks that hot paths run on every batch."""

from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite.

    A NaN or an inf anywhere makes the sum NaN or inf, so a finite sum settles it in one pass;
    ``torch.isfinite(t).all()`` takes about four passes and two temporaries (4.9 vs 0.4 ms for a
    [4,096, 576] float32 batch on 2 CPU threads, benchmarks/kernel_micro.py). Only a non-finite sum,
    which finite values can give too by overflowing, takes the elementwise check."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    t = t.detach()  # a parameter's sum need not join the autograd graph
    low_precision = t.dtype in (torch.float16, torch.bfloat16)
    total = t.sum(dtype=torch.float32) if low_precision else t.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())
