"""Shared helpers for benchmark scripts: machine info, GEMM peak, the protocol's activations, and
what every training-throughput runner shares (benchmarks/run_saelab.py, benchmarks/peers/run_*.py).

Only the standard library, numpy and torch are imported at top level, so the peer libraries'
virtual environment (benchmarks/peers/setup_peers.sh) imports this module too; the harvesting
functions import saelab lazily and run in saelab's environment only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

# ---- the fixed protocol (GUIDE §6) ------------------------------------------------------------
HOOK = "blocks.9.hook_resid_post"
"""SmolLM2-135M-Instruct, layer-9 residual stream (= hidden_states[10])."""
CONTEXT = 128
"""Tokens per window of wiki_train (BOS first, position 0 skipped)."""
TRAIN_TOKENS = 262_144
"""Training rows of the protocol, seen once."""
EVAL_TOKENS = 32_768
"""Held-out rows (wiki_eval) for nMSE and dead latents."""
BATCH = 4096
CONTEXT_DRAW = "drawn at random from the first 16,777,216 tokens (sample_contexts)"
"""How the training windows are chosen; a cache made another way is harvested again."""
K = 32
THREADS = 2
DEAD_TOKENS = 10_000_000
"""AuxK's dead window (saelab's default for long runs; a short one keeps AuxK active in a short run)."""
WARMUP_STEPS = 10
DECAY_FRACTION = 0.6
"""saelab's TrainConfig defaults for the learning-rate schedule; lr_multiplier mirrors lr_at."""


def load_kernels_file(path: str | Path):
    """Another saelab version's ``sae/kernels.py`` as a module (it imports only torch), with this
    version's AuxK dense/sparse threshold so that both choose the same form for the same dead set."""
    import importlib.util

    import saelab.sae.kernels as this

    spec = importlib.util.spec_from_file_location("other_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.AUX_DENSE_FACTOR = this.AUX_DENSE_FACTOR
    if hasattr(module, "GPU_AUX_DENSE_FACTOR"):  # older files use AUX_DENSE_FACTOR on every device
        module.GPU_AUX_DENSE_FACTOR = this.GPU_AUX_DENSE_FACTOR
    return module


def run_json_child(cmd: list[str], env: dict[str, str], what: str) -> dict[str, Any]:
    """Run a benchmark's child process and return the JSON object on its last stdout line; if it fails,
    exit with ``what`` and the end of its stderr."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{what} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")


def command_line() -> str:
    """The command that ran, shell-quoted so that pasting it runs it again (a --prompt of several words)."""
    return "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def sync(device: str | torch.device = "cpu") -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a clock read after it is true."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def profiled(step, device: str | torch.device, rows: int) -> tuple[float, str]:
    """(wall seconds, its top operators by self time) of one call of ``step`` under torch.profiler,
    with the CUDA kernels' times on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    gpu = str(device).startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        wall = time.perf_counter() - t
    return wall, prof.key_averages().table(sort_by="self_cuda_time_total" if gpu else "self_cpu_time_total",
                                           row_limit=rows)


def device_name(device: str | torch.device = "cpu") -> str:
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def gemm_flops(d: int = 576, n: int = 8192, batch: int = 4096, repeats: int = 10,
               device: str | torch.device = "cpu") -> float:
    """Measured float32 GEMM FLOP/s for the encoder's shape [batch, d] @ [d, n] on ``device``."""
    a, b = torch.randn(batch, d, device=device), torch.randn(d, n, device=device)
    out = torch.empty(batch, n, device=device)
    torch.mm(a, b, out=out)
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b, out=out)
    sync(device)
    return 2 * batch * d * n * repeats / (time.perf_counter() - t)


def encoder_bound(flops: float, d: int, n: int) -> float:
    """Tokens/s if training cost exactly one forward encoder GEMM: flops / (2 d n)."""
    return flops / (2 * d * n)


# ---- protocol activations (saelab environment only) ---------------------------------------------
def protocol_meta(train_corpus: str) -> dict[str, Any]:
    return {"model_name": "default", "hook_name": HOOK, "context_size": CONTEXT, "prepend_bos": True,
            "exclude_first": True, "dataset": train_corpus, "contexts": CONTEXT_DRAW}


def harvest_train_cache(lm, folder: str | Path, n_rows: int = TRAIN_TOKENS, *, overwrite: bool = False,
                        progress: bool = True):
    """The protocol's training activations as a float32 activation cache at ``folder``.

    ``n_rows`` rows of HOOK from 128-token windows of wiki_train (position 0 skipped), the windows
    drawn at random from the whole corpus as ``saelab harvest`` draws them (sample_contexts), shuffled
    through a buffer as large as the whole harvest (so the stored order is a global shuffle).
    An interrupted harvest of the same ``n_rows`` resumes; ``overwrite`` starts over.
    """
    from saelab.data import ActivationStream, default_corpus, iter_texts, pack_contexts, sample_contexts
    from saelab.data import write_activation_cache
    from saelab.pipeline import HarvestConfig

    corpus = default_corpus("train")
    contexts = pack_contexts(iter_texts(corpus), lm.tokenize, CONTEXT, bos_token_id=lm.bos_token_id)
    contexts = sample_contexts(contexts, -(-n_rows // (CONTEXT - 1)), HarvestConfig.sample_pool_tokens // CONTEXT)
    stream = ActivationStream(lm, HOOK, contexts, batch_size=BATCH, lm_batch_size=16, max_tokens=n_rows,
                              buffer_tokens=max(n_rows, 2 * BATCH), progress=progress)
    return write_activation_cache(stream, folder, meta=protocol_meta(corpus), dtype="float32",
                                  resume=not overwrite, overwrite=overwrite, progress=progress)


def eval_contexts(lm, n_tokens: int = EVAL_TOKENS) -> torch.Tensor:
    """Token windows [N, 128] of wiki_eval (BOS first) holding ``n_tokens`` rows after position 0 is skipped."""
    from saelab.data import default_corpus, token_contexts

    return token_contexts(default_corpus("eval"), lm.tokenize, CONTEXT, n_contexts=-(-n_tokens // (CONTEXT - 1)),
                          bos_token_id=lm.bos_token_id)


def eval_activations(lm, n_tokens: int = EVAL_TOKENS, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The protocol's held-out rows: HOOK on 128-token windows of wiki_eval, position 0 skipped, in order."""
    tokens = eval_contexts(lm, n_tokens) if tokens is None else tokens
    with torch.no_grad():
        acts = [lm.activations(tokens[i:i + 16], HOOK)[:, 1:].reshape(-1, lm.d_model)
                for i in range(0, tokens.shape[0], 16)]
    return torch.cat(acts)[:n_tokens]


def _complete_rows(folder: Path) -> int:
    """Rows of a complete activation cache at ``folder``; 0 if there is none or it is incomplete."""
    try:
        m = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return 0
    same = m.get("complete") and m.get("dtype") == "float32" and m.get("meta", {}).get("contexts") == CONTEXT_DRAW
    return int(m.get("n_rows", 0)) if same else 0


def ensure_bench_caches(train_dir: str | Path, eval_dir: str | Path, train_rows: int, eval_rows: int,
                        *, progress: bool = True) -> None:
    """Make sure both float32 caches exist with at least the rows asked for (the LM loads only if needed).

    A training cache with fewer rows is harvested again from the start (rows of a smaller harvest
    are shuffled differently, so they are not a prefix of a larger one); one with more is reused,
    and runners read its first ``train_rows`` rows.
    """
    train_dir, eval_dir = Path(train_dir), Path(eval_dir)
    need_train = _complete_rows(train_dir) < train_rows
    need_eval = _complete_rows(eval_dir) < eval_rows
    if not (need_train or need_eval):
        return
    from saelab.data import write_activation_cache
    from saelab.models import load_model

    lm = load_model("default")
    if need_train:
        print(f"harvesting {train_rows:,} training rows into {train_dir}", file=sys.stderr, flush=True)
        harvest_train_cache(lm, train_dir, train_rows, overwrite=True, progress=progress)
    if need_eval:
        print(f"harvesting {eval_rows:,} eval rows into {eval_dir}", file=sys.stderr, flush=True)
        from saelab.data import default_corpus

        acts = eval_activations(lm, eval_rows)
        meta = {**protocol_meta(default_corpus("train")), "dataset": default_corpus("eval"), "order": "harvest"}
        write_activation_cache([acts], eval_dir, meta=meta, dtype="float32", overwrite=True, progress=False)


def write_random_cache(folder: Path, rows: int, d: int, seed: int, rows_seed: int) -> None:
    """A float32 activation cache of Gaussian rows around a common random offset (as a residual stream
    has one), in the format CacheReader reads; kept if one of at least ``rows`` rows with these seeds is
    there. The offset comes from ``seed`` alone, so training and held-out rows (other ``rows_seed``)
    share one distribution."""
    manifest = folder / "manifest.json"
    contexts = f"random: N(offset, I), offset seed {seed}, rows seed {rows_seed}"
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        if old.get("n_rows", 0) >= rows and old.get("meta", {}).get("contexts") == contexts:
            return
    folder.mkdir(parents=True, exist_ok=True)
    offset = 3.0 * np.random.default_rng(seed).standard_normal(d, dtype=np.float32)
    g = np.random.default_rng([seed, rows_seed])
    np.save(folder / "shard_00000.npy", g.standard_normal((rows, d), dtype=np.float32) + offset)
    manifest.write_text(json.dumps({"format": "saelab-activation-cache", "version": 1, "d": d, "dtype": "float32",
                                    "shard_rows": rows, "n_rows": rows, "complete": True,
                                    "shards": [{"file": "shard_00000.npy", "rows": rows}],
                                    "meta": {"contexts": contexts}}))


# ---- runner side: identical data, schedule, timing and metrics for every library ----------------
class CacheReader:
    """Read rows of a saelab activation cache (manifest.json + shard_XXXXX.npy) with plain file reads.

    No saelab import and no memory map (mapped pages would count in the process's RSS and blur the
    peak-memory comparison): each call reads exactly the rows asked for into a fresh float32 array.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._held: np.ndarray | None = None  # rows [0, len) read once by preload()
        m = json.loads((self.folder / "manifest.json").read_text())
        if not m.get("complete"):
            raise ValueError(f"activation cache {self.folder} is incomplete")
        self.d: int = m["d"]
        self.n_rows: int = m["n_rows"]
        self.dtype: str = m["dtype"]
        self._np = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}[self.dtype]
        self._shards = []  # (path, first row, rows, data offset)
        start = 0
        for s in m["shards"]:
            path = self.folder / s["file"]
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                if shape != (s["rows"], self.d) or fortran or dtype != self._np:
                    raise ValueError(f"{path}: {dtype} {shape} does not match the manifest")
                self._shards.append((path, start, s["rows"], f.tell()))
            start += s["rows"]

    def preload(self, rows: int) -> None:
        """Hold rows [0, rows) in memory, so later reads inside them cost no file read. For GPU runs,
        where reading a batch from disk takes longer than the step it feeds."""
        self._held = None
        self._held = self.read(0, min(rows, self.n_rows))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) in stored order, as a float32 array [stop - start, d] (a view of the
        preloaded rows where they cover it, else a new array)."""
        if not 0 <= start <= stop <= self.n_rows:
            raise ValueError(f"rows [{start}, {stop}) outside a cache of {self.n_rows} rows")
        if self._held is not None and stop <= len(self._held):
            return self._held[start:stop]
        out = np.empty((stop - start, self.d), dtype=self._np)
        pos = 0
        for path, first, rows, offset in self._shards:
            lo, hi = max(start, first), min(stop, first + rows)
            if lo >= hi:
                continue
            with open(path, "rb") as f:
                f.seek(offset + (lo - first) * self.d * self._np.itemsize)
                chunk = np.fromfile(f, dtype=self._np, count=(hi - lo) * self.d)
            out[pos:pos + hi - lo] = chunk.reshape(hi - lo, self.d)
            pos += hi - lo
        if self.dtype == "bfloat16":
            return (out.astype(np.uint32) << 16).view(np.float32)
        return out.astype(np.float32, copy=False)

    def batch(self, b: int, batch_size: int) -> torch.Tensor:
        """Training batch ``b``: rows [b * batch_size, (b + 1) * batch_size), as a float32 tensor."""
        return torch.from_numpy(self.read(b * batch_size, (b + 1) * batch_size))


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = WARMUP_STEPS,
                  decay_fraction: float = DECAY_FRACTION) -> float:
    """saelab's schedule (TrainConfig.lr_at / lr): linear warmup, constant, linear decay to 0 at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = int(total_steps * (1 - decay_fraction))
    if decay_fraction > 0 and step >= decay_start:
        return max(total_steps - step, 0) / max(total_steps - decay_start, 1)
    return 1.0


def default_lr(n: int) -> float:
    """saelab's default learning rate for n latents (TrainConfig: 4e-3 / sqrt(n / 2^14), at most 1e-2)."""
    return min(4e-3 / math.sqrt(n / 2**14), 1e-2)


def saelab_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR giving a peer's optimizer saelab's schedule (stepped once per optimizer step).

    The base learning rate is the optimizer's ``initial_lr`` if an earlier scheduler set one,
    else its current ``lr``.
    """
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"])
        group.pop("initial_lr", None)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total_steps))


@torch.no_grad()
def geometric_median(points_ND: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's iteration in float64 (for giving a peer the paper's b_pre init when it has none)."""
    pts = points_ND.double()
    median = pts.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / (pts - median).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * pts).sum(dim=0) / w.sum()
        done = (new - median).norm() <= tol * median.norm().clamp_min(1e-12)
        median = new
        if done:
            break
    return median.to(points_ND.dtype)


def runner_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every runner takes (compare_peers.py passes the same ones to all)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="/tmp/saelab-bench/acts", help="training activation cache (float32)")
    ap.add_argument("--eval-cache", default="/tmp/saelab-bench/acts_eval", help="held-out activation cache")
    ap.add_argument("--rows", type=int, default=TRAIN_TOKENS, help="training rows: the cache's first ROWS rows")
    ap.add_argument("--eval-rows", type=int, default=EVAL_TOKENS, help="held-out rows for nMSE / dead latents")
    ap.add_argument("--n", type=int, default=8192, help="latents")
    ap.add_argument("--k", type=int, default=K)
    ap.add_argument("--batch-size", type=int, default=BATCH)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: saelab's for n)")
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dead-tokens", type=int, default=DEAD_TOKENS,
                    help="AuxK's dead window: a latent is dead after this many tokens without firing")
    ap.add_argument("--device", default="cpu", help="where the SAE trains and evaluates (cpu, cuda, cuda:1)")
    return ap


def setup_runner(args: argparse.Namespace) -> tuple["CacheReader", "CacheReader", int]:
    """Threads, seed, defaults; call before building anything. Returns the training and eval
    readers and the number of training batches, the same for every library."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.lr is None:
        args.lr = default_lr(args.n)
    if args.rows < 2 * args.batch_size:
        raise SystemExit(f"--rows must be at least two batches ({2 * args.batch_size})")
    reader, eval_reader = CacheReader(args.cache), CacheReader(args.eval_cache)
    n_batches = min(args.rows, reader.n_rows) // args.batch_size
    if args.device.startswith("cuda"):  # a GPU step is shorter than a batch's file read: time the step
        reader.preload(n_batches * args.batch_size)
    return reader, eval_reader, n_batches


class StepClock:
    """Times the training loop the same way for every library.

    ``setup()`` marks the start of SAE construction; ``start()`` the moment batch 1 is in memory
    (after step 0, which holds the libraries' one-time data-dependent initialisation and warm-up
    costs); ``stop()`` the end of the last optimizer step. Timed: steps 1 .. S-1. ``lap(aux)`` ends
    one timed step and records whether AuxK ran in it, so step times split into the two regimes
    (laps cover start .. the last lap; a runner calls it once per timed step).
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = device  # every clock read first waits for this device's queued work
        self.t_setup = self.t_start = self.t_stop = None
        self.laps: list[tuple[float, bool]] = []
        self._t_lap = None

    def _now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def setup(self) -> None:
        self.t_setup = self._now()

    def start(self) -> None:
        self.t_start = self._t_lap = self._now()

    def lap(self, aux_active: bool) -> None:
        now = self._now()
        self.laps.append((now - self._t_lap, bool(aux_active)))
        self._t_lap = now

    def stop(self) -> None:
        self.t_stop = self._now()

    def regimes(self, batch_size: int) -> dict[str, Any]:
        """Median step time and tokens/s with AuxK inactive ('plain') and active ('aux'), and the
        share of timed steps with AuxK active (None where a regime has no step)."""
        out: dict[str, Any] = {"aux_steps": sum(a for _, a in self.laps), "lapped_steps": len(self.laps)}
        out["aux_share"] = out["aux_steps"] / len(self.laps) if self.laps else None
        for name, flag in (("plain", False), ("aux", True)):
            times = sorted(t for t, a in self.laps if a == flag)
            med = times[len(times) // 2] if times else None
            out[f"step_s_{name}"] = med
            out[f"tokens_per_s_{name}"] = batch_size / med if med else None
        return out

    def timed_batches(self, reader: CacheReader, n_batches: int, batch_size: int) -> Iterator[torch.Tensor]:
        """Batches 0 .. n_batches-1 in stored order; starts the clock when batch 1 has been read."""
        for b in range(n_batches):
            x = reader.batch(b, batch_size)
            if b == 1:
                self.start()
            yield x


class EvalAccumulator:
    """nMSE = sum||x - x_hat||^2 / sum||x - mean_eval(x)||^2 (float64), L0, and latents never fired."""

    def __init__(self, n_latents: int):
        self.sse = 0.0
        self.sum_x = None
        self.sum_sq = 0.0
        self.rows = 0
        self.nonzero = 0
        self.fired = torch.zeros(n_latents, dtype=torch.bool)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> None:
        """One batch: inputs, reconstructions, and the selected latents (indices, values) per row."""
        xd = x.double()
        self.sse += float((xd - x_hat.double()).pow(2).sum())
        s = xd.sum(dim=0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq += float(xd.pow(2).sum())
        self.rows += x.shape[0]
        active = vals > 0
        self.nonzero += int(active.sum())
        self.fired[idx[active]] = True

    def result(self) -> dict[str, float]:
        mean = self.sum_x / self.rows
        total_var = self.sum_sq - self.rows * float(mean.pow(2).sum())
        return {"eval_nmse": self.sse / total_var, "eval_dead_frac": float((~self.fired).double().mean()),
                "eval_l0": self.nonzero / self.rows, "eval_rows": self.rows}


def evaluate(encode_decode, reader: CacheReader, n_rows: int, n_latents: int, batch_size: int = BATCH,
             device: str | torch.device = "cpu") -> dict:
    """Metrics of ``encode_decode(x) -> (x_hat, idx_BK, vals_BK)`` on the first ``n_rows`` held-out rows
    (x on ``device``; the metrics are accumulated on the CPU)."""
    acc = EvalAccumulator(n_latents)
    n_rows = min(n_rows, reader.n_rows)
    with torch.no_grad():
        for lo in range(0, n_rows, batch_size):
            x = torch.from_numpy(reader.read(lo, min(lo + batch_size, n_rows)))
            x_hat, idx, vals = encode_decode(x.to(device))
            acc.update(x, x_hat.cpu(), idx.cpu(), vals.cpu())
    return acc.result()


def rss_mb() -> float:
    """Current resident set size of this process in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far in MB.

    /proc/self/status VmHWM belongs to the current address space, so it starts afresh at exec;
    getrusage's ru_maxrss would still carry the parent's peak from before the fork.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


RESULT_PREFIX = "BENCH_RESULT "


def finish_run(args: argparse.Namespace, clock: StepClock, *, library: str, version: str, n_batches: int,
               rss_base: float, peak_train: float, metrics: dict[str, float], notes: str = "",
               final_loss: float | None = None) -> None:
    """Print the run's one JSON line (prefixed with RESULT_PREFIX so library chatter can surround it)."""
    timed = clock.t_stop - clock.t_start
    total = clock.t_stop - clock.t_setup
    out = {
        "library": library, "version": version, "n": args.n, "k": args.k, "batch_size": args.batch_size,
        "rows": n_batches * args.batch_size, "steps": n_batches, "lr": args.lr, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "timed_steps": n_batches - 1, "train_s": timed,
        "tokens_per_s": (n_batches - 1) * args.batch_size / timed,
        "total_s": total, "tokens_per_s_incl_init": n_batches * args.batch_size / total,
        "rss_base_mb": rss_base, "peak_rss_train_mb": peak_train, "peak_rss_mb": peak_rss_mb(),
        "final_train_loss": final_loss, "dead_tokens": args.dead_tokens, **clock.regimes(args.batch_size),
        "device": device_name(args.device),
        "peak_gpu_mb": torch.cuda.max_memory_allocated(args.device) / 2**20 if "cuda" in str(args.device) else None,
        **metrics, "notes": notes,
    }
    print(RESULT_PREFIX + json.dumps(out), flush=True)
