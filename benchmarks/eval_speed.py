"""Wall time of the downstream metrics (delta CE, KL, CE recovered vs zero and mean ablation) of one SAE
on SmolLM2, for two checkouts of saelab side by side: a "before" source tree (e.g. a clean clone of an
older commit) and this one, each in a fresh process, rounds interleaved, metrics compared.

    python benchmarks/eval_speed.py --sae RUN/sae --before-src /tmp/saelab-before/src --rounds 2

"after, N per forward": this checkout with ``variants_per_forward=N`` (the clean, spliced and ablated runs
continue from the shared activation N at a time, stacked along the batch).

Each run loads the model and the SAE, packs the quickstart's evaluation text (``--tokens`` predictions
from wiki_eval at ``--context``, position 0 excluded: ceil(tokens / (context - 1)) contexts), computes
the mean activation for mean-ablation (not timed), then times ``downstream_metrics`` alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import run_json_child  # noqa: E402

METRICS = ("ce_clean", "ce_spliced", "delta_ce", "kl", "ce_zero_abl", "ce_mean_abl", "ce_recovered_zero",
           "ce_recovered_mean", "n_predictions")


def child(args: argparse.Namespace) -> None:
    """One timed evaluation with whichever saelab PYTHONPATH selects; prints one JSON line."""
    import torch

    import saelab
    from saelab.data import token_contexts
    from saelab.evals.downstream import downstream_metrics
    from saelab.models import load_model
    from saelab.sae import load_sae

    torch.set_num_threads(args.threads)
    lm = load_model("default")
    sae = load_sae(args.sae)
    hook, first = sae.cfg.hook_name, int(sae.cfg.exclude_first)
    corpus = ROOT / "data" / "wiki-en" / "wiki_eval.jsonl.xz"
    tokens = token_contexts(str(corpus), lm.tokenize, args.context, n_contexts=math.ceil(args.tokens / (args.context - first)),
                            bos_token_id=lm.bos_token_id, prepend_bos=sae.cfg.prepend_bos)
    with torch.no_grad():
        mean_D = torch.cat([lm.activations(t, hook)[:, first:].reshape(-1, lm.d_model) for t in tokens.split(32)]).mean(0)
    extra = {"variants_per_forward": args.variants_per_forward} if args.variants_per_forward else {}
    t0 = time.perf_counter()
    metrics = downstream_metrics(lm, sae, tokens, lm_batch_size=args.lm_batch_size, mean_act_D=mean_D,
                                 progress=False, **extra)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "saelab": saelab.__file__, "metrics": metrics}))


def run_one(args: argparse.Namespace, src: str, variants_per_forward: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--sae", args.sae, "--tokens", str(args.tokens),
           "--context", str(args.context), "--lm-batch-size", str(args.lm_batch_size), "--threads", str(args.threads),
           "--variants-per-forward", str(variants_per_forward)]
    env = {**os.environ, "PYTHONPATH": src}
    return run_json_child(cmd, env, f"run with {src}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", required=True, help="SAE folder (trained at SmolLM2's hook)")
    p.add_argument("--before-src", help="src/ of the checkout to compare against (required)")
    p.add_argument("--after-src", default=str(ROOT / "src"),
                   help="src/ of the checkout under test (default this one; a snapshot keeps edits made meanwhile out)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16_384)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--lm-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--per-forward", default="1,4",
                   help="this checkout's variants_per_forward settings to time (runs stacked per forward above the hook)")
    p.add_argument("--variants-per-forward", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if not args.before_src:
        p.error("--before-src is required")

    setups = [("before", args.before_src, 0)]
    setups += [(f"after, {n} per forward", args.after_src, int(n)) for n in args.per_forward.split(",")]
    print("python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]))
    results: dict[str, list[dict]] = {name: [] for name, _, _ in setups}
    for r in range(args.rounds):
        for name, src, vpf in setups:
            res = run_one(args, src, vpf)
            results[name].append(res)
            print(f"round {r + 1}  {name:<28} {res['seconds']:8.1f} s   ({res['saelab']})", flush=True)
        base = results["before"][-1]["seconds"]
        print(f"round {r + 1}  speed-up: " + ", ".join(f"{name} {base / results[name][-1]['seconds']:.2f}x"
                                                      for name, _, _ in setups[1:]), flush=True)
    ref = results["before"][0]["metrics"]
    print(f"\n{'metric':<20} {'before':>12} " + " ".join(f"{n[:14]:>14}" for n, _, _ in setups[1:]) + "  max |diff|")
    for key in METRICS:
        if key not in ref:
            continue
        values = [results[n][0]["metrics"][key] for n, _, _ in setups[1:]]
        diff = max(abs(res["metrics"][key] - ref[key]) for runs in results.values() for res in runs)
        print(f"{key:<20} {ref[key]:>12.6f} " + " ".join(f"{v:>14.6f}" for v in values) + f"  {diff:.2e}")


if __name__ == "__main__":
    main()
