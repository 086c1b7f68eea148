"""Time to build the feature browser for one SAE on the default model, split by phase.

    python benchmarks/browse_build.py --sae runs/quickstart [--tokens 1048576] [--out /tmp/browse-bench]

The SAE is any saelab run folder, SAELens folder or OpenAI .pt file for SmolLM2-135M-Instruct (e.g.
the n = 8,192 SAE of `saelab quickstart`). The site is built with `build_browser` exactly as
`saelab browse` builds it (default settings otherwise), from the offline Wikipedia eval split,
and rebuilt from scratch (`overwrite`). Phases: load (model and SAE), tokenize, LM forward (truncated
after the hooked layer), SAE encode, statistics (top-k merges, samples, histograms, counts), finish
(decoder neighbours, direct logit effect), site write.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info  # noqa: E402

from saelab.explore.browser import BrowseConfig, build_browser  # noqa: E402


def folder_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", required=True, help="run folder, SAELens folder or OpenAI .pt of a default-model SAE")
    ap.add_argument("--tokens", type=int, default=1_048_576, help="tokens scored")
    ap.add_argument("--out", default="/tmp/saelab-browse-bench", help="site folder (replaced)")
    ap.add_argument("--corpus", default=None, help="text (default: the offline Wikipedia eval split)")
    args = ap.parse_args()

    t = time.perf_counter()
    res = build_browser([args.sae], args.out, BrowseConfig(n_tokens=args.tokens, corpus=args.corpus), overwrite=True)
    wall = time.perf_counter() - t
    s = res["seconds"]
    n_files, n_bytes = folder_size(Path(args.out))
    sae = res["saes"][0]
    print(f"Machine: {machine_info()}\nCommand: `{command_line()}`\n")
    print(f"Feature browser for {sae['n_latents']:,} latents (k = {sae['k']}, {sae['alive']:,} active) at "
          f"{res['hook']} of {res['model']}: {res['n_tokens']:,} tokens scored ({res['n_contexts']:,} contexts of "
          f"{res['context_size']}); site {n_bytes / 2**20:.1f} MiB in {n_files:,} files\n")
    print("| phase | seconds | share |\n|---|---|---|")
    rows = [("load model and SAE", s["load"]), ("tokenize", s["tokenize"]), ("LM forward (truncated)", s["lm"]),
            ("SAE encode", s["encode"]), ("statistics (top-k merges, samples, histograms)", s["stats"]),
            ("finish (neighbours, direct logit effect)", s["finish"]), ("site write", s["write"])]
    for name, v in rows:
        print(f"| {name} | {v:.1f} | {100 * v / s['total']:.0f} % |")
    print(f"| **total** | **{s['total']:.1f}** | |")
    print(f"\nthroughput: {res['n_tokens'] / (s['lm'] + s['encode'] + s['stats']):,.0f} tokens/s for the pass; "
          f"wall {wall:.1f} s")


if __name__ == "__main__":
    main()
