"""One saelab training run for the side-by-side comparison (benchmarks/compare_peers.py).

Trains a top-k SAE with saelab's TrainingRun/Trainer (the code path of ``train_sae``) on the first
ROWS rows of a float32 activation cache, in stored order (batch b = rows [b*B, (b+1)*B), the same
batches every runner reads), then evaluates nMSE and dead latents on held-out rows and prints one
JSON line prefixed with BENCH_RESULT. Run it in saelab's environment:

    OMP_NUM_THREADS=2 python benchmarks/run_saelab.py --n 8192 --rows 32768

Recipe: saelab's defaults (geometric-median b_pre from the first 32,768 training rows, nMSE
normalizer computed once, unit-norm decoder with parallel-gradient removal, tied init, AuxK with
k_aux=256 and coefficient 1/32 on latents dead for 10 M tokens, Adam eps 6.25e-10, fused Adam,
warmup 10 steps, linear decay over the last 60 %). Timing covers steps 1..S-1 (common.StepClock);
the one-time initialisation and step 0 are excluded, as for every library; no checkpoint is
written inside the timed loop (checkpoint_every is set past the end of the run).
"""

from __future__ import annotations

import inspect
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StepClock, evaluate, finish_run, peak_rss_mb, rss_mb, runner_parser  # noqa: E402
from common import DECAY_FRACTION, WARMUP_STEPS, setup_runner  # noqa: E402


def saelab_version() -> str:
    """Package version plus the checkout's commit (and '+dirty' with uncommitted changes)."""
    import subprocess

    import saelab

    version = getattr(saelab, "__version__", "?")
    try:
        root = Path(saelab.__file__).resolve().parents[2]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return f"{version} ({commit}{'+dirty' if dirty else ''})"
    except (OSError, subprocess.CalledProcessError):
        return version


def main() -> None:
    args = runner_parser(__doc__).parse_args()
    reader, eval_reader, n_batches = setup_runner(args)
    from saelab.train import TrainConfig, TrainingRun

    cfg = TrainConfig(n_latents=args.n, k=args.k, batch_size=args.batch_size, total_tokens=n_batches * args.batch_size,
                      lr=args.lr, seed=args.seed, checkpoint_every=10**9, log_every=10**9, dead_tokens=args.dead_tokens,
                      warmup_steps=WARMUP_STEPS, decay_fraction=DECAY_FRACTION)
    rss_base = rss_mb()
    clock = StepClock(args.device)
    with tempfile.TemporaryDirectory(prefix="saelab-bench-run-") as run_dir:
        clock.setup()
        # On CUDA in TF32, as sparsify's Trainer runs itself (matmul precision "high").
        placement = {"device": args.device, "allow_tf32": args.device.startswith("cuda")}
        if "device" not in inspect.signature(TrainingRun).parameters:  # a --baseline from before devices
            if args.device != "cpu":
                sys.exit(f"run_saelab.py: error: --device {args.device}: this saelab trains on the CPU only")
            placement = {}
        run = TrainingRun(cfg, run_dir, d_in=reader.d, meta=None, **placement,
                          init_sample=lambda: reader.batch(0, min(cfg.effective_init_rows, n_batches * args.batch_size)))
        for b, x in enumerate(clock.timed_batches(reader, n_batches, args.batch_size)):
            stats = run.train_step(x)
            if b:  # AuxK ran in this step iff its loss is nonzero
                clock.lap(stats["auxk"] > 0)
        clock.stop()
        peak_train = peak_rss_mb()
        sae = run.trainer.final_sae().eval()

    def encode_decode(x):
        x_hat, vals, idx = sae.forward_with_latents(x)
        return x_hat, idx, vals

    metrics = evaluate(encode_decode, eval_reader, args.eval_rows, args.n, device=args.device)
    finish_run(args, clock, library="saelab", version=saelab_version(),
               n_batches=n_batches, rss_base=rss_base, peak_train=peak_train, metrics=metrics,
               notes="TrainingRun.train_step (fused Adam, sparse encoder backward); geometric-median b_pre")


if __name__ == "__main__":
    main()
