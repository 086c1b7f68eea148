"""Training throughput of saelab side by side with EleutherAI sparsify, SAELens and dictionary_learning.

Every library trains a top-k SAE (k=32, batch 4096, fp32, 2 threads) on the SAME activations in
the SAME batch order: the protocol's SmolLM2-135M-Instruct blocks.9.hook_resid_post rows (128-token
windows of wiki_train, position 0 skipped), harvested once by saelab into a float32 activation
cache (globally shuffled at harvest), read by every runner in stored order (batch b = rows
[b*4096, (b+1)*4096)). Each (library, n) run is a fresh process (so peak RSS is its own); runs are
interleaved (saelab, sparsify, sae-lens, dictionary-learning, then again, ...) because this machine's
timings vary up to 1.8x between identical runs, and the float32 GEMM bound is measured in the same
run, right before each timed run (each run's ratio to the bound uses its own measurement).
Medians over the repeats are reported.

    bash benchmarks/peers/setup_peers.sh /work/peer-venv          # once: the peers' own venv
    python benchmarks/compare_peers.py                             # full protocol (262,144 rows)
    python benchmarks/compare_peers.py --rows 32768 --n 8192       # quick check
    python benchmarks/compare_peers.py --libs saelab sparsify --dead-tokens 16384 \
        --baseline /tmp/before/src                                 # AuxK active; an older saelab too
    python benchmarks/compare_peers.py --profile --n 8192          # top operators of a saelab step
    python benchmarks/compare_peers.py --device cuda --libs saelab sparsify --n 32768 131072 \
        --activations random --peer-python python3                 # on a GPU (benchmarks/gpu_check.sh)

``--device cuda`` trains and evaluates every library on the GPU (the same cached activations, read
on the CPU and copied per batch, in the same order), synchronizes before every clock read, and
measures the GEMM bound on the GPU in the same round. On CUDA the GEMMs run in TF32 for every
library (sparsify's Trainer sets matmul precision "high" itself; saelab gets ``allow_tf32``) and the
bound is the TF32 GEMM's. ``--activations random`` uses Gaussian rows with a common offset instead of
the protocol's LM activations (a machine without the LM or the corpus; the nMSE is then not the
protocol's); ``--device cuda`` without a GPU stops with one line.

Step times are also split by AuxK regime: each runner records, per timed step, whether AuxK ran
(some latent past the dead window), and the table gives tokens/s with AuxK inactive and active
(median step of each) and the share of steps with AuxK active. A short ``--dead-tokens`` window
keeps AuxK active for most of a short run, as in a long run once latents start dying.

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
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import BATCH, DEAD_TOKENS, EVAL_TOKENS, K, RESULT_PREFIX, THREADS, TRAIN_TOKENS  # noqa: E402
from common import command_line  # noqa: E402
from common import default_lr, device_name, encoder_bound, ensure_bench_caches, gemm_flops, machine_info  # noqa: E402
from common import write_random_cache  # noqa: E402

# name -> (runner script, distribution whose version is reported, module to import, needs the peer venv)
LIBRARIES = {
    "saelab": (HERE / "run_saelab.py", "saelab", "saelab", False),
    "sparsify": (HERE / "peers" / "run_sparsify.py", "eai-sparsify", "sparsify", True),
    "saelens": (HERE / "peers" / "run_saelens.py", "sae-lens", "sae_lens", True),
    "dictlearn": (HERE / "peers" / "run_dictlearn.py", "dictionary-learning", "dictionary_learning", True),
}


BASELINE = "saelab-base"
"""An older saelab (``--baseline SRC``: its src folder, e.g. a clone at an earlier commit) run by
this checkout's benchmarks/run_saelab.py with PYTHONPATH=SRC, so only the library differs."""


def child_env(threads: int, device: str = "cpu") -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               TQDM_DISABLE="1")
    if not device.startswith("cuda"):  # sparsify's Triton kernels are its GPU path
        env["SPARSIFY_DISABLE_TRITON"] = "1"
    return env


def probe(lib: str, python: str, env: dict[str, str]) -> tuple[str | None, str | None]:
    """(version, None) if the library imports in that Python, else (None, why not)."""
    _, dist, module, _ = LIBRARIES[lib]
    if shutil.which(python) is None:  # a path, or a name on PATH such as python3
        return None, f"no Python at {python} (run benchmarks/peers/setup_peers.sh)"
    # A checkout on PYTHONPATH (the GPU machine's) has no installed metadata: its __version__ serves.
    code = (f"import importlib.metadata as md, {module} as m; "
            f"print(getattr(m, '__version__', None) or md.version({dist!r}))")
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
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--seed", str(args.seed),
           "--dead-tokens", str(args.dead_tokens), "--device", args.device]
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


def fmt_tok(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def median_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def parse_args() -> argparse.Namespace:
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
    ap.add_argument("--dead-tokens", type=int, default=DEAD_TOKENS,
                    help="AuxK dead window for every library (short: AuxK active for most of the run)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help=f"src folder of another saelab checkout, run as '{BASELINE}' right after saelab")
    ap.add_argument("--profile", action="store_true",
                    help="print the top operators of one saelab step with AuxK inactive and one with it active "
                         "(torch.profiler, in this process), then exit")
    ap.add_argument("--profile-rows", type=int, default=25, help="operators shown by --profile")
    ap.add_argument("--profile-step", type=int, default=None,
                    help="the step --profile takes with AuxK active (default: the run's last step, where the dead "
                         "set is largest; the first AuxK step has the fewest dead latents)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/saelab-bench"),
                    help="holds acts/ (training cache), acts_eval/ and results-*.jsonl")
    ap.add_argument("--peer-python", default="/work/peer-venv/bin/python", help="Python of the peers' venv")
    ap.add_argument("--gemm-repeats", type=int, default=10, help="GEMMs per bound measurement")
    ap.add_argument("--device", default="cpu", help="where every library trains and evaluates: cpu or cuda[:i]")
    ap.add_argument("--activations", choices=["protocol", "random"], default="protocol",
                    help="the protocol's SmolLM2 activations (harvested once), or Gaussian rows (no LM needed)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--saelens-b-dec-init", choices=["library", "median"], default="library",
                    help="SAELens starts b_dec at 0 (library); median: geometric median of the first batch")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"compare_peers.py: error: --device {args.device}: torch {torch.__version__} sees no CUDA GPU")
    suffix = "" if args.activations == "protocol" else "_random"
    args.train_cache, args.eval_cache = args.workdir / f"acts{suffix}", args.workdir / f"acts_eval{suffix}"
    if args.baseline is not None:
        if not (args.baseline / "saelab").is_dir():
            raise SystemExit(f"--baseline {args.baseline}: expected a src folder holding saelab/")
        LIBRARIES[BASELINE] = (HERE / "run_saelab.py", "saelab", "saelab", False)
        at = args.libs.index("saelab") + 1 if "saelab" in args.libs else 0
        args.libs.insert(at, BASELINE)
    return args


def main() -> None:
    args = parse_args()
    os.environ.update({v: str(args.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    torch.set_num_threads(args.threads)
    env = child_env(args.threads, args.device)
    if args.device.startswith("cuda"):  # the TF32 bound: sparsify's Trainer and saelab's runner both use TF32
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.activations == "random":
        write_random_cache(args.train_cache, args.rows, 576, args.seed, rows_seed=0)
        write_random_cache(args.eval_cache, args.eval_rows, 576, args.seed, rows_seed=1)
    else:
        ensure_bench_caches(args.train_cache, args.eval_cache, args.rows, args.eval_rows)
    d = json.loads((args.train_cache / "manifest.json").read_text())["d"]
    if args.profile:
        for n in args.n:
            profile_saelab(args, n)
        return

    pythons = {lib: (args.peer_python if LIBRARIES[lib][3] else sys.executable) for lib in args.libs}
    envs = {lib: env for lib in args.libs}
    if BASELINE in args.libs:
        envs[BASELINE] = {**env, "PYTHONPATH": str(args.baseline.resolve())}
    versions, unavailable = {}, {}
    for lib in args.libs:
        versions[lib], why = probe(lib, pythons[lib], envs[lib])
        if why:
            unavailable[lib] = why
            print(f"{lib}: {why}", file=sys.stderr, flush=True)
    runnable = [lib for lib in args.libs if lib not in unavailable]

    results: dict[tuple[str, int], list[dict]] = {(lib, n): [] for lib in args.libs for n in args.n}
    log = args.workdir / f"results-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    args.workdir.mkdir(parents=True, exist_ok=True)
    for rep in range(args.repeats):
        for n in args.n:
            for lib in runnable:
                # The bound right before each run: this machine's GEMM speed drifts within minutes.
                flops = gemm_flops(d, n, args.batch_size, repeats=args.gemm_repeats, device=args.device)
                r = run_one(lib, pythons[lib], n, args, envs[lib])
                r["gemm_flops"] = flops
                r["bound_tokens_per_s"] = encoder_bound(flops, d, n)
                results[(lib, n)].append(r)
                with open(log, "a") as f:
                    f.write(json.dumps({"round": rep, "lib": lib, "n": n, **r}) + "\n")
                print(f"round {rep + 1}/{args.repeats}  {lib:<11} n={n}: {run_summary(r)}", file=sys.stderr,
                      flush=True)
    print_report(args, d, results, versions, unavailable, runnable, log)
    missing = [f"{lib} n={n}" for (lib, n), runs in results.items() if not any("error" not in r for r in runs)]
    if missing:
        sys.exit(f"compare_peers.py: no result for {', '.join(missing)} (see above)")


def run_summary(r: dict) -> str:
    if "error" in r:
        return r["error"]
    bound = r["bound_tokens_per_s"]
    return (f"{r['tokens_per_s']:,.0f} tok/s ({r['tokens_per_s'] / bound:.2f} of bound {bound:,.0f}), "
            f"AuxK off {fmt_tok(r.get('tokens_per_s_plain'))} / on {fmt_tok(r.get('tokens_per_s_aux'))} tok/s "
            f"({r.get('aux_steps', 0)}/{r.get('lapped_steps', 0)} steps on), nMSE {r['eval_nmse']:.4f}, "
            f"dead {r['eval_dead_frac']:.1%}, peak {r['peak_rss_train_mb']:,.0f} MB")


def ratio_to_bound(runs: list[dict], key: str) -> float | None:
    """Median over runs of the run's tokens/s over the bound measured right before it."""
    vals = [r[key] / r["bound_tokens_per_s"] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def peak_memory(runs: list[dict], gpu: bool) -> str:
    if gpu:
        return f"{fmt_mb(max(r.get('peak_gpu_mb') or float('nan') for r in runs))} (GPU)"
    return (f"{fmt_mb(max(r['peak_rss_train_mb'] for r in runs))} "
            f"(+{fmt_mb(max(r['peak_rss_train_mb'] - r['rss_base_mb'] for r in runs))})")


def print_report(args, d, results, versions, unavailable, runnable, log) -> None:
    gpu = args.device.startswith("cuda")
    print(f"\nMachine: {machine_info()}; device {args.device} ({device_name(args.device)})\n"
          f"Command: `{command_line()}`\n")
    acts = ("SmolLM2-135M-Instruct blocks.9.hook_resid_post, 128-token windows of wiki_train (position 0 skipped)"
            if args.activations == "protocol" else "random Gaussian rows (common offset), d = 576")
    precision = "TF32 matmuls (float32 storage)" if gpu else "fp32"
    lr_text = f"{args.lr:g}" if args.lr is not None else ", ".join(f"{default_lr(n):.3g} (n={n})" for n in args.n)
    print(f"Protocol: {acts}, {args.rows:,} training rows in batches of {args.batch_size:,} (one pass, same "
          f"batches and order for all), k={args.k}, {precision}, {args.threads} CPU threads, lr {lr_text}, AuxK dead "
          f"window {args.dead_tokens:,} tokens; eval on {args.eval_rows:,} held-out rows. {args.repeats} interleaved "
          "rounds, medians shown. tokens/s: steps 1..S-1 (one-time init and step 0 excluded); 'AuxK off / on': "
          "tokens/s of the median step without and with AuxK, and the share of timed steps with AuxK on. Bound: "
          f"{precision} GEMM FLOP/s of [{args.batch_size}, {d}] x [{d}, n] on {args.device}, measured right before "
          "each run / (2 d n); ratios are medians of each run's ratio. Peak memory: "
          + ("peak GPU memory allocated by torch in the run (max_memory_allocated). On the GPU every runner "
             "reads its training rows into host memory before the clock starts (a batch's file read takes "
             "longer than a step); each batch's copy to the GPU is timed.\n" if gpu else
             "peak RSS of the run's process at the end of training, and in brackets its growth over the RSS "
             "after imports and before the SAE was built.\n"))
    print("| library | version | n | tokens/s (median) | runs (tokens/s) | ratio to bound | AuxK off / on tokens/s "
          "| AuxK on: ratio to bound | AuxK steps | ratio to saelab | final nMSE | dead % | peak memory MB (+ over imports) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.n:
        ok = {lib: [r for r in results[(lib, n)] if "error" not in r] for lib in args.libs}
        base = median_of(ok.get("saelab", []), "tokens_per_s")
        for lib in args.libs:
            version, name = versions.get(lib) or "", LIBRARIES[lib][1] if lib != BASELINE else BASELINE
            if lib in unavailable:
                print(f"| {name} | {version} | {n:,} | not available: {unavailable[lib]} |" + " |" * 9)
                continue
            runs = ok[lib]
            errors = [r["error"] for r in results[(lib, n)] if "error" in r]
            if not runs:
                print(f"| {name} | {version} | {n:,} | failed: {errors[0] if errors else 'not run'} |" + " |" * 9)
                continue
            version = runs[0]["version"] or version
            tok = median_of(runs, "tokens_per_s")
            each = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in runs) + (f" ({len(errors)} failed)" if errors else "")
            on_ratio = ratio_to_bound(runs, "tokens_per_s_aux")
            share = statistics.median(r["aux_share"] for r in runs) if all(r.get("aux_share") is not None
                                                                            for r in runs) else None
            print(f"| {name} | {version} | {n:,} | {tok:,.0f} | {each} | {ratio_to_bound(runs, 'tokens_per_s'):.3f} "
                  f"| {fmt_tok(median_of(runs, 'tokens_per_s_plain'))} / {fmt_tok(median_of(runs, 'tokens_per_s_aux'))} "
                  f"| {'-' if on_ratio is None else f'{on_ratio:.3f}'} | {'-' if share is None else f'{share:.0%}'} "
                  f"| {f'{tok / base:.2f}' if base else 'n/a'} | {median_of(runs, 'eval_nmse'):.4f} "
                  f"| {median_of(runs, 'eval_dead_frac'):.1%} | {peak_memory(runs, gpu)} |")
    print(f"\n| n | library | {precision} GEMM GFLOP/s before each run | encoder-GEMM bound tokens/s (median) |\n|---|---|---|---|")
    for n in args.n:
        for lib in runnable:
            runs = results[(lib, n)]
            if runs:
                gflops = ", ".join(f"{r['gemm_flops'] / 1e9:.1f}" for r in runs)
                print(f"| {n:,} | {lib} | {gflops} | "
                      f"{statistics.median(r['bound_tokens_per_s'] for r in runs):,.0f} |")
    print("\nHow each library ran (details in the runner docstrings):")
    for lib in runnable:
        note = next((r["notes"] for n in args.n for r in results[(lib, n)] if "notes" in r), "")
        name = f"{BASELINE} ({args.baseline})" if lib == BASELINE else LIBRARIES[lib][1]
        print(f"- {name} ({Path(LIBRARIES[lib][0]).relative_to(HERE.parent)}): {note}")
    print(f"\nRaw per-run JSON lines: {log}")


def profile_saelab(args: argparse.Namespace, n: int) -> None:
    """Top operators (self time) of one saelab training step with AuxK inactive and one with it active.

    Trains from the cache's first batches with this run's settings; the plain step is the first one
    after two warm-up steps, the AuxK step ``--profile-step`` (default: the last), if AuxK is active
    then (so ``--dead-tokens`` should be a few batches, e.g. 16384). On ``--device
    cuda`` CUDA kernel times are profiled too."""
    import tempfile

    from common import CacheReader, default_lr, profiled
    from saelab.train import TrainConfig, TrainingRun

    reader = CacheReader(args.train_cache)
    n_batches = min(args.rows, reader.n_rows) // args.batch_size
    cfg = TrainConfig(n_latents=n, k=args.k, batch_size=args.batch_size, total_tokens=n_batches * args.batch_size,
                      lr=args.lr or default_lr(n), seed=args.seed, checkpoint_every=10**9, log_every=10**9,
                      dead_tokens=args.dead_tokens)
    gpu = args.device.startswith("cuda")
    seen: set[bool] = set()
    with tempfile.TemporaryDirectory(prefix="saelab-profile-") as run_dir:
        run = TrainingRun(cfg, run_dir, d_in=reader.d, meta=None, device=args.device, allow_tf32=gpu,
                          init_sample=lambda: reader.batch(0, min(cfg.effective_init_rows, n_batches * args.batch_size)))
        for b in range(n_batches):
            x = reader.batch(b, args.batch_size)
            tr = run.trainer
            aux = cfg.auxk and bool((tr.tokens_since_fired >= cfg.effective_dead_tokens).any())
            aux_step = args.profile_step if args.profile_step is not None else n_batches - 1
            if b < 2 or aux in seen or (aux and b != aux_step):  # steps 0-1 warm up; one step per regime
                run.train_step(x)
                continue
            wall, table = profiled(lambda: run.train_step(x), args.device, args.profile_rows)
            seen.add(aux)
            dead = (tr.tokens_since_fired >= cfg.effective_dead_tokens).sum().item()
            flops = gemm_flops(reader.d, n, args.batch_size, repeats=args.gemm_repeats, device=args.device)
            gemm_s = 2 * args.batch_size * reader.d * n / flops
            print(f"\nn={n:,}, step {b}, AuxK {'ACTIVE' if aux else 'inactive'} ({dead:,} dead latents): "
                  f"{wall * 1e3:,.1f} ms under the profiler; encoder GEMM alone {gemm_s * 1e3:,.2f} ms "
                  f"(measured right after)")
            print(table)
            if len(seen) == 2:
                return
    print(f"n={n:,}: no step with AuxK {'active' if True not in seen else 'inactive'} in {n_batches} batches "
          f"(dead window {args.dead_tokens:,} tokens)")


if __name__ == "__main__":
    main()
