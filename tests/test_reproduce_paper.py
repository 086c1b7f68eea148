"""benchmarks/reproduce_paper.py writes docs/reproduction.md from the results it reads: the words on how the
latents-against-baselines intervals were made come from what those results record (interval_groups,
interval_method)."""

from __future__ import annotations

import json
import lzma
import sys
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
