"""What a Ctrl-C costs a harvest: an uninterrupted `saelab harvest`, then the same command interrupted
(SIGINT, as Ctrl-C sends) part-way and run again, on the offline default model.

    python benchmarks/harvest_resume.py [--n-tokens 65536] [--buffer-tokens 8192] [--stop-at 0.6] [--src OTHER/src]

Each harvest is a fresh `python -m saelab harvest` process (model load and the corpus's sample pool
included). The interruption comes once the harvest's progress bar shows ``--stop-at`` of the tokens. Reported: the three wall times,
the rows the interrupted run kept, the resume against the uninterrupted harvest, and whether the
resumed cache's shards are byte-identical to the uninterrupted one's. ``--src`` times another saelab
checkout's harvest the same way (e.g. one before the stream's state was saved at a Ctrl-C).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, command_line, machine_info  # noqa: E402


def harvest(src: Path, out: Path, options: list[str], stop_at: float | None = None) -> tuple[float, list[str]]:
    """(wall seconds, its `saelab:` messages) of one harvest process; with ``stop_at``, SIGINT once its
    progress bar shows that fraction of the tokens harvested."""
    cmd = [sys.executable, "-m", "saelab", "harvest", "--out", str(out), *options]
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONUNBUFFERED": "1"}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err, sent = b"", False
    while chunk := proc.stderr.read1(65536):
        err += chunk
        bars = re.findall(rb"harvest [^:]+:\s+(\d+)%", err[-4096:])
        if stop_at is not None and not sent and bars and int(bars[-1]) >= 100 * stop_at:
            proc.send_signal(signal.SIGINT)
            sent = True
    proc.wait()
    seconds = time.perf_counter() - t
    text = err.decode(errors="replace").replace("\r", "\n")
    if proc.returncode != (130 if sent else 0):
        sys.exit(f"harvest_resume: {' '.join(cmd)} exited {proc.returncode}:\n{text[-2000:]}")
    return seconds, [line for line in text.splitlines() if line.startswith("saelab:")]


def rows_kept(folder: Path) -> int:
    if not (folder / "manifest.json").is_file():  # interrupted before its first rows were written
        return 0
    manifest = json.loads((folder / "manifest.json").read_text())
    return manifest["n_rows"] + manifest.get("partial_rows", 0)


def same_shards(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("shard_*.npy"))
    return names == sorted(p.name for p in b.glob("shard_*.npy")) and \
        all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-tokens", type=int, default=65_536)
    ap.add_argument("--buffer-tokens", type=int, default=8192,
                    help="the shuffle buffer (harvest --buffer-tokens): rows are written once it is first full")
    ap.add_argument("--stop-at", type=float, default=0.6, help="Ctrl-C once this fraction of the tokens is harvested")
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="the saelab source folder to time")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/saelab-harvest-resume"))
    args = ap.parse_args()
    if not 0 < args.stop_at < 1:
        ap.error(f"--stop-at {args.stop_at}: expected a fraction between 0 and 1")
    if not (args.src / "saelab").is_dir():
        ap.error(f"--src {args.src}: expected a folder holding the saelab package")
    shutil.rmtree(args.workdir, ignore_errors=True)
    options = ["--n-tokens", str(args.n_tokens), "--buffer-tokens", str(args.buffer_tokens)]
    whole, _ = harvest(args.src, args.workdir / "whole", options)
    first, _ = harvest(args.src, args.workdir / "cut", options, stop_at=args.stop_at)
    kept = rows_kept(args.workdir / "cut")
    resume, said = harvest(args.src, args.workdir / "cut", options)
    print(f"Machine: {machine_info()}\nCommand: `{command_line()}`\nsaelab source: {args.src}\n")
    print("The resume said:", *said or ["(nothing)"], sep="\n    ", end="\n\n")
    print("| uninterrupted s | interrupted after s (rows kept) | resume s | resume / uninterrupted | "
          "interrupted + resume / uninterrupted | shards identical |")
    print("|---:|---:|---:|---:|---:|---|")
    print(f"| {whole:.1f} | {first:.1f} ({kept:,}) | {resume:.1f} | {resume / whole:.2f} | "
          f"{(first + resume) / whole:.2f} | {same_shards(args.workdir / 'whole', args.workdir / 'cut')} |")


if __name__ == "__main__":
    main()
