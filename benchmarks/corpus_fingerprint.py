"""What a local corpus's fingerprint costs: the first call, later calls on the unchanged file, and a call after an edit.

A writing harvest (and quickstart's checks, a reuse or resume of a cache that records one, eval's training-text
check) takes ``corpus_fingerprint`` of a local corpus: its size and the sha256 of every byte. A file of ``--gb`` GB
is written in a temporary folder under ``--dir`` (removed after); each call runs ``corpus_fingerprint`` in a fresh
process, as each saelab command does, with this run's own ``$SAELAB_CACHE_DIR``, timed inside the process (the
interpreter's start left out) with the bytes it read (``rchar`` of /proc/self/io). "again in the same process" is
a second call in that process. The last call follows an edit of one byte with the modification time set back
(``os.utime``), which must be hashed again. With ``--other OLD/src`` another version's calls run beside these,
alternating which goes first. The file was just written, so the first hash reads it from the page cache: the
hashing's speed, not the disk's.

    python benchmarks/corpus_fingerprint.py --gb 2 --calls 3 --other /tmp/old/src
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info  # noqa: E402

HERE = Path(__file__).resolve().parents[1] / "src"
CALL = """
import json, sys, time
from saelab.data.text import corpus_fingerprint

def read_so_far():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])

out = {}
for name in ("call", "again in the same process"):
    start, read = time.perf_counter(), read_so_far()
    fingerprint = corpus_fingerprint(sys.argv[1])
    out[name] = {"s": time.perf_counter() - start, "read": read_so_far() - read}
print(json.dumps({"sha256": fingerprint["sha256"], **out}))
"""
RACY_S = 2.1
"""A little more than saelab.utils.file_digests.RACY_NS: a file written just now is not kept."""


def write_corpus(path: Path, n_bytes: int) -> None:
    block = (b"Some text of a corpus, line after line.\n" * (2**20 // 40 + 1))[:2**20] * 64
    with open(path, "wb") as f:
        left = n_bytes
        while left:
            left -= f.write(block[:min(left, len(block))])


def call(src: Path, corpus: Path, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "SAELAB_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", CALL, str(corpus)], capture_output=True, text=True, env=env,
                          check=False)
    if done.returncode != 0:
        sys.exit(f"corpus_fingerprint with {src} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def edit_one_byte(corpus: Path) -> None:
    """One byte changed in place, the file's size and modification time as they were."""
    st = corpus.stat()
    with open(corpus, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(b"#")
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns))


def shown(result: dict) -> str:
    took = f"{result['s']:.2f} s" if result["s"] >= 0.1 else f"{result['s'] * 1e3:.2f} ms"
    return f"{took}, {result['read']:,} bytes read"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=2.0, help="the corpus file's size in GB (10^9 bytes)")
    p.add_argument("--calls", type=int, default=3, help="later calls on the unchanged file")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the file is written")
    p.add_argument("--other", type=Path, help="another version's src folder, timed beside this one")
    args = p.parse_args()
    versions = {"this": HERE, **({"other": args.other.resolve()} if args.other else {})}
    rows: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        corpus = Path(tmp, "corpus.txt")
        write_corpus(corpus, int(args.gb * 1e9))
        time.sleep(RACY_S)
        steps = ["first call"] + [f"later call {i + 1}" for i in range(args.calls)] + ["after a same-size edit"]
        for i, step in enumerate(steps):
            if step == "after a same-size edit":
                edit_one_byte(corpus)
            order = list(versions.items()) if i % 2 == 0 else list(versions.items())[::-1]
            for version, src in order:
                result = call(src, corpus, Path(tmp, f"cache-{version}"))
                rows.setdefault(step, {})[version] = result
                if step == "first call":
                    rows.setdefault("again in the same process", {})[version] = result["again in the same process"]
                print(json.dumps({"step": step, "version": version, **result}), file=sys.stderr, flush=True)
    print(f"\n{machine_info()}; a corpus file of {int(args.gb * 1e9):,} bytes in {args.dir}")
    print(command_line() + "\n")
    print("| call | " + " | ".join(versions) + " |\n|---|" + "---|" * len(versions))
    for step in ["first call", "again in the same process"] + steps[1:]:
        print(f"| {step} | " + " | ".join(shown(rows[step][v].get("call", rows[step][v])) for v in versions) + " |")


if __name__ == "__main__":
    main()
