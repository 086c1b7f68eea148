"""CUDA training throughput of saelab's trainer on one GPU (no peer libraries needed).

For each cell (n latents, batch size), at d = 576 (SmolLM2-135M layer 9) and k = 32:

- ``step``: ``TrainingRun.train_step`` (the code path of ``train_sae``: sparse top-k encoder, its
  sparse backward, fused Adam, decoder constraints, dead-latent counters) on batches already on the
  GPU, timed over --steps steps after --warmup, between ``torch.cuda.synchronize()`` calls; in float32
  and with TF32 matmuls (``allow_tf32=True``) unless --no-tf32.
- ``end-to-end``: ``train_sae`` itself, fed CPU batches as a cache reader yields them (pageable
  memory), so the background prefetch, pinning and asynchronous host-to-device copy are included;
  tokens/s from the run's metrics.jsonl (every step since the run started, the first one included).

Peak GPU memory is ``torch.cuda.max_memory_allocated`` over the cell, initialisation included.
"encoder GEMM TFLOP/s" is 2 * batch * d * n per step over the step time: the forward GEMM alone, the
work a dense trainer cannot skip, as a yardstick of how close the step is to it.

Activations are random (rows x ~ N(mu, I) with a common random offset mu, as a residual stream has), or
read from an activation cache with --cache DIR (d is then the cache's). AuxK's dead window is 10 M
tokens (the paper's), so AuxK does not act in these short runs; the learning rate is constant.

    python benchmarks/gpu_throughput.py                       # the four cells, fp32 and TF32
    python benchmarks/gpu_throughput.py --n 32768 --batch 4096 --steps 50 --json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from saelab.data import ActivationCache  # noqa: E402
from saelab.train import TrainConfig, TrainingRun, train_sae  # noqa: E402

POOL = 4
"""Distinct batches per cell, cycled (random data: the values do not change the work)."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[32768, 131072], help="latent counts")
    p.add_argument("--batch", type=int, nargs="+", default=[4096, 32768], help="batch sizes (rows per step)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--d", type=int, default=576, help="activation width with random data")
    p.add_argument("--steps", type=int, default=20, help="timed steps per cell")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuBLAS and allocator warm-up)")
    p.add_argument("--cache", type=Path, help="read activations from this activation cache instead")
    p.add_argument("--no-tf32", action="store_true", help="float32 matmuls only")
    p.add_argument("--no-end-to-end", action="store_true", help="skip the train_sae runs")
    p.add_argument("--json", type=Path, help="also append one JSON line per result to this file")
    return p.parse_args()


def host_batches(args: argparse.Namespace, batch: int) -> tuple[list[torch.Tensor], int]:
    """POOL float32 CPU batches [batch, d] and d."""
    if args.cache:
        cache = ActivationCache(args.cache)
        it = cache.batches(batch, shuffle=True, seed=0, epochs=10**6)
        return [next(it) for _ in range(POOL)], cache.d
    g = torch.Generator().manual_seed(0)
    offset = 3.0 * torch.randn(args.d, generator=g)
    return [torch.randn(batch, args.d, generator=g) + offset for _ in range(POOL)], args.d


def config(args: argparse.Namespace, n: int, batch: int, log_every: int = 10**9) -> TrainConfig:
    return TrainConfig(n_latents=n, k=args.k, batch_size=batch, total_tokens=(args.warmup + args.steps) * batch,
                       lr=1e-4, warmup_steps=0, decay_fraction=0.0, dead_tokens=10_000_000,
                       init_rows=min(32_768, POOL * batch), checkpoint_every=10**9, log_every=log_every)


def init_rows(pool: list[torch.Tensor], rows: int) -> torch.Tensor:
    return torch.cat(pool)[:rows]


def time_steps(args, n: int, batch: int, pool: list[torch.Tensor], d: int, tf32: bool) -> dict:
    """TrainingRun.train_step on batches already on the GPU."""
    cfg = config(args, n, batch)
    gpu_pool = [x.cuda() for x in pool]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="saelab-gpu-bench-") as run_dir:
        with TrainingRun(cfg, run_dir, d_in=d, meta=None, init_sample=lambda: init_rows(pool, cfg.effective_init_rows),
                         device="cuda", allow_tf32=tf32) as run:
            for i in range(args.warmup):
                run.train_step(gpu_pool[i % POOL])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(args.steps):
                stats = run.train_step(gpu_pool[i % POOL])
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
    step_s = elapsed / args.steps
    return {"mode": "step", "precision": "tf32" if tf32 else "fp32", "tokens_per_s": batch / step_s,
            "step_ms": 1e3 * step_s, "gemm_tflops": 2 * batch * d * n / step_s / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "nmse_last": stats["nmse"]}


def end_to_end(args, n: int, batch: int, pool: list[torch.Tensor], d: int) -> dict:
    """train_sae fed pageable CPU batches (prefetch thread, pinning, asynchronous copy included)."""
    cfg = config(args, n, batch, log_every=args.warmup + args.steps)  # one metrics line, at the end

    def batches_from(start: int) -> Iterator[torch.Tensor]:
        for b in range(start, cfg.total_steps):
            yield pool[b % POOL]

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="saelab-gpu-bench-") as tmp:
        train_sae(cfg, batches_from, Path(tmp) / "run", d_in=d, progress=False, device="cuda")
        row = json.loads((Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    return {"mode": "end-to-end", "precision": "fp32", "tokens_per_s": row["tokens_per_s"],
            "step_ms": 1e3 * batch / row["tokens_per_s"], "gemm_tflops": 2 * d * n * row["tokens_per_s"] / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "nmse_last": row["nmse"]}


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_throughput.py: error: no CUDA GPU is visible to torch")
    props = torch.cuda.get_device_properties(0)
    print(f"# saelab CUDA training throughput: {props.name} ({props.total_memory / 2**30:.0f} GiB), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}; k={args.k}, {args.steps} timed steps "
          f"after {args.warmup}, {'cache ' + str(args.cache) if args.cache else 'random activations'}", flush=True)
    print("\n| n | batch | d | mode | precision | tokens/s | step ms | encoder GEMM TFLOP/s | peak GPU GiB |")
    print("|---:|---:|---:|---|---|---:|---:|---:|---:|", flush=True)
    for n in args.n:
        for batch in args.batch:
            pool, d = host_batches(args, batch)
            runs = [lambda: time_steps(args, n, batch, pool, d, False)]
            if not args.no_tf32:
                runs.append(lambda: time_steps(args, n, batch, pool, d, True))
            if not args.no_end_to_end:
                runs.append(lambda: end_to_end(args, n, batch, pool, d))
            for run in runs:
                r = {"n": n, "batch": batch, "d": d, "k": args.k, "gpu": props.name, **run()}
                print(f"| {n:,} | {batch:,} | {d} | {r['mode']} | {r['precision']} | {r['tokens_per_s']:,.0f} | "
                      f"{r['step_ms']:.1f} | {r['gemm_tflops']:.1f} | {r['peak_gib']:.2f} |", flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
