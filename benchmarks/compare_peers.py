"""Training throughput of saelab side by side with EleutherAI sparsify, SAELens and dictionary_learning.

Every library trains a top-k SAE (k=32, batch 4096, fp32, 2 threads) on the SAME activations in
the SAME batch order: the protocol's SmolLM2-135M-Instruct blocks.9.hook_resid_post rows (128-token
windows of wiki_train, position 0 skipped), harvested once by saelab into a float32 activation
cache (globally shuffled at harvest), read by every runner in stored order (batch b = rows
[b*4096, (b+1)*4096)). Each (library, n) run is a fresh process (so peak RSS is its own); runs are
interleaved (saelab, sparsify, sae-lens, dictionary-learning, then again, ...) because this machine's
timings vary up to 1.8x between identical runs, and the float32 GEMM bound is measured in the same
run, before each round. Medians over the repeats are reported.

    bash benchmarks/peers/setup_peers.sh /work/peer-venv          # once: the peers' own venv
    python benchmarks/compare_peers.py                             # full protocol (262,144 rows)
    python benchmarks/compare_peers.py --rows 32768 --n 8192       # quick check

Per run: tokens/s over the timed steps (steps 1..S-1: each library's one-time initialisation and
step 0 are excluded; batch reading is included, identical for all), eval nMSE
(sum||x - x_hat||^2 / sum||x - mean||^2 over the held-out rows) and dead % (latents that never fire
on them), and peak RSS at the end of training (getrusage; includes the library's imports). The
runners are benchmarks/run_saelab.py and benchmarks/peers/run_{sparsify,saelens,dictlearn}.py;
their docstrings say how each library is driven and where its settings differ from saelab's.
All use the same peak lr (saelab's default for n unless --lr), saelab's schedule (warmup 10
steps, linear decay over the last 60 %), AuxK with coefficient 1/32 on a 10 M-token dead window.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import BATCH, EVAL_TOKENS, K, RESULT_PREFIX, THREADS, TRAIN_TOKENS, command_line  # noqa: E402
from common import default_lr, encoder_bound, ensure_bench_caches, gemm_flops, machine_info  # noqa: E402

# name -> (runner script, distribution whose version is reported, module to import, needs the peer venv)
LIBRARIES = {
    "saelab": (HERE / "run_saelab.py", "saelab", "saelab", False),
    "sparsify": (HERE / "peers" / "run_sparsify.py", "eai-sparsify", "sparsify", True),
    "saelens": (HERE / "peers" / "run_saelens.py", "sae-lens", "sae_lens", True),
    "dictlearn": (HERE / "peers" / "run_dictlearn.py", "dictionary-learning", "dictionary_learning", True),
}


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               SPARSIFY_DISABLE_TRITON="1", TQDM_DISABLE="1")
    return env


def probe(lib: str, python: str, env: dict[str, str]) -> tuple[str | None, str | None]:
    """(version, None) if the library imports in that Python, else (None, why not)."""
    _, dist, module, _ = LIBRARIES[lib]
    if not Path(python).exists():
        return None, f"no Python at {python} (run benchmarks/peers/setup_peers.sh)"
    code = f"import importlib.metadata as md, {module}; print(md.version({dist!r}))"
    try:
        p = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    except subprocess.TimeoutExpired:
        return None, "import timed out"
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        return None, f"does not import: {lines[-1] if lines else 'exit ' + str(p.returncode)}"
    return p.stdout.strip().splitlines()[-1], None


def run_one(lib: str, python: str, n: int, args: argparse.Namespace, env: dict[str, str]) -> dict:
    script = LIBRARIES[lib][0]
    cmd = [python, str(script), "--cache", str(args.train_cache), "--eval-cache", str(args.eval_cache),
           "--rows", str(args.rows), "--eval-rows", str(args.eval_rows), "--n", str(n), "--k", str(args.k),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.lr is not None:
        cmd += ["--lr", str(args.lr)]
    if lib == "saelens":
        cmd += ["--b-dec-init", args.saelens_b_dec_init]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            out = json.loads(line[len(RESULT_PREFIX):])
            out["wall_s"] = time.perf_counter() - t
            return out
    tail = [ln for ln in (p.stderr or p.stdout).strip().splitlines() if ln.strip()][-3:]
    return {"error": f"exit {p.returncode}: {' | '.join(tail)}"}


def fmt_mb(x: float) -> str:
    return f"{x:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 32768], help="latent counts")
    ap.add_argument("--libs", nargs="+", default=list(LIBRARIES), choices=list(LIBRARIES),
                    help="libraries, in run order")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds (medians are reported)")
    ap.add_argument("--rows", type=int, default=TRAIN_TOKENS, help="training rows (protocol: 262,144)")
    ap.add_argument("--eval-rows", type=int, default=EVAL_TOKENS, help="held-out rows (protocol: 32,768)")
    ap.add_argument("--k", type=int, default=K)
    ap.add_argument("--batch-size", type=int, default=BATCH)
    ap.add_argument("--lr", type=float, default=None, help="peak lr for all (default: saelab's 2e-3/sqrt(n/2^14))")
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/saelab-bench"),
                    help="holds acts/ (training cache), acts_eval/ and results-*.jsonl")
    ap.add_argument("--peer-python", default="/work/peer-venv/bin/python", help="Python of the peers' venv")
    ap.add_argument("--gemm-repeats", type=int, default=10, help="GEMMs per bound measurement")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--saelens-b-dec-init", choices=["library", "median"], default="library",
                    help="SAELens starts b_dec at 0 (library); median: geometric median of the first batch")
    args = ap.parse_args()
    args.train_cache, args.eval_cache = args.workdir / "acts", args.workdir / "acts_eval"

    os.environ.update({v: str(args.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    torch.set_num_threads(args.threads)
    env = child_env(args.threads)
    ensure_bench_caches(args.train_cache, args.eval_cache, args.rows, args.eval_rows)
    d = json.loads((args.train_cache / "manifest.json").read_text())["d"]

    pythons = {lib: (args.peer_python if LIBRARIES[lib][3] else sys.executable) for lib in args.libs}
    versions, unavailable = {}, {}
    for lib in args.libs:
        versions[lib], why = probe(lib, pythons[lib], env)
        if why:
            unavailable[lib] = why
            print(f"{lib}: {why}", file=sys.stderr, flush=True)
    runnable = [lib for lib in args.libs if lib not in unavailable]

    results: dict[tuple[str, int], list[dict]] = {(lib, n): [] for lib in args.libs for n in args.n}
    flops: dict[int, list[float]] = {n: [] for n in args.n}
    log = args.workdir / f"results-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    args.workdir.mkdir(parents=True, exist_ok=True)
    for rep in range(args.repeats):
        for n in args.n:
            flops[n].append(gemm_flops(d, n, args.batch_size, repeats=args.gemm_repeats))
            print(f"round {rep + 1}/{args.repeats} n={n}: GEMM {flops[n][-1] / 1e9:.1f} GFLOP/s", file=sys.stderr,
                  flush=True)
            for lib in runnable:
                r = run_one(lib, pythons[lib], n, args, env)
                results[(lib, n)].append(r)
                with open(log, "a") as f:
                    f.write(json.dumps({"round": rep, "lib": lib, "n": n, "gemm_flops": flops[n][-1], **r}) + "\n")
                msg = r.get("error") or (f"{r['tokens_per_s']:,.0f} tok/s, nMSE {r['eval_nmse']:.4f}, "
                                         f"dead {r['eval_dead_frac']:.1%}, peak {r['peak_rss_train_mb']:,.0f} MB")
                print(f"  {lib:<10} n={n}: {msg}", file=sys.stderr, flush=True)

    print(f"\nMachine: {machine_info()}\nCommand: `{command_line()}`\n")
    lr_text = f"{args.lr:g}" if args.lr is not None else ", ".join(f"{default_lr(n):.3g} (n={n})" for n in args.n)
    print(f"Protocol: SmolLM2-135M-Instruct blocks.9.hook_resid_post, 128-token windows of wiki_train "
          f"(position 0 skipped), {args.rows:,} training rows in batches of {args.batch_size:,} (one pass, same "
          f"batches and order for all), k={args.k}, fp32, {args.threads} threads, lr {lr_text}; eval on "
          f"{args.eval_rows:,} rows of wiki_eval. {args.repeats} interleaved rounds, medians shown. tokens/s: "
          "steps 1..S-1 (one-time init and step 0 excluded). Bound: median float32 GEMM FLOP/s of "
          f"[{args.batch_size}, {d}] x [{d}, n] in this run / (2 d n). Peak memory: peak RSS of the run's "
          "process at the end of training, and in brackets its growth over the RSS after imports and before the "
          "SAE was built.\n")
    print("| library | version | n | tokens/s (median) | runs (tokens/s) | ratio to bound | ratio to saelab "
          "| final nMSE | dead % | peak memory MB (+ over imports) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.n:
        bound = encoder_bound(statistics.median(flops[n]), d, n) if flops[n] else float("nan")
        ok = {lib: [r for r in results[(lib, n)] if "error" not in r] for lib in args.libs}
        base = statistics.median(r["tokens_per_s"] for r in ok["saelab"]) if ok.get("saelab") else None
        for lib in args.libs:
            version, name = versions.get(lib) or "", LIBRARIES[lib][1]
            if lib in unavailable:
                print(f"| {name} | {version} | {n:,} | not available: {unavailable[lib]} | | | | | | |")
                continue
            runs = ok[lib]
            errors = [r["error"] for r in results[(lib, n)] if "error" in r]
            if not runs:
                print(f"| {name} | {version} | {n:,} | failed: {errors[0] if errors else 'not run'} | | | | | | |")
                continue
            version = runs[0]["version"] or version
            tok = statistics.median(r["tokens_per_s"] for r in runs)
            each = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in runs) + (f" ({len(errors)} failed)" if errors else "")
            rel = f"{tok / base:.2f}" if base else "n/a"
            nmse = statistics.median(r["eval_nmse"] for r in runs)
            dead = statistics.median(r["eval_dead_frac"] for r in runs)
            peak = max(r["peak_rss_train_mb"] for r in runs)
            grown = max(r["peak_rss_train_mb"] - r["rss_base_mb"] for r in runs)
            print(f"| {name} | {version} | {n:,} | {tok:,.0f} | {each} | {tok / bound:.3f} | {rel} | {nmse:.4f} "
                  f"| {dead:.1%} | {fmt_mb(peak)} (+{fmt_mb(grown)}) |")
    print("\n| n | float32 GEMM GFLOP/s (per round) | encoder-GEMM bound tokens/s (median) |\n|---|---|---|")
    for n in args.n:
        if flops[n]:
            print(f"| {n:,} | {', '.join(f'{f / 1e9:.1f}' for f in flops[n])} | "
                  f"{encoder_bound(statistics.median(flops[n]), d, n):,.0f} |")
    print("\nHow each library ran (details in the runner docstrings):")
    for lib in runnable:
        note = next((r["notes"] for n in args.n for r in results[(lib, n)] if "notes" in r), "")
        print(f"- {LIBRARIES[lib][1]} ({Path(LIBRARIES[lib][0]).relative_to(HERE.parent)}): {note}")
    print(f"\nRaw per-run JSON lines: {log}")


if __name__ == "__main__":
    main()
