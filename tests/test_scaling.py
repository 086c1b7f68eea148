"""Scaling study: the per-k nMSE(n) power-law fit on known answers, the refusal of mixed eval settings, and
a tiny real sweep through the CLI (sweep -> eval SWEEP_DIR -> report SWEEP_DIR, sweep --eval, and a run
evaluated otherwise)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from saelab.cli import main
from saelab.data import ActivationCache
from saelab.errors import SaelabError
from saelab.report.scaling import _fits_table, check_eval_settings, fit_scaling
from saelab.train import TrainConfig, train_sae

PNG = b"\x89PNG\r\n\x1a\n"


def rows_for(k, sizes, nmse, tokens=2**21):
    """Runs whose SAE-input-space nMSE (the one fitted) is ``nmse(n)``; their raw-space one differs, as a LayerNorm
    SAE's does."""
    return [{"run": f"n{n}_k{k}", "n_latents": n, "k": k, "total_tokens": tokens, "nmse_sae_input": nmse(n),
             "nmse": 1.3 * nmse(n) * (n / 1024) ** 0.05, "delta_ce": 2.0 * n ** -0.3, "l0": float(k),
             "eval_inactive_frac": 0.0} for n in sizes]


def test_the_fit_is_of_the_papers_nmse_or_says_it_is_not():
    """The paper's Figure 1 plots nMSE in the SAE's input space: that is the one fitted. A group with a run whose
    metrics.json predates it is fitted on the raw-space nMSE, and says so."""
    sizes = [2 ** p for p in range(10, 14)]
    rows = rows_for(32, sizes, lambda n: 0.9 * (n / 1024) ** -0.25 + 0.05)
    f = fit_scaling(rows)["k=32"]
    assert f["nmse"] == [r["nmse_sae_input"] for r in rows]
    assert f["alpha"] == pytest.approx(0.25, rel=1e-5) and f["note"] is None and f["nmse_space"] == "sae_input"
    older = [{**r, "nmse_sae_input": None} if r["n_latents"] == 2048 else r for r in rows]
    f = fit_scaling(older)["k=32"]
    assert f["nmse_space"] == "raw" and f["nmse"] == [r["nmse"] for r in rows]
    assert f["note"] == ("raw-space nMSE (metrics.json without nmse_sae_input): n2048_k32; `saelab eval SWEEP_DIR "
                         "--overwrite` records the SAE-input-space one")
    assert "| k=32 | 2^10, 2^11, 2^12, 2^13 |" in "\n".join(_fits_table({"k=32": f}))


def test_fit_recovers_known_exponent_and_floor_per_k():
    sizes = [2 ** p for p in range(10, 16)]
    rows = (rows_for(32, sizes, lambda n: 0.9 * (n / 1024) ** -0.25 + 0.05)
            + rows_for(64, sizes[2:5], lambda n: 0.5 * (n / 1024) ** -0.4 + 0.02)
            + rows_for(16, sizes[:2], lambda n: 0.3))
    fits = fit_scaling(rows)
    assert list(fits) == ["k=16", "k=32", "k=64"]
    f = fits["k=32"]
    assert f["fitted"] and f["n"] == sizes and f["dof"] == 3
    assert f["alpha"] == pytest.approx(0.25, rel=1e-6) and f["c"] == pytest.approx(0.05, rel=1e-5)
    assert f["a"] == pytest.approx(0.9 * 1024 ** 0.25, rel=1e-5) and f["rmse_log"] < 1e-9
    assert [r["fitted"] for r in f["residuals"]] == pytest.approx([r["nmse"] for r in f["residuals"]], rel=1e-9)
    assert f["delta_ce_slope"] == pytest.approx(-0.3, rel=1e-9)
    assert f["monotone"] and f["note"] is None and 0 < f["alpha_pure"] < 0.25  # the floor flattens a c-free fit
    # Exact data: no residual variance, the profile interval closes onto the exponent.
    assert f["alpha_interval"] == pytest.approx([0.25, 0.25], rel=1e-6) and f["interval_level"] == 0.95
    # Three sizes: fitted exactly, flagged, no interval; two sizes: not fitted.
    assert fits["k=64"]["alpha"] == pytest.approx(0.4, rel=1e-5) and "passes through" in fits["k=64"]["note"]
    assert fits["k=64"]["alpha_interval"] is None
    assert fits["k=64"]["alpha_interval_note"].startswith("undefined: 3 points for 3 parameters")
    assert fits["k=16"] == {**fits["k=16"], "fitted": False, "note": "needs 3 sizes to fit a + c, has 2"}
    # Three sizes whose log-log curve bends down would need a floor below 0: the fit misses them, and says so.
    bent = fit_scaling(rows_for(4, sizes[:3], {1024: 0.5, 2048: 0.45, 4096: 0.2}.get))["k=4"]
    assert bent["rmse_log"] > 0.01 and "yet the curve misses them: the floor c cannot go below 0" in bent["note"]
    # nMSE that does not fall with n (undertrained large SAEs) is flagged: its alpha says nothing.
    bumpy = fit_scaling(rows_for(8, sizes[:4], {1024: 0.31, 2048: 0.30, 4096: 0.302, 8192: 0.29}.get))["k=8"]
    assert not bumpy["monotone"] and bumpy["note"].startswith("nMSE stops falling from n = 2,048 to 4,096 "
                                                              "(0.3000 -> 0.3020;")
    # Three sizes that dip and rise: the curve misses them as no falling law passes a rise, not for its floor
    # (which sits at 0.295, far above 0), and its alpha (here about -50) is marked as meaningless in the table.
    dip = fit_scaling(rows_for(16, sizes[:3], {1024: 0.2975, 2048: 0.2926, 4096: 0.3220}.get))
    assert not dip["k=16"]["monotone"] and dip["k=16"]["c"] > 0.2
    assert "yet the curve misses them: no curve of this form changes direction" in dip["k=16"]["note"]
    assert "floor c cannot go below 0" not in dip["k=16"]["note"]
    rise = fit_scaling(rows_for(16, sizes[:3], {1024: 0.30, 2048: 0.32, 4096: 0.28}.get))["k=16"]  # its c: 0
    assert "no curve of this form changes direction" in rise["note"] and "floor" not in rise["note"]
    assert "(not meaningful: see the note)" in "\n".join(_fits_table(dip))
    assert "(not meaningful" not in "\n".join(_fits_table({"k=32": fits["k=32"]}))
    # Runs on other token budgets are their own curves.
    more = fit_scaling(rows + rows_for(32, sizes[:3], lambda n: 0.4, tokens=2**20))
    assert "k=32, 2.1M tokens" in more and "k=32, 1.05M tokens" in more
    # So are runs that differ in another training setting (an lr grid): never one curve through both.
    lr_grid = [{**r, "settings": {"lr": lr}} for lr in (1e-3, 3e-3)
               for r in rows_for(16, sizes[:3], lambda n, lr=lr: lr * 100 * (n / 1024) ** -0.3)]
    by_lr = fit_scaling(lr_grid)
    assert list(by_lr) == ["k=16, lr=0.001", "k=16, lr=0.003"]
    assert by_lr["k=16, lr=0.003"]["settings"] == {"lr": 0.003} and len(by_lr["k=16, lr=0.001"]["runs"]) == 3
    assert by_lr["k=16, lr=0.001"]["alpha"] == pytest.approx(0.3, rel=1e-4)


SETTINGS = {"model": "tiny", "hook": "blocks.1.hook_resid_post", "eval_corpus": "wiki_eval.jsonl.xz",
            "context_size": 64, "position_0": "included", "n_tokens": 32768, "n_predictions": 16182}


def test_mixed_eval_settings_are_refused_naming_runs_and_setting():
    rows = rows_for(32, [2 ** p for p in range(10, 16)], lambda n: 0.3)
    for r in rows:
        r["eval_settings"] = dict(SETTINGS)
    assert check_eval_settings(rows, "runs/s") == SETTINGS
    for r in rows[4:]:  # the two largest re-evaluated by `--suite paper` with fewer predictions
        r["eval_settings"]["n_predictions"] = 4032
    with pytest.raises(SaelabError) as e:
        check_eval_settings(rows, "runs/s")
    assert str(e.value) == (
        "sweep folder runs/s mixes evaluations: n_predictions differs (16,182: n1024_k32, n2048_k32, n4096_k32, "
        "n8192_k32; 4,032: n16384_k32, n32768_k32); their nMSE and delta CE cannot share one fit: re-evaluate every "
        "run with one setting, `saelab eval runs/s --overwrite` (with the eval options you want)")
    # A metrics.json from before the settings were recorded does not pass as the same evaluation.
    rows = rows[:4]
    del rows[0]["eval_settings"]["eval_corpus"]
    with pytest.raises(SaelabError, match=r"eval_corpus differs \(not recorded: n1024_k32; wiki_eval.jsonl.xz: "
                                          r"n2048_k32, n4096_k32, n8192_k32\)"):
        check_eval_settings(rows, "runs/s")


def run_cli(capsys, *argv, code=0):
    capsys.readouterr()
    got = main(list(argv))
    out, err = capsys.readouterr()
    assert got == code, err[-3000:]
    return (json.loads(out) if code == 0 else None), err


@pytest.mark.slow  # ~40 s on 2 cores; .ci/run runs the slow tests
def test_tiny_sweep_eval_and_scaling_report(tiny_series, data_dir, tmp_path, capsys):
    wiki = data_dir / "wiki-en"
    acts, sweep = tmp_path / "acts", tmp_path / "sweep"
    run_cli(capsys, "harvest", "--model", str(tiny_series / "checkpoint-120"), "--hook", "blocks.1.hook_resid_post",
            "--corpus", str(wiki / "wiki_train.jsonl.xz"), "--out", str(acts), "--n-tokens", "4096",
            "--context-size", "32", "--buffer-tokens", "8192", "--no-progress")
    common = ["--activations", str(acts), "--out", str(sweep), "--batch-size", "256", "--total-tokens", "4096",
              "--init-rows", "1024", "--no-progress"]
    ev = ["--corpus", str(wiki / "wiki_eval.jsonl.xz"), "--recon-tokens", "1024", "--downstream-tokens", "310",
          "--ablations"]
    run_cli(capsys, "sweep", *common, "--grid", "n_latents=32,64,128", "k=4")
    _, err = run_cli(capsys, "report", str(sweep), code=2)
    assert f"sweep folder {sweep} has no evaluated runs: its runs (n32_k4, n64_k4, n128_k4) have no metrics.json" in err
    assert f"run `saelab eval {sweep}` first" in err

    out, _ = run_cli(capsys, "eval", str(sweep), *ev, "--no-progress")
    assert set(out) == {"n32_k4", "n64_k4", "n128_k4"} and all(0 < v["nmse"] < 1.5 for v in out.values())
    for name in out:
        metrics = json.loads((sweep / name / "metrics.json").read_text())
        assert metrics["n_tokens"] == 1024 and (sweep / name / "report.md").exists()
    out, _ = run_cli(capsys, "eval", str(sweep), *ev, "--no-progress")
    assert out == dict.fromkeys(("n128_k4", "n32_k4", "n64_k4"), "already evaluated")
    # Other settings, or another model, never replace the evaluations unasked: named before any work.
    before = {name: (sweep / name / "metrics.json").read_bytes() for name in out}
    other_model = ["--model", str(tiny_series / "checkpoint-90")]
    fewer = [*ev[:3], "512", *ev[4:]]  # --recon-tokens 512
    for given, changed in ((fewer, "(--recon-tokens 1024 -> 512)"), ([*ev, *other_model], "(--model ")):
        _, err = run_cli(capsys, "eval", str(sweep), *given, "--no-progress", code=2)
        assert f"hold an evaluation with other settings {changed}" in err and "; pass --overwrite" in err
        assert all(name in err for name in out)
    _, err = run_cli(capsys, "eval", str(sweep / "n32_k4"), *ev, *other_model, "--no-progress", code=2)
    assert "holds this SAE's evaluation with other settings (--model " in err  # the model path
    assert before == {name: (sweep / name / "metrics.json").read_bytes() for name in out}
    # One run evaluated otherwise: named in the singular.
    run_cli(capsys, "eval", str(sweep / "n32_k4"), *fewer, "--overwrite", "--no-progress")
    _, err = run_cli(capsys, "eval", str(sweep), *ev, "--no-progress", code=2)
    assert f"n32_k4 in {sweep} holds an evaluation with other settings (--recon-tokens 512 -> 1024)" in err
    run_cli(capsys, "eval", str(sweep / "n32_k4"), *ev, "--overwrite", "--no-progress")

    # A second sweep into the same folder, evaluated as it finishes; k=2 has only two sizes.
    ev_prefixed = [a.replace("--", "--eval-", 1) for a in ev]
    # An evaluation that would be refused after the training is refused before it.
    no_corpus = [ev_prefixed[0], str(tmp_path / "nope.txt"), *ev_prefixed[2:]]  # --eval-corpus nope.txt
    for given, why in (([*ev_prefixed, "--eval-context-size", "100000"], "--eval-context-size 100000 exceeds the "
                        "longest context of "), (no_corpus, "nope.txt")):
        _, err = run_cli(capsys, "sweep", *common, "--grid", "n_latents=32,64", "k=2", "--eval", *given, code=2)
        assert why in err and not (sweep / "n32_k2").exists()
    run_cli(capsys, "sweep", *common, "--grid", "n_latents=32,64", "k=2", "--eval", *ev_prefixed)
    out, _ = run_cli(capsys, "report", str(sweep))
    assert out["report"] == str(sweep / "scaling.md") and out["k=4"]["alpha"] is not None
    data = json.loads((sweep / "scaling.json").read_text())
    assert [r["run"] for r in data["runs"]] == ["n32_k2", "n32_k4", "n64_k2", "n64_k4", "n128_k4"]
    assert data["fits"]["k=4"]["fitted"] and data["fits"]["k=4"]["n"] == [32, 64, 128]
    k4 = {r["run"]: r for r in data["runs"] if r["k"] == 4}
    assert data["fits"]["k=4"]["nmse_space"] == "sae_input"
    assert data["fits"]["k=4"]["nmse"] == [k4[f"n{n}_k4"]["nmse_sae_input"] for n in (32, 64, 128)]
    assert not data["fits"]["k=2"]["fitted"] and data["unevaluated"] == []
    for png in ("scaling_nmse.png", "scaling_delta_loss.png"):
        raw = (sweep / png).read_bytes()
        assert raw[:8] == PNG and struct.unpack(">II", raw[16:24])[0] > 300
    md = (sweep / "scaling.md").read_text()
    assert "| k=4 | 2^5, 2^6, 2^7 |" in md and "![nMSE vs n](scaling_nmse.png)" in md
    # Eval-time inactivity and training-time dead latents are two columns, each saying which it is.
    assert data["eval_settings"]["n_tokens"] == 1024 and data["eval_settings"]["context_size"] == 32
    assert "inactive on the 1,024 eval tokens | dead at end of training | training dead window (tokens) |" in md
    for r in data["runs"]:
        metrics = json.loads((sweep / r["run"] / "metrics.json").read_text())
        log = [json.loads(line) for line in (sweep / r["run"] / "metrics.jsonl").read_text().splitlines()]
        assert r["eval_inactive_frac"] == metrics["dead_frac"] and r["eval_tokens"] == 1024
        assert r["train_dead_frac"] == log[-1]["dead_frac"] and r["train_dead_window"] == 512  # 4,096 tokens / 8
        assert "dead_frac" not in r

    # One run evaluated with other settings: the report refuses, naming it and the setting.
    run_cli(capsys, "eval", str(sweep / "n64_k4"), *ev[:-3], "--downstream-tokens", "155", "--ablations",
            "--overwrite", "--no-progress")  # other settings replace an evaluation only when asked to
    _, err = run_cli(capsys, "report", str(sweep), code=2)
    assert f"sweep folder {sweep} mixes evaluations: n_predictions differs (" in err and ": n64_k4)" in err
    assert f"`saelab eval {sweep} --overwrite`" in err
    run_cli(capsys, "eval", str(sweep), *ev, "--overwrite", "--no-progress")
    out, _ = run_cli(capsys, "report", str(sweep))
    assert out["k=4"]["alpha"] is not None
    # A hand-edited count in one run's metrics.json: named in one line, as a run's own report names it.
    damaged = sweep / "n64_k4" / "metrics.json"
    good = damaged.read_text()
    damaged.write_text(json.dumps({**json.loads(good), "n_tokens": "abc"}))
    _, err = run_cli(capsys, "report", str(sweep), code=2)
    assert err.strip() == (f"saelab report: error: {damaged}: n_tokens is 'abc', expected a non-negative integer (a "
                           "count of tokens); the evaluation metrics file is damaged: remove it, or run the command "
                           "that wrote it again with --overwrite")
    damaged.write_text(good)
    # A run cut off before its SAE was written: eval and report go on with the finished runs and name it.
    cache = ActivationCache(acts)
    train_sae(TrainConfig(n_latents=256, k=4, batch_size=256, total_tokens=4096, init_rows=1024),
              lambda start: cache.batches(256, start_batch=start), sweep / "n256_k4", d_in=cache.d, progress=False,
              device="cpu", stop_after_steps=2)
    unfinished = (f"{sweep}; its run n256_k4 has not finished training (no sae/ yet); run the same `saelab sweep` "
                  "or `saelab train` command again to finish it")
    out, err = run_cli(capsys, "eval", str(sweep), *ev, "--no-progress")
    assert "n256_k4" not in out and err.strip() == f"saelab eval: note: this evaluates the finished runs of {unfinished}"
    out, err = run_cli(capsys, "report", str(sweep))
    assert out["k=4"]["alpha"] is not None
    assert f"saelab report: note: this reports the finished runs of {unfinished}" in err
    # the study itself names it too (the note goes to the terminal only)
    assert json.loads((sweep / "scaling.json").read_text())["unfinished"] == ["n256_k4"]
    assert (f"Not finished training (no sae/ yet; run the same `saelab sweep` or `saelab train` command again, then "
            f"`saelab eval {sweep}`): n256_k4.") in (sweep / "scaling.md").read_text()
    _, err = run_cli(capsys, "report", str(tmp_path), code=2)
    assert "is neither a run folder" in err
    _, err = run_cli(capsys, "eval", str(sweep), "--suite", "paper", code=2)
    assert "is a sweep folder; --suite paper evaluates one SAE" in err


@pytest.mark.slow  # ~30 s on 2 cores: two harvests and two trainings before the report
def test_report_on_a_folder_of_unrelated_runs_writes_each_runs_report(tiny_dir, data_dir, tmp_path, capsys):
    """Runs on other hooks gathered in one folder are not a sweep: no scaling curve across them."""
    from saelab.pipeline import HarvestConfig, harvest, train_from_cache
    from saelab.train import TrainConfig

    folder = tmp_path / "gathered"
    for layer in (0, 1):
        cfg = HarvestConfig(model=str(tiny_dir), hook=f"blocks.{layer}.hook_resid_post", context_size=32,
                            corpus=str(data_dir / "wiki-en" / "wiki_train.jsonl.xz"), n_tokens=2048,
                            buffer_tokens=8192, sample_pool_tokens=0)
        cache = harvest(cfg, tmp_path / f"acts{layer}", progress=False)
        train = TrainConfig(n_latents=32, k=2, batch_size=256, total_tokens=2048, init_rows=512)
        train_from_cache(cache, folder / f"layer{layer}", train, progress=False)
    out, err = run_cli(capsys, "report", str(folder))
    assert out == {"reports": [str(folder / "layer0" / "report.md"), str(folder / "layer1" / "report.md")]}
    assert (f"saelab report: note: the runs in {folder} are not one sweep (hook_name differs "
            "(blocks.0.hook_resid_post: layer0; blocks.1.hook_resid_post: layer1); ") in err
    assert "no scaling study" in err
    assert "blocks.1.hook_resid_post" in (folder / "layer1" / "report.md").read_text()
    assert not (folder / "scaling.json").exists()


@pytest.fixture(scope="module")
def evaluated_sweep(tiny_dir, data_dir, tmp_path_factory):
    """A real sweep of three sizes on tiny-gpt2, evaluated (the model and cache are kept for more runs)."""
    from saelab.evals.core import EvalConfig
    from saelab.pipeline import HarvestConfig, evaluate_sweep, harvest, sweep_from_cache
    from saelab.train import TrainConfig

    root = tmp_path_factory.mktemp("evaluated_sweep")
    wiki = data_dir / "wiki-en"
    cache = harvest(HarvestConfig(model=str(tiny_dir), hook="blocks.1.hook_resid_post", context_size=32,
                                  corpus=str(wiki / "wiki_train.jsonl.xz"), n_tokens=2048, buffer_tokens=8192,
                                  sample_pool_tokens=0), root / "acts", progress=False)
    base = TrainConfig(n_latents=32, k=2, batch_size=256, total_tokens=2048, init_rows=512)
    sweep_from_cache(cache, root / "sweep", base, {"n_latents": [32, 64, 128]}, progress=False)
    ev = EvalConfig(corpus=str(wiki / "wiki_eval.jsonl.xz"), recon_tokens=512, downstream_tokens=155)
    evaluate_sweep(root / "sweep", ev, progress=False)
    return root / "sweep", cache, base, ev


def _copy_of(evaluated_sweep, tmp_path):
    import shutil

    return Path(shutil.copytree(evaluated_sweep[0], tmp_path / "sweep"))


def test_a_run_trained_twice_under_two_names_is_one_point_of_the_fit(evaluated_sweep, tmp_path, capsys):
    import shutil

    sweep = _copy_of(evaluated_sweep, tmp_path)
    shutil.copytree(sweep / "n32", sweep / "n32_k2")  # what a sweep given the base's k=2 again once wrote
    out, _ = run_cli(capsys, "report", str(sweep))
    data = json.loads((sweep / "scaling.json").read_text())
    fit = data["fits"]["k=2"]
    assert fit["n"] == [32, 64, 128] and fit["runs"] == ["n32", "n64", "n128"]
    assert fit["copies"] == {"n32_k2": "n32"}
    assert [r["copy_of"] for r in data["runs"]] == [None, "n32", None, None]
    md = (sweep / "scaling.md").read_text()
    assert "| k=2 | 2^5, 2^6, 2^7 |" in md and "| n32_k2 (copy of n32) | 32 |" in md
    assert "Copies, counted once (same training config and weights, trained under two names): n32_k2 = n32." in md


def test_a_relu_run_is_shown_and_grouped_by_its_l1_coefficient_not_as_k(evaluated_sweep, tmp_path, capsys):
    """A ReLU SAE has no k (train_config.json records the unused default): the study shows its L1
    coefficient, as its report.md does, and never puts it on a top-k curve."""
    from dataclasses import replace

    from saelab.pipeline import evaluate_run, train_from_cache

    _, cache, base, ev = evaluated_sweep
    sweep = _copy_of(evaluated_sweep, tmp_path)
    train_from_cache(cache, sweep / "relu64", replace(base, recipe="relu-l1", architecture="relu", n_latents=64,
                                                       k=base.k, l1_coefficient=5.0), progress=False)
    evaluate_run(sweep / "relu64", ev, progress=False)
    assert json.loads((sweep / "relu64" / "train_config.json").read_text())["train"]["k"] == 2
    run_cli(capsys, "report", str(sweep))
    data = json.loads((sweep / "scaling.json").read_text())
    relu = data["fits"]["ReLU, L1 coefficient 5.0, recipe=relu-l1"]
    assert relu["runs"] == ["relu64"] and relu["k"] is None and not relu["fitted"]
    assert data["fits"]["k=2, recipe=short-run"]["runs"] == ["n32", "n64", "n128"]
    md = (sweep / "scaling.md").read_text()
    assert "| relu64 | 64 | ReLU, L1 coefficient 5.0 |" in md and "| relu64 | 64 | 2 |" not in md
    assert "64 / ReLU, L1 coefficient 5.0" in (sweep / "relu64" / "report.md").read_text()


def test_a_run_whose_metrics_describe_other_weights_is_not_evaluated(evaluated_sweep, tmp_path, capsys):
    """sae/ replaced after the evaluation: its metrics.json is stale, as the run's own report says."""
    import shutil

    sweep = _copy_of(evaluated_sweep, tmp_path)
    shutil.rmtree(sweep / "n64" / "sae")
    shutil.copytree(sweep / "n128" / "sae", sweep / "n64" / "sae")
    _, err = run_cli(capsys, "report", str(sweep))
    assert (f"saelab: note: metrics.json of n64 describes other weights than sae/ (the SAE changed since): left out "
            f"of the scaling study; run `saelab eval {sweep}`") in err
    data = json.loads((sweep / "scaling.json").read_text())
    assert [r["run"] for r in data["runs"]] == ["n32", "n128"] and data["fits"]["k=2"]["n"] == [32, 128]
    assert data["unevaluated"] == ["n64"] and data["other_weights"] == ["n64"]
    md = (sweep / "scaling.md").read_text()
    assert f"Not evaluated (metrics.json describes other weights than sae/; run `saelab eval {sweep}`): n64." in md
    assert "| n64 |" not in md


def test_a_report_after_an_overwrite_says_the_study_there_is_of_earlier_evaluations(evaluated_sweep, tmp_path,
                                                                                    capsys, monkeypatch):
    """sweep --overwrite trains every run anew: cut off before any run finished, then finished, none evaluated
    yet. Each report is refused, and the study the replaced runs made stays, said to be of earlier
    evaluations rather than left looking current."""
    import functools

    import saelab.train
    from saelab.pipeline import sweep_from_cache

    _, cache, base, _ = evaluated_sweep
    sweep = _copy_of(evaluated_sweep, tmp_path)
    run_cli(capsys, "report", str(sweep))
    before = (sweep / "scaling.json").read_bytes()
    kept = ("; the scaling study there (scaling.md, scaling.json, scaling_nmse.png, scaling_delta_loss.png) is of "
            "earlier evaluations, and stays until a report replaces it")
    whole = saelab.train.train_many
    monkeypatch.setattr(saelab.train, "train_many", functools.partial(whole, stop_after_steps=1))  # cut off
    for reason in (f"{sweep} holds no finished run: its runs n32, n64, n128 have not finished training",
                   f"sweep folder {sweep} has no evaluated runs: its runs (n32, n64, n128) have no metrics.json"):
        sweep_from_cache(cache, sweep, base, {"n_latents": [32, 64, 128]}, overwrite=True, progress=False)
        _, err = run_cli(capsys, "report", str(sweep), code=2)
        assert reason in err and err.strip().endswith(kept), err
        assert (sweep / "scaling.json").read_bytes() == before
        monkeypatch.setattr(saelab.train, "train_many", whole)  # the same command again finishes the overwrite


def test_a_report_interrupted_while_writing_the_study_leaves_the_earlier_study_whole(evaluated_sweep, tmp_path,
                                                                                     capsys, monkeypatch):
    """Ctrl-C between the study's files left a new scaling.json beside the earlier scaling.md and plots:
    one study of two evaluations. The files are replaced together: the earlier ones come back."""
    import saelab.report.scaling as scaling

    sweep = _copy_of(evaluated_sweep, tmp_path)
    run_cli(capsys, "report", str(sweep))
    before = {name: (sweep / name).read_bytes() for name in scaling.SCALING_FILES}
    (sweep / "n64" / "metrics.json").unlink()  # the new study: of n32 and n128 only

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(scaling, "_delta_loss_plot", interrupted)  # after scaling.json and one plot
    with pytest.raises(KeyboardInterrupt):
        scaling.write_scaling_report(sweep)
    assert {name: (sweep / name).read_bytes() for name in scaling.SCALING_FILES} == before
    assert sorted(p.name for p in sweep.iterdir()) == sorted(["n32", "n64", "n128", *scaling.SCALING_FILES])


@pytest.mark.slow  # ~25 s on 2 cores: two scaling studies; .ci/run runs the slow tests
def test_an_earlier_scaling_study_the_runs_no_longer_make_is_removed(evaluated_sweep, tiny_dir, data_dir, tmp_path,
                                                                     capsys):
    """Once the runs are not one sweep, the study written before them is removed, not left looking current; where
    they were evaluated unalike, the refusal says the study there is of the earlier evaluations."""
    from dataclasses import replace

    from saelab.pipeline import HarvestConfig, evaluate_run, harvest, train_from_cache
    _, _, base, ev = evaluated_sweep
    SCALING_FILES = ("scaling.md", "scaling.json", "scaling_nmse.png", "scaling_delta_loss.png")
    unalike = _copy_of(evaluated_sweep, tmp_path / "unalike")
    run_cli(capsys, "report", str(unalike))
    assert all((unalike / name).exists() for name in SCALING_FILES)
    evaluate_run(unalike / "n64", replace(ev, recon_tokens=256), overwrite=True, progress=False)
    _, err = run_cli(capsys, "report", str(unalike), code=2)
    assert f"sweep folder {unalike} mixes evaluations: n_tokens differs (" in err
    # a refusal destroys nothing: the study stays, named as of the earlier evaluations
    assert err.strip().endswith("; the scaling study there (scaling.md, scaling.json, scaling_nmse.png, "
                                "scaling_delta_loss.png) is of earlier evaluations, and stays until a report replaces it")
    assert all((unalike / name).exists() for name in SCALING_FILES)

    gathered = _copy_of(evaluated_sweep, tmp_path / "gathered")
    run_cli(capsys, "report", str(gathered))
    other = harvest(HarvestConfig(model=str(tiny_dir),
                                  hook="blocks.1.hook_resid_post", context_size=16,
                                  corpus=str(data_dir / "wiki-en" / "wiki_train.jsonl.xz"), n_tokens=2048,
                                  buffer_tokens=8192, sample_pool_tokens=0), tmp_path / "acts16", progress=False)
    train_from_cache(other, gathered / "ctx16", base, progress=False)
    _, err = run_cli(capsys, "report", str(gathered))
    assert "are not one sweep (context_size differs" in err
    assert err.strip().endswith("no scaling study; removed the earlier one (scaling.md, scaling.json, "
                                "scaling_nmse.png, scaling_delta_loss.png)")
    assert not any((gathered / name).exists() for name in SCALING_FILES)
