"""report.md for a run folder: configuration, evaluation table, plots, wall times."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saelab.report.plots import training_curves
from saelab.train.checkpoint import TRAIN_CONFIG, read_metrics, read_status
from saelab.train.config import TrainConfig
from saelab.utils.atomic import write_text

METRIC_ROWS = [
    ("nmse", "nMSE (FVU)", "{:.4f}"),
    ("l0", "L0 (active latents per token)", "{:.2f}"),
    ("dead_frac", "dead latents (never fired on the eval tokens)", "{:.2%}"),
    ("dense_frac", "dense latents (fire on >10% of tokens)", "{:.2%}"),
    ("ce_clean", "CE loss, clean model (nats)", "{:.4f}"),
    ("ce_spliced", "CE loss, SAE spliced in (nats)", "{:.4f}"),
    ("delta_ce", "delta CE (spliced - clean)", "{:.4f}"),
    ("kl", "KL(clean || spliced) per token", "{:.4f}"),
    ("ce_zero_abl", "CE loss, hook zero-ablated", "{:.4f}"),
    ("ce_mean_abl", "CE loss, hook mean-ablated", "{:.4f}"),
    ("ce_recovered_zero", "CE recovered vs zero-ablation", "{:.2%}"),
    ("ce_recovered_mean", "CE recovered vs mean-ablation", "{:.2%}"),
]


def _table(rows: list[tuple[str, str]]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)


def write_run_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / TRAIN_CONFIG).read_text())
    sae_cfg, train = cfg["sae"], cfg["train"]
    metrics: dict[str, Any] = {}
    if (run_dir / "metrics.json").exists():
        metrics = json.loads((run_dir / "metrics.json").read_text())
    log = read_metrics(run_dir)
    status = read_status(run_dir)

    lines = [f"# SAE run `{run_dir.name}`", ""]
    lines += ["## Setup", "", _table([
        ("model", f"`{sae_cfg['model_name']}`"), ("hook", f"`{sae_cfg['hook_name']}`"),
        ("latents n / k", f"{train['n_latents']:,} / {train['k']}"),
        ("training tokens", f"{train['total_tokens']:,} in batches of {train['batch_size']:,}"),
        ("context", f"{sae_cfg['context_size']} tokens, BOS first: {sae_cfg['prepend_bos']}, "
                    f"position 0 excluded: {sae_cfg['exclude_first']}"),
        ("corpus", f"`{sae_cfg['dataset']}`"),
        ("learning rate", f"{TrainConfig.from_dict(train).effective_lr:.3g}"),
        ("AuxK / Multi-TopK / EMA", f"{train['auxk']} (k_aux={train['k_aux']}) / {train['multi_topk']} / {train['ema_decay']}"),
        ("status", f"{status.get('state', '?')} at step {status.get('step', '?')} of {status.get('total_steps', '?')}"),
    ]), ""]
    if metrics:
        n_tok = metrics.get("n_tokens", 0)
        lines += ["## Evaluation on held-out text", "",
                  f"Eval corpus `{metrics.get('eval_corpus')}`: {n_tok:,} tokens for reconstruction, "
                  f"{metrics.get('n_predictions', 0):,} next-token predictions for the downstream loss "
                  f"(context {metrics.get('context_size')}, position 0 {metrics.get('position_0')}).", ""]
        lines += [_table([(label, fmt.format(metrics[key])) for key, label, fmt in METRIC_ROWS if key in metrics]), ""]
    if log:
        training_curves(log, run_dir / "training_curves.png")
        last = log[-1]
        lines += ["## Training", "", f"Final batch nMSE {last['nmse']:.4f}, L0 {last['l0']:.1f}, "
                  f"inactive latents {last['inactive_frac']:.2%}, throughput {last['tokens_per_s']:,.0f} tokens/s.", "",
                  "![training curves](training_curves.png)", ""]
    if (run_dir / "density.png").exists():
        lines += ["![latent density](density.png)", ""]
    if (run_dir / "evals" / "report.md").exists():
        lines += ["## Paper metrics", "", "Compute-equivalent, ablation sparsity, probe loss and N2G: "
                  "[evals/report.md](evals/report.md) (`saelab eval RUN --suite paper`).", ""]
    wall = metrics.get("wall_seconds")
    if wall:
        lines += ["## Wall time (s)", "", _table([(k, f"{v:,.1f}") for k, v in wall.items()]), ""]
    path = run_dir / "report.md"
    write_text(path, "\n".join(lines))
    return path
