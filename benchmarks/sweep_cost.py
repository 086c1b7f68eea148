"""Cost of a sweep (S SAEs from one harvest and one pass over the cache) against S separate runs
(each harvesting its own activations, as a per-SAE script would).

    python benchmarks/sweep_cost.py [--tokens 131072] [--n 1024 2048 4096 8192]

Both paths use the offline default model at blocks.9.hook_resid_post, 64-token contexts.
Separate runs are timed as harvest + training of each SAE; the sweep as one harvest + one
`train_many` call over the same cache. Identical results are checked in tests/test_sweep.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info  # noqa: E402

from saelab.models import load_model  # noqa: E402
from saelab.pipeline import HarvestConfig, harvest, sweep_from_cache, train_from_cache  # noqa: E402
from saelab.train import TrainConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131_072)
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--workdir", default="/tmp/saelab-sweep-cost")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    lm = load_model("default")
    hcfg = HarvestConfig(n_tokens=args.tokens, context_size=64)
    base = TrainConfig(k=32, total_tokens=args.tokens, checkpoint_every=10**9)

    t = time.perf_counter()
    harvest(hcfg, work / "acts", lm=lm, progress=False)
    t_harvest = time.perf_counter() - t
    t_train = {}
    for n in args.n:
        t = time.perf_counter()
        train_from_cache(work / "acts", work / f"alone_n{n}", TrainConfig(**{**base.to_dict(), "n_latents": n}),
                         progress=False)
        t_train[n] = time.perf_counter() - t
    t = time.perf_counter()
    sweep_from_cache(work / "acts", work / "sweep", base, {"n_latents": args.n}, progress=False)
    t_sweep = time.perf_counter() - t

    separate = len(args.n) * t_harvest + sum(t_train.values())
    together = t_harvest + t_sweep
    print(f"Machine: {machine_info()}\nCommand: `{command_line()}`\n")
    print(f"{len(args.n)} SAEs (n = {', '.join(map(str, args.n))}, k = 32) on {args.tokens:,} tokens of "
          "SmolLM2-135M-Instruct blocks.9.hook_resid_post\n")
    print("| | seconds |\n|---|---|")
    print(f"| one harvest | {t_harvest:.1f} |")
    for n, v in t_train.items():
        print(f"| train n={n} alone | {v:.1f} |")
    print(f"| S separate runs (S harvests + S trainings) | {separate:.1f} |")
    print(f"| sweep (1 harvest + 1 pass training all S) | {together:.1f} |")
    print(f"| **ratio separate / sweep** | **{separate / together:.2f}x** |")


if __name__ == "__main__":
    main()
