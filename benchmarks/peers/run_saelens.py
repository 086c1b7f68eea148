"""One SAELens (PyPI ``sae-lens``) training run for benchmarks/compare_peers.py.

Run with the peer environment's Python (benchmarks/peers/setup_peers.sh):

    OMP_NUM_THREADS=2 /work/peer-venv/bin/python benchmarks/peers/run_saelens.py --n 8192 --rows 32768

How SAELens is driven: its own ``SAETrainer.fit`` loop, unmodified, with a ``TopKTrainingSAE``.
SAETrainer takes any iterator of activation batches as its data provider (SAELens' own
ActivationsStore is one), so it gets the cache's batches directly: batch b = rows
[b*B, (b+1)*B), the same batches in the same order as every other runner.

Settings, as close to saelab's recipe as SAELens' options go:
- ``TopKTrainingSAEConfig(d_in=d, d_sae=n, k=32, dtype="float32", apply_b_dec_to_input=True,
  normalize_activations="none")`` with SAELens' training defaults otherwise: decoder rows
  initialised at norm 0.1 (``decoder_init_norm``), encoder = decoder transpose, b_dec = 0 (SAELens
  6 has no data-dependent b_dec init), ``rescale_acts_by_decoder_norm=True`` in place of a
  unit-norm decoder constraint, dense [B, n] latents (``use_sparse_activations=False``), loss =
  sum-of-squares MSE (not normalised), gradient-norm clipping at 1.0.
- AuxK: ``aux_loss_coefficient=1/32`` (SAELens' default is 1.0; its aux loss is on the same
  un-normalised scale as its MSE, so 1/32 is the paper's ratio), k_aux = d/2;
  ``dead_feature_window`` = ceil(10 M / B) steps (SAELens counts steps, not tokens), i.e. the
  same 10 M-token window as saelab.
- Adam (torch, betas (0.9, 0.999), eps 1e-8), ``lr`` = the common lr; its scheduler is replaced
  after construction by a LambdaLR with saelab's schedule (warmup 10 steps, constant, linear
  decay to 0 over the last 60 %).
- No wandb, no checkpoints, no autocast.

``--b-dec-init median`` sets b_dec to the geometric median of the first training batch before
training (what dictionary_learning does in its step 0), for a quality comparison without SAELens'
zero start; the default leaves SAELens' own init. Timing is unaffected (setup is not timed).
"""

from __future__ import annotations

import importlib.metadata as md
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import StepClock, evaluate, finish_run, peak_rss_mb, rss_mb, runner_parser  # noqa: E402
from common import geometric_median, saelab_schedule, setup_runner  # noqa: E402


def main() -> None:
    ap = runner_parser(__doc__)
    ap.add_argument("--b-dec-init", choices=["library", "median"], default="library",
                    help="library: SAELens' zero b_dec; median: geometric median of the first batch")
    args = ap.parse_args()
    reader, eval_reader, n_batches = setup_runner(args)

    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    B = args.batch_size
    clock = StepClock()
    rss_base = rss_mb()

    clock.setup()
    sae_cfg = TopKTrainingSAEConfig(d_in=reader.d, d_sae=args.n, k=args.k, dtype="float32", device="cpu",
                                    apply_b_dec_to_input=True, normalize_activations="none",
                                    aux_loss_coefficient=1 / 32)
    sae = TopKTrainingSAE(sae_cfg)
    if args.b_dec_init == "median":
        sae.b_dec.data = geometric_median(reader.batch(0, B)).to(sae.b_dec.dtype)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=n_batches * B, train_batch_size_samples=B, lr=args.lr, lr_end=args.lr,
        lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=0, adam_beta1=0.9, adam_beta2=0.999,
        device="cpu", autocast=False, dead_feature_window=math.ceil(10_000_000 / B), n_checkpoints=0,
        checkpoint_path=None, save_final_checkpoint=False, logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(trainer_cfg, sae, data_provider=clock.timed_batches(reader, n_batches, B))
    trainer.lr_scheduler = saelab_schedule(trainer.optimizer, n_batches)
    trainer.fit()
    clock.stop()
    peak_train = peak_rss_mb()
    sae.eval()

    def encode_decode(x):
        acts = sae.encode(x)
        vals, idx = acts.topk(args.k, dim=-1, sorted=False)
        return sae.decode(acts), idx, vals

    metrics = evaluate(encode_decode, eval_reader, args.eval_rows, args.n)
    finish_run(args, clock, library="sae-lens", version=md.version("sae-lens"), n_batches=n_batches,
               rss_base=rss_base, peak_train=peak_train, metrics=metrics,
               notes=f"SAETrainer.fit + TopKTrainingSAE (dense latents); aux 1/32; saelab's lr schedule; "
                     f"b_dec init: {'zero (SAELens default)' if args.b_dec_init == 'library' else 'geometric median'}")


if __name__ == "__main__":
    main()
