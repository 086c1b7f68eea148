"""The fixed quality/speed protocol on the offline default model.

SmolLM2-135M-Instruct, blocks.9.hook_resid_post (= hidden_states[10]), 128-token windows of
wiki_train (BOS first, position 0 skipped), 262,144 training tokens seen once in batches of 4,096,
k = 32; eval nMSE and dead latents on 32,768 tokens of wiki_eval. Also: training and harvest
throughput, with the encoder-GEMM bound measured in the same run.

    python benchmarks/protocol.py --n 8192 32768 [--workdir /tmp/saelab-protocol]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONTEXT as T  # noqa: E402
from common import EVAL_TOKENS, HOOK, TRAIN_TOKENS, command_line, encoder_bound, eval_activations  # noqa: E402
from common import eval_contexts, gemm_flops, harvest_train_cache, machine_info  # noqa: E402

from saelab.data import ActivationStream, write_activation_cache  # noqa: E402
from saelab.evals.reconstruction import reconstruction_metrics  # noqa: E402
from saelab.models import load_model  # noqa: E402
from saelab.pipeline import train_from_cache  # noqa: E402
from saelab.train import TrainConfig  # noqa: E402


def harvest_speed(lm, tokens_NT: torch.Tensor, lm_batch: int = 16) -> dict[str, float]:
    """Tokens/s of a full forward vs the truncated forward, and of a full harvest (truncated
    forward + position-0 drop + shuffle buffer + fp16 cache write) on the same contexts."""
    n_tok = tokens_NT.numel()
    out = {}
    with torch.no_grad():
        for name, fn in [("full_forward", lambda b: lm.model(b)),
                         ("truncated_forward", lambda b: lm.activations(b, HOOK))]:
            fn(tokens_NT[:2])  # warm up
            t = time.perf_counter()
            for i in range(0, tokens_NT.shape[0], lm_batch):
                fn(tokens_NT[i:i + lm_batch])
            out[name] = n_tok / (time.perf_counter() - t)
    tmp = Path("/tmp/saelab-harvest-speed")
    shutil.rmtree(tmp, ignore_errors=True)
    stream = ActivationStream(lm, HOOK, tokens_NT, batch_size=4096, lm_batch_size=lm_batch, buffer_tokens=16384,
                              progress=False, drop_last=False)
    t = time.perf_counter()
    write_activation_cache(stream, tmp, meta={}, progress=False)
    out["harvest_to_cache"] = n_tok / (time.perf_counter() - t)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 32768], help="latent counts to train")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: TrainConfig's scaling)")
    ap.add_argument("--workdir", default="/tmp/saelab-protocol", help="activation cache and runs")
    ap.add_argument("--speed-contexts", type=int, default=64, help="contexts for the harvest-speed measurement")
    ap.add_argument("--harvest-speed-only", action="store_true", help="only measure harvest throughput")
    args = ap.parse_args()
    work = Path(args.workdir)

    lm = load_model("default")
    if args.harvest_speed_only:
        args.n = []
    cache_dir = work / "acts_train"
    manifest = cache_dir / "manifest.json"
    if args.n and (not manifest.exists() or '"complete": true' not in manifest.read_text()):
        harvest_train_cache(lm, cache_dir, TRAIN_TOKENS)
    eval_tokens = eval_contexts(lm, EVAL_TOKENS)
    eval_acts = eval_activations(lm, EVAL_TOKENS, eval_tokens) if args.n else None

    rows = []
    for n in args.n:
        flops = gemm_flops(lm.d_model, n)
        cfg = TrainConfig(n_latents=n, k=args.k, batch_size=4096, total_tokens=TRAIN_TOKENS, lr=args.lr,
                          checkpoint_every=10**9)
        t = time.perf_counter()
        sae = train_from_cache(cache_dir, work / f"run_n{n}", cfg, overwrite=True, progress=False)
        secs = time.perf_counter() - t
        res, _ = reconstruction_metrics(sae, eval_acts.split(4096))
        tok_s = TRAIN_TOKENS / secs
        bound = encoder_bound(flops, lm.d_model, n)
        rows.append((n, res.nmse, res.dead_frac, res.l0, tok_s, bound, tok_s / bound))
        print(f"n={n}: nMSE {res.nmse:.4f}, dead {res.dead_frac:.2%}, {tok_s:,.0f} tok/s", flush=True)

    speed = harvest_speed(lm, eval_tokens[:args.speed_contexts])
    print(f"\nMachine: {machine_info()}\nCommand: `{command_line()}`\n")
    print(f"Protocol: {HOOK} of SmolLM2-135M-Instruct, {T}-token windows, position 0 skipped, "
          f"{TRAIN_TOKENS:,} training tokens (batches of 4,096, one pass), k={args.k}; eval on {EVAL_TOKENS:,} "
          "tokens of wiki_eval. Training time includes the whole loop (data, step, dead tracking, checkpoint at end).\n")
    print("| n | eval nMSE | dead (of 32,768 eval tokens) | L0 | train tokens/s | encoder-GEMM bound tokens/s | ratio to bound |")
    print("|---|---|---|---|---|---|---|")
    for n, nm, dead, l0, tok_s, bound, ratio in rows:
        print(f"| {n:,} | {nm:.4f} | {dead:.2%} | {l0:.1f} | {tok_s:,.0f} | {bound:,.0f} | {ratio:.2f} |")
    print("\n| harvest path (64 contexts x 128 tokens) | tokens/s |\n|---|---|")
    for name, v in speed.items():
        print(f"| {name} | {v:,.0f} |")


if __name__ == "__main__":
    main()
