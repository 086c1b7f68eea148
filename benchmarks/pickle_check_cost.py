"""What the untrusted-torch-file check costs on large pickles, side by side with the check of another version.

The check (``saelab.utils.pickle_check.check_torch_file``) reads every opcode of a torch file's pickle before
torch does; its time grows with the pickle's size. Files of about 5 and 10 MB are written once:

- ``views``: what torch.save writes for 150,000 views of one stored tensor (an ordinary, pickle-heavy file);
- ``empty-tuples``: a pickle of one tuple of 5 million empty tuples (what a hostile file may hold);
- ``tuple-keys``: a dict of 200,000 keys (layer, hook name), each counted by its hash (a version that refuses
  over 256 tuple keys stops at the 257th);
- ``hash-bomb``: set() of one list of 256 complex numbers of one hash, 48,000 times (8 bytes and 32,640
  comparisons to load each: 30 s in all), padded with a record nothing refers to (what a hostile file may hold);
- ``sets-of-pairs``: 4,000 sets of 250 pairs of ints, each key counted by its hash (a version that counts tuples
  by their kind refuses it, as if all 250 of a set shared one hash);
- ``long-name-keys``: a dict of 100,000 keys (layer, a hook name of 70-74 characters, None), each counted by its hash (a
  version that takes None or a text past 64 bytes for a value it does not know refuses it at the 257th key).

Each round times the check of this saelab and, with ``--other OLD/src``, of another version's source in a
fresh process each (CPU time, so a busy machine slows both alike), alternating which goes first:

    python benchmarks/pickle_check_cost.py --other /tmp/old/src --rounds 2
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1] / "src"
TIMED = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from saelab.utils.pickle_check import check_torch_file
t = time.process_time()
try:
    check_torch_file(sys.argv[2]); outcome = "read"
except Exception as e:
    outcome = type(e).__name__
print(json.dumps({"cpu_s": round(time.process_time() - t, 2), "outcome": outcome,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def write_views(path: Path) -> None:
    base = torch.zeros(4096)
    torch.save({"views": [base[i % 4000:i % 4000 + 8] for i in range(150_000)]}, path)


def write_pickle(path: Path, pickled: bytes, pad: int = 0) -> None:
    """A torch zip archive whose data.pkl is ``pickled``, and a record of ``pad`` bytes nothing refers to."""
    buf = io.BytesIO()
    torch.save({}, buf)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                data = pickled
            out.writestr(info, data)
        if pad:
            out.writestr("archive/pad", bytes(pad))


def write_empty_tuples(path: Path) -> None:
    """One tuple of 5 million empty tuples (torch reads it)."""
    write_pickle(path, b"\x80\x02(" + b")" * 5_000_000 + b"t.")


def write_hash_bomb(path: Path) -> None:
    """set(x) again and again, x one list of 256 complex numbers of hash 12345 (memo 0: set, 1: complex, 2: x)."""
    one_hash = b"".join(b"h\x01G" + struct.pack(">d", 12345 - 1_000_003 * b) + b"G" + struct.pack(">d", b) + b"\x86Ra"
                        for b in range(256))
    write_pickle(path, b"\x80\x02cbuiltins\nset\nq\x00cbuiltins\ncomplex\nq\x01]q\x02" + one_hash + b"}"
                 + b"Nh\x00h\x02\x85Rs" * 48_000 + b".", pad=10_000_000)


def write_tuple_keys(path: Path) -> None:
    torch.save({(i, f"blocks.{i}.hook_resid_post"): i for i in range(200_000)}, path)


def write_sets_of_pairs(path: Path) -> None:
    torch.save({f"layer{layer}": {(i, i + 1) for i in range(250)} for layer in range(4_000)}, path)


def write_long_name_keys(path: Path) -> None:
    torch.save({(i, f"blocks.{i}.attn.hook_z" + "." * 50, None): i for i in range(100_000)}, path)


def timed(src: Path, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", TIMED, str(src), str(path)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--other", type=Path, help="another version's src folder, timed beside this one")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    versions = {"this": HERE, **({"other": args.other} if args.other else {})}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"views": Path(tmp, "views.pt"), "empty-tuples": Path(tmp, "empty.pt"),
                 "tuple-keys": Path(tmp, "keys.pt"), "hash-bomb": Path(tmp, "hash.pt"),
                 "sets-of-pairs": Path(tmp, "pairs.pt"), "long-name-keys": Path(tmp, "names.pt")}
        write_views(files["views"])
        write_empty_tuples(files["empty-tuples"])
        write_tuple_keys(files["tuple-keys"])
        write_hash_bomb(files["hash-bomb"])
        write_sets_of_pairs(files["sets-of-pairs"])
        write_long_name_keys(files["long-name-keys"])
        for name, path in files.items():
            print(f"{name}: {path.stat().st_size:,} bytes")
        for r in range(args.rounds):
            order = list(versions.items()) if r % 2 == 0 else list(versions.items())[::-1]
            for name, path in files.items():
                for version, src in order:
                    print(json.dumps({"round": r, "file": name, "version": version, **timed(src, path)}), flush=True)


if __name__ == "__main__":
    main()
