"""Shared helpers for benchmark scripts: machine info, GEMM peak, protocol activations."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def gemm_flops(d: int = 576, n: int = 8192, batch: int = 4096, repeats: int = 10) -> float:
    """Measured float32 GEMM FLOP/s for the encoder's shape [batch, d] @ [d, n]."""
    a, b = torch.randn(batch, d), torch.randn(d, n)
    out = torch.empty(batch, n)
    torch.mm(a, b, out=out)
    t = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b, out=out)
    return 2 * batch * d * n * repeats / (time.perf_counter() - t)


def encoder_bound(flops: float, d: int, n: int) -> float:
    """Tokens/s if training cost exactly one forward encoder GEMM: flops / (2 d n)."""
    return flops / (2 * d * n)
