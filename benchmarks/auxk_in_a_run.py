"""What AuxK costs in a real training run: the dead set that run's own window gives, not a chosen one.

auxk_cost.py times AuxK at a dead set it picks after a few warm-up steps; the AuxK values of such
latents are far more often positive than those of latents dead for a whole window, which decides
the cost of AuxK's entry form. This script trains the same recipe on the same activation cache
with ``python -m saelab train`` (a fresh process per run, checkpoints only at the end), with this
saelab and with ``--baseline SRC`` (another checkout's src/) in alternating order, and reads each
run's metrics.jsonl: its cumulative tokens/s at every log row gives the wall time of each interval
of ``log_every`` steps, an interval is plain when no latent was dead at either end and AuxK when
latents were dead at both, and the table gives the mean step of each and their ratio:

    python benchmarks/auxk_in_a_run.py --activations runs/quickstart/activations \
        --baseline /tmp/before/src --rounds 2

The recipe is quickstart's (n = 8,192, k = 32, 1,048,576 tokens; AuxK starts near step 90) unless
``--set`` changes it (``--set n-latents=16384``). The first interval (one-time set-up) is left out.
No timing here is asserted anywhere: it is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, command_line, machine_info  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--activations", type=Path, required=True, help="an activation cache (saelab harvest)")
    ap.add_argument("--baseline", type=Path, default=None, help="another saelab's src/, run in alternation")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE", help="train options beside the recipe")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (args.activations / "manifest.json").is_file():
        ap.error(f"--activations {args.activations}: not an activation cache (no manifest.json); "
                 "expected a folder `saelab harvest` wrote")
    if args.baseline is not None and not (args.baseline / "saelab").is_dir():
        ap.error(f"--baseline {args.baseline}: holds no saelab package; expected another checkout's src/")
    bad = [o for o in args.set if "=" not in o or not o.split("=", 1)[0]]
    if bad:
        ap.error(f"--set {bad[0]}: expected OPTION=VALUE, e.g. n-latents=16384")
    return args


def train(src: Path, args: argparse.Namespace, out: Path) -> list[dict]:
    """One `saelab train` run of ``src``'s saelab; its metrics.jsonl rows."""
    options = [f"--{o.split('=', 1)[0]}={o.split('=', 1)[1]}" for o in args.set]
    cmd = [sys.executable, "-m", "saelab", "train", "--activations", str(args.activations), "--out", str(out),
           "--device", "cpu", "--no-progress", "--log-every", "10", "--checkpoint-every", "100000", *options]
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        sys.exit(f"auxk_in_a_run.py: `saelab train` of {src} failed (its error is above)")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_times(rows: list[dict]) -> tuple[list[float], list[float]]:
    """Seconds per step of each plain interval and each AuxK interval (the first interval left out)."""
    plain, auxk = [], []
    # A fresh run: its tokens over its cumulative tokens/s are the seconds since it started.
    at = [(r["step"], r["tokens"] / r["tokens_per_s"], r["dead_frac"]) for r in rows]
    for (s0, t0, d0), (s1, t1, d1) in zip(at[1:], at[2:]):
        per_step = (t1 - t0) / (s1 - s0)
        if d0 == 0 and d1 == 0:
            plain.append(per_step)
        elif d0 > 0 and d1 > 0:
            auxk.append(per_step)
    return plain, auxk


def main() -> None:
    args = parse_args()
    print(command_line())
    print(machine_info())
    versions = {"this": ROOT / "src"} | ({"baseline": args.baseline} if args.baseline else {})
    times: dict[str, dict[str, list[float]]] = {v: {"plain": [], "auxk": []} for v in versions}
    final: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="saelab-auxk-run-") as tmp:
        for r in range(args.rounds):
            order = list(versions) if r % 2 == 0 else list(reversed(versions))
            for name in order:
                rows = train(versions[name], args, Path(tmp) / f"{name}{r}")
                plain, auxk = step_times(rows)
                times[name]["plain"].append(statistics.mean(plain) if plain else float("nan"))
                times[name]["auxk"].append(statistics.mean(auxk) if auxk else float("nan"))
                final[name] = rows[-1]
                print(f"round {r + 1} {name}: plain step {1e3 * times[name]['plain'][-1]:.0f} ms ({len(plain)} "
                      f"intervals), AuxK step {1e3 * times[name]['auxk'][-1]:.0f} ms ({len(auxk)} intervals), "
                      f"final nMSE {rows[-1]['nmse']:.4f}, dead {100 * rows[-1]['dead_frac']:.1f}%", flush=True)
    print("\n| saelab | plain step (rounds) | AuxK step (rounds) | AuxK / plain | final training nMSE |")
    print("|---|---|---|---|---|")
    for name in versions:
        p, a = times[name]["plain"], times[name]["auxk"]
        rounds = lambda xs: ", ".join(f"{1e3 * x:.0f}" for x in xs)  # noqa: E731
        print(f"| {name} | {1e3 * statistics.median(p):.0f} ms ({rounds(p)}) | {1e3 * statistics.median(a):.0f} ms "
              f"({rounds(a)}) | {statistics.median(a) / statistics.median(p):.3f} | {final[name]['nmse']:.4f} |")


if __name__ == "__main__":
    main()
