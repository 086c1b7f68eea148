"""Data parallelism with torch.distributed (gloo on CPU, NCCL on GPUs), started by torchrun.

Every rank holds the whole SAE and reads the same global batch, trains on its own contiguous
slice of rows, and averages gradients with an all-reduce before the (identical) optimizer step;
firing statistics for dead-latent tracking and the AuxK residual variance are reduced too, so
the result equals single-process training on the same global batches (up to float summation
order). Latent sharding for very wide SAEs is described in docs/distributed.md.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rows(x_BD: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (the batch must split evenly)."""
    w = world_size()
    if w == 1:
        return x_BD
    if x_BD.shape[0] % w:
        raise ValueError(f"global batch of {x_BD.shape[0]} rows does not split evenly over {w} processes")
    per = x_BD.shape[0] // w
    return x_BD[rank() * per:(rank() + 1) * per]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_gradients(params) -> None:
    if not is_distributed():
        return
    w = world_size()
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= w
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
