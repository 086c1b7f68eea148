"""benchmarks/reproduce_paper.py writes docs/reproduction.md from the results it reads: the words on how the
latents-against-baselines intervals were made come from what those results record (interval_groups,
interval_method), and the wall-time table gives the time each stage's results took, as recorded, in seconds
under a minute."""

from __future__ import annotations

import json
import lzma
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reproduce_paper as rp  # noqa: E402

HOOK = "blocks.0.hook_resid_post"


def wiki_jsonl(data_dir: Path, path: Path, n: int) -> Path:
    """The first ``n`` articles of the shipped Wikipedia eval split, one document a line."""
    with lzma.open(data_dir / "wiki-en" / "wiki_eval.jsonl.xz", "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    path.write_text("".join(json.dumps({"text": json.loads(line)["text"]}) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def suite_study(tiny_dir, data_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A study folder whose suite SAE (random, on the tiny GPT-2) holds real ablation-sparsity and probe results
    over a corpus of 6 documents, as reproduce_paper's run_stages makes them."""
    from saelab.evals.config import AblationSparsityConfig, ProbeConfig
    from saelab.evals.suite import PaperSuiteConfig
    from saelab.pipeline import EvalConfig, paper_suite
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    out, plan = tmp_path_factory.mktemp("study"), {"suite_n": 32}
    run = rp.suite_run(out, plan)
    save_sae(TopKSAE(SAEConfig(d_in=64, n_latents=32, k=4, hook_name=HOOK, model_name=str(tiny_dir),
                               context_size=32)), run / "sae")
    cfg = PaperSuiteConfig(metrics=("ablation_sparsity", "probe"), ablation_contexts=8, probe_contexts=64,
                           ablation_sparsity=AblationSparsityConfig(n_sites=4, n_future=8, channels_per_site=4),
                           probe=ProbeConfig(min_per_class=20, max_examples=200))
    paper_suite(run, eval_cfg=EvalConfig(corpus=str(wiki_jsonl(data_dir, out / "eval.jsonl", 6))), cfg=cfg,
                progress=False)
    return out, plan


def test_interval_words_come_from_the_recorded_groups(suite_study):
    """The page said "bootstrap over contexts, paired" and "split by context" whatever the results recorded;
    saelab's intervals resample the contexts' documents, and the probe splits by paragraph."""
    out, plan = suite_study
    evals = rp.suite_run(out, plan) / "evals"
    abl = json.loads((evals / "ablation_sparsity.json").read_text())["result"]
    probe = json.loads((evals / "probe.json").read_text())["result"]
    assert abl["interval_groups"] == probe["interval_groups"] == "documents"
    base = rp.baselines(out, plan)
    n_abl = abl["intervals"]["ratio_latent_to_random"]["n_groups"]
    n_probe = probe["intervals"]["mean_loss_minus_baseline"]["n_groups"]
    ablation, probed = rp.baseline_notes(base)
    assert f"paired bootstrap over the sites' {n_abl} documents (1,000 draws)" in ablation
    assert (f"{len(probe['tasks'])} tasks, split by paragraph" in probed
            and f"paired bootstrap over each task's held-out documents ({n_probe} over the tasks)" in probed)
    for words in (ablation, probed):
        assert "over contexts" not in words and "by context" not in words and "earlier saelab" not in words


def test_intervals_an_earlier_saelab_made_are_named_so(suite_study, tmp_path):
    """Results written before saelab recorded interval_method (the page's own: its intervals resampled contexts
    and paragraphs) are said to be an earlier saelab's and likely too narrow, not worded as the current method."""
    import shutil

    out, plan = suite_study
    study = tmp_path / "study"
    shutil.copytree(out, study)
    evals = rp.suite_run(study, plan) / "evals"
    for name in ("ablation_sparsity", "probe"):
        rec = json.loads((evals / f"{name}.json").read_text())
        del rec["result"]["interval_method"], rec["result"]["interval_groups"]  # as an earlier saelab wrote it
        (evals / f"{name}.json").write_text(json.dumps(rec))
    for words in rp.baseline_notes(rp.baselines(study, plan)):
        assert "its intervals are an earlier saelab's (it records no interval_method)" in words
        assert "49 %" in words and "likely too narrow" in words and "documents" in words


@pytest.mark.slow  # ~25 s on 2 cores: a harvest, a sweep of two SAEs and their evaluation
def test_the_wall_time_table_gives_each_stages_recorded_time(tiny_dir, data_dir, tmp_path):
    """A stage the script's call found done took ~0 s in that call and the table said 0.0 minutes; it now gives
    the time the stage's results took as their records hold it, and this call's beside it, in seconds under a
    minute."""
    from saelab.pipeline import EvalConfig, HarvestConfig, evaluate_sweep, harvest, sweep_from_cache
    from saelab.train import TrainConfig

    corpus = wiki_jsonl(data_dir, tmp_path / "wiki.jsonl", 6)
    acts = harvest(HarvestConfig(model=str(tiny_dir), hook=HOOK, corpus=str(corpus), n_tokens=2048, context_size=32,
                                 buffer_tokens=8192), tmp_path / "acts", progress=False)
    base = TrainConfig(n_latents=64, k=4, batch_size=128, total_tokens=2048, init_rows=256)
    eval_cfg = EvalConfig(corpus=str(corpus), recon_tokens=256, downstream_tokens=248)
    sweep_from_cache(acts, tmp_path / "sweep", base, {"k": [2, 4]}, progress=False)
    evaluate_sweep(tmp_path / "sweep", eval_cfg, progress=False)
    assert [r["run"] for r in rp.runs_of(tmp_path / "sweep")] == ["k2", "k4"]  # the page's rows read the same runs
    t0 = time.perf_counter()  # again, as a rerun of the script: every run found done
    sweep_from_cache(acts, tmp_path / "sweep", base, {"k": [2, 4]}, progress=False)
    now = {"train sweep": time.perf_counter() - t0}
    train, evaluation = rp.sweep_seconds(tmp_path / "sweep")
    statuses = [json.loads((tmp_path / "sweep" / r / "status.json").read_text()) for r in ("k2", "k4")]
    assert train == max(s["train_seconds"] for s in statuses) > 0
    parts = [json.loads((tmp_path / "sweep" / r / "metrics.json").read_text())["seconds"] for r in ("k2", "k4")]
    assert evaluation == pytest.approx(sum(sum(p.values()) for p in parts)) and evaluation > 0
    rows = rp.wall_time_rows(now, {"train sweep": train, "eval sweep": evaluation})
    assert rows[0] == f"| train sweep | {train:.1f} s | {now['train sweep']:.1f} s |"
    assert rows[1] == f"| eval sweep | {evaluation:.1f} s | - |"
    assert rp.duration(90.0) == "1.5 min" and rp.duration(None) == "not recorded"


def test_the_page_and_the_script_say_one_thing_of_revivals():
    """docs/reproduction.md was corrected to say what the trainer counts as a revival (each latent dead at a step's
    start that fires in that step), and the script that writes it still called a revival a step: a page written
    again would have taken the correction back."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "reproduction.md").read_text(encoding="utf-8")
    assert rp.REVIVALS in page and "each such latent at each step counts one" in rp.REVIVALS


def test_the_frontier_leaves_out_an_sae_that_fires_nothing():
    """A ReLU SAE whose L0 is 0 (an L1 strong enough to silence it) has no place on the log-L0 axis: left out,
    where it stopped the script with a math domain error before the page was written."""
    relu = [{"l0": 0.0, "nmse": 1.0}, {"l0": 4.0, "nmse": 0.5}, {"l0": 16.0, "nmse": 0.3}]
    topk = [{"k": 8, "l0": 8.0, "nmse": 0.35}, {"k": 1, "l0": 0.0, "nmse": 1.0}]
    out = rp.frontier(topk, relu)
    assert [m["k"] for m in out["matched"]] == [8] and out["verdict"] == "holds"
    assert rp.frontier(topk, relu[:1]) == {"matched": [], "verdict": "cannot tell"}
