"""Data parallelism with torch.distributed (gloo on CPU, NCCL on GPUs), started by torchrun.

Every rank holds the whole SAE, trains on its own contiguous slice of rows of each global batch
(``local_rows``; from an activation cache it reads only those rows), and averages gradients with an
all-reduce before the (identical) optimizer step;
firing statistics for dead-latent tracking and the AuxK residual variance are reduced too, so
the result equals single-process training on the same global batches (up to float summation
order). Latent sharding for very wide SAEs is described in docs/distributed.md.

Devices: with CUDA present each process trains on its own GPU, ``cuda:LOCAL_RANK`` (``own_gpu``; where
LOCAL_RANK is unset, as in a group torch.multiprocessing.spawn started, the rank modulo the GPU count), and
the process group pairs NCCL for CUDA tensors with gloo for CPU tensors (``--device cpu`` under torchrun on
a GPU host still works); without CUDA it is gloo alone. Every collective here gets tensors on the training
device.
"""

from __future__ import annotations

import atexit
import datetime
import os
import re
from typing import Mapping

import torch
import torch.distributed as dist

from saelab.errors import ConfigError, PeerProcessError, first_line
from saelab.utils.device import resolve_device
from saelab.utils.words import plural


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gpu_index(env: Mapping[str, str], global_rank: int, device_count: int) -> int:
    """The GPU of the process of rank ``global_rank`` among its machine's ``device_count``: LOCAL_RANK in
    ``env``, as torchrun sets it; where it is unset (a group torch.multiprocessing.spawn or a script started),
    the rank modulo the GPU count, which is the local rank when every machine runs one process per GPU and
    numbers them consecutively (the usual layout; set LOCAL_RANK for any other)."""
    if env.get("LOCAL_RANK") is None:
        return global_rank % max(device_count, 1)
    return env_whole_number(env, "LOCAL_RANK", "this process's index on its machine")


def env_whole_number(env: Mapping[str, str], name: str, meaning: str, default: int = 0) -> int:
    """The environment variable ``name`` as an int (``default`` when unset), or one line naming it."""
    given = env.get(name)
    if given is None:
        return default
    try:
        return int(given)
    except ValueError:
        raise ConfigError(f"{name}={given!r} is not a whole number; expected {meaning}, as torchrun sets it") from None


def own_gpu() -> int:
    """This process's GPU index (``gpu_index``), before the group is joined too (its rank then from RANK)."""
    joined = dist.is_available() and dist.is_initialized()
    global_rank = dist.get_rank() if joined else env_whole_number(os.environ, "RANK", "this process's rank")
    return gpu_index(os.environ, global_rank, torch.cuda.device_count())


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1)."""
    if env_whole_number(os.environ, "WORLD_SIZE", "the number of processes", 1) <= 1 or is_distributed():
        return is_distributed()
    # torch's rendezvous reads RANK with a bare int(), and LOCAL_RANK picks the GPU: both named here, on any device
    env_whole_number(os.environ, "RANK", "this process's rank")
    env_whole_number(os.environ, "LOCAL_RANK", "this process's index on its machine")
    if torch.cuda.is_available():
        # The same backend on every rank; NCCL starts at the first CUDA collective, on this rank's GPU.
        own = own_gpu()
        if own < torch.cuda.device_count():  # a higher one is refused, in one line, by process_device
            torch.cuda.set_device(own)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group(backend="gloo")
    atexit.register(_leave_group)
    return True


_failed = False


def leave_on_failure() -> None:
    """This process ends in failure: leave the group at exit without waiting for the others, which may be
    waiting in a collective for this one (torchrun then stops them) rather than at the final barrier."""
    global _failed
    _failed = True


def _leave_group() -> None:
    """Shut the process group down before the interpreter does: gloo's threads left running at exit
    can abort the process ("terminate called without an active exception") after its work is done.
    After a success the ranks first wait for each other (a bounded wait: a rank that failed is not waited
    for long), so rank 0, which holds the group's store, does not leave while another rank still talks to it."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if not _failed:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        except RuntimeError:  # another rank is gone: nothing left to wait for
            pass
    dist.destroy_process_group()


def process_device(device: str | torch.device | None = None) -> torch.device:
    """The device this process trains on: ``device`` resolved (None: CUDA when available, else the
    CPU), and data-parallel with CUDA, this process's own GPU (``own_gpu``: ``cuda:LOCAL_RANK``). A CUDA
    device is always returned with its index, so devices compare equal however they were named."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev
    if is_distributed():
        own = own_gpu()
        if own >= torch.cuda.device_count():
            raise ConfigError(f"device {str(device)!r}: this process is LOCAL_RANK {own} but the machine has "
                              f"{torch.cuda.device_count()} CUDA device(s); start at most that many processes "
                              "per node, or pass --device cpu")
        if dev.index is not None and dev.index != own:
            raise ConfigError(f"device {str(device)!r}: data-parallel, each process trains on its own GPU "
                              f"(cuda:{own} here, from LOCAL_RANK or the rank); pass --device cuda")
        # NCCL runs a collective on the current device: in a group the caller started, it may still be GPU 0
        torch.cuda.set_device(own)
        return torch.device("cuda", own)
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def wait_for_every_rank() -> None:
    """Every process reaches this point before any goes on: where rank 0 changes a folder the others read.
    A CPU tensor where the group has gloo (ours pairs it with NCCL), whatever GPU a process holds; in a group
    a library user started with NCCL alone, a tensor on this process's GPU, ``own_gpu`` (the current
    device may still be GPU 0 on every process there)."""
    if is_distributed():
        on_cpu = any(name in str(dist.get_backend()) for name in ("gloo", "mpi"))
        _together(dist.all_reduce, torch.zeros(1, device="cpu" if on_cpu else torch.device("cuda", own_gpu())))


def _together(collective, *args, **kwargs) -> None:
    """Run ``collective``; where another process has stopped, say so in one line (that process's own error
    says why) instead of the backend's traceback."""
    try:
        collective(*args, **kwargs)
    except RuntimeError as e:
        reason = re.sub(r"^\[[^\]]*\] ", "", first_line(e)).split(". ")[0]  # without gloo's source file, advice
        raise PeerProcessError(f"process {rank()} of {world_size()}: another process of this run stopped "
                               f"(its error says why); the wait for it ended in: {reason}") from e


def check_batch_split(batch_size: int) -> None:
    """Refuse a global batch that the processes cannot share evenly (checked before a run starts)."""
    w = world_size()
    if batch_size % w:
        raise ConfigError(f"batch_size={batch_size} (--batch-size) does not split evenly over {w} processes; "
                          f"expected a multiple of {w} (e.g. {max(w, batch_size - batch_size % w)})")


def local_rows(x_BD: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (the batch must split evenly)."""
    w = world_size()
    if w == 1:
        return x_BD
    if x_BD.shape[0] % w:
        raise ConfigError(f"global batch of {x_BD.shape[0]} {plural(x_BD.shape[0], 'row')} does not split evenly over "
                          f"{w} processes; "
                          "expected a batch size divisible by the process count")
    per = x_BD.shape[0] // w
    return x_BD[rank() * per:(rank() + 1) * per]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        _together(dist.all_reduce, t, op=dist.ReduceOp.SUM)
    return t


def average_gradients(params) -> None:
    if not is_distributed():
        return
    w = world_size()
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    _together(dist.all_reduce, flat, op=dist.ReduceOp.SUM)
    flat /= w
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Every rank takes rank ``src``'s parameters (after initialisation: ranks on different GPUs
    need not round identically)."""
    if not is_distributed():
        return
    for p in module.parameters():
        # Collectives need contiguous memory: a matrix stored transposed (W_enc) goes as its transpose.
        view = p if p.is_contiguous() else p.t() if p.dim() == 2 and p.t().is_contiguous() else None
        if view is not None:
            _together(dist.broadcast, view, src)
        else:
            flat = p.contiguous()
            _together(dist.broadcast, flat, src)
            p.copy_(flat)


def broadcast_float(value: float, device: torch.device, src: int = 0) -> float:
    """Rank ``src``'s value of a Python float, on every rank."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    _together(dist.broadcast, t, src)
    return float(t.item())
