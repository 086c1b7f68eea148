"""What AuxK adds to a training step, at a chosen number of dead latents, in one process.

A whole training run mixes steps with and without AuxK, and its dead set follows the run; this
script isolates the one quantity: a saelab ``Trainer`` trains a few warm-up steps on the
protocol's activations (the cache compare_peers.py harvests), then alternates plain steps (no
latent dead) and AuxK steps with a fixed dead set, on the same batches, and reports the median
wall time of each and their ratio. The dead set is the latents that went longest without firing
in the warm-up (ties in a seeded random order), ``--dead`` of them (fractions of n when < 1):

    python benchmarks/auxk_cost.py --n 8192 32768 --dead 0.03 0.1 0.24 --rounds 5

What an AuxK step costs depends on how many of its values are nonzero (the line before each result
says): a short warm-up makes latents "dead" that fired a few steps ago, whose AuxK values are often
positive; after a warm-up as long as a run (``--warmup-steps 200`` on the quickstart's cache) the
longest-silent latents are dead as in a real run, with a few nonzero values per row.

Both kinds of step run the same code path (``TrainingRun.train_step``); only the dead mask
differs. ``--kernels-from OLD/src/saelab/sae/kernels.py`` compares two versions of the kernels
in the same process: each round times this saelab's and the other file's in turn, each first in
every other round (the training loss's encoder and decoders, KERNEL_NAMES, swapped between steps;
the rest of the step, e.g. the optimizer and the decoder constraints, is this saelab's in both),
so both see the same machine state. ``--variant NAME=KNOB:VALUE[,KNOB:VALUE]`` does the same for
settings of this saelab's kernels module (e.g. ``--variant chunked=GPU_CHUNK_ELEMENTS:0``), each
variant timed against the module as it is; ``--profile`` prints the top operators of one plain and
one AuxK step of each version at the last dead-set size. ``--cache random`` trains on Gaussian rows
(d = 576) instead of a harvested cache (the GPU machine has neither the model nor the room for one);
on a GPU every batch is on the device before its step is timed, and matmuls run in TF32, as
saelab trains there by default. ``--clock cpu`` counts the process's CPU time instead of wall time
(steadier on a shared machine; with --threads 1 it is the single core's time). No timing here is
asserted anywhere: it is a measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BATCH, K, CacheReader, command_line, default_lr, load_kernels_file, machine_info, profiled  # noqa: E402
from common import sync, write_random_cache  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 32768], help="latent counts")
    ap.add_argument("--dead", type=float, nargs="+", default=[0.03, 0.24],
                    help="dead latents per AuxK step: a count, or a fraction of n when < 1")
    ap.add_argument("--rounds", type=int, default=5, help="plain/AuxK step pairs timed per dead-set size")
    ap.add_argument("--warmup-steps", type=int, default=4, help="steps trained before timing")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/saelab-bench/acts"),
                    help="a float32 activation cache (compare_peers.py harvests it), or 'random' for Gaussian rows")
    ap.add_argument("--random-rows", type=int, default=16 * BATCH, help="rows of --cache random")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernels-from", type=Path, default=None,
                    help="another saelab's sae/kernels.py, timed against this one's in the same process")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or this process's CPU time (time.process_time)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KNOB:VALUE[,KNOB:VALUE]",
                    help="settings of saelab.sae.kernels (see TUNABLE) timed against the module as it is")
    ap.add_argument("--profile", action="store_true", help="top operators of one plain and one AuxK step per version")
    ap.add_argument("--profile-rows", type=int, default=15, help="operators shown by --profile")
    ap.add_argument("--aux-form", choices=["auto", "dense", "sparse"], default="auto",
                    help="force AuxK's dense or sparse (entry) form (auto: saelab's size rule, "
                         "kernels.AUX_DENSE_FACTOR and GPU_AUX_DENSE_FACTOR)")
    args = ap.parse_args()
    try:
        variants = [parse_variant(v) for v in args.variant]
    except ValueError as e:
        ap.error(f"--variant {e}")
    args.variant = dict(variants)
    if len(args.variant) < len(variants):
        ap.error(f"--variant: each NAME once, got {[name for name, _ in variants]}")
    if args.rounds < 1 or args.warmup_steps < 0:
        ap.error(f"--rounds {args.rounds} --warmup-steps {args.warmup_steps}: expected at least 1 round, "
                 "and 0 or more warm-up steps")
    if str(args.cache) != "random" and not (args.cache / "manifest.json").is_file():
        ap.error(f"--cache {args.cache}: no activation cache there; run benchmarks/compare_peers.py once to harvest it")
    if args.kernels_from is not None and not args.kernels_from.is_file():
        ap.error(f"--kernels-from {args.kernels_from}: expected a kernels.py file")
    if any(x <= 0 for x in args.dead):
        ap.error(f"--dead {args.dead}: expected positive counts or fractions")
    return args


TUNABLE = {"DEFAULT_CHUNK_ROWS": "a positive integer", "GEMM_ALIGN": "a positive integer",
           "GPU_CHUNK_ELEMENTS": "an integer >= 0", "GPU_GROUPED_TOPK_MIN_N": "an integer >= 0 or inf",
           "AUX_DENSE_FACTOR": "a number >= 0 or inf", "GPU_AUX_DENSE_FACTOR": "a number >= 0 or inf",
           "CPU_BF16_SCREEN_MIN_N": "an integer >= 0 or inf", "SCREEN_MARGIN": "an integer >= 0"}
"""The settings of saelab.sae.kernels that --variant may change, and the values each takes."""


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME=KNOB:VALUE,KNOB:VALUE' -> (NAME, {KNOB: value}), each KNOB in TUNABLE with a value it takes."""
    name, eq, body = text.partition("=")
    if not name or not eq or name == "this":
        raise ValueError(f"{text!r}: expected NAME=KNOB:VALUE[,KNOB:VALUE] with a NAME other than 'this'")
    settings = {}
    for item in body.split(","):
        knob, _, value = item.partition(":")
        if knob not in TUNABLE:
            raise ValueError(f"{text!r}: {knob!r} is not one of {', '.join(TUNABLE)}")
        if knob in settings:
            raise ValueError(f"{text!r}: {knob} is set twice")
        settings[knob] = _setting(knob, value, text)
    return name, settings


def _setting(knob: str, value: str, text: str) -> int | float:
    want = TUNABLE[knob]
    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    integral = x == float("inf") or (x == x and x == int(x))
    ok = x >= (1 if "positive" in want else 0) and ("inf" in want or x != float("inf"))
    if not ok or ("integer" in want and not integral):
        raise ValueError(f"{text!r}: {knob} takes {want}, got {value!r}")
    return x if x == float("inf") or "number" in want else int(x)


def dead_mask(tokens_since_fired: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """The ``count`` latents that went longest without firing (ties in a seeded random order)."""
    gen = torch.Generator().manual_seed(seed)
    n = tokens_since_fired.numel()
    shuffled = torch.randperm(n, generator=gen).to(tokens_since_fired.device)
    longest = tokens_since_fired[shuffled].float().argsort(descending=True, stable=True)
    mask = torch.zeros(n, dtype=torch.bool, device=tokens_since_fired.device)
    mask[shuffled[longest[:count]]] = True
    return mask


def set_dead(trainer, dead: torch.Tensor | None) -> None:
    """Make exactly ``dead`` the dead set of the next step (None: no latent dead)."""
    trainer.tokens_since_fired.zero_()
    if dead is not None:
        trainer.tokens_since_fired[dead] = trainer.cfg.effective_dead_tokens


def timed_step(run, x: torch.Tensor, dead: torch.Tensor | None, device: str, clock=time.perf_counter
               ) -> tuple[float, float]:
    """(seconds on ``clock``, AuxK loss) of one step with exactly ``dead`` dead (None: no latent dead)."""
    set_dead(run.trainer, dead)
    sync(device)
    t = clock()
    stats = run.train_step(x)
    sync(device)
    return clock() - t, stats["auxk"]


KERNEL_NAMES = ("sparse_topk_encode", "sparse_decode", "decode_aux")
"""What the training loss calls from saelab.sae.kernels: the functions --kernels-from swaps."""


def kernel_variants(other: Path | None, settings: dict[str, dict]) -> dict[str, Callable[[], None]]:
    """{name: a call that makes the training loss use that version}: this saelab's kernels as they
    are, the file ``other``'s, and this module with each variant's settings."""
    import saelab.sae.kernels as this

    own = tuple(getattr(this, name) for name in KERNEL_NAMES)
    as_is = {knob: getattr(this, knob) for variant in settings.values() for knob in variant}

    def version(functions: tuple, knobs: dict) -> Callable[[], None]:
        def use() -> None:
            import saelab.train.losses as losses

            for knob, value in {**as_is, **knobs}.items():
                setattr(this, knob, value)
            for name, function in zip(KERNEL_NAMES, functions):
                setattr(losses, name, function)
        return use

    variants = {"this": version(own, {})}
    if other is not None:
        module = load_kernels_file(other)
        variants[str(other)] = version(tuple(getattr(module, name) for name in KERNEL_NAMES), {})
    variants.update({name: version(own, knobs) for name, knobs in settings.items()})
    return variants


def measure(args: argparse.Namespace, reader: CacheReader, n: int) -> None:
    from saelab.train import TrainConfig, TrainingRun

    n_batches = reader.n_rows // BATCH
    gpu = args.device.startswith("cuda")
    cfg = TrainConfig(n_latents=n, k=K, batch_size=BATCH, total_tokens=n_batches * BATCH, lr=default_lr(n),
                      seed=args.seed, checkpoint_every=10**9, log_every=10**9)
    with tempfile.TemporaryDirectory(prefix="saelab-auxk-cost-") as run_dir:
        run = TrainingRun(cfg, run_dir, d_in=reader.d, meta=None, device=args.device, allow_tf32=gpu,
                          init_sample=lambda: reader.batch(0, min(cfg.effective_init_rows, n_batches * BATCH)))
        tr = run.trainer
        for b in range(args.warmup_steps):
            run.train_step(reader.batch(b % n_batches, BATCH))
        # Real staleness, kept aside: each timed step resets the counters to its own dead set.
        staleness = tr.tokens_since_fired.clone()
        variants = kernel_variants(args.kernels_from, args.variant)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        for size in args.dead:
            count = round(size * n) if size < 1 else int(size)
            dead = dead_mask(staleness, min(count, n), args.seed)
            times = {name: ([], [], []) for name in variants}  # plain, AuxK, AuxK loss
            for r in range(args.rounds):
                x = reader.batch((args.warmup_steps + r) % n_batches, BATCH).to(args.device)
                order = list(variants.items())
                for name, use in (order if r % 2 == 0 else order[::-1]):  # each goes first in turn
                    use()
                    plain, aux, losses = times[name]
                    plain.append(timed_step(run, x, None, args.device, clock)[0])
                    seconds, loss = timed_step(run, x, dead, args.device, clock)
                    aux.append(seconds)
                    losses.append(loss)
            variants["this"]()
            per_row, dense, over = nonzero_aux_per_row(run, x, dead)
            print(f"n={n:,} dead={int(dead.sum()):,}: {per_row:.1f} nonzero AuxK values per row, {over:.1%} of rows "
                  f"with more than k_aux positive; this saelab takes the {'dense' if dense else 'entry'} form",
                  flush=True)
            for name, (plain, aux, losses) in times.items():
                report(n, dead, name if len(variants) > 1 else "", plain, aux, losses)
        if args.profile:
            profile_versions(args, run, variants, x, dead)


def nonzero_aux_per_row(run, x: torch.Tensor, dead: torch.Tensor) -> tuple[float, bool, float]:
    """The nonzero AuxK values per row of ``x`` at the dead set ``dead`` (they set AuxK's cost and form),
    whether this saelab takes the dense form there, and the share of rows with more than k_aux positive
    dead pre-activations (on the CPU, a chunk holding one such row runs AuxK's top-k)."""
    from saelab.sae.kernels import sparse_topk_encode

    sae, dead_idx, k_aux = run.trainer.sae, dead.nonzero().squeeze(1), run.trainer.cfg.k_aux
    with torch.no_grad():
        x_n, _ = sae.normalize_input(x)
        enc = sparse_topk_encode(x_n, sae.b_dec, sae.W_enc, sae.b_enc, sae.cfg.k, dead_idx=dead_idx, k_aux=k_aux)
        pre_dead = (x_n - sae.b_dec) @ sae.W_enc[:, dead_idx] + sae.b_enc[dead_idx]
        over = ((pre_dead > 0).sum(dim=1) > k_aux).float().mean().item()
    return (enc.aux_vals_BA != 0).sum().item() / x.shape[0], enc.aux_dense, over


def profile_versions(args: argparse.Namespace, run, variants: dict, x: torch.Tensor, dead: torch.Tensor) -> None:
    """The top operators of one plain and one AuxK step (after an untimed one) of each version."""
    tr = run.trainer
    for name, use in variants.items():
        use()
        for label, mask in (("plain", None), (f"AuxK, {int(dead.sum()):,} dead", dead)):
            timed_step(run, x, mask, args.device)
            set_dead(tr, mask)
            wall, table = profiled(lambda: run.train_step(x), args.device, args.profile_rows)
            print(f"\nn={tr.cfg.n_latents:,} {name}, {label}: {wall * 1e3:,.2f} ms under the profiler\n{table}",
                  flush=True)
    variants["this"]()


def ms(seconds: float) -> str:
    """Milliseconds with the decimals a GPU step needs and a CPU step does not."""
    return f"{seconds * 1e3:,.0f}" if abs(seconds) >= 0.1 else f"{seconds * 1e3:.2f}"


def report(n: int, dead: torch.Tensor, name: str, plain: list[float], aux: list[float], losses: list[float]) -> None:
    ratios = [a / p for a, p in zip(aux, plain)]
    p, a = statistics.median(plain), statistics.median(aux)
    print(f"n={n:,} dead={int(dead.sum()):,} ({dead.float().mean().item():.1%}){' ' + name if name else ''}: "
          f"plain {ms(p)} ms, AuxK {ms(a)} ms (+{ms(a - p)}), AuxK / plain {a / p:.3f} "
          f"(pairs {min(ratios):.3f}-{max(ratios):.3f}); AuxK loss nonzero in {sum(x > 0 for x in losses)}/{len(losses)}",
          flush=True)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.aux_form != "auto":  # the size rule reads this module constant at every call
        import saelab.sae.kernels as kernels

        kernels.AUX_DENSE_FACTOR = kernels.GPU_AUX_DENSE_FACTOR = float("inf") if args.aux_form == "dense" else 0.0
    print(command_line())
    print(machine_info())
    if str(args.cache) == "random":
        args.cache = Path(tempfile.gettempdir()) / "saelab-auxk-cost-random"
        write_random_cache(args.cache, args.random_rows, 576, args.seed, rows_seed=0)
    reader = CacheReader(args.cache)
    if args.device.startswith("cuda"):  # reading a batch takes longer than a GPU step
        reader.preload(reader.n_rows)
    for n in args.n:
        measure(args, reader, n)


if __name__ == "__main__":
    main()
