"""How long a saelab command takes before it does anything: `--help`, a verb's `--help` and a refused option.

Each command runs as `python -m saelab ...` in a fresh process (wall time, the interpreter's own start
included), ``--runs`` times; the table gives the median and the range. With ``--other OLD/src`` another
version's source is timed beside this one, the two alternating run by run, so a busy machine slows both alike.
The last column names the heavy libraries the command imported (from one extra run under ``-X importtime``).

    python benchmarks/cli_startup.py --other /tmp/old/src --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"
COMMANDS = {"saelab --help": ["--help"], "saelab train --help": ["train", "--help"],
            "saelab train --lr x (refused)": ["train", "--lr", "x"],
            # an unknown option: its hint reads every verb's options (another verb's option is named as such)
            "saelab top x --scale-tokens 5 (refused)": ["top", "x", "--scale-tokens", "5"],
            "saelab train --bogus (refused)": ["train", "--bogus"]}
EXPECTED_STATUS = {name: 2 for name in COMMANDS if name.endswith("(refused)")}
HEAVY = ("torch", "scipy", "matplotlib")


def run(src: Path, argv: list[str], *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([sys.executable, *flags, "-m", "saelab", *argv], env=env, capture_output=True, text=True)


def wall_s(src: Path, name: str) -> float:
    start = time.perf_counter()
    done = run(src, COMMANDS[name])
    elapsed = time.perf_counter() - start
    if done.returncode != EXPECTED_STATUS.get(name, 0):  # a command that failed otherwise times something else
        sys.exit(f"{name} with {src}: exit status {done.returncode}\n{done.stderr[-2000:]}")
    return elapsed


def heavy_imports(src: Path, name: str) -> str:
    """The libraries of HEAVY that the command imported (a top-level line of -X importtime's report)."""
    report = run(src, COMMANDS[name], "-X", "importtime").stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in report.splitlines() if line.startswith("import time:")}
    return ", ".join(lib for lib in HEAVY if lib in imported) or "none"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--other", type=Path, help="another version's src folder, timed beside this one")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    versions = {"this": HERE, **({"other": args.other.resolve()} if args.other else {})}
    times: dict[tuple[str, str], list[float]] = {(v, c): [] for v in versions for c in COMMANDS}
    for r in range(args.runs):
        order = list(versions.items()) if r % 2 == 0 else list(versions.items())[::-1]
        for name in COMMANDS:
            for version, src in order:
                times[version, name].append(wall_s(src, name))
    for version, src in versions.items():
        print(f"{version}: {src}")
    print(f"\n| command | version | median s ({args.runs} runs) | range s | imports |")
    print("|---|---|---|---|---|")
    for name in COMMANDS:
        for version, src in versions.items():
            t = times[version, name]
            print(f"| `{name}` | {version} | {statistics.median(t):.2f} | {min(t):.2f}-{max(t):.2f} | "
                  f"{heavy_imports(src, name)} |")


if __name__ == "__main__":
    main()
