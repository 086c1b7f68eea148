"""What the nearest latents a feature browser site lists cost: peak memory and time of `saelab browse` by
--n-neighbours, on one SAE of each size given.

    python benchmarks/browse_neighbours.py [--n-latents 2048 4096] [--neighbours 8 1023 all] [--dir /tmp/nb-bench]

Each build is `saelab browse` as a user runs it, in a child process of its own (so that its peak RSS is its
own), on the test suite's tiny GPT-2 (2 layers, d_model 64, random weights, GPT-2's real tokenizer; saved to
DIR) and an SAE of N latents (each size of --n-latents) centred on its activations (b_dec = their mean, so that its latents fire at
varied rates), over the offline Wikipedia eval split. The cost of one listed neighbour is the difference from
the first setting, in peak memory and in time (finish: the neighbours and the direct logit effect; write: the
pages), over the difference in entries listed (N x neighbours). A --neighbours value past an SAE's other latents is
skipped for it; "all" lists them all (N - 1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, command_line, machine_info  # noqa: E402

HOOK = "blocks.1.hook_resid_post"
CHILD = """
import json, resource, sys, time
from saelab.cli import main
t = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "wall": time.perf_counter() - t,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def make_inputs(folder: Path, n_latents: int, corpus: str) -> tuple[Path, Path]:
    """The tiny GPT-2's folder and an SAE of ``n_latents`` on its last block, written under ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from saelab.data import token_contexts
    from saelab.models import LanguageModel
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    torch.manual_seed(0)
    tokenizer = GPT2TokenizerFast.from_pretrained(str(ROOT / "data" / "gpt2-tokenizer"))
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=50257, n_positions=128))
    model_dir, sae_dir = folder / "tiny-gpt2", folder / f"sae-{n_latents}"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    lm = LanguageModel(model, tokenizer, "tiny-gpt2")
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=n_latents, k=8, hook_name=HOOK, model_name=str(model_dir),
                            context_size=32))
    toks = token_contexts(corpus, lm.tokenize, 32, n_contexts=8, bos_token_id=lm.bos_token_id)
    with torch.no_grad():
        sae.b_dec.copy_(lm.activations(toks, HOOK)[:, 1:].reshape(-1, 64).mean(0))
    save_sae(sae, sae_dir)
    return model_dir, sae_dir


def build(folder: Path, model_dir: Path, sae_dir: Path, corpus: str, n_tokens: int, k: int) -> tuple:
    """One `saelab browse` in a child process: (peak RSS, finish seconds, write seconds, site bytes)."""
    site = folder / f"{sae_dir.name}-site-{k}"
    argv = ["browse", str(sae_dir), "--out", str(site), "--model", str(model_dir), "--corpus", corpus, "--n-tokens",
            str(n_tokens), "--n-neighbours", str(k), "--overwrite", "--no-progress"]
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=True)
    lines = done.stdout.strip().splitlines()
    run, summary = json.loads(lines[-1]), json.loads("\n".join(lines[:-1]))
    assert run["code"] == 0, done.stderr[-2000:]
    size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    return run["peak_rss"], summary["seconds"]["finish"], summary["seconds"]["write"], size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-latents", type=int, nargs="+", default=[2048], help="latents of the SAE (one SAE each)")
    ap.add_argument("--neighbours", nargs="+", default=["8", "1023", "all"],
                    help="--n-neighbours values ('all': the SAE's other latents)")
    ap.add_argument("--n-tokens", type=int, default=31 * 64, help="tokens scored")
    ap.add_argument("--dir", default="/tmp/saelab-neighbours-bench", help="folder for the model, SAE and sites")
    args = ap.parse_args()

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = str(ROOT / "data" / "wiki-en" / "wiki_eval.jsonl.xz")
    print(f"Machine: {machine_info()}\nCommand: `{command_line()}`\n")
    print(f"`saelab browse` of one SAE ({args.n_tokens:,} tokens scored)\n")
    print("| latents | --n-neighbours | entries | peak RSS (MiB) | finish (s) | write (s) | site (MiB) | "
          "per entry over the first: memory (B), time (µs), disk (B) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.n_latents:
        model_dir, sae_dir = make_inputs(folder, n, corpus)
        ks = sorted({n - 1 if k == "all" else int(k) for k in args.neighbours} & set(range(1, n)))
        rows = [(k, *build(folder, model_dir, sae_dir, corpus, args.n_tokens, k)) for k in ks]
        k0, rss0, fin0, wr0, site0 = rows[0]
        for k, rss, fin, wr, site in rows:
            extra = (k - k0) * n
            per = (f"{(rss - rss0) / extra:,.0f}, {1e6 * (fin + wr - fin0 - wr0) / extra:.2f}, "
                   f"{(site - site0) / extra:.1f}" if extra else "")
            print(f"| {n:,} | {k:,} | {k * n:,} | {rss / 2**20:,.0f} | {fin:.1f} | {wr:.1f} | {site / 2**20:,.1f} | "
                  f"{per} |", flush=True)

if __name__ == "__main__":
    main()
