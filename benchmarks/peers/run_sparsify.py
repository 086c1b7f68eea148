"""One EleutherAI sparsify (PyPI ``eai-sparsify``) training run for benchmarks/compare_peers.py.

Run with the peer environment's Python (benchmarks/peers/setup_peers.sh):

    OMP_NUM_THREADS=2 /work/peer-venv/bin/python benchmarks/peers/run_sparsify.py --n 8192 --rows 32768

How sparsify is driven: its own ``sparsify.Trainer.fit`` loop, unmodified, with a stub in place of
the language model. sparsify's Trainer only takes activations from a model forward (a forward
hook on a module named by ``hookpoints``), so the stub's one "layer" returns cached rows: the
dataset holds one "sequence" per training batch whose token ids are the row numbers
[b*B, (b+1)*B) of the activation cache, and the layer reads exactly those rows. With
``batch_size=1`` sequence, sparsify sees the same [B, d] batches, in the same order, as every
other runner (position masking is a no-op: no excluded tokens).

Settings, as close to saelab's recipe as sparsify's options go:
- ``SparseCoderConfig(activation="topk", num_latents=n, k=32, normalize_decoder=True)``;
  sparsify's own init (nn.Linear encoder, decoder = its row-normalised copy, b_dec = mean of the
  first batch, set inside step 0), ReLU before TopK, FVU loss normalised per batch.
- ``optimizer="adam"`` (sparsify's default is signum; the paper and saelab use Adam; torch Adam
  since bitsandbytes is not installed: betas (0.9, 0.999), eps 1e-8), ``lr`` = the common lr.
- ``auxk_alpha=1/32`` (sparsify's default is 0, i.e. AuxK off), its k_aux = d/2,
  ``dead_feature_threshold`` = ``--dead-tokens`` (default 10 M tokens, sparsify's and saelab's).
- Step times per AuxK regime: the stub layer's call for batch b ends step b-1, which ran AuxK iff
  a latent's token count was past the threshold when its forward began (sparsify's own test).
- Learning-rate schedule: sparsify's ``get_linear_schedule_with_warmup`` is replaced after
  construction by a LambdaLR with saelab's schedule (warmup 10 steps, constant, linear decay to
  0 over the last 60 %), so every library follows the same schedule.
- ``log_to_wandb=False``; the end-of-run checkpoint (``Trainer.save``) is replaced by the stop
  of the clock, so no file I/O is timed.
- ``fit`` sets ``torch.set_float32_matmul_precision("high")``; on a CPU this keeps fp32 GEMMs
  (the results are bit-identical to "highest" here), and it is reset to "highest" for the eval.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import StepClock, evaluate, finish_run, peak_rss_mb, rss_mb, runner_parser  # noqa: E402
from common import saelab_schedule, setup_runner  # noqa: E402


def main() -> None:
    args = runner_parser(__doc__).parse_args()
    reader, eval_reader, n_batches = setup_runner(args)
    import torch
    from torch import nn

    from sparsify import SparseCoderConfig, Trainer, TrainConfig

    B = args.batch_size
    clock = StepClock(args.device)
    device = torch.device(args.device)

    aux_now: list[bool] = []  # AuxK state of the step whose forward ran last

    def aux_active() -> bool:
        counts = next(iter(trainer.num_tokens_since_fired.values()))
        return bool((counts > cfg.dead_feature_threshold).any())

    class CachedLayer(nn.Module):
        """The hookpoint: returns the cache rows whose numbers arrive as token ids, [1, B, d]."""

        def forward(self, ids):
            lo, hi = int(ids[0, 0]), int(ids[0, -1]) + 1
            assert hi - lo == ids.shape[1], "rows of a batch must be contiguous"
            if lo >= 2 * B:  # batch b >= 2 begins: step b-1 is over
                clock.lap(aux_now.pop())
            x = torch.from_numpy(reader.read(lo, hi)).unsqueeze(0).to(device)
            if lo == B and hi - lo == B:  # batch 1 is in memory: start timing
                clock.start()
            if lo >= B:
                aux_now.append(aux_active())
            return x

    def stop_clock(*_args, **_kwargs):
        clock.stop()
        clock.lap(aux_now.pop())

    class StubLM(nn.Module):
        """What sparsify.Trainer needs of a PreTrainedModel: base_model, device, config, dummy_inputs."""

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([CachedLayer()])
            self.config = SimpleNamespace(num_hidden_layers=1)
            self.dummy_inputs = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

        @property
        def base_model(self):
            return self

        @property
        def device(self):  # where sparsify builds its SAE and sends the batches
            return device

        def forward(self, input_ids):
            return self.layers[0](input_ids)

    class BatchRows(torch.utils.data.Dataset):
        """Item b: the row numbers of training batch b (one 'sequence' of B 'tokens')."""

        def __len__(self):
            return n_batches

        def __getitem__(self, b):
            return {"input_ids": torch.arange(b * B, (b + 1) * B)}

    rss_base = rss_mb()
    with tempfile.TemporaryDirectory(prefix="sparsify-bench-") as save_dir:
        cfg = TrainConfig(
            SparseCoderConfig(activation="topk", num_latents=args.n, k=args.k, normalize_decoder=True),
            batch_size=1, optimizer="adam", lr=args.lr, lr_warmup_steps=10, auxk_alpha=1 / 32,
            dead_feature_threshold=args.dead_tokens,
            hookpoints=["layers.0"], init_seeds=[args.seed], save_every=10**9, log_to_wandb=False,
            save_dir=save_dir, run_name="bench",
        )
        clock.setup()
        trainer = Trainer(cfg, BatchRows(), StubLM())
        (adam,) = trainer.optimizers
        trainer.lr_schedulers = [saelab_schedule(adam, n_batches)]
        trainer.save = stop_clock  # the final checkpoint write: not timed, not needed
        trainer.fit()
        peak_train = peak_rss_mb()
    torch.set_float32_matmul_precision("highest")
    (sae,) = trainer.saes.values()
    sae.eval()

    def encode_decode(x):
        top_acts, top_idx, _ = sae.encode(x)
        return sae.decode(top_acts, top_idx), top_idx, top_acts

    metrics = evaluate(encode_decode, eval_reader, args.eval_rows, args.n, device=args.device)
    finish_run(args, clock, library="eai-sparsify", version=md.version("eai-sparsify"), n_batches=n_batches,
               rss_base=rss_base, peak_train=peak_train, metrics=metrics,
               notes="sparsify.Trainer.fit via a stub LM; adam, auxk_alpha=1/32, saelab's lr schedule")


if __name__ == "__main__":
    main()
