"""The scaling study on the offline default model: nMSE(n) per k, fitted and plotted (paper Figure 1).

    python benchmarks/scaling_study.py --out runs/scaling                  # full study (~45-60 min on 2 cores)
    python benchmarks/scaling_study.py --out /tmp/scaling-smoke --smoke     # n = 2^10..2^12 on 131k tokens

Stages, each resumable (re-run the same command after an interruption):

1. harvest ``--tokens`` activations of SmolLM2-135M-Instruct ``blocks.9.hook_resid_post`` (context 64);
2. sweep A: n = 2^10 .. 2^15 at k = 32, one pass over the cache;
3. sweep B: k = 16 and 64 at n = 2^12, 2^13, 2^14 (``--smoke``: k = 16 at 2^10 .. 2^12);
4. core evaluation of every run (held-out wiki_eval; no ablation baselines: the study needs nMSE and
   delta CE only, and they halve the downstream cost);
5. ``write_scaling_report``: scaling.json, scaling_nmse.png, scaling_delta_loss.png, scaling.md.

Every run trains on the same ``--tokens`` (each token seen once), batch 4,096, the default recipe
except the decoder initialisation, which is the same for every size (``--decoder-init``, random
as in the paper by default; ``auto`` would switch method between sizes and bend the curve). The script prints the equivalent ``saelab`` commands and the wall time of
each stage, and writes them to OUT/study.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info  # noqa: E402

from saelab.models import load_model  # noqa: E402
from saelab.pipeline import EvalConfig, HarvestConfig, harvest, sweep_configs, sweep_from_cache  # noqa: E402
from saelab.train import TrainConfig  # noqa: E402
from saelab.train.checkpoint import read_status  # noqa: E402
from saelab.utils.atomic import write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="study folder (activations/ and one folder per SAE)")
    ap.add_argument("--tokens", type=int, default=None, help="training tokens per SAE (default 1,048,576; smoke 131,072)")
    ap.add_argument("--decoder-init", default="random", choices=["random", "data"],
                    help="decoder initialisation of every SAE (one method for all sizes)")
    ap.add_argument("--smoke", action="store_true", help="n = 2^10..2^12, k = 32 and 16, on 131,072 tokens")
    ap.add_argument("--eval-recon-tokens", type=int, default=32_768)
    ap.add_argument("--eval-downstream-tokens", type=int, default=16_384)
    args = ap.parse_args()
    tokens = args.tokens or (131_072 if args.smoke else 1_048_576)
    if args.smoke:
        grids = [{"n_latents": [1024, 2048, 4096], "k": [32]}, {"n_latents": [1024, 2048, 4096], "k": [16]}]
    else:
        grids = [{"n_latents": [2 ** p for p in range(10, 16)], "k": [32]},
                 {"n_latents": [4096, 8192, 16384], "k": [16, 64]}]
    out = Path(args.out)
    acts = out / "activations"
    base = TrainConfig(total_tokens=tokens, checkpoint_every=128, decoder_init=args.decoder_init)
    eval_cfg = EvalConfig(recon_tokens=args.eval_recon_tokens, downstream_tokens=args.eval_downstream_tokens,
                          ablations=())
    cli = [f"saelab harvest --model default --hook blocks.9.hook_resid_post --n-tokens {tokens} --context-size 64 "
           f"--out {acts}"]
    for g in grids:
        grid = " ".join(f"{k}={','.join(map(str, v))}" for k, v in g.items())
        cli.append(f"saelab sweep --activations {acts} --out {out} --grid {grid} --total-tokens {tokens} "
                   f"--checkpoint-every 128 --decoder-init {args.decoder_init}")
    cli += [f"saelab eval {out} --recon-tokens {eval_cfg.recon_tokens} --downstream-tokens "
            f"{eval_cfg.downstream_tokens} --ablations", f"saelab report {out}"]
    print(f"Machine: {machine_info()}\nCommand: `{command_line()}`\nEquivalent saelab commands:")
    print("\n".join("    " + c for c in cli), flush=True)

    times: dict[str, float] = {}
    t = time.perf_counter()
    lm = load_model("default")
    times["load_model"] = time.perf_counter() - t
    t = time.perf_counter()
    cache = harvest(HarvestConfig(n_tokens=tokens, context_size=64), acts, lm=lm)
    times["harvest"] = time.perf_counter() - t
    for i, g in enumerate(grids):
        t = time.perf_counter()
        names = sweep_configs(base, g)
        if all(read_status(out / name).get("state") == "finished" for name in names):
            print(f"sweep {'AB'[i]}: every run already finished", flush=True)
        else:
            sweep_from_cache(cache, out, base, g)
        times[f"sweep_{'AB'[i]} ({', '.join(f'{k}={v}' for k, v in g.items())})"] = time.perf_counter() - t
    from saelab.evals.suite import evaluate_sweep
    from saelab.report.scaling import write_scaling_report

    t = time.perf_counter()
    evaluate_sweep(out, eval_cfg)
    times["evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    result = write_scaling_report(out)
    times["report"] = time.perf_counter() - t
    times["total"] = sum(times.values())
    write_json(out / "study.json", {"machine": machine_info(), "command": command_line(), "tokens": tokens,
                                    "grids": grids, "cli": cli, "seconds": {k: round(v, 1) for k, v in times.items()}})
    print(f"\nTraining tokens per SAE: {tokens:,}\n\n| stage | seconds |\n|---|---|")
    for k, v in times.items():
        print(f"| {k} | {v:,.1f} |")
    print("\n| group | alpha | c | rms log residual |\n|---|---|---|---|")
    for label, f in result["fits"].items():
        if f["fitted"]:
            print(f"| {label} | {f['alpha']:.4f} | {f['c']:.4f} | {f['rmse_log']:.4f} |")
        else:
            print(f"| {label} | — | — | {f['note']} |")
    print(f"\nReport: {out / 'scaling.md'}")


if __name__ == "__main__":
    main()
