"""`saelab eval RUN --suite paper`: every metric on a real (small) model and SAE, one JSON per metric with the
documented envelope, report.md with tables and plots, resumable; an OpenAI v5 checkpoint gets its hook and
context 64; metrics that do not apply are skipped (or refused when asked for by name)."""

from __future__ import annotations

import json
import lzma
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from saelab.cli import main, parse_args
from saelab.cli.evaluate import suite_config
from saelab.explore.browser.build import read_n2g_file, run_explanations
from saelab.sae import load_sae
from test_pipeline import _hashes, _tiny_quickstart, wiki_jsonl

PNG = b"\x89PNG\r\n\x1a\n"
ENVELOPE = {"metric", "schema_version", "status", "reason", "inputs", "sae", "eval", "wall_s", "created", "result"}
# Small sizes: each metric runs in a second or two on the tiny models.
PROBE_SPLIT = "each part holds both classes; a paragraph within its document"  # as the probe records its split
SMALL = ["--recon-tokens", "1024", "--downstream-tokens", "992", "--ablation-contexts", "8", "--abl-n-sites", "4",
         "--abl-n-future", "8", "--abl-channels-per-site", "4", "--probe-contexts", "64", "--probe-min-per-class", "20",
         "--probe-max-examples", "200", "--n2g-contexts", "24", "--n2g-n-latents", "8", "--n2g-n-examples", "5",
         "--n2g-max-len", "6", "--no-progress"]


def for_metrics(argv: list[str], *metrics: str) -> list[str]:
    """``argv`` without the options (and their values) of the paper metrics not in ``metrics`` and the eval options
    none of them reads (name "core" where it runs): --metrics refuses an option of a metric it leaves out."""
    from saelab.cli.evaluate import EVAL_SETTING_READERS, METRIC_OPTIONS

    left_out = tuple(p for metric, prefixes in METRIC_OPTIONS.items() if metric not in metrics for p in prefixes)
    left_out += tuple("--" + dest.removeprefix("eval.").replace("_", "-") for dest, readers in
                      EVAL_SETTING_READERS.items() if not set(readers) & set(metrics))
    kept, words = [], iter(argv)
    for word in words:
        if word.startswith(left_out):
            next(words)  # its value
        else:
            kept.append(word)
    return kept


def replaced(argv: list[str], option: str, value: str) -> list[str]:
    """``argv`` with ``option``'s value changed: an option given twice is refused."""
    i = argv.index(option)
    return [*argv[:i + 1], value, *argv[i + 2:]]


def eval_corpus(data_dir: Path, path: Path, n: int = 6) -> Path:
    with lzma.open(data_dir / "wiki-en" / "wiki_eval.jsonl.xz", "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    path.write_text("".join(json.dumps({"text": json.loads(line)["text"]}) + "\n" for line in lines))
    return path


def run_cli(capsys, *argv: str, code: int = 0) -> tuple[dict | None, str]:
    capsys.readouterr()
    got = main(list(argv))
    out, err = capsys.readouterr()
    assert got == code, err[-3000:]
    return (json.loads(out) if code == 0 else None), err


@pytest.mark.slow  # ~20 s on 2 cores; .ci/run runs the slow tests
def test_paper_suite_on_a_series_model(tiny_series, tiny_series_run, data_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_series_run, run)
    corpus = eval_corpus(data_dir, tmp_path / "eval.jsonl")
    argv = ["eval", str(run), "--suite", "paper", "--series", str(tiny_series), "--corpus", str(corpus),
            "--ce-fit-min-frac", "0.1", *SMALL]
    out, _ = run_cli(capsys, *argv)
    names = ("core", "compute_equivalent", "ablation_sparsity", "probe", "n2g")
    assert out == {"report": str(run / "evals" / "report.md"), **{m: "ok" for m in names}}
    recs = {m: json.loads((run / "evals" / f"{m}.json").read_text()) for m in names}
    for m, rec in recs.items():
        assert set(rec) == ENVELOPE and rec["metric"] == m and rec["schema_version"] == 1, m
        assert rec["status"] == "ok" and rec["reason"] is None and rec["wall_s"] > 0
        assert rec["sae"]["hook"] == "blocks.1.hook_resid_post" and rec["eval"]["context_size"] == 32
        assert rec["inputs"]["sae_sha256"] == rec["sae"]["sha256"]
    core, ce = recs["core"]["result"], recs["compute_equivalent"]["result"]
    assert not (run / "metrics.json").exists()  # the suite leaves the run's own evaluation (`saelab eval RUN`) alone
    # Compute-equivalent compares losses on the core eval's own predictions.
    assert (ce["spliced_loss"], ce["clean_loss"]) == (core["ce_spliced"], core["ce_clean"])
    assert ce["n_predictions"] == core["n_predictions"] == 32 * 30
    assert ce["series"]["name"] == "tiny-series" and len(ce["checkpoints"]) == 6 and ce["fraction"] > 0
    # Its interval resamples the documents of the contexts, as core's: the same groups, core's per-context losses.
    assert ce["interval_groups"] == core["interval_groups"] == "documents" and ce["interval_note"] is None
    fraction = ce["intervals"]["fraction"]
    assert fraction["n_groups"] == core["intervals"]["delta_ce"]["n_groups"] > 1 and fraction["n_boot"] == 1000
    assert fraction["low"] <= ce["fraction"] <= fraction["high"]
    assert recs["ablation_sparsity"]["result"]["latents_per_s"] > 0
    assert recs["ablation_sparsity"]["result"]["latent"]["n_ablations"] == 4 * 2  # k = 2 at 4 sites
    assert recs["probe"]["result"]["tasks"] and recs["n2g"]["result"]["n_explained"] == 8
    assert recs["n2g"]["result"]["splice"]["ce_n2g_all"] > 0
    # The browser shows the suite's explanations of a run by default, and only of the weights they describe.
    sae = load_sae(run / "sae")
    explained = run_explanations(run, sae)
    assert len(explained) == 8 and any(e["text"] for e in explained.values())
    assert explained == read_n2g_file(run / "evals" / "n2g.json")
    with torch.no_grad():
        sae.W_dec.mul_(2)
    assert run_explanations(run, sae) == {}
    record = (run / "evals" / "n2g.json").read_text()  # an N2G that failed has nothing to show, and breaks nothing
    (run / "evals" / "n2g.json").write_text(json.dumps({**json.loads(record), "status": "error", "result": None}))
    assert run_explanations(run, load_sae(run / "sae")) == {}
    (run / "evals" / "n2g.json").write_text(record[:50])  # a damaged one: said, and the site is built without
    assert run_explanations(run, load_sae(run / "sae")) == {} and "n2g.json: not JSON (line " in capsys.readouterr().err
    (run / "evals" / "n2g.json").write_text(record)
    index = json.loads((run / "evals" / "suite.json").read_text())
    assert set(index["metrics"]) == set(names) and index["wall_s"] > 0
    report = (run / "evals" / "report.md").read_text()
    for heading in ("## Summary", "## Core", "## Compute-equivalent", "## Sparsity of ablation effects",
                    "## Held-out 1-D probe loss", "## N2G explanations", "latents/s", "| **total** |"):
        assert heading in report, heading
    for png in ("compute_equivalent.png", "probe.png", "n2g.png"):
        assert (run / "evals" / png).read_bytes()[:8] == PNG and f"]({png})" in report
    assert f"{ce['fraction']:.3g} [{fraction['low']:.3g}, {fraction['high']:.3g}] of the training tokens" in report
    assert "evals/report.md" in (run / "report.md").read_text()  # the run's own report points to it

    # Resumable: the same command reuses every result (the SAE hashed once, for the checks before the load and
    # the suite); a changed size is refused before any metric runs, and with --overwrite --metrics reruns that
    # metric only.
    created = {m: r["created"] for m, r in recs.items()}
    hashes = _hashes(monkeypatch)
    out, _ = run_cli(capsys, *argv)
    assert out == {"report": str(run / "evals" / "report.md"), **{m: "ok (reused)" for m in names}}
    assert hashes == [recs["core"]["sae"]["sha256"]]
    before = {p.name: p.read_bytes() for p in (run / "evals").iterdir()}
    fewer_sites = replaced(argv, "--abl-n-sites", "3")
    _, err = run_cli(capsys, *fewer_sites, code=2)
    assert "holds results of this SAE with other settings: ablation_sparsity (--abl-n-sites 4 -> 3); pass --overwrite" \
        in err
    assert before == {p.name: p.read_bytes() for p in (run / "evals").iterdir()}
    out, _ = run_cli(capsys, *for_metrics(fewer_sites, "ablation_sparsity"), "--overwrite", "--metrics",
                     "ablation_sparsity")
    assert out["ablation_sparsity"] == "ok"
    assert json.loads((run / "evals" / "ablation_sparsity.json").read_text())["result"]["n_sites"] == 3
    assert json.loads((run / "evals" / "probe.json").read_text())["created"] == created["probe"]
    out, _ = run_cli(capsys, *for_metrics(argv, "core", "probe"), "--overwrite", "--metrics", "core", "probe")
    assert out == {"report": str(run / "evals" / "report.md"), "core": "ok", "probe": "ok"}
    # With core reused from its file (which holds no per-context losses), compute_equivalent measures the spliced
    # and clean losses of each context again, and takes its headline from that measurement too, not from the
    # file's means (here shifted as another device's rounding would shift them): the headline and the interval's
    # draws come from one measurement, so the same fractions and the same interval as before.
    (run / "evals" / "compute_equivalent.json").unlink()
    record = json.loads((run / "evals" / "core.json").read_text())
    core = record["result"]
    shifted = {**core, "ce_spliced": core["ce_spliced"] + 1e-3, "ce_clean": core["ce_clean"] + 1e-3}
    (run / "evals" / "core.json").write_text(json.dumps({**record, "result": shifted}))
    out, _ = run_cli(capsys, *for_metrics(argv, "core", "compute_equivalent"), "--metrics", "core",
                     "compute_equivalent")
    assert (out["core"], out["compute_equivalent"]) == ("ok (reused)", "ok")
    again = json.loads((run / "evals" / "compute_equivalent.json").read_text())["result"]
    assert [again["spliced_loss"], again["clean_loss"]] == pytest.approx([core["ce_spliced"], core["ce_clean"]],
                                                                          rel=1e-6, abs=0)
    assert again["fraction"] == pytest.approx(ce["fraction"], rel=1e-6)
    assert again["intervals"]["fraction"] == pytest.approx(fraction, rel=1e-6)
    # The interval is centred on the headline recomputed from the full sample: every loss's mean over all contexts.
    from saelab.evals.compute_equivalent import compute_equivalent

    head = compute_equivalent(again["checkpoints"], again["spliced_loss"], clean_loss=again["clean_loss"],
                              reference_compute=again["reference_compute"], fit_min_frac=0.1)
    assert head["fraction"] == again["fraction"] == again["intervals"]["fraction"]["estimate"]
    low, high = again["intervals"]["fraction"]["low"], again["intervals"]["fraction"]["high"]
    assert low < head["fraction"] < high


def v5_checkpoint(path: Path, d: int = 64, n: int = 256, k: int = 8, seed: int = 0) -> Path:
    """An OpenAI sparse_autoencoder v5 state dict (keys and shapes of their Autoencoder) for a d-wide model."""
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(d, n, generator=g)
    dec = dec / dec.norm(dim=0, keepdim=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"pre_bias": 0.01 * torch.randn(d, generator=g), "latent_bias": torch.zeros(n),
                "stats_last_nonzero": torch.zeros(n, dtype=torch.long), "latents_activation_frequency": torch.zeros(n),
                "latents_mean_square": torch.zeros(n), "encoder.weight": dec.T.contiguous(), "decoder.weight": dec,
                "activation": "TopK", "activation_state_dict": {"k": k, "postact_fn": "ReLU"}}, path)
    return path


def test_openai_v5_checkpoint_gets_its_hook_and_context_64(tiny_dir, data_dir, tmp_path, capsys):
    # Layer 1 of the 2-layer model stands in for GPT-2's layer 8 (resid_post_mlp -> blocks.L.hook_resid_post).
    pt = v5_checkpoint(tmp_path / "sparse-autoencoder" / "resid_post_mlp_v5_32k" / "autoencoders" / "1.pt")
    corpus = eval_corpus(data_dir, tmp_path / "eval.jsonl", n=8)
    out_dir = tmp_path / "out"
    out, _ = run_cli(capsys, "eval", str(pt), "--model", str(tiny_dir), "--suite", "paper", "--out", str(out_dir),
                     "--corpus", str(corpus), *SMALL)
    assert out["compute_equivalent"] == "skipped"  # no checkpoint series is known for this model
    assert all(out[m] == "ok" for m in ("core", "ablation_sparsity", "probe", "n2g"))
    core = json.loads((out_dir / "evals" / "core.json").read_text())
    assert core["sae"]["hook"] == "blocks.1.hook_resid_post" and core["sae"]["input_norm"] == "layernorm"
    assert core["eval"]["context_size"] == 64 and core["result"]["context_size"] == 64
    assert core["result"]["n_predictions"] == 16 * 62  # 992 predictions: 16 contexts of 64, position 0 left out
    skipped = json.loads((out_dir / "evals" / "compute_equivalent.json").read_text())
    assert skipped["status"] == "skipped" and skipped["result"] is None
    assert f"no checkpoint series is known for model {str(tiny_dir.resolve())!r}" in skipped["reason"]
    assert "--series" in skipped["reason"]
    assert "Skipped: no checkpoint series is known" in (out_dir / "evals" / "report.md").read_text()
    # Another SAE's suite into the same folder is refused before it runs; every file there is kept.
    other = v5_checkpoint(tmp_path / "other" / "resid_post_mlp_v5_32k" / "autoencoders" / "1.pt", seed=1)
    before = {p.name: p.read_bytes() for p in (out_dir / "evals").iterdir()}
    _, err = run_cli(capsys, "eval", str(other), "--model", str(tiny_dir), "--suite", "paper", "--out", str(out_dir),
                     "--corpus", str(corpus), *for_metrics(SMALL, "core"), "--metrics", "core", code=2)
    assert "holds results of another SAE (core); pick another --out, or pass --overwrite" in err
    assert before == {p.name: p.read_bytes() for p in (out_dir / "evals").iterdir()}
    # Asking for it by name is an error; so are unknown metrics and series, and a .pt without --out or hook.
    _, err = run_cli(capsys, "eval", str(pt), "--model", str(tiny_dir), "--suite", "paper", "--out", str(out_dir),
                     "--metrics", "compute_equivalent", "--corpus", str(corpus), code=2)
    assert "metric(s) asked for do not apply: compute_equivalent: no checkpoint series is known" in err
    _, err = run_cli(capsys, "eval", str(pt), "--model", str(tiny_dir), "--suite", "paper", "--out", str(out_dir),
                     "--metrics", "core", "fvu", code=2)
    assert "--metrics must be among the paper suite's (core, compute_equivalent" in err and "got unknown fvu" in err
    _, err = run_cli(capsys, "eval", str(pt), "--model", str(tiny_dir), "--suite", "paper", "--out", str(out_dir),
                     "--series", "gpt-7-checkpoints", "--corpus", str(corpus), code=2)
    assert "unknown checkpoint series 'gpt-7-checkpoints'" in err
    _, err = run_cli(capsys, "eval", str(pt), "--model", str(tiny_dir), "--suite", "paper", code=2)
    assert "pass --out DIR" in err and "1.pt" in err
    loose = v5_checkpoint(tmp_path / "ae.pt")
    _, err = run_cli(capsys, "eval", str(loose), "--model", str(tiny_dir), code=2)
    assert "ae.pt records no hook" in err and "--hook blocks.8.hook_resid_post" in err


def test_series_that_fails_to_load_is_recorded_and_reported(tiny_dir, data_dir, tmp_path, capsys):
    """A series whose checkpoints cannot be loaded (hub offline, say): the other metrics still finish."""
    pt = v5_checkpoint(tmp_path / "resid_post_mlp_v5_32k" / "autoencoders" / "1.pt")
    broken = tmp_path / "broken-series"
    for step in (1, 2, 3):
        (broken / f"checkpoint-{step}").mkdir(parents=True)
    (broken / "series.json").write_text(json.dumps({"tokens_per_step": 10, "checkpoints": [
        {"path": f"checkpoint-{s}", "step": s} for s in (1, 2, 3)]}))
    corpus = eval_corpus(data_dir, tmp_path / "eval.jsonl", n=8)
    _, err = run_cli(capsys, "eval", str(pt), "--model", str(tiny_dir), "--suite", "paper", "--out",
                     str(tmp_path / "out"), "--series", str(broken), "--metrics", "core", "compute_equivalent",
                     "--corpus", str(corpus), *for_metrics(SMALL, "core", "compute_equivalent"), code=2)
    assert "failed in 1 metric(s): compute_equivalent: ModelLoadError: cannot load model directory" in err
    rec = json.loads((tmp_path / "out" / "evals" / "compute_equivalent.json").read_text())
    assert rec["status"] == "error" and "checkpoint-1" in rec["reason"]
    assert json.loads((tmp_path / "out" / "evals" / "core.json").read_text())["status"] == "ok"
    assert "| error |" in (tmp_path / "out" / "evals" / "report.md").read_text()


def test_results_the_suite_would_replace_are_refused_before_the_model_loads(tiny_dir, data_dir, tmp_path, capsys,
                                                                           monkeypatch):
    """Results in --out of another SAE, or of this SAE with other settings, were refused only after the model
    loaded; the refusal needs only the settings, the SAE and the files there, so it now comes before the load.
    The SAE is still hashed once."""
    import saelab.pipeline

    pt = v5_checkpoint(tmp_path / "sae" / "resid_post_mlp_v5_32k" / "autoencoders" / "1.pt")
    other = v5_checkpoint(tmp_path / "other" / "resid_post_mlp_v5_32k" / "autoencoders" / "1.pt", seed=1)
    out_dir = tmp_path / "out"
    argv = ["eval", str(pt), "--model", str(tiny_dir), "--suite", "paper", "--out", str(out_dir), "--corpus",
            str(eval_corpus(data_dir, tmp_path / "eval.jsonl", n=8)), *for_metrics(SMALL, "core"), "--metrics", "core"]
    run_cli(capsys, *argv)
    before = {p.name: p.read_bytes() for p in (out_dir / "evals").iterdir()}
    monkeypatch.setattr(saelab.pipeline, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    hashes = _hashes(monkeypatch)
    _, err = run_cli(capsys, "eval", str(other), *argv[2:], code=2)
    assert "holds results of another SAE (core); pick another --out, or pass --overwrite" in err
    assert len(hashes) == 1
    _, err = run_cli(capsys, *replaced(argv, "--recon-tokens", "992"), code=2)
    assert "holds results of this SAE with other settings: core (--recon-tokens 1024 -> 992)" in err
    _, err = run_cli(capsys, *argv, "--sample-pool-tokens", "0", code=2)  # named once, as the option it is
    assert "other settings: core (--sample-pool-tokens 4194304 -> 0);" in err
    assert before == {p.name: p.read_bytes() for p in (out_dir / "evals").iterdir()}
    from saelab.evals.suite import _input_changes

    probe = {"corpus": "c", "sample_pool_tokens": 4194304, "n_contexts": 512, "config": {"n_boot": 1000}}
    assert _input_changes("probe", probe, {**probe, "sample_pool_tokens": 0}) == ["eval.sample_pool_tokens 4194304 -> 0"]


@pytest.mark.slow  # ~20 s on 2 cores
def test_changed_contexts_are_named_by_the_options_typed(tiny_dir, data_dir, tmp_path, capsys):
    """The refusal of results made with other settings named each metric's settings by its option (--abl-n-sites
    4 -> 3) but the contexts by the suite's field (probe_contexts 64 -> 48), which no option spells: each is now
    the option the user typed."""
    pt = v5_checkpoint(tmp_path / "sae" / "resid_post_mlp_v5_32k" / "autoencoders" / "1.pt")
    names = ("ablation_sparsity", "probe", "n2g")
    argv = ["eval", str(pt), "--model", str(tiny_dir), "--suite", "paper", "--out", str(tmp_path / "out"), "--corpus",
            str(eval_corpus(data_dir, tmp_path / "eval.jsonl", n=8)), *for_metrics(SMALL, *names), "--metrics", *names]
    run_cli(capsys, *argv)
    for option, value in (("--ablation-contexts", "6"), ("--abl-n-sites", "3"), ("--probe-contexts", "48"),
                          ("--n2g-contexts", "20")):
        argv = replaced(argv, option, value)
    _, err = run_cli(capsys, *argv, code=2)
    assert ("other settings: ablation_sparsity (--abl-n-sites 4 -> 3, --ablation-contexts 8 -> 6); probe "
            "(--probe-contexts 64 -> 48); n2g (--n2g-contexts 24 -> 20); pass --overwrite") in err, err


def test_run_paper_suite_names_the_saes_context_it_refuses(tiny_gpt2, tmp_path):
    """From Python with the model loaded, the SAE's own context past the model's positions was refused as
    `context_size=256 ...`, a setting never given; it is named as the command line names it, and a context set
    in the eval settings keeps its setting's name."""
    from saelab.errors import ConfigError
    from saelab.evals.core import EvalConfig
    from saelab.evals.suite import run_paper_suite
    from saelab.sae import SAEConfig, TopKSAE

    sae = TopKSAE(SAEConfig(d_in=64, n_latents=32, k=4, hook_name="blocks.1.hook_resid_post", context_size=256))
    with pytest.raises(ConfigError) as e:
        run_paper_suite(sae, tmp_path, lm=tiny_gpt2, progress=False)
    assert str(e.value) == "the SAE's context of 256 tokens exceeds the longest context of tiny-gpt2 (128 tokens)"
    with pytest.raises(ConfigError) as e:
        run_paper_suite(sae, tmp_path, lm=tiny_gpt2, eval_cfg=EvalConfig(context_size=200), progress=False)
    assert str(e.value) == "context_size=200 exceeds the longest context of tiny-gpt2 (128 tokens)"
    assert not (tmp_path / "evals").exists()


def test_core_and_browser_name_the_saes_context_they_refuse(tiny_gpt2, tmp_path):
    """evaluate_core and the browser's reader, given a loaded model, refused the SAE's own context as
    `context_size=256 ...`, a setting never given; named as the suite names it."""
    from saelab.errors import ConfigError
    from saelab.evals.core import evaluate_core
    from saelab.explore.browser import build_browser
    from saelab.explore.browser.build import BrowseConfig, read_tokens
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    sae = TopKSAE(SAEConfig(d_in=64, n_latents=32, k=4, hook_name="blocks.1.hook_resid_post", context_size=256))
    for refuse in (lambda: evaluate_core(sae, tiny_gpt2, progress=False), lambda: read_tokens(tiny_gpt2, sae, BrowseConfig())):
        with pytest.raises(ConfigError) as e:
            refuse()
        assert str(e.value) == "the SAE's context of 256 tokens exceeds the longest context of tiny-gpt2 (128 tokens)"
    save_sae(sae, tmp_path / "sae")
    with pytest.raises(ConfigError) as e:  # the whole build, the model given loaded
        build_browser([tmp_path / "sae"], tmp_path / "site", BrowseConfig(n_tokens=256), lm=tiny_gpt2, progress=False)
    assert str(e.value) == ("the SAE's context of 256 tokens (--context-size sets another) exceeds the longest context "
                            "of tiny-gpt2 (128 tokens)")


@pytest.mark.parametrize("argv,match", [
    (["--probe-contexts", "0"], "--probe-contexts must be >= 1"),
    (["--n2g-contexts", "1"], "--n2g-contexts must be >= 2"),
    (["--abl-n-future", "0"], "--abl-n-future must be >= 1, got 0"),
    (["--abl-latents-per-site", "0"], "--abl-latents-per-site must be >= 1"),
    (["--ce-fit", "foo"], "--ce-fit must be 'power' or 'interp', got 'foo'"),
    (["--ce-fit-min-frac", "2"], "--ce-fit-min-frac must be in [0, 1), got 2"),
    (["--ce-lm-batch-size", "0"], "--ce-lm-batch-size must be >= 1, got 0"),
    (["--series-steps", "100", "-5"], "--series-steps must be >= 0, got -5"),
    (["--probe-min-per-class", "0"], "--probe-min-per-class must be >= 1, got 0"),
    (["--probe-tasks", "number", "foo"], "--probe-tasks ['foo'] unknown; expected some of number, in_parens"),
    (["--n2g-seq-batch-size", "0"], "--n2g-seq-batch-size must be >= 1, got 0"),
    (["--n2g-latents", "3", "-1"], "--n2g-latents must be >= 0, got -1"),
    (["--n2g-n-latents", "-1"], "--n2g-n-latents must be >= 0"),
    (["--n2g-keep-frac", "2"], "--n2g-keep-frac must be in (0, 1], got 2"),
    (["--n2g-firing-frac", "5"], "--n2g-firing-frac must be in [0, 1), got 5"),
    (["--n2g-max-patterns-reported", "-1"], "--n2g-max-patterns-reported must be >= 0, got -1"),
])
def test_bad_suite_sizes(tmp_path, capsys, argv, match):
    # The SAE does not exist: a value refused only after the SAE (or the model) loads reads "no such file".
    _, err = run_cli(capsys, "eval", str(tmp_path / "no-sae"), "--suite", "paper", *argv, code=2)
    assert err.startswith("saelab eval: error: ") and err.count("\n") == 1, err
    assert match in err


def test_zero_where_the_help_gives_it_a_meaning_is_accepted():
    # 0 = all latents / no channels / no intervals / no patterns listed / any nonzero activation / every checkpoint.
    args = parse_args(["eval", "SAE", "--suite", "paper", "--n2g-n-latents", "0", "--abl-channels-per-site", "0",
                       "--probe-n-boot", "0", "--n2g-max-patterns-reported", "0", "--n2g-firing-frac", "0",
                       "--n2g-latents", "0", "--ce-fit-min-frac", "0", "--series-steps", "0", "--no-progress"])
    cfg = suite_config(args)
    assert (cfg.n2g.n_latents, cfg.n2g.latents, cfg.compute_equivalent.steps) == (0, (0,), (0,))


def test_n2g_latents_the_sae_lacks_are_refused_before_the_model_loads(tiny_series_run, data_dir, tmp_path, capsys):
    # An id past the SAE's 128 latents once indexed past them (IndexError) and aborted the suite.
    out = tmp_path / "out"
    corpus = eval_corpus(data_dir, tmp_path / "eval.jsonl")
    _, err = run_cli(capsys, "eval", str(tiny_series_run), "--suite", "paper", "--out", str(out), "--corpus",
                     str(corpus), *SMALL, "--n2g-latents", "5", "99999", "--model", str(tmp_path / "no-model"),
                     code=2)
    assert err.count("\n") == 1, err
    assert "--n2g-latents [99999] out of range: the SAE has 128 latents (0 to 127)" in err
    assert not (out / "evals").exists()  # refused before the model (a missing one here) loads


def test_more_n2g_latents_than_the_sae_has_are_refused_before_the_model_loads(tiny_series_run, data_dir, tmp_path,
                                                                              capsys):
    """--n2g-n-latents 500 on a 128-latent SAE explained every latent that fired, without a word."""
    out = tmp_path / "out"
    corpus = eval_corpus(data_dir, tmp_path / "eval.jsonl")
    _, err = run_cli(capsys, "eval", str(tiny_series_run), "--suite", "paper", "--out", str(out), "--corpus",
                     str(corpus), *replaced(SMALL, "--n2g-n-latents", "500"), "--model", str(tmp_path / "no-model"),
                     code=2)
    assert err.count("\n") == 1, err
    assert "--n2g-n-latents 500: the SAE has 128 latents; expected at most 128 (0: every latent that fires)" in err
    assert not (out / "evals").exists()  # refused before the model (a missing one here) loads


def test_a_rerun_with_or_without_no_progress_reuses_the_results(tiny_dir, data_dir, tmp_path, capsys):
    """ablation_sparsity's and compute_equivalent's settings held their progress flag: the same command typed
    without --no-progress was refused as other settings (ablation_sparsity.progress false -> true). It measures
    nothing and is not recorded; a record of an earlier saelab that holds it is reused either way."""
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    run = tmp_path / "run"
    save_sae(TopKSAE(SAEConfig(d_in=64, n_latents=32, k=4, hook_name="blocks.0.hook_resid_post",
                               model_name=str(tiny_dir), context_size=32)), run / "sae")
    argv = ["eval", str(run), "--suite", "paper", "--metrics", "ablation_sparsity", "--corpus",
            str(eval_corpus(data_dir, tmp_path / "eval.jsonl")), "--ablation-contexts", "4", "--abl-n-sites", "2",
            "--abl-n-future", "8", "--abl-channels-per-site", "4"]
    out, _ = run_cli(capsys, *argv, "--no-progress")
    assert out["ablation_sparsity"] == "ok"
    path = run / "evals" / "ablation_sparsity.json"
    rec = json.loads(path.read_text())
    assert "progress" not in rec["inputs"]["config"]
    out, _ = run_cli(capsys, *argv)
    assert out["ablation_sparsity"] == "ok (reused)"
    for shown in (False, True):  # as an earlier saelab recorded it
        rec["inputs"]["config"]["progress"] = shown
        path.write_text(json.dumps(rec))
        for flags in ([], ["--no-progress"]):
            out, _ = run_cli(capsys, *argv, *flags)
            assert out["ablation_sparsity"] == "ok (reused)"


def test_the_runs_own_evals_folder_as_out_is_the_run_folder(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    """`--out RUN/evals` means the run's evals/ (the default), not RUN/evals/evals/."""
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    run = tmp_path / "run"
    save_sae(TopKSAE(SAEConfig(d_in=64, n_latents=32, k=4, hook_name="blocks.0.hook_resid_post",
                               model_name=str(tiny_dir), context_size=32)), run / "sae")
    argv = ["eval", str(run), "--suite", "paper", "--metrics", "core", "--corpus",
            str(eval_corpus(data_dir, tmp_path / "eval.jsonl")), "--recon-tokens", "256", "--downstream-tokens", "248",
            "--no-progress"]
    out, _ = run_cli(capsys, *argv, "--out", str(run / "evals"))
    assert out == {"report": str(run / "evals" / "report.md"), "core": "ok"}
    assert sorted(p.name for p in (run / "evals").iterdir()) == ["core.json", "density.png",
                                                                "latent_frequencies.safetensors", "report.md",
                                                                "suite.json"]
    out, _ = run_cli(capsys, *argv)  # the default folder: the same evaluation, reused
    assert out == {"report": str(run / "evals" / "report.md"), "core": "ok (reused)"}
    monkeypatch.setenv("HOME", str(tmp_path))  # the run named from the home folder, as a shell leaves "~/run"
    out, _ = run_cli(capsys, "eval", "~/run", *argv[2:])
    assert out == {"report": str(run / "evals" / "report.md"), "core": "ok (reused)"}


@pytest.mark.slow  # ~30 s under load: a quickstart, five suites and a core eval
def test_the_suites_core_reuses_the_runs_evaluation_of_its_settings(tiny_dir, data_dir, tmp_path, capsys):
    """After the quickstart (it evaluates the run into metrics.json), `--suite paper` measured core again with the
    same settings. It takes core's metrics and latent frequencies from metrics.json's evaluation, and says so: the
    numbers the suite computes of those settings, but its seconds. An evaluation of another model dtype, or one
    whose contexts the suite's draw does not repeat (a pool smaller than the suite's contexts), is computed anew."""
    from saelab.pipeline import quickstart
    from saelab.run_folder import read_latent_frequencies

    cfg = _tiny_quickstart(tiny_dir, wiki_jsonl(data_dir, tmp_path / "train.jsonl", 0, 2),
                           wiki_jsonl(data_dir, tmp_path / "eval.jsonl", 3, 1))
    run, evals = tmp_path / "run", tmp_path / "run" / "evals"
    metrics = quickstart(cfg, run, progress=False)
    sizes = ["--corpus", cfg.eval.corpus, "--recon-tokens", "256", "--downstream-tokens", "128", "--no-progress"]
    suite = ["eval", str(run), "--suite", "paper", "--metrics", "core", *sizes]
    out, err = run_cli(capsys, *suite, "--model-dtype", "bfloat16", "--out", str(tmp_path / "bf16"))
    assert out["core"] == "ok" and "metrics.json" not in err  # metrics.json's model was in float32
    out, err = run_cli(capsys, *suite)
    assert out["core"] == "ok (reused)"
    assert (f"saelab: note: {evals / 'core.json'} takes core's metrics from {run / 'metrics.json'}, an evaluation of "
            "the same SAE and settings, not measured again") in err.splitlines()
    entry = json.loads((evals / "suite.json").read_text())["metrics"]["core"]
    assert entry["reused"] and entry["from"] == str(run / "metrics.json")
    reused = json.loads((evals / "core.json").read_text())
    assert reused["status"] == "ok" and reused["result"]["seconds"] == metrics["seconds"]
    frequencies = read_latent_frequencies(evals)
    assert torch.equal(frequencies.frequencies_N, read_latent_frequencies(run).frequencies_N)
    assert "![latent density](density.png)" in (evals / "report.md").read_text()
    written = (evals / "core.json").read_bytes()
    out, _ = run_cli(capsys, *suite)  # its own record now
    assert out["core"] == "ok (reused)" and (evals / "core.json").read_bytes() == written
    out, _ = run_cli(capsys, *suite, "--overwrite")
    assert out["core"] == "ok"
    computed = json.loads((evals / "core.json").read_text())
    assert computed["inputs"] == reused["inputs"] and computed["eval"] == reused["eval"]
    assert {**computed["result"], "seconds": None} == {**reused["result"], "seconds": None}
    assert torch.equal(read_latent_frequencies(evals).frequencies_N, frequencies.frequencies_N)
    # A pool of 4 contexts: core's 9 are drawn among 9 by `saelab eval`, among the suite's 16 here: other contexts.
    pool = ["--sample-pool-tokens", "128"]
    run_cli(capsys, "eval", str(run), *sizes, *pool, "--overwrite")
    wider = ["--ablation-contexts", "16", "--abl-n-sites", "2", "--abl-n-future", "8", "--abl-channels-per-site", "4"]
    out, err = run_cli(capsys, "eval", str(run), "--suite", "paper", "--metrics", "core", "ablation_sparsity", *sizes,
                       *pool, *wider, "--out", str(tmp_path / "pool"))
    assert out["core"] == "ok" and "metrics.json" not in err
    drawn = json.loads((tmp_path / "pool" / "evals" / "core.json").read_text())["result"]
    assert drawn["nmse"] != json.loads((run / "metrics.json").read_text())["nmse"]
    # core alone draws as many as `saelab eval` did, among the same 9: the same contexts, taken
    out, err = run_cli(capsys, "eval", str(run), "--suite", "paper", "--metrics", "core", *sizes, *pool, "--out",
                       str(tmp_path / "alone"))
    assert out["core"] == "ok (reused)" and f"takes core's metrics from {run / 'metrics.json'}" in err


def test_the_suites_core_saves_latent_frequencies_and_its_report_draws_density(tiny_dir, data_dir, tmp_path,
                                                                                capsys):
    """The suite's core metric saves each latent's firing frequency as `saelab eval` does (the same file and
    values), and evals/report.md shows density.png drawn from them. Frequencies it cannot draw (missing: a
    suite run before they were saved; of other weights) are named in one line, and the report goes on."""
    from saelab.evals.core import eval_settings
    from saelab.run_folder import read_latent_frequencies, write_latent_frequencies
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    torch.manual_seed(0)
    sae_dir = tmp_path / "sae"
    save_sae(TopKSAE(SAEConfig(d_in=64, n_latents=32, k=4, hook_name="blocks.0.hook_resid_post",
                               model_name=str(tiny_dir), context_size=32)), sae_dir)
    sizes = ["--corpus", str(eval_corpus(data_dir, tmp_path / "eval.jsonl")), "--recon-tokens", "256",
             "--downstream-tokens", "248", "--no-progress"]
    suite = ["eval", str(sae_dir), "--suite", "paper", "--metrics", "core", "--out", str(tmp_path / "out"), *sizes]
    run_cli(capsys, *suite)
    evals = tmp_path / "out" / "evals"
    core = json.loads((evals / "core.json").read_text())
    saved = read_latent_frequencies(evals)
    assert saved.sae_sha256 == core["inputs"]["sae_sha256"] and saved.evaluation == eval_settings(core["result"])
    assert saved.frequencies_N.shape == (32,) and saved.frequencies_N.sum() > 0
    report = (evals / "report.md").read_text()
    assert "![latent density](density.png)" in report and (evals / "density.png").read_bytes()[:8] == PNG
    # The ordinary evaluation of the same SAE with the same settings: the same frequencies, the same plot.
    run_cli(capsys, "eval", str(sae_dir), "--out", str(tmp_path / "plain"), *sizes)
    plain = read_latent_frequencies(tmp_path / "plain")
    assert torch.equal(plain.frequencies_N, saved.frequencies_N)
    assert (plain.sae_sha256, plain.evaluation) == (saved.sae_sha256, saved.evaluation)
    assert (evals / "density.png").read_bytes() == (tmp_path / "plain" / "density.png").read_bytes()

    (evals / "latent_frequencies.safetensors").unlink()  # a suite run before the frequencies were saved
    (evals / "density.png").unlink()
    out, err = run_cli(capsys, *suite)
    assert out["core"] == "ok (reused)" and not (evals / "density.png").exists()
    assert "latent density" not in (evals / "report.md").read_text()
    assert (f"saelab: note: evals/density.png not drawn: {evals / 'latent_frequencies.safetensors'} is missing (the "
            "suite's core metric ran before saelab saved the latents' firing frequencies); the suite's core metric "
            "run again (`--suite paper --metrics core --overwrite`) saves them") in err.splitlines()
    write_latent_frequencies(evals, replace(saved, sae_sha256="0" * 20))
    _, err = run_cli(capsys, *suite)
    assert f"{evals / 'latent_frequencies.safetensors'} measured other SAE weights than those " \
           f"{evals / 'core.json'} describes" in err and not (evals / "density.png").exists()
    out, _ = run_cli(capsys, *suite, "--overwrite")
    assert out["core"] == "ok" and read_latent_frequencies(evals).sae_sha256 == saved.sae_sha256
    assert (evals / "density.png").read_bytes() == (tmp_path / "plain" / "density.png").read_bytes()
    assert "![latent density](density.png)" in (evals / "report.md").read_text()


def test_a_difference_no_setting_names_still_counts():
    """compute_equivalent's contexts follow from --downstream-tokens, which its own settings do not hold: a
    record that differs only there is still another setting (its result is not replaced unasked)."""
    from saelab.evals.suite import _input_changes

    old = {"sae_sha256": "x", "n_contexts": 16, "config": {"fit": "power"}}
    assert _input_changes("compute_equivalent", old, {**old, "n_contexts": 32}) == ["contexts 16 -> 32"]
    assert _input_changes("compute_equivalent", old, {**old, "series": "other"})
    assert _input_changes("compute_equivalent", old, dict(old)) == []


def test_a_tokenizer_that_splits_the_default_padding_token_is_refused_before_any_metric(split_pad_dir, data_dir,
                                                                                        tmp_path, capsys):
    """N2G pads with " _" by default, one token for GPT-2. On a tokenizer that splits it (GPT-2's without the
    merge that makes it one) n2g failed at the end of the suite, after every other metric's forwards, naming
    the setting (padding_token) instead of the option. Now the suite is refused before any metric runs, in one
    line naming --n2g-padding-token, whether n2g was asked for by name or not; a single-token text runs it."""
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    save_sae(TopKSAE(SAEConfig(d_in=64, n_latents=128, k=4, hook_name="blocks.1.hook_resid_post",
                               model_name=str(split_pad_dir), context_size=32)), tmp_path / "sae")
    argv = ["eval", str(tmp_path / "sae"), "--suite", "paper", "--corpus",
            str(eval_corpus(data_dir, tmp_path / "eval.jsonl", n=8)), *SMALL]
    refusal = "saelab eval: error: --n2g-padding-token ' _' (the default) is 2 tokens for this tokenizer; pick a " \
              "single-token text"
    for metrics, tail in (([], ", or leave n2g out with --metrics"), (["--metrics", "n2g"], "")):
        kept = for_metrics(argv, "n2g", *([] if metrics else ["core"]))  # every metric runs without --metrics
        _, err = run_cli(capsys, *kept, "--out", str(tmp_path / "out"), *metrics, code=2)
        assert err.strip().splitlines()[-1] == refusal + tail, err
        assert not (tmp_path / "out" / "evals").exists()  # no metric ran

    out, _ = run_cli(capsys, *for_metrics(argv, "n2g"), "--out", str(tmp_path / "out"), "--metrics", "n2g",
                     "--n2g-padding-token", " x")
    assert out["n2g"] == "ok"
    assert json.loads((tmp_path / "out" / "evals" / "n2g.json").read_text())["inputs"]["config"]["padding_token"] == " x"


def test_a_probe_that_measured_no_task_is_not_ok(tiny_series_run, data_dir, tmp_path, capsys):
    """--probe-contexts too few for any task read "probe": "ok" with mean loss null over 0 tasks."""
    corpus = eval_corpus(data_dir, tmp_path / "eval.jsonl")
    argv = ["eval", str(tiny_series_run), "--suite", "paper", "--out", str(tmp_path / "out"), "--corpus", str(corpus),
            *replaced(SMALL, "--probe-contexts", "1")]
    out, _ = run_cli(capsys, *argv)
    assert out["probe"] == "skipped" and out["core"] == "ok"
    rec = json.loads((tmp_path / "out" / "evals" / "probe.json").read_text())
    assert rec["status"] == "skipped" and rec["result"] is None
    assert rec["reason"].startswith("every task was skipped") and "(need 20 of each)" in rec["reason"]
    assert "| skipped |" in (tmp_path / "out" / "evals" / "report.md").read_text()
    # Asked for by name, as a metric that does not apply: an error, exit 2.
    _, err = run_cli(capsys, *for_metrics(argv, "probe"), "--metrics", "probe", code=2)
    assert "failed in 1 metric(s): probe: every task was skipped" in err
    assert json.loads((tmp_path / "out" / "evals" / "probe.json").read_text())["status"] == "error"


def test_the_probe_is_named_for_what_it_computes(tiny_series_run, data_dir, tmp_path, capsys):
    """The probe scores the held-out CE of the latent chosen on train data (ridge-penalized fit, saelab's own
    tasks), not the paper's minimum over latents: the report and docs/evals.md name it so, never as §4.2's."""
    corpus = eval_corpus(data_dir, tmp_path / "eval.jsonl")
    run_cli(capsys, "eval", str(tiny_series_run), "--suite", "paper", "--out", str(tmp_path / "out"), "--corpus",
            str(corpus), *for_metrics(SMALL, "probe"), "--metrics", "probe")
    report = (tmp_path / "out" / "evals" / "report.md").read_text()
    title = "Held-out 1-D probe loss (after §4.2)"
    assert f"| {title} |" in report and f"## {title}" in report and "Probe loss (§4.2)" not in report
    assert "Not the paper's minimum over latents" in report
    docs = (Path(__file__).resolve().parents[1] / "docs" / "evals.md").read_text()
    section = docs.split("\n### `probe`", 1)[1].split("\n### ", 1)[0]
    assert section.startswith(" (held-out 1-D probe loss, after paper §4.2;") and "l2 = 1e-3" in section


def test_a_probe_result_of_the_earlier_split_is_computed_again(tiny_series_run, data_dir, tmp_path, capsys):
    """A probe result written before splits had to give each part both classes may hold a task scored on one
    class; its record names the split method. A record of the earlier method (none recorded) was refused as of
    other settings (`method absent -> ...`) until --overwrite, while one whose intervals an earlier saelab made was
    computed again with a note: the same settings computed by an earlier saelab are now computed again, with a
    note, either way; the report says so of it while it stands. A setting the user changed is still refused, named
    alone."""
    from saelab.report.paper import write_paper_report

    corpus = eval_corpus(data_dir, tmp_path / "eval.jsonl")
    argv = ["eval", str(tiny_series_run), "--suite", "paper", "--out", str(tmp_path / "out"), "--corpus", str(corpus),
            *for_metrics(SMALL, "probe"), "--metrics", "probe"]
    out, _ = run_cli(capsys, *argv)
    path = tmp_path / "out" / "evals" / "probe.json"
    rec = json.loads(path.read_text())
    assert out["probe"] == "ok" and rec["inputs"]["method"] == f"splits: {PROBE_SPLIT}"
    out, _ = run_cli(capsys, *argv)
    assert out["probe"] == "ok (reused)" and json.loads(path.read_text())["created"] == rec["created"]
    del rec["inputs"]["method"]  # as the earlier probe wrote it
    path.write_text(json.dumps(rec))
    report = write_paper_report(tmp_path / "out").read_text()
    assert ("An earlier saelab computed it another way (it records no method; this saelab's: 'splits: each part "
            "holds both classes; a paragraph within its document'); the suite run again (`--metrics probe` for it alone) computes it anew") in report
    _, err = run_cli(capsys, *replaced(argv, "--probe-contexts", "48"), code=2)
    assert re.search(r"holds results of this SAE with other settings: probe \(--probe-contexts 64 -> 48\); pass "
                     "--overwrite", err), err  # the contexts changed, named alone
    out, err = run_cli(capsys, *argv)
    assert out["probe"] == "ok"
    assert [line for line in err.splitlines() if line.startswith("saelab: note:")] == [
        f"saelab: note: {path} is computed again, not reused: an earlier saelab computed it another way (it records "
        "no method; this saelab's: 'splits: each part holds both classes; a paragraph within its document')"]
    again = json.loads(path.read_text())
    assert again["inputs"]["method"] == f"splits: {PROBE_SPLIT}"
    assert "earlier saelab" not in (tmp_path / "out" / "evals" / "report.md").read_text()


def test_results_of_a_bfloat16_model_are_checked_against_bfloat16_references(tmp_path):
    """Before the load, the suite's check of the results it would replace resolves compute_equivalent's
    references in the model's dtype, as the run records them: a bfloat16 suite run again was refused as made
    from other settings (series.dtype "bfloat16" -> absent). The references' dtype is the model's, recorded once
    (model_dtype): a float32 run was refused naming the change twice (`compute_equivalent.series.dtype "bfloat16" ->
    absent, model_dtype "bfloat16" -> "float32"`). A record that holds it twice, as saelab wrote it before, is judged
    as strictly, the change named once; one without model_dtype (an earlier saelab's) by its references' dtype."""
    from saelab.errors import RunExistsError
    from saelab.evals import suite
    from saelab.evals.core import EvalConfig
    from saelab.sae.topk import SAEConfig, TopKSAE

    model = "EleutherAI/pythia-70m"
    sae = TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2, hook_name="blocks.0.hook_resid_post", model_name=model,
                            context_size=16))
    cfg, ev = suite.PaperSuiteConfig(metrics=("compute_equivalent",)), EvalConfig(corpus=None)
    cfg.compute_equivalent.series = "pythia-70m"

    def inputs(dtype: str) -> dict:
        """compute_equivalent's inputs as the suite run of a model in ``dtype`` records them."""
        run, wanted, reasons = suite._suite_run(None, sae, model, tmp_path, cfg, ev, 16)
        run.model_dtype = dtype
        suite._resolve_series(run, reasons, "cpu", dtype)
        run.sae_hash = suite.sae_sha256(sae)
        return suite._inputs(run, next(m for m in wanted if m.name == "compute_equivalent"), suite._base_inputs(run))

    def refusal(recorded: dict, dtype: str) -> str | None:
        (tmp_path / "evals").mkdir(exist_ok=True)
        (tmp_path / "evals" / "compute_equivalent.json").write_text(json.dumps({"status": "ok", "inputs": recorded}))
        try:
            suite.check_results_before_load(sae, model, cfg, ev, 16, tmp_path, dtype=dtype)
        except RunExistsError as e:
            return re.search(r"other settings: (.*); pass --overwrite", str(e))[1]
        return None

    bf16 = inputs("bfloat16")
    twice = {**bf16, "config": {**bf16["config"], "series": {**bf16["config"]["series"], "dtype": "bfloat16"}}}
    for recorded in (bf16, twice):  # as saelab writes it now, and as it wrote it before
        assert refusal(recorded, "bfloat16") is None and suite._reusable({"status": "ok", "inputs": recorded},
                                                                         inputs("bfloat16"))
        assert refusal(recorded, "float32") == 'compute_equivalent (model_dtype "bfloat16" -> "float32")'
    assert bf16[suite.MODEL_DTYPE] == "bfloat16" and "dtype" not in bf16["config"]["series"]  # recorded once
    assert refusal(inputs("float32"), "bfloat16") == 'compute_equivalent (model_dtype "float32" -> "bfloat16")'
    earlier = {k: v for k, v in twice.items() if k != suite.MODEL_DTYPE}  # the references' dtype its only record
    assert refusal(earlier, "bfloat16") is None and not suite._reusable({"status": "ok", "inputs": earlier},
                                                                         inputs("float32"))
    assert refusal(earlier, "float32") == 'compute_equivalent (compute_equivalent.series.dtype "bfloat16" -> absent)'
    why = suite.earlier_computation({"status": "ok", "inputs": earlier, "result": {}}, "compute_equivalent")
    assert "without recording the dtype its model was loaded in" in why  # computed again, with a note


def test_the_suite_report_names_the_offline_default_by_its_hub_id(tmp_path):
    """The header said model `default` (saelab's spec) while the core section said the hub id."""
    from saelab.report.paper import write_paper_report

    (tmp_path / "evals").mkdir()
    record = {"metric": "ablation_sparsity", "status": "skipped", "reason": "not asked", "wall_s": 0.0, "result": None,
              "sae": {"source": "sae", "n_latents": 8, "k": 2, "model": "default", "hook": "blocks.9.hook_resid_post"},
              "eval": {"corpus": "c", "context_size": 64, "position_0": "excluded"}}
    (tmp_path / "evals" / "ablation_sparsity.json").write_text(json.dumps(record))
    report = write_paper_report(tmp_path).read_text()
    assert "| model / hook | `HuggingFaceTB/SmolLM2-135M-Instruct` / `blocks.9.hook_resid_post` |" in report


@pytest.mark.slow
def test_results_whose_intervals_an_earlier_saelab_made_are_computed_again(tiny_series, tiny_series_run, data_dir,
                                                                            tmp_path, capsys):
    """A result of the same inputs written before the intervals changed (core's read the whole draw's documents,
    or there were none; compute-equivalent's headline took a reused core.json's means) was reused as it was, its
    intervals beside new ones, and the report said so only of a result without any. Each result records how its
    intervals were made (interval_method): one that records none, as an earlier saelab wrote it, is computed again
    with a note naming its file, and said so in the report while it stands; a current one is reused."""
    names = ("core", "compute_equivalent", "ablation_sparsity")
    evals = tmp_path / "out" / "evals"
    argv = ["eval", str(tiny_series_run), "--suite", "paper", "--out", str(tmp_path / "out"), "--series",
            str(tiny_series), "--corpus", str(eval_corpus(data_dir, tmp_path / "eval.jsonl")), "--ce-fit-min-frac",
            "0.1", *for_metrics(SMALL, *names), "--metrics", *names]
    out, _ = run_cli(capsys, *argv)
    assert out == {"report": str(evals / "report.md"), **{m: "ok" for m in names}}
    out, _ = run_cli(capsys, *argv)
    assert out == {"report": str(evals / "report.md"), **{m: "ok (reused)" for m in names}}

    def as_an_earlier_saelab_wrote_them() -> dict[str, bytes]:
        """core as before its intervals existed, compute-equivalent without the record; their files' bytes."""
        for m in ("core", "compute_equivalent"):
            rec = json.loads((evals / f"{m}.json").read_text())
            drop = ("intervals", "interval_groups", "interval_method") if m == "core" else ("interval_method",)
            rec["result"] = {k: v for k, v in rec["result"].items() if k not in drop}
            (evals / f"{m}.json").write_text(json.dumps(rec))
        return {m: (evals / f"{m}.json").read_bytes() for m in names}

    as_an_earlier_saelab_wrote_them()
    out, err = run_cli(capsys, *argv)
    assert out == {"report": str(evals / "report.md"), "core": "ok", "compute_equivalent": "ok",
                   "ablation_sparsity": "ok (reused)"}
    notes = [line for line in err.splitlines() if line.startswith("saelab: note:")]
    assert notes == [f"saelab: note: {evals / 'core.json'} is computed again, not reused: it has no intervals (an "
                     "earlier saelab wrote it, before saelab computed them)",
                     f"saelab: note: {evals / 'compute_equivalent.json'} is computed again, not reused: its intervals "
                     "are an earlier saelab's (it records no interval_method)"]
    from saelab.evals.suite import INTERVAL_METHODS

    again = {m: json.loads((evals / f"{m}.json").read_text()) for m in names}
    assert {m: rec["result"]["interval_method"] for m, rec in again.items()} == {m: INTERVAL_METHODS[m] for m in names}
    assert again["core"]["result"]["intervals"]["delta_ce"]["n_boot"] == 1000
    # compute-equivalent's headline and draws from core's measurement of this run, as when both ran at first
    ce, core = again["compute_equivalent"]["result"], again["core"]["result"]
    assert (ce["spliced_loss"], ce["clean_loss"]) == (core["ce_spliced"], core["ce_clean"])
    assert "earlier saelab" not in (evals / "report.md").read_text()
    out, _ = run_cli(capsys, *argv)
    assert out == {"report": str(evals / "report.md"), **{m: "ok (reused)" for m in names}}
    # Left as they are by a run of another metric, the report says so of them, and of how to compute them anew.
    earlier = as_an_earlier_saelab_wrote_them()
    out, _ = run_cli(capsys, *for_metrics(argv[:-4], "ablation_sparsity"), "--metrics", "ablation_sparsity")
    assert out["ablation_sparsity"] == "ok (reused)"
    assert earlier == {m: (evals / f"{m}.json").read_bytes() for m in names}
    report = (evals / "report.md").read_text()
    assert ("It has no intervals (an earlier saelab wrote it, before saelab computed them); the suite run again "
            "(`--metrics core` for it alone) computes it anew, as this saelab does.") in report
    assert ("Its intervals are an earlier saelab's (it records no interval_method); the suite run again (`--metrics "
            "compute_equivalent` for it alone) computes it anew") in report
    assert report.count("earlier saelab") == 2


@pytest.mark.slow  # ~40 s on 2 cores: three suites and a core eval
def test_the_suite_on_the_sae_training_text_warns_and_records_it(tiny_series_run, tiny_series, data_dir, tmp_path,
                                                                 capsys):
    """`saelab eval RUN` on the text the SAE was trained on warns and records `training text (not held out)`;
    `--suite paper` on it said nothing, and its evals/*.json and evals/report.md read as held out. It gives the
    same warning, once, before the model loads, and each result measured on that text records it, as its report
    says; a result reused from an earlier saelab, which recorded none, gains it."""
    from saelab.evals.core import HELD_OUT_TEXT, TRAINING_TEXT

    run = tmp_path / "run"
    shutil.copytree(tiny_series_run, run)
    trained_on = load_sae(run / "sae").cfg.dataset  # the shipped train split, as the harvest read it
    warning = f"warning: evaluating on {trained_on}, the text the SAE was trained on; the metrics are not held-out"
    small = [*for_metrics(SMALL, "core", "probe", "n2g"), "--sample-pool-tokens", "0"]
    argv = ["eval", str(run), "--suite", "paper", "--metrics", "core", "probe", "n2g", "--corpus", trained_on, *small]
    weightless = tmp_path / "weightless"  # its config and tokenizer pass every check; its load fails
    shutil.copytree(tiny_series / "checkpoint-120", weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    _, err = run_cli(capsys, *argv, "--model", str(weightless), code=2)
    lines = err.splitlines()
    assert lines.index(warning) < next(i for i, line in enumerate(lines) if "cannot load model directory" in line)

    out, err = run_cli(capsys, *argv)
    assert out == {"report": str(run / "evals" / "report.md"), "core": "ok", "probe": "ok", "n2g": "ok"}
    assert err.splitlines().count(warning) == 1
    records = {m: json.loads((run / "evals" / f"{m}.json").read_text()) for m in ("core", "probe", "n2g")}
    assert {m: rec["eval"]["eval_text"] for m, rec in records.items()} == dict.fromkeys(records, TRAINING_TEXT)
    assert json.loads((run / "evals" / "suite.json").read_text())["eval"]["eval_text"] == TRAINING_TEXT
    report = (run / "evals" / "report.md").read_text()
    assert f"`{trained_on}`, {TRAINING_TEXT}, contexts of 32 tokens" in report
    assert ("**Warning:** `core`, `probe` and `n2g` read the text the SAE was trained on: their numbers are not "
            "held-out.") in report
    assert report.count(f" s on {TRAINING_TEXT}; definitions and schema") == 3
    # core eval's record of the same text: the same label
    out, err = run_cli(capsys, "eval", str(run), "--corpus", trained_on, "--sample-pool-tokens", "0",
                       "--recon-tokens", "1024", "--downstream-tokens", "992", "--no-progress")
    assert out["eval_text"] == TRAINING_TEXT and warning in err.splitlines()

    # a result an earlier saelab wrote, without the record: reused, it gains it
    core = run / "evals" / "core.json"
    core.write_text(json.dumps({**records["core"], "eval": {k: v for k, v in records["core"]["eval"].items()
                                                            if k != "eval_text"}}))
    out, err = run_cli(capsys, *argv)
    assert out["core"] == "ok (reused)" and err.splitlines().count(warning) == 1
    assert json.loads(core.read_text())["eval"]["eval_text"] == TRAINING_TEXT

    held_out = ["--corpus", str(eval_corpus(data_dir, tmp_path / "eval.jsonl")), "--out", str(tmp_path / "held-out")]
    out, err = run_cli(capsys, *argv[:5], "core", *held_out, *for_metrics(small, "core"))
    assert out["core"] == "ok" and "the text the SAE was trained on" not in err
    assert json.loads((tmp_path / "held-out" / "evals" / "core.json").read_text())["eval"]["eval_text"] == HELD_OUT_TEXT
    report = (tmp_path / "held-out" / "evals" / "report.md").read_text()
    assert "**Warning:**" not in report and f" s on {HELD_OUT_TEXT}; definitions" in report


def test_a_probe_of_hub_tasks_alone_reads_no_eval_text(tiny_series_run):
    """The probe's Hugging Face tasks bring their own texts: a suite of such a probe alone reads none of the eval
    corpus, and the training text's warning and record are not for it."""
    from saelab.evals.config import EvalConfig, PaperSuiteConfig, ProbeConfig
    from saelab.evals.suite import suite_reads_eval_text

    sae = load_sae(tiny_series_run / "sae")
    hub_only = PaperSuiteConfig(metrics=("probe",), probe=ProbeConfig(tasks=(), hf_tasks=("imdb",)))
    assert not suite_reads_eval_text(sae, sae.cfg.model_name, hub_only, EvalConfig(), 32)
    assert suite_reads_eval_text(sae, sae.cfg.model_name, replace(hub_only, probe=ProbeConfig()), EvalConfig(), 32)


def test_a_probe_of_hub_tasks_alone_records_only_what_it_reads(data_dir, tmp_path):
    """A probe of Hugging Face tasks alone reads none of the eval corpus's contexts, yet its inputs recorded the
    corpus, how the contexts were drawn and how many: another --corpus, --sample-pool-tokens or --probe-contexts
    refused its result as of other settings (with --overwrite, computed it again to the same numbers). Its inputs
    leave them out; such a record an earlier saelab wrote, with them, is judged by the rest (reused where the rest is
    the same), and a probe that reads the eval text is judged by it as before."""
    from saelab.errors import RunExistsError
    from saelab.evals import suite
    from saelab.evals.config import EvalConfig, PaperSuiteConfig, ProbeConfig
    from saelab.sae.topk import SAEConfig, TopKSAE

    model = "EleutherAI/pythia-70m"
    sae = TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2, hook_name="blocks.0.hook_resid_post", model_name=model,
                            context_size=16))
    a, b = eval_corpus(data_dir, tmp_path / "a.jsonl"), eval_corpus(data_dir, tmp_path / "b.jsonl", n=5)
    hub = PaperSuiteConfig(metrics=("probe",), probe=ProbeConfig(tasks=(), hf_tasks=("imdb",)))
    tokens = replace(hub, probe=ProbeConfig(hf_tasks=("imdb",)))  # the token tasks too: they read the eval text

    def inputs(cfg: PaperSuiteConfig, ev: EvalConfig) -> dict:
        run, wanted, reasons = suite._suite_run(None, sae, model, tmp_path, cfg, ev, 16)
        run.sae_hash = suite.sae_sha256(sae)
        return suite._inputs(run, wanted[0], suite._base_inputs(run))

    def refusal(recorded: dict, cfg: PaperSuiteConfig, ev: EvalConfig) -> str | None:
        (tmp_path / "evals").mkdir(exist_ok=True)
        (tmp_path / "evals" / "probe.json").write_text(json.dumps({"status": "ok", "inputs": recorded}))
        try:
            suite.check_results_before_load(sae, model, cfg, ev, 16, tmp_path)
        except RunExistsError as e:
            return re.search(r"other settings: (.*); pass --overwrite", str(e))[1]
        return None

    unread = {"corpus", "corpus_fingerprint", "sample_pool_tokens", "draw_pool", "n_contexts"}
    at_a = EvalConfig(corpus=str(a))
    others = (EvalConfig(corpus=str(b)), EvalConfig(corpus=str(a), sample_pool_tokens=0))
    rec = inputs(hub, at_a)
    earlier = {**inputs(tokens, at_a), "config": rec["config"]}  # as an earlier saelab recorded the same probe
    before_pools = {k: v for k, v in earlier.items() if k != "draw_pool"}  # and one before draw_pool was recorded
    for recorded in (rec, earlier, before_pools):
        for cfg, ev in ((hub, at_a), *((hub, ev) for ev in others), (replace(hub, probe_contexts=64), at_a)):
            assert refusal(recorded, cfg, ev) is None and suite._reusable({"status": "ok", "inputs": recorded},
                                                                          inputs(cfg, ev))
        done = {"status": "ok", "inputs": recorded, "result": {"interval_method": suite.INTERVAL_METHODS["probe"]}}
        assert suite.earlier_computation(done, "probe") is None  # reused, not computed again
        assert refusal(recorded, replace(hub, probe=ProbeConfig(tasks=(), hf_tasks=("imdb",), l2=0.1)), at_a) == \
            "probe (probe.l2 0.001 -> 0.1)"  # what it reads: named alone
    named = refusal(rec, tokens, at_a)  # the token tasks added, named alone
    assert named.startswith("probe (probe.tasks [] -> [") and named.count(" -> ") == 1, named
    assert not unread & set(rec) and unread <= set(earlier)
    read = inputs(tokens, at_a)
    assert refusal(read, tokens, others[0]) == f'probe (eval.corpus "{a.resolve()}" -> "{b.resolve()}")'
    assert refusal(read, tokens, others[1]) == "probe (eval.sample_pool_tokens 4194304 -> 0)"


def _refused_then_measured_anew(capsys, monkeypatch, argv, path, rec, fingerprint, named):
    """After an input of core's result ``rec`` in ``path`` changed in place: the suite refuses it before the model
    loads, naming the input as ``named``, and keeps the file; --overwrite measures it anew (another ``fingerprint``,
    another clean loss); the same command then reuses it. Returns the new record."""
    import saelab.pipeline

    before = path.read_bytes()
    load_model = saelab.pipeline.load_model
    monkeypatch.setattr(saelab.pipeline, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    _, err = run_cli(capsys, *argv, code=2)
    assert (f"holds results of this SAE with other settings: core ({named}); pass --overwrite" in err
            and path.read_bytes() == before)
    monkeypatch.setattr(saelab.pipeline, "load_model", load_model)
    out, _ = run_cli(capsys, *argv, "--overwrite")
    again = json.loads(path.read_text())
    assert out["core"] == "ok" and again["inputs"][fingerprint] != rec["inputs"][fingerprint]
    assert again["result"]["ce_clean"] != rec["result"]["ce_clean"]  # measured on the input as it is now
    out, _ = run_cli(capsys, *argv)
    assert out["core"] == "ok (reused)"
    return again


def test_results_of_an_eval_corpus_edited_since_are_not_reused(tiny_series_run, data_dir, tmp_path, capsys,
                                                               monkeypatch):
    """Results recorded the eval corpus by its path alone: after the file was edited in place (same path, same
    size) the suite reused the results of its old text as of the new one. They record its fingerprint: one of other
    text is refused before the model loads, naming the corpus as changed, and replaced with --overwrite; a result
    an earlier saelab wrote, without the fingerprint, is judged by its other inputs as before."""

    corpus = eval_corpus(data_dir, tmp_path / "eval.jsonl")
    argv = ["eval", str(tiny_series_run), "--suite", "paper", "--out", str(tmp_path / "out"), "--corpus", str(corpus),
            *for_metrics(SMALL, "core"), "--metrics", "core"]
    out, _ = run_cli(capsys, *argv)
    path = tmp_path / "out" / "evals" / "core.json"
    rec = json.loads(path.read_text())
    assert out["core"] == "ok" and rec["inputs"]["corpus_fingerprint"]["bytes"] == corpus.stat().st_size
    text = corpus.read_text()
    edited = text.replace(" the ", " and ")  # the same size, other text
    corpus.write_text(edited)
    assert edited != text and len(edited.encode()) == len(text.encode())
    again = _refused_then_measured_anew(capsys, monkeypatch, argv, path, rec, "corpus_fingerprint",
                                       f"--corpus {corpus.resolve()} (its text changed since)")
    # as an earlier saelab wrote it: no fingerprint, judged by the other inputs
    del again["inputs"]["corpus_fingerprint"]
    path.write_text(json.dumps(again))
    out, _ = run_cli(capsys, *argv)
    assert out["core"] == "ok (reused)"
    from saelab.evals.suite import _input_changes

    old = again["inputs"]
    other_text = {**old, "corpus_fingerprint": {"bytes": 1, "sha256": "0" * 64}}
    assert _input_changes("core", other_text, rec["inputs"]) == [f"eval.corpus {corpus.resolve()} (its text changed "
                                                                 "since)"]
    assert _input_changes("core", {**other_text, "corpus": "/elsewhere/eval.jsonl"}, rec["inputs"]) == [
        f'eval.corpus "/elsewhere/eval.jsonl" -> "{corpus.resolve()}"']  # another file: named by its path alone
    assert _input_changes("core", old, rec["inputs"]) == []


def test_the_eval_corpus_typed_another_way_reuses_the_results(tiny_series_run, data_dir, tmp_path, capsys,
                                                              monkeypatch):
    """`--corpus eval.jsonl`, then `--corpus ./eval.jsonl` or its absolute path, the file unchanged: core's record
    holds the eval settings as typed (its config) beside the corpus's absolute path and fingerprint, and the words
    typed were compared: the same file was refused as other settings (`--corpus eval.jsonl -> ./eval.jsonl`). The
    corpus is compared by what it is; another file of that name is still refused, and a result an earlier saelab
    wrote (no fingerprint) is judged by the corpus's path and the words that named it."""
    from saelab.evals.suite import _input_changes

    eval_corpus(data_dir, tmp_path / "eval.jsonl")
    monkeypatch.chdir(tmp_path)
    argv = ["eval", str(tiny_series_run), "--suite", "paper", "--out", str(tmp_path / "out"),
            *for_metrics(SMALL, "core"), "--metrics", "core"]
    out, _ = run_cli(capsys, *argv, "--corpus", "eval.jsonl")
    path = tmp_path / "out" / "evals" / "core.json"
    written = path.read_bytes()
    assert out["core"] == "ok" and json.loads(written)["inputs"]["config"]["corpus"] == "eval.jsonl"
    for typed in ("./eval.jsonl", str(tmp_path / "eval.jsonl")):
        out, _ = run_cli(capsys, *argv, "--corpus", typed)
        assert out["core"] == "ok (reused)" and path.read_bytes() == written, typed
    old = json.loads(written)["inputs"]
    new = {**old, "config": {**old["config"], "corpus": "./eval.jsonl"}}
    earlier = {k: v for k, v in old.items() if k != "corpus_fingerprint"}  # as an earlier saelab wrote it
    assert _input_changes("core", old, new) == []
    assert _input_changes("core", earlier, new) == ['eval.corpus "eval.jsonl" -> "./eval.jsonl"']
    elsewhere = {**new, "corpus": str(tmp_path / "b" / "eval.jsonl")}  # another file of that name: named once
    assert _input_changes("core", earlier, elsewhere) == [f'eval.corpus "{tmp_path / "eval.jsonl"}" -> '
                                                          f'"{tmp_path / "b" / "eval.jsonl"}"']


@pytest.mark.slow  # ~20 s on 2 cores: three suites of compute-equivalent
def test_a_failed_recompute_of_an_earlier_saelabs_result_keeps_it(tiny_series, tiny_series_run, data_dir, tmp_path,
                                                                  capsys):
    """A result whose intervals an earlier saelab made is computed again; when that fails (a checkpoint of the
    series cannot be loaded), its ok file was replaced with the error record, as a metric failing at first is: the
    numbers were lost. The earlier file is kept as it was, the error says so in one line, and the report still
    names its intervals as an earlier saelab's. A first failure still records its error."""
    series = tmp_path / "series"  # three of its checkpoints: fewer to load
    recorded = json.loads((tiny_series / "series.json").read_text())
    recorded["checkpoints"] = [c for c in recorded["checkpoints"] if c["step"] in (20, 60, 120)]
    for c in recorded["checkpoints"]:
        shutil.copytree(tiny_series / c["path"], series / c["path"])
    (series / "series.json").write_text(json.dumps(recorded))
    evals = tmp_path / "out" / "evals"
    argv = ["eval", str(tiny_series_run), "--suite", "paper", "--out", str(tmp_path / "out"), "--series", str(series),
            "--corpus", str(eval_corpus(data_dir, tmp_path / "eval.jsonl")), "--ce-fit-min-frac", "0.1",
            *for_metrics(SMALL, "compute_equivalent"), "--metrics", "compute_equivalent"]
    out, _ = run_cli(capsys, *argv)
    assert out["compute_equivalent"] == "ok"
    path = evals / "compute_equivalent.json"
    rec = json.loads(path.read_text())
    rec["result"] = {k: v for k, v in rec["result"].items() if k != "interval_method"}  # as an earlier saelab
    path.write_text(json.dumps(rec))
    earlier = path.read_bytes()
    (evals / "series_losses.json").unlink()  # each checkpoint's loss is measured again ...
    for weights in (series / "checkpoint-20").glob("*.safetensors"):  # ... and one cannot be loaded
        weights.unlink()
    _, err = run_cli(capsys, *argv, code=2)
    assert json.loads(path.read_text())["status"] == "ok" and path.read_bytes() == earlier
    line = err.strip().splitlines()[-1]
    assert "failed in 1 metric(s): compute_equivalent: ModelLoadError: cannot load model directory" in line
    assert line.endswith("; the earlier result in evals/compute_equivalent.json is kept as it was, though its "
                         "intervals are an earlier saelab's (it records no interval_method)"), line
    report = (evals / "report.md").read_text()
    assert ("Its intervals are an earlier saelab's (it records no interval_method); it is kept as it was, as "
            "computing it again failed (below).") in report
    assert "| ok (earlier result; recompute failed: ModelLoadError: cannot load model directory" in report
    path.unlink()  # a first failure: its error recorded
    run_cli(capsys, *argv, code=2)
    assert json.loads(path.read_text())["status"] == "error"


def test_results_of_a_model_folder_replaced_since_are_not_reused(tiny_series, tiny_series_run, data_dir, tmp_path,
                                                                 capsys, monkeypatch):
    """Results recorded a local model by its path alone: after other weights were saved into its folder (a
    fine-tuning writing where it read) the suite reused the results of the old weights. They record the weights'
    fingerprint: other weights are refused before the model loads, naming the model as changed, and measured with
    --overwrite; a result an earlier saelab wrote, without the fingerprint, is judged by the model's path as
    before."""
    from saelab.evals.suite import _input_changes

    model = tmp_path / "model"
    shutil.copytree(tiny_series / "checkpoint-120", model)
    argv = ["eval", str(tiny_series_run), "--suite", "paper", "--out", str(tmp_path / "out"), "--model", str(model),
            "--corpus", str(eval_corpus(data_dir, tmp_path / "eval.jsonl")), *for_metrics(SMALL, "core"),
            "--metrics", "core"]
    out, _ = run_cli(capsys, *argv)
    path = tmp_path / "out" / "evals" / "core.json"
    rec = json.loads(path.read_text())
    assert out["core"] == "ok" and rec["inputs"]["model_fingerprint"]["bytes"] == (
        model / "model.safetensors").stat().st_size
    shutil.copyfile(tiny_series / "checkpoint-60" / "model.safetensors", model / "model.safetensors")  # in place
    again = _refused_then_measured_anew(capsys, monkeypatch, argv, path, rec, "model_fingerprint",
                                       f"--model {model} (its weights changed since)")
    del again["inputs"]["model_fingerprint"]  # as an earlier saelab wrote it: judged by the other inputs
    path.write_text(json.dumps(again))
    out, _ = run_cli(capsys, *argv)
    assert out["core"] == "ok (reused)"
    assert _input_changes("core", again["inputs"], rec["inputs"]) == []
    other = {**rec["inputs"], "model": "/elsewhere/model"}  # another folder: named by its path alone
    assert _input_changes("core", other, rec["inputs"]) == [
        f'model "/elsewhere/model" -> "{model}"']


def as_an_earlier_saelab_wrote_it(path: Path, **result) -> bytes:
    """``path``'s result without its interval_method, as an earlier saelab wrote it (``result``: numbers told apart
    from any measured now); the file's bytes."""
    rec = json.loads(path.read_text())
    rec["result"] = {**{k: v for k, v in rec["result"].items() if k != "interval_method"}, **result}
    path.write_text(json.dumps(rec))
    return path.read_bytes()


def frequencies_in_the_way(evals: Path) -> None:
    """A folder where core saves latent_frequencies.safetensors: its write fails (IsADirectoryError), after core's
    measurement, as a full disk would make it fail."""
    frequencies = evals / "latent_frequencies.safetensors"
    frequencies.unlink()
    (frequencies / "in the way").mkdir(parents=True)


@pytest.mark.slow  # ~70 s under load: two suites of core and compute-equivalent
def test_a_failed_core_recompute_lends_no_earlier_means_to_compute_equivalent(tiny_series, tiny_series_run, data_dir,
                                                                               tmp_path, capsys):
    """core.json of an earlier saelab is computed again; where that fails once its losses were measured (saving the
    latent frequencies fails), the earlier file is kept, and its result was handed on as this run's core:
    compute-equivalent took the kept file's spliced and clean means beside the per-context sums measured now, the
    mix of two measurements its comment rules out. It measures both again, as after a reused core.json."""
    evals = tmp_path / "out" / "evals"
    names = ("core", "compute_equivalent")
    argv = ["eval", str(tiny_series_run), "--suite", "paper", "--out", str(tmp_path / "out"), "--series",
            str(tiny_series), "--corpus", str(eval_corpus(data_dir, tmp_path / "eval.jsonl")), "--ce-fit-min-frac",
            "0.1", *for_metrics(SMALL, *names), "--metrics", *names]
    out, _ = run_cli(capsys, *argv)
    assert out["core"] == out["compute_equivalent"] == "ok"
    first = json.loads((evals / "compute_equivalent.json").read_text())["result"]
    kept = as_an_earlier_saelab_wrote_it(evals / "core.json", ce_spliced=99.0, ce_clean=98.0)
    (evals / "compute_equivalent.json").unlink()  # computed again (each checkpoint's loss kept in series_losses)
    frequencies_in_the_way(evals)
    out, err = run_cli(capsys, *argv, code=2)
    assert (evals / "core.json").read_bytes() == kept
    assert "failed in 1 metric(s): core: IsADirectoryError: " in err
    ce = json.loads((evals / "compute_equivalent.json").read_text())
    assert ce["status"] == "ok"
    assert (ce["result"]["spliced_loss"], ce["result"]["clean_loss"]) != (99.0, 98.0)
    assert ce["result"]["spliced_loss"] == pytest.approx(first["spliced_loss"], abs=1e-4)
    assert ce["result"]["clean_loss"] == pytest.approx(first["clean_loss"], abs=1e-4)


@pytest.mark.slow  # ~25 s under load: two suites of core
def test_the_report_names_a_kept_result_whose_recompute_failed(tiny_series_run, data_dir, tmp_path, capsys):
    """After a failed recompute of an earlier saelab's core.json, suite.json said "error" while report.md showed
    core "ok", drawn from the kept file, with a note that running the suite again computes it anew. The summary
    says it is the earlier result and that computing it again failed, the section gives the error line."""
    evals = tmp_path / "out" / "evals"
    argv = ["eval", str(tiny_series_run), "--suite", "paper", "--out", str(tmp_path / "out"), "--corpus",
            str(eval_corpus(data_dir, tmp_path / "eval.jsonl")), *for_metrics(SMALL, "core"), "--metrics", "core"]
    run_cli(capsys, *argv)
    as_an_earlier_saelab_wrote_it(evals / "core.json")
    frequencies_in_the_way(evals)
    _, err = run_cli(capsys, *argv, code=2)
    entry = json.loads((evals / "suite.json").read_text())["metrics"]["core"]
    assert entry["status"] == "error" and entry["reason"].startswith("IsADirectoryError: ")
    report = (evals / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| Core"))
    error = entry["reason"].split("; the earlier result in")[0]
    assert entry["recompute_error"] == error
    assert f"| ok (earlier result; recompute failed: {error}) |" in row, row
    section = report.split("## Core", 1)[1]
    assert ("Its intervals are an earlier saelab's (it records no interval_method); it is kept as it was, as "
            f"computing it again failed (below).\n\nComputing it again failed: {error}\n") in section, section
    assert "computes it anew" not in report


def test_an_earlier_record_without_the_fingerprint_compares_the_corpus_as_typed(tiny_series_run, data_dir, tmp_path,
                                                                                capsys, monkeypatch):
    """A core.json an earlier saelab wrote records no fingerprint of the corpus's text: only its path and the words
    typed (core's config) tell the text. The words were dropped from the comparison for it too, so the file's text
    replaced since, typed another way (`./eval.jsonl`), reused the results of the text before. Records with the
    fingerprint drop the words; records without it compare them as before."""
    from saelab.evals.suite import _input_changes

    corpus = eval_corpus(data_dir, tmp_path / "eval.jsonl")
    monkeypatch.chdir(tmp_path)
    argv = ["eval", str(tiny_series_run), "--suite", "paper", "--out", str(tmp_path / "out"),
            *for_metrics(SMALL, "core"), "--metrics", "core"]
    run_cli(capsys, *argv, "--corpus", "eval.jsonl")
    path = tmp_path / "out" / "evals" / "core.json"
    rec = json.loads(path.read_text())
    del rec["inputs"]["corpus_fingerprint"]  # as an earlier saelab wrote it
    path.write_text(json.dumps(rec))
    earlier = path.read_bytes()
    eval_corpus(data_dir, tmp_path / "other.jsonl", n=9).replace(corpus)  # the file's text replaced since
    _, err = run_cli(capsys, *argv, "--corpus", "./eval.jsonl", code=2)
    assert 'holds results of this SAE with other settings: core (--corpus "eval.jsonl" -> "./eval.jsonl")' in err
    assert path.read_bytes() == earlier
    new = {**rec["inputs"], "config": {**rec["inputs"]["config"], "corpus": "./eval.jsonl"}}
    assert _input_changes("core", rec["inputs"], new) == ['eval.corpus "eval.jsonl" -> "./eval.jsonl"']


def test_another_file_of_the_corpus_name_is_named_as_the_corpus_option(tiny_series_run, data_dir, tmp_path, capsys,
                                                                       monkeypatch):
    """`cd A; --corpus ev.jsonl`, then `cd B; --corpus ev.jsonl`: the refusal named the corpus `corpus "…/A/ev.jsonl"
    -> "…/B/ev.jsonl"`, the inputs' key, where an edited file is `--corpus …/ev.jsonl (its text changed since)` and
    every other setting its option."""
    for folder, n in (("A", 6), ("B", 7)):
        (tmp_path / folder).mkdir()
        eval_corpus(data_dir, tmp_path / folder / "ev.jsonl", n=n)
    argv = ["eval", str(tiny_series_run), "--suite", "paper", "--out", str(tmp_path / "out"),
            *for_metrics(SMALL, "core"), "--metrics", "core", "--corpus", "ev.jsonl"]
    monkeypatch.chdir(tmp_path / "A")
    run_cli(capsys, *argv)
    monkeypatch.chdir(tmp_path / "B")
    _, err = run_cli(capsys, *argv, code=2)
    assert re.search(r'other settings: core \(--corpus "\S*A/ev\.jsonl" -> "\S*B/ev\.jsonl"\); pass --overwrite',
                     err), err


@pytest.mark.slow  # ~30 s under load: four probes and a whole suite
def test_a_recompute_that_measures_nothing_says_it_replaced_the_earlier_result(tiny_series_run, data_dir, tmp_path,
                                                                               capsys):
    """A probe.json of the earlier split method is computed again; under this saelab's split every task may be
    skipped. That verdict replaces the earlier ok file (a failure to compute keeps it): the error line says it
    replaced the earlier result, where it was silent, and so does the note of a suite that does not name probe."""
    evals = tmp_path / "out" / "evals"
    argv = ["eval", str(tiny_series_run), "--suite", "paper", "--out", str(tmp_path / "out"), "--corpus",
            str(eval_corpus(data_dir, tmp_path / "eval.jsonl")), *for_metrics(SMALL, "probe"), "--metrics", "probe"]
    run_cli(capsys, *replaced(argv, "--out", str(tmp_path / "measured")))
    measured = json.loads((tmp_path / "measured" / "evals" / "probe.json").read_text())["result"]
    nothing = replaced(argv, "--probe-contexts", "1")
    run_cli(capsys, *nothing, code=2)
    rec = json.loads((evals / "probe.json").read_text())
    assert rec["status"] == "error" and rec["reason"].startswith("every task was skipped")
    del rec["inputs"]["method"]  # an ok result of these settings, as the earlier split method computed it
    earlier = json.dumps({**rec, "status": "ok", "reason": None, "result": measured})
    (evals / "probe.json").write_text(earlier)
    _, err = run_cli(capsys, *nothing, code=2)
    line = err.strip().splitlines()[-1]
    assert "failed in 1 metric(s): probe: every task was skipped" in line
    assert line.endswith("; it replaced the earlier result in evals/probe.json, as an earlier saelab computed it "
                         f"another way (it records no method; this saelab's: 'splits: {PROBE_SPLIT}')"), line
    assert json.loads((evals / "probe.json").read_text())["status"] == "error"
    (evals / "probe.json").write_text(earlier)  # a suite that does not name probe: skipped, said in a note
    out, err = run_cli(capsys, *argv[:8], *replaced(SMALL, "--probe-contexts", "1"))
    assert out["probe"] == "skipped"
    notes = [line for line in err.splitlines() if line.startswith(f"saelab: note: {evals / 'probe.json'}: every")]
    assert len(notes) == 1 and "; it replaced the earlier result in evals/probe.json, as an earlier saelab" in \
        notes[0], err
    assert "it replaced the earlier result" in json.loads((evals / "suite.json").read_text())["metrics"]["probe"][
        "reason"]


def earlier_folder_fingerprint(folder: Path) -> dict:
    """A corpus folder's fingerprint as saelab took it before it marked how each file is read: its files' sha256s
    alone, in name order (one file: its own)."""
    import hashlib

    files = sorted(folder.iterdir())
    digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    digest = digests[0] if len(digests) == 1 else hashlib.sha256("\n".join(digests).encode()).hexdigest()
    return {"bytes": sum(f.stat().st_size for f in files), "sha256": digest}


@pytest.mark.slow  # ~30 s under load: a suite of core and a core eval
def test_a_corpus_folder_whose_file_is_read_otherwise_is_not_reused(tiny_series_run, data_dir, tmp_path, capsys):
    """A folder's fingerprint hashed its files' bytes alone: part.jsonl renamed part.txt (the same bytes, read as one
    plain-text document) reused the results of the JSON lines' text. The fingerprint marks how each file is read;
    a record of the earlier fingerprint is compared as it was taken, so an upgrade refuses none as edited. `eval SAE
    --out` (metrics.json's eval_as_read) too."""
    fold = tmp_path / "fold"
    fold.mkdir()
    eval_corpus(data_dir, fold / "part.jsonl")
    argv = ["eval", str(tiny_series_run), "--suite", "paper", "--out", str(tmp_path / "out"), "--corpus", str(fold),
            *for_metrics(SMALL, "core"), "--metrics", "core"]
    run_cli(capsys, *argv)
    path = tmp_path / "out" / "evals" / "core.json"
    rec = json.loads(path.read_text())
    (fold / "part.jsonl").rename(fold / "part.txt")
    _, err = run_cli(capsys, *argv, code=2)
    assert f"other settings: core (--corpus {fold} (its text changed since)); pass --overwrite" in err, err
    (fold / "part.txt").rename(fold / "part.jsonl")
    out, _ = run_cli(capsys, *argv)
    assert out["core"] == "ok (reused)"
    rec["inputs"]["corpus_fingerprint"] = earlier_folder_fingerprint(fold)  # as the earlier fingerprint recorded it
    path.write_text(json.dumps(rec))
    out, _ = run_cli(capsys, *argv)
    assert out["core"] == "ok (reused)"
    ev = ["eval", str(tiny_series_run / "sae"), "--out", str(tmp_path / "ev"), "--corpus", str(fold),
          "--recon-tokens", "1024", "--downstream-tokens", "992", "--no-progress"]
    run_cli(capsys, *ev)
    metrics = tmp_path / "ev" / "metrics.json"
    rec = json.loads(metrics.read_text())
    rec["eval_as_read"]["corpus_fingerprint"] = earlier_folder_fingerprint(fold)
    metrics.write_text(json.dumps(rec))
    _, err = run_cli(capsys, *ev)
    assert "already holds this evaluation" in err and json.loads(metrics.read_text()) == rec


def small_run(tiny_dir: Path, run: Path) -> Path:
    """A run folder of a random SAE on tiny_dir's blocks.0 (context 32), not yet evaluated."""
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    torch.manual_seed(0)
    save_sae(TopKSAE(SAEConfig(d_in=64, n_latents=32, k=4, hook_name="blocks.0.hook_resid_post",
                               model_name=str(tiny_dir), context_size=32)), run / "sae")
    return run


def test_a_result_of_another_model_dtype_is_not_reused(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    """The suite's results recorded no model dtype (but compute-equivalent's references): a float32 core.json was
    reused by `--model-dtype bfloat16`, whose numbers differ. Each result records the dtype the model is in (one
    given loaded: its own): another is refused before the model loads, named as the option, and measured anew with
    --overwrite. `--model-dtype` ran the suite in bfloat16 before it was recorded, so a result an earlier saelab
    wrote, without it, is computed again with a note, and the report says so of it while it stands."""
    import saelab.pipeline
    from saelab.evals.config import EvalConfig, PaperSuiteConfig
    from saelab.models import load_model
    from saelab.pipeline import paper_suite
    from saelab.report.paper import write_paper_report

    run = small_run(tiny_dir, tmp_path / "run")
    corpus = eval_corpus(data_dir, tmp_path / "eval.jsonl")
    argv = ["eval", str(run), "--suite", "paper", "--metrics", "core", "--corpus", str(corpus), "--recon-tokens",
            "256", "--downstream-tokens", "248", "--no-progress"]
    path = run / "evals" / "core.json"
    out, _ = run_cli(capsys, *argv)
    f32 = json.loads(path.read_text())
    assert out["core"] == "ok" and f32["inputs"]["model_dtype"] == "float32"
    load = saelab.pipeline.load_model
    monkeypatch.setattr(saelab.pipeline, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    _, err = run_cli(capsys, *argv, "--model-dtype", "bfloat16", code=2)
    assert 'holds results of this SAE with other settings: core (--model-dtype "float32" -> "bfloat16"); pass ' \
           "--overwrite" in err, err
    monkeypatch.setattr(saelab.pipeline, "load_model", load)
    out, _ = run_cli(capsys, *argv, "--model-dtype", "bfloat16", "--overwrite")
    bf16 = json.loads(path.read_text())
    assert out["core"] == "ok" and bf16["inputs"]["model_dtype"] == "bfloat16"
    assert bf16["result"]["ce_clean"] != f32["result"]["ce_clean"]
    # From Python, a model given loaded in bfloat16 is in its own dtype, whatever model_dtype says: reused.
    index = paper_suite(run, lm=load_model(str(tiny_dir), dtype="bfloat16"),
                        eval_cfg=EvalConfig(corpus=str(corpus), recon_tokens=256, downstream_tokens=248),
                        cfg=PaperSuiteConfig(metrics=("core",)), progress=False)
    assert index["metrics"]["core"]["reused"] and json.loads(path.read_text()) == bf16
    del bf16["inputs"]["model_dtype"]  # as an earlier saelab wrote it
    path.write_text(json.dumps(bf16))
    unknown = "an earlier saelab computed it without recording the dtype its model was loaded in"
    assert f"{unknown[0].upper()}{unknown[1:]}" in write_paper_report(run).read_text()
    out, err = run_cli(capsys, *argv)  # in float32: computed again, not refused
    assert out["core"] == "ok" and f"saelab: note: {path} is computed again, not reused: {unknown}" in err, err
    assert json.loads(path.read_text())["inputs"]["model_dtype"] == "float32"
    assert json.loads(path.read_text())["result"]["ce_clean"] == f32["result"]["ce_clean"]
    assert "earlier saelab" not in (run / "evals" / "report.md").read_text()


@pytest.mark.slow  # 8-17 s, a suite run three times
def test_core_is_not_reused_where_another_metrics_contexts_change_its_draw(tiny_dir, data_dir, tmp_path, capsys,
                                                                           monkeypatch):
    """Every metric reads the first contexts of one draw, which picks among sample_pool_tokens // T contexts, or
    among as many as it draws where that is more: with a small pool, --probe-contexts changed which contexts core
    read, and core.json was reused as of them. Each result records how many its draw picked among (draw_pool):
    another is refused before the model loads, named, and measured anew with --overwrite; a pool that holds every
    context drawn (the default), or the first contexts in order (0), still reuses it."""
    import saelab.pipeline
    from saelab.evals.suite import earlier_computation

    run = small_run(tiny_dir, tmp_path / "run")
    path = run / "evals" / "core.json"
    argv = ["eval", str(run), "--suite", "paper", "--corpus", str(eval_corpus(data_dir, tmp_path / "eval.jsonl")),
            "--recon-tokens", "256", "--downstream-tokens", "248", "--no-progress"]
    probe = ["--metrics", "core", "probe", "--probe-contexts", "12", "--probe-min-per-class", "2",
             "--probe-max-examples", "40"]
    for pool in ([], ["--sample-pool-tokens", "0"]):  # core's 9 contexts are the same beside the probe's 12
        shutil.rmtree(run / "evals", ignore_errors=True)
        out, _ = run_cli(capsys, *argv, *pool, "--metrics", "core")
        assert out["core"] == "ok"
        out, _ = run_cli(capsys, *argv, *pool, *probe)
        assert out["core"] == "ok (reused)", pool
    pool = ["--sample-pool-tokens", "128"]  # 4 contexts of 32 tokens: core's 9 drawn among 9, beside the probe among 12
    shutil.rmtree(run / "evals")
    run_cli(capsys, *argv, *pool, "--metrics", "core")
    alone = json.loads(path.read_text())
    assert alone["inputs"]["draw_pool"] == 9
    load = saelab.pipeline.load_model
    monkeypatch.setattr(saelab.pipeline, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    _, err = run_cli(capsys, *argv, *pool, *probe, code=2)
    assert ("holds results of this SAE with other settings: core (contexts drawn among 9 -> 12 (more than "
            "--sample-pool-tokens 128 holds: 4 of 32 tokens)); pass --overwrite") in err, err
    monkeypatch.setattr(saelab.pipeline, "load_model", load)
    out, _ = run_cli(capsys, *argv, *pool, *probe, "--overwrite")
    beside = json.loads(path.read_text())
    assert out["core"] == "ok" and beside["inputs"]["draw_pool"] == 12
    assert beside["result"]["nmse"] != alone["result"]["nmse"]  # other contexts
    out, _ = run_cli(capsys, *argv, *pool, *probe)
    assert out == {"report": str(run / "evals" / "report.md"), "core": "ok (reused)", "probe": "ok (reused)"}
    del beside["inputs"]["draw_pool"]  # as an earlier saelab wrote it: computed again, with a note
    assert earlier_computation(beside, "core") == ("an earlier saelab computed it without recording how many contexts "
                                                   "its draw picked among (with a small --sample-pool-tokens, the other "
                                                   "metrics' contexts chose its own)")


def test_a_probe_of_hub_tasks_alone_draws_no_contexts(data_dir, gpt2_tokenizer, tmp_path):
    """A probe of Hugging Face tasks alone reads none of the eval corpus's contexts, yet the suite drew
    --probe-contexts of them: a corpus too short for those was refused, and the count widened the draw the other
    metrics read theirs from. The suite draws what the metrics that read the eval text ask for alone."""
    from saelab.evals import suite
    from saelab.evals.config import EvalConfig, PaperSuiteConfig, ProbeConfig
    from saelab.sae.topk import SAEConfig, TopKSAE

    model = "gpt2"
    sae = TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2, hook_name="blocks.0.hook_resid_post", model_name=model,
                            context_size=16))
    ev = EvalConfig(corpus=str(eval_corpus(data_dir, tmp_path / "a.jsonl", n=2)), recon_tokens=60,
                    downstream_tokens=30)
    hub = PaperSuiteConfig(metrics=("core", "probe"), probe_contexts=100_000,
                           probe=ProbeConfig(tasks=(), hf_tasks=("imdb",)))
    run = suite._suite_run(None, sae, model, tmp_path, hub, ev, 16)[0]
    assert run.n_drawn == 4  # core's 60 tokens in contexts of 15 predictions
    drawn = suite.read_suite_contexts(sae, model, hub, ev, gpt2_tokenizer, gpt2_tokenizer.bos_token_id, 16)
    assert drawn.tokens.shape == (4, 16)


def test_a_probe_of_hub_tasks_alone_reads_no_corpus(gpt2_tokenizer, tiny_gpt2, tmp_path):
    """The suite of such a probe alone drew one context all the same: it tokenized the eval pool and refused a corpus
    shorter than a context (naming eval.context_size, which the probe does not read). It reads none, and the probe
    runs its texts' tasks on no token contexts."""
    from saelab.evals import suite
    from saelab.evals.config import EvalConfig, PaperSuiteConfig, ProbeConfig
    from saelab.evals.probe import run_probe
    from saelab.evals.probe_tasks import ContextTask
    from saelab.sae.topk import SAEConfig, TopKSAE

    sae = TopKSAE(SAEConfig(d_in=64, n_latents=32, k=4, hook_name="blocks.1.hook_resid_post", model_name="gpt2",
                            context_size=16))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a")
    hub = PaperSuiteConfig(metrics=("probe",), probe=ProbeConfig(tasks=(), hf_tasks=("imdb",)))
    drawn = suite.read_suite_contexts(sae, "gpt2", hub, EvalConfig(corpus=str(tiny)), gpt2_tokenizer,
                                      gpt2_tokenizer.bos_token_id, 16)
    assert drawn.tokens.shape == (0, 16)
    texts = [f"the number is {i}" for i in range(30)] + [f"the word is {w}" for w in "abcdefghijklmnopqrstuvwxyzabcd"]
    res = run_probe(tiny_gpt2, sae, drawn.tokens, ProbeConfig(tasks=(), min_per_class=10),
                    context_tasks=[ContextTask("ends_in_digit", texts, [1] * 30 + [0] * 30)])
    assert set(res["tasks"]) == {"ends_in_digit"}
