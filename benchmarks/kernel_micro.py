"""The training kernels alone, this saelab's against another version's, side by side in one process.

A finite check of one batch (``all_finite`` against ``torch.isfinite(x).all()``), then three
measurements on random data of the protocol's shapes (batch 4,096, d = 576, k = 32,
k_aux = 256), each variant timed in turn for ``--rounds`` rounds (medians and minima):

- ``topk``: the encoder's top-k of one [1,024, n] chunk, saelab's kernel against torch.topk (and
  the other version's);
- ``decode``: ``sparse_decode`` forward + backward, the main selection (k entries per row over all
  n rows) and an AuxK one (k_aux entries per row over a dead set);
- ``encode``: ``sparse_topk_encode`` forward + backward (with the AuxK decode), with no latent dead
  and with a fraction dead.

    python benchmarks/kernel_micro.py --other OLD/src/saelab/sae/kernels.py --n 8192 32768 --dead 0.03 0.24

Without ``--other`` only the finite check and the top-k comparison run. ``--gemm`` adds the encoder
GEMM itself, [4,096, 576] @ [576, n], as compare_peers' bound times it (one ``mm``, row-major
weight) against the ways a step could run it: the step's own (``addmm`` with the bias, 2,048-row
chunks into one reused buffer, the latent-major weight), the whole batch latent-major, 1,024-row
chunks, and MKL's and oneDNN's prepacked-weight GEMMs where this torch has them (packing included:
the weights change every step). ``--screen`` times the parts of the bfloat16 screen (``_Screen``) on one
[2,048, n] chunk, where saelab would screen it (bfloat16 hardware, n >= CPU_BF16_SCREEN_MIN_N): its GEMM
against the float32 one it replaces, the top k + SCREEN_MARGIN of the bfloat16 pre-activations, the
candidates (that top-k, their float32 recomputation and the top k of those), the error bound, and the whole
screened top-k (random rows and weights settle fewer rows by the bound than a trained
SAE's on activations, so more run the second stage or the float32 GEMM: the share is printed; whole training
steps are auxk_cost.py's). No timing here is asserted anywhere.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BATCH, K, command_line, load_kernels_file, machine_info  # noqa: E402

import saelab.sae.kernels as this  # noqa: E402
from saelab.utils.tensors import all_finite  # noqa: E402

D, K_AUX, CHUNK = 576, 256, 1024


def compare(label: str, variants: dict, rounds: int) -> None:
    """Time each variant (a no-argument function) once per round, in turn, and print the medians."""
    times = {name: [] for name in variants}
    for r in range(rounds):
        for name, run in (list(variants.items()) if r % 2 == 0 else list(variants.items())[::-1]):
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    print(label + ": " + ", ".join(f"{name} {statistics.median(v) * 1e3:,.1f} ms (min {min(v) * 1e3:,.1f})"
                                   for name, v in times.items()), flush=True)


def gemm_variants(n: int, gen: torch.Generator) -> dict:
    """The encoder GEMM's candidate forms (see the module docstring), each a no-argument function."""
    x = torch.randn(BATCH, D, generator=gen)
    W_row_major = torch.randn(D, n, generator=gen)
    W_ND = torch.randn(n, D, generator=gen)  # W_enc.t() of the latent-major TopKSAE: a linear layer's weight
    b = torch.zeros(n)
    whole, bufs = torch.empty(BATCH, n), {rows: torch.empty(rows, n) for rows in (CHUNK, 2 * CHUNK)}
    # the step's chunks are 2,048 rows on the CPU (kernels.DEFAULT_CHUNK_ROWS)

    def chunked(rows: int):
        def run():
            for lo in range(0, BATCH, rows):
                torch.addmm(b, x[lo:lo + rows], W_ND.t(), out=bufs[rows])
        return run

    variants = {"bound (mm, row-major)": lambda: torch.mm(x, W_row_major, out=whole),
                "addmm, 1,024-row chunks": chunked(CHUNK), "step (addmm, 2,048-row chunks)": chunked(2 * CHUNK),
                "mm latent-major": lambda: torch.mm(x, W_ND.t(), out=whole)}
    if torch.backends.mkl.is_available():
        def mkl_packed():
            packed = torch.ops.mkl._mkl_reorder_linear_weight(W_ND, CHUNK)
            for lo in range(0, BATCH, CHUNK):
                torch.ops.mkl._mkl_linear(x[lo:lo + CHUNK], packed, W_ND, b, CHUNK)
        variants["MKL packed, 1,024-row chunks"] = mkl_packed
    if torch.backends.mkldnn.is_available():
        def onednn_packed():
            packed = torch.ops.mkldnn._reorder_linear_weight(W_ND, BATCH)
            torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        variants["oneDNN packed"] = onednn_packed
    return variants


def screen_parts(n: int, gen: torch.Generator) -> tuple[dict, "this._Screen"] | None:
    """The bfloat16 screen's parts on one chunk of DEFAULT_CHUNK_ROWS rows (see the module docstring), and the
    screen (it counts the rows its bound settles); None where saelab would not screen n latents here."""
    rows, c = this.DEFAULT_CHUNK_ROWS, K + this.SCREEN_MARGIN
    xs = torch.randn(rows, D, generator=gen)
    W = (torch.randn(n, D, generator=gen) / D**0.5).t()  # latent-major, as TopKSAE
    b = torch.zeros(n)
    if not this._Screen.wanted(W, n, K):
        return None
    screen = this._Screen(W, b, n, xs, rows)
    xh = xs.to(torch.bfloat16)
    approx = torch.addmm(screen.bh, xh, screen.Wh)
    bound = screen._row_bound(xs, xh)
    return {"bfloat16 GEMM": lambda: torch.addmm(screen.bh, xh, screen.Wh, out=screen.buf),
            "float32 GEMM": lambda: torch.addmm(b, xs, W),
            f"top {c} of bfloat16": lambda: this._topk(approx, c),
            "candidates": lambda: screen._candidates_top(xs, approx, bound, c, K, False),
            "bound": lambda: screen._row_bound(xs, xh),
            "screened top-k": lambda: screen.topk(xs, K, False)}, screen


def decode_case(mod, vals, idx, W, g):
    def run():
        mod.sparse_decode(vals, idx, W).backward(g)
        W.grad = vals.grad = None
    return run


def encode_case(mod, x, W_enc, b_enc, b_dec, W_dec, dead):
    def run():
        enc = mod.sparse_topk_encode(x, b_dec, W_enc, b_enc, K, dead_idx=dead, k_aux=K_AUX)
        loss = enc.vals_BK.square().sum()
        if dead is not None:
            loss = loss + mod.decode_aux(enc, W_dec).square().sum()
        loss.backward()
        W_enc.grad = b_enc.grad = b_dec.grad = W_dec.grad = None
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--other", type=Path, default=None, help="another saelab's sae/kernels.py")
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 32768], help="latent counts")
    ap.add_argument("--dead", type=float, nargs="+", default=[0.03, 0.24], help="fractions of n dead")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gemm", action="store_true", help="also time the encoder GEMM's forms against the bound's")
    ap.add_argument("--screen", action="store_true", help="also time the parts of the bfloat16 screen's top-k")
    args = ap.parse_args()
    if args.other is not None and not args.other.is_file():
        ap.error(f"--other {args.other}: expected a kernels.py file")
    if any(not 0 < f < 1 for f in args.dead):
        ap.error(f"--dead {args.dead}: expected fractions between 0 and 1")
    torch.set_num_threads(args.threads)
    print(command_line())
    print(machine_info())
    other = load_kernels_file(args.other) if args.other else None
    batch = torch.randn(BATCH, D, generator=torch.Generator().manual_seed(0))
    compare(f"finite check of a [{BATCH:,}, {D}] batch", {
        "torch.isfinite().all()": lambda: bool(torch.isfinite(batch).all()), "all_finite": lambda: all_finite(batch)},
        args.rounds)
    for n in args.n:
        gen = torch.Generator().manual_seed(0)
        pre = torch.randn(CHUNK, n, generator=gen)
        topk_variants = {"torch.topk": lambda: pre.topk(K, dim=-1, sorted=False), "saelab": lambda: this._topk(pre, K)}
        if other is not None:
            topk_variants["other"] = lambda: other._topk(pre, K)
        compare(f"n={n:,} topk k={K} of [{CHUNK:,}, {n:,}]", topk_variants, args.rounds)
        if args.gemm:
            compare(f"n={n:,} encoder GEMM [{BATCH:,}, {D}] @ [{D}, {n:,}]", gemm_variants(n, gen), args.rounds)
        screened = screen_parts(n, gen) if args.screen else None
        if screened is not None:
            compare(f"n={n:,} screen of a [{this.DEFAULT_CHUNK_ROWS:,}, {n:,}] chunk", screened[0], args.rounds)
            print(f"  rows the bound settled (either stage): {screened[1].settled / screened[1].rows:.1%}")
        elif args.screen:
            print(f"n={n:,} screen: not timed, saelab runs float32 here (no bfloat16 GEMM in hardware, or fewer than "
                  f"{this.CPU_BF16_SCREEN_MIN_N:,} latents)")
        if other is None:
            continue
        W_dec = torch.randn(n, D, generator=gen).requires_grad_()
        g = torch.randn(BATCH, D, generator=gen)
        x = torch.randn(BATCH, D, generator=gen)
        W_enc = (torch.randn(n, D, generator=gen) / D**0.5).t().requires_grad_()  # latent-major, as TopKSAE
        b_enc, b_dec = torch.zeros(n, requires_grad=True), torch.zeros(D, requires_grad=True)
        main_idx = torch.randn(BATCH, n, generator=gen).topk(K, dim=-1).indices
        main_vals = torch.rand(BATCH, K, generator=gen).requires_grad_()
        compare(f"n={n:,} decode {K} per row", {
            "this": decode_case(this, main_vals, main_idx, W_dec, g),
            "other": decode_case(other, main_vals, main_idx, W_dec, g)}, args.rounds)
        for frac in args.dead:
            dead = torch.randperm(n, generator=gen)[:round(frac * n)].sort().values
            per_row = min(K_AUX, dead.numel())
            aux_idx = dead[torch.randn(BATCH, dead.numel(), generator=gen).topk(per_row, dim=-1).indices]
            aux_vals = torch.rand(BATCH, per_row, generator=gen).requires_grad_()
            compare(f"n={n:,} decode {per_row} per row over {dead.numel():,} dead", {
                "this": decode_case(this, aux_vals, aux_idx, W_dec, g),
                "other": decode_case(other, aux_vals, aux_idx, W_dec, g)}, args.rounds)
        for frac in [0.0] + args.dead:
            dead = torch.randperm(n, generator=gen)[:round(frac * n)].sort().values if frac else None
            compare(f"n={n:,} encode + AuxK decode, {frac:.0%} dead", {
                "this": encode_case(this, x, W_enc, b_enc, b_dec, W_dec, dead),
                "other": encode_case(other, x, W_enc, b_enc, b_dec, W_dec, dead)}, args.rounds)


if __name__ == "__main__":
    main()
