"""What keeping freed host memory (saelab.utils.host_memory) changes, in fresh processes that alternate
SAELAB_RETAIN_FREED_MEMORY=1 and =0 (the setting is per process, so each run is its own process):

    python benchmarks/host_memory.py --n 8192 32768 --rounds 3 --lm

- train: a saelab TrainingRun trains ``--steps`` steps on the protocol's activation cache (compare_peers.py
  harvests it; AuxK inactive), and reports per step, as medians over the steps after the 4th (the heap
  needs a few steps to hold every block): wall time, the process's system CPU time (page faults are
  kernel time) and its minor page faults.
- lm (``--lm``): the default language model computes the next-token cross-entropy of [16, 128] random
  tokens 5 times (logits [16, 128, vocab], as the downstream metrics do) with the setting held around the
  calls; the same medians over the last 3. saelab holds it only in training runs: an evaluation's
  blocks change size, which grows the heap under the setting (saelab.utils.host_memory).
- memory: each process's peak resident set and its resident set after the timed calls (MB).

Each round runs both settings, each first in every other round. No timing here is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import BATCH, K, THREADS, CacheReader, command_line, default_lr, machine_info, peak_rss_mb, rss_mb  # noqa: E402
from common import run_json_child  # noqa: E402

SKIP_STEPS = 4


def _measure(step, count: int, skip: int) -> dict[str, float]:
    """Medians over calls skip..count-1 of step(i): wall ms, system CPU ms, minor faults."""
    wall, system, faults = [], [], []
    for i in range(count):
        before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step(i)
        after = resource.getrusage(resource.RUSAGE_SELF)
        wall.append((time.perf_counter() - t) * 1e3)
        system.append((after.ru_stime - before.ru_stime) * 1e3)
        faults.append(after.ru_minflt - before.ru_minflt)
    medians = {name: statistics.median(values[skip:]) for name, values in
               (("wall_ms", wall), ("sys_ms", system), ("faults", faults))}
    return {**medians, "peak_mb": peak_rss_mb(), "end_mb": rss_mb()}


def child_train(args: argparse.Namespace) -> dict[str, float]:
    import tempfile

    from saelab.train import TrainConfig, TrainingRun

    reader = CacheReader(args.cache)
    n_batches = reader.n_rows // BATCH
    cfg = TrainConfig(n_latents=args.child_n, k=K, batch_size=BATCH, total_tokens=args.steps * BATCH,
                      lr=default_lr(args.child_n), seed=0, checkpoint_every=10**9, log_every=10**9,
                      dead_tokens=10**12)
    with tempfile.TemporaryDirectory(prefix="saelab-host-memory-") as run_dir, \
            TrainingRun(cfg, run_dir, d_in=reader.d, meta=None, device="cpu",
                        init_sample=lambda: reader.batch(0, min(cfg.effective_init_rows, n_batches * BATCH))) as run:
        return _measure(lambda i: run.train_step(reader.batch(i % n_batches, BATCH)), args.steps, SKIP_STEPS)


def child_lm(args: argparse.Namespace) -> dict[str, float]:
    from saelab.models import load_model
    from saelab.utils.host_memory import freed_memory_retained

    lm = load_model()
    tokens = torch.randint(0, lm.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0))
    # what the setting would do for a forward of one fixed size (saelab keeps it to training runs)
    with torch.no_grad(), freed_memory_retained():
        return _measure(lambda i: lm.cross_entropy(tokens), 5, 2)


def run_child(args: argparse.Namespace, job: str, n: int, retain: str) -> dict[str, float]:
    env = {**os.environ, "SAELAB_RETAIN_FREED_MEMORY": retain, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", job, "--child-n", str(n), "--steps", str(args.steps),
           "--cache", str(args.cache), "--threads", str(args.threads)]
    return run_json_child(cmd, env, f"{job} child (SAELAB_RETAIN_FREED_MEMORY={retain})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[8192, 32768], help="latent counts to train")
    ap.add_argument("--steps", type=int, default=12, help=f"training steps per process (> {SKIP_STEPS})")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lm", action="store_true", help="also time the language model's cross-entropy forward")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/saelab-bench/acts"))
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--child", choices=["train", "lm"], help=argparse.SUPPRESS)
    ap.add_argument("--child-n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(child_train(args) if args.child == "train" else child_lm(args)))
        return
    if not args.n and not args.lm:
        ap.error("nothing to measure: give --n N [N ...] and/or --lm")
    if args.steps <= SKIP_STEPS:
        ap.error(f"--steps {args.steps}: expected more than {SKIP_STEPS}")
    if args.n and not (args.cache / "manifest.json").is_file():
        ap.error(f"--cache {args.cache}: no activation cache there; run benchmarks/compare_peers.py once to harvest it")
    print(command_line())
    print(machine_info())
    jobs = [("train", n) for n in args.n] + ([("lm", 0)] if args.lm else [])
    for job, n in jobs:
        results: dict[str, list[dict[str, float]]] = {"1": [], "0": []}
        for r in range(args.rounds):
            for retain in ("1", "0") if r % 2 == 0 else ("0", "1"):
                results[retain].append(run_child(args, job, n, retain))
        name = f"train n={n:,}" if job == "train" else "LM cross-entropy [16, 128]"
        for retain, label in (("1", "retained"), ("0", "malloc default")):
            rows = results[retain]
            cells = [f"{key} {' / '.join(f'{row[key]:,.0f}' for row in rows)}"
                     for key in ("wall_ms", "sys_ms", "faults", "peak_mb", "end_mb")]
            print(f"{name}, {label}: " + "; ".join(cells), flush=True)
        ratio = [a["wall_ms"] / b["wall_ms"] for a, b in zip(results["1"], results["0"])]
        print(f"{name}: wall retained / default per round {', '.join(f'{x:.3f}' for x in ratio)} "
              f"(median {statistics.median(ratio):.3f})", flush=True)


if __name__ == "__main__":
    main()
