"""One dictionary_learning (PyPI ``dictionary-learning``) training run for benchmarks/compare_peers.py.

Run with the peer environment's Python (benchmarks/peers/setup_peers.sh):

    OMP_NUM_THREADS=2 /work/peer-venv/bin/python benchmarks/peers/run_dictlearn.py --n 8192 --rows 32768

How dictionary_learning is driven: its ``TopKTrainer`` (trainers/top_k.py, the Gao et al. recipe)
stepped with ``trainer.update(step, x)`` for every batch, which is the body of its ``trainSAE``
loop without the logging and saving (``trainSAE`` builds its trainers itself, so it offers no
way to give them the common schedule). Batches: b = rows [b*B, (b+1)*B) of the cache, the same
batches in the same order as every other runner.

Settings: ``AutoEncoderTopK(d, n, k=32)`` and TopKTrainer's defaults otherwise: unit-norm decoder,
encoder = decoder transpose, b_dec = geometric median of the first batch (inside step 0),
ReLU before TopK, dense [B, n] latents, un-normalised MSE, parallel-gradient removal, gradient-norm
clipping at 1.0, AuxK with ``auxk_alpha=1/32`` and k_aux = d/2 on latents dead for 10 M tokens,
torch Adam (betas (0.9, 0.999), eps 1e-8) at the common lr. Its LambdaLR is replaced after
construction by saelab's schedule (warmup 10 steps, constant, linear decay to 0 over the last 60 %).
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import StepClock, evaluate, finish_run, peak_rss_mb, rss_mb, runner_parser  # noqa: E402
from common import saelab_schedule, setup_runner  # noqa: E402


def main() -> None:
    args = runner_parser(__doc__).parse_args()
    reader, eval_reader, n_batches = setup_runner(args)
    from dictionary_learning.trainers.top_k import TopKTrainer

    B = args.batch_size
    clock = StepClock()
    rss_base = rss_mb()

    clock.setup()
    trainer = TopKTrainer(steps=n_batches, activation_dim=reader.d, dict_size=args.n, k=args.k, layer=9,
                          lm_name="SmolLM2-135M-Instruct", lr=args.lr, auxk_alpha=1 / 32,
                          warmup_steps=min(10, n_batches - 1), decay_start=None, seed=args.seed, device="cpu")
    trainer.scheduler = saelab_schedule(trainer.optimizer, n_batches)
    for step, x in enumerate(clock.timed_batches(reader, n_batches, B)):
        trainer.update(step, x)
    clock.stop()
    peak_train = peak_rss_mb()
    ae = trainer.ae.eval()

    def encode_decode(x):
        acts, top_vals, top_idx, _ = ae.encode(x, return_topk=True)
        return ae.decode(acts), top_idx, top_vals

    metrics = evaluate(encode_decode, eval_reader, args.eval_rows, args.n)
    finish_run(args, clock, library="dictionary-learning", version=md.version("dictionary-learning"),
               n_batches=n_batches, rss_base=rss_base, peak_train=peak_train, metrics=metrics,
               notes="TopKTrainer.update per batch; auxk 1/32; saelab's lr schedule")


if __name__ == "__main__":
    main()
