"""Compute-equivalent (paper §4.1): the fit and its inversion on known answers, the checkpoint series
(hub code paths without the network, local folders), and the whole method on a series trained here."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

from saelab.evals.compute_equivalent import (
    CRFM_TOKENS_PER_STEP,
    PYTHIA_TOKENS_PER_STEP,
    ComputeEquivalentConfig,
    SeriesError,
    compute_equivalent,
    interp_tokens,
    local_series,
    resolve_series,
    run_compute_equivalent,
    series_for_model,
)
from saelab.report.plots import compute_equivalent_plot

A, B, C_IRR = 40.0, 0.12, 2.0
TOTAL = 4_000_000_000


def law(c):
    return A * np.asarray(c, dtype=np.float64) ** -B + C_IRR


def synthetic(tokens):
    return [{"tokens": int(t), "loss": float(law(t)), "label": f"ck{i}"} for i, t in enumerate(tokens)]


# ---- known answers ----------------------------------------------------------------------------
def test_power_fit_recovers_exponent_and_inverts_to_the_known_compute():
    pts = synthetic(np.logspace(7, math.log10(TOTAL), 9))
    res = compute_equivalent(pts, spliced_loss=float(law(1e9)), clean_loss=float(law(TOTAL)), reference_compute=TOTAL,
                             fit_min_frac=0)
    assert res["kind"] == "training_progress" and res["compute_unit"] == "tokens"
    assert res["reference"]["how"] == "series_total" and res["reference_compute"] == TOTAL
    assert res["fit"]["b"] == pytest.approx(B, rel=1e-6) and res["fit"]["c"] == pytest.approx(C_IRR, rel=1e-5)
    assert res["compute_equivalent"] == pytest.approx(1e9, rel=1e-5)
    assert res["fraction"] == pytest.approx(0.25, rel=1e-5)  # 1e9 of 4e9 tokens
    assert res["clean_fraction"] == pytest.approx(1.0, rel=1e-5)
    assert res["fraction_relative"] == pytest.approx(0.25, rel=1e-5)
    assert not res["extrapolated"] and res["extrapolation"] is None
    # The model-free interpolation agrees closely inside the measured range (loss is nearly linear in log C).
    assert res["fraction_interp"] == pytest.approx(0.25, rel=0.02)
    assert all(r["used_in_fit"] and r["fitted_loss"] == pytest.approx(r["loss"], rel=1e-9) for r in res["checkpoints"])
    json.dumps(res, allow_nan=False)


def test_interp_is_linear_in_log_tokens_and_monotone():
    assert interp_tokens([10, 100], [5.0, 4.0], 4.5) == pytest.approx(math.sqrt(1000))
    assert interp_tokens([10, 100], [5.0, 4.0], 5.0) == pytest.approx(10)
    assert interp_tokens([10, 100], [5.0, 4.0], 3.9) is None and interp_tokens([10, 100], [5.0, 4.0], 5.1) is None
    # A bump (noise) is flattened by the running minimum: the crossing stays unique.
    assert interp_tokens([10, 100, 1000], [5.0, 4.0, 4.2], 4.1) == pytest.approx(10 ** 1.9)


def test_interp_method_makes_the_interpolation_the_headline():
    pts = synthetic(np.logspace(7, math.log10(TOTAL), 9))
    res = compute_equivalent(pts, float(law(1e9)), reference_compute=TOTAL, fit="interp")
    assert res["fit"]["method"] == "interp" and res["fraction"] == res["fraction_interp"]


@pytest.mark.parametrize("spliced,where", [(float(law(1e6)), "before_first"), (float(law(8e9)), "beyond_last"),
                                           (C_IRR - 0.1, "unreachable")])
def test_extrapolation_is_flagged(spliced, where):
    pts = synthetic(np.logspace(7, math.log10(TOTAL), 6))
    res = compute_equivalent(pts, spliced, reference_compute=TOTAL)
    assert res["extrapolated"] and res["extrapolation"] == where
    assert res["fraction_interp"] is None  # nothing to interpolate between
    if where == "unreachable":
        assert res["fraction"] is None and res["compute_equivalent"] is None
    elif where == "beyond_last":
        assert res["fraction"] == pytest.approx(2.0, rel=1e-5)
    else:
        assert res["fraction"] == pytest.approx(1e6 / TOTAL, rel=1e-4)


def test_fit_window_leaves_out_early_checkpoints():
    tokens = np.logspace(5, math.log10(TOTAL), 10)
    pts = synthetic(tokens)
    pts[0]["loss"] = pts[1]["loss"] = 10.8  # an initial plateau no power law follows
    res = compute_equivalent(pts, float(law(1e9)), reference_compute=TOTAL, fit_min_frac=0.001)
    assert [r["used_in_fit"] for r in res["checkpoints"]][:3] == [False, False, False]
    assert res["fit"]["b"] == pytest.approx(B, rel=1e-5) and res["fraction"] == pytest.approx(0.25, rel=1e-4)


def test_series_that_does_not_decrease_or_is_too_short_is_refused():
    flat = [{"tokens": t, "loss": 5.0 + 0.01 * i} for i, t in enumerate([1e6, 1e7, 1e8, 1e9])]
    with pytest.raises(SeriesError, match="series 'mine' does not decrease: the loss goes from 5.0000 to 5.0300"):
        compute_equivalent(flat, 5.0, reference_compute=10**9, series_name="mine", fit_min_frac=0)
    with pytest.raises(SeriesError, match="'mine' has 2 checkpoints with >= 1 training tokens; the fit needs "
                                          "at least 3"):
        compute_equivalent(synthetic([1e6, 1e8]), 5.0, reference_compute=10**8, series_name="mine", fit_min_frac=0)
    with pytest.raises(SeriesError, match="has 1 checkpoints with >= 40,000,000 training tokens"):
        compute_equivalent(synthetic([1e6, 1e7, 1e9]), 5.0, reference_compute=TOTAL)
    with pytest.raises(SeriesError, match="non-finite"):
        compute_equivalent([{"tokens": 1, "loss": float("nan")}] * 3, 5.0, reference_compute=3)


# ---- the interval: a paired bootstrap over documents ------------------------------------------------
def doc_sums(n_docs: int, seed: int = 0, spliced_at: float = 1e9, per_doc: int = 50, tokens=None):
    """Per-document loss sums of a series that follows the law, each document harder or easier for every model
    alike (its own offset), plus each model's own noise: (points, loss_sums, spliced loss, clean loss)."""
    rng = np.random.default_rng(seed)
    tokens = np.logspace(7, math.log10(TOTAL), 7) if tokens is None else tokens
    offset = rng.normal(0, 0.3, n_docs)
    per = lambda c: (law(c) + offset + rng.normal(0, 0.05, n_docs)) * per_doc  # noqa: E731
    sums = {"references": torch.tensor(np.stack([per(t) for t in tokens], 1)),
            "spliced": torch.tensor(per(spliced_at)), "clean": torch.tensor(per(TOTAL)),
            "n": torch.full((n_docs,), float(per_doc), dtype=torch.float64)}
    n = float(sums["n"].sum())
    points = [{"tokens": int(t), "loss": float(sums["references"][:, i].sum()) / n, "label": f"ck{i}"}
              for i, t in enumerate(tokens)]
    return points, sums, float(sums["spliced"].sum()) / n, float(sums["clean"].sum()) / n


def test_interval_is_a_paired_document_bootstrap_of_the_refitted_curve():
    """Each draw takes the documents with replacement (the generator's draws, as the other metrics' bootstraps),
    recomputes every loss from the drawn documents, refits the power law and inverts it: the interval equals one
    rolled by hand from those draws; the point estimates are those without an interval, bit for bit."""
    from saelab.evals.power_law import fit_power_law

    points, sums, spliced, clean = doc_sums(30)
    plain = compute_equivalent(points, spliced, clean_loss=clean, reference_compute=TOTAL, fit_min_frac=0)
    res = compute_equivalent(points, spliced, clean_loss=clean, reference_compute=TOTAL, fit_min_frac=0,
                             loss_sums=sums, n_boot=100, seed=7)
    assert {k: v for k, v in res.items() if not k.startswith("interval")} == plain
    assert set(res["intervals"]) == {"fraction", "clean_fraction", "fraction_relative"}
    assert res["interval_draws"] == dict(inside=100, beyond_last=0, before_first=0, unreachable=0, failed=0)
    idx = torch.randint(30, (100, 30), generator=torch.Generator().manual_seed(7))
    by_hand = []
    for drawn in idx:
        total = {k: v[drawn].sum(0).numpy() for k, v in sums.items()}
        law_b = fit_power_law([p["tokens"] for p in points], total["references"] / total["n"], interval_level=None)
        c_spliced, c_clean = law_b.invert(total["spliced"] / total["n"]), law_b.invert(total["clean"] / total["n"])
        by_hand.append([c_spliced / TOTAL, c_clean / TOTAL, c_spliced / c_clean])
    by_hand = np.array(by_hand)
    for i, name in enumerate(("fraction", "clean_fraction", "fraction_relative")):
        ci = res["intervals"][name]
        assert ci["estimate"] == res[name] and ci["low"] < res[name] < ci["high"]
        assert [ci[k] for k in ("level", "n_boot", "n_groups", "n_undefined", "n_infinite")] == [0.95, 100, 30, 0, 0]
        assert [ci["low"], ci["high"]] == pytest.approx(np.quantile(by_hand[:, i], [0.025, 0.975]), rel=1e-6)
    json.dumps(res, allow_nan=False)


def test_interval_narrows_with_more_documents():
    widths = []
    for n_docs in (16, 256):
        points, sums, spliced, clean = doc_sums(n_docs, seed=n_docs)
        ci = compute_equivalent(points, spliced, clean_loss=clean, reference_compute=TOTAL, fit_min_frac=0,
                                loss_sums=sums, n_boot=200)["intervals"]["fraction"]
        assert ci["low"] < ci["estimate"] < ci["high"]
        widths.append(ci["high"] - ci["low"])
    assert widths[1] < widths[0] / 2.5  # 16 times the documents: about a quarter of the width


def test_draws_that_never_reach_the_spliced_loss_or_fail_to_fit_are_counted():
    """A spliced loss near the fitted floor: the draws whose floor lies above it need infinite compute, which
    bounds the interval from below only (its upper bound is ∞, None in JSON). A series whose decline is within
    its noise fails to fit in some draws: counted and left out, the metric still answers."""
    from saelab.evals.compute_equivalent import format_fraction_interval

    points, sums, spliced, clean = doc_sums(12, seed=1, spliced_at=1e18, per_doc=1)
    res = compute_equivalent(points, spliced, clean_loss=clean, reference_compute=TOTAL, fit_min_frac=0,
                             loss_sums=sums, n_boot=200)
    ci, places = res["intervals"]["fraction"], res["interval_draws"]
    assert res["extrapolation"] == "beyond_last" and res["fraction"] is not None  # the headline reaches it
    assert places["unreachable"] > 0.025 * 200 and ci["n_infinite"] == places["unreachable"]
    assert places["beyond_last"] + places["unreachable"] == 200  # the extrapolated draws count as they are
    assert ci["high"] is None and ci["low"] is not None and ci["low"] < ci["estimate"]
    assert format_fraction_interval(ci).endswith(", ∞)") and json.dumps(res, allow_nan=False)
    flat = doc_sums(12, seed=2, tokens=np.logspace(7, 7.02, 4))
    res = compute_equivalent(flat[0], flat[2], clean_loss=flat[3], reference_compute=TOTAL, fit_min_frac=0,
                             loss_sums=flat[1], n_boot=100)
    assert res["interval_draws"]["failed"] > 0 and sum(res["interval_draws"].values()) == 100
    assert res["intervals"]["fraction"]["n_undefined"] >= res["interval_draws"]["failed"]
    with pytest.raises(ValueError, match=r"loss_sums must hold \[G\] totals and references \[G, 4\]"):
        compute_equivalent(flat[0], flat[2], reference_compute=TOTAL, fit_min_frac=0,
                           loss_sums={**flat[1], "references": flat[1]["references"][:, :3]})


def test_a_draw_whose_clean_loss_the_curve_never_reaches_leaves_its_fractions_undefined():
    """A draw with its clean loss below the refitted floor has infinite clean compute: fraction_relative (and the
    fraction, where the clean loss sets the reference) is undefined there, as in the headline, not 0, which
    pulled the interval's low end to 0 unsaid."""
    from saelab.evals.compute_equivalent import _draw
    from saelab.evals.power_law import floor_grid_starts

    C, L = [1e7, 1e8, 1e9, 1e10], np.array([4.0, 3.0, 2.5, 2.25])  # falls toward a floor near 2
    points = [{"tokens": int(c), "loss": float(x), "params": 1, "compute": c} for c, x in zip(C, L)]
    for reference, kind in ((1e10, "training_progress"), (None, "model_family")):
        head = compute_equivalent(points, 2.6, clean_loss=1.9, reference_compute=reference, kind=kind,
                                  fit_min_frac=0)
        assert head["fraction_relative"] is None
        _, (fraction, clean_fraction, relative) = _draw(head, L, 2.6, 1.9, "s", floor_grid_starts(C, L[None])[0])
        assert math.isnan(relative) and math.isnan(clean_fraction)
        assert math.isnan(fraction) if reference is None else fraction == pytest.approx(head["fraction"])


def test_one_document_gives_no_interval():
    points, sums, spliced, clean = doc_sums(1)
    ci = compute_equivalent(points, spliced, clean_loss=clean, reference_compute=TOTAL, fit_min_frac=0,
                            loss_sums=sums)["intervals"]["fraction"]
    assert (ci["low"], ci["high"], ci["n_boot"], ci["n_groups"]) == (None, None, 0, 1)


def test_a_mean_loss_without_its_per_context_sums_is_refused(tiny_gpt2):
    """The interval resamples per-context sums: a mean given without them would be the headline while the draws
    resample sums measured again, two sources for one number."""
    from saelab.sae import SAEConfig, TopKSAE

    sae = TopKSAE(SAEConfig(d_in=64, n_latents=16, k=4, hook_name="blocks.0.hook_resid_post"))
    tokens = torch.randint(1, 100, (4, 16))
    with pytest.raises(ValueError, match="^spliced_loss and clean_loss given without context_sums; expected both"):
        run_compute_equivalent(tiny_gpt2, sae, tokens, ComputeEquivalentConfig(series="crfm-gpt2-small"),
                               spliced_loss=3.0, clean_loss=2.9)


# ---- series -----------------------------------------------------------------------------------
def test_hub_series_names_revisions_and_tokens():
    crfm = resolve_series("crfm-gpt2-small")
    assert crfm.checkpoints[-1].source == "hub:stanford-crfm/alias-gpt2-small-x21@checkpoint-400000"
    assert crfm.total_tokens == 400_000 * 512 * 1024 == 400_000 * CRFM_TOKENS_PER_STEP
    assert [c.tokens for c in crfm.checkpoints] == [int(c.label.split("-")[1]) * 524_288 for c in crfm.checkpoints]
    other = resolve_series("crfm-gpt2-small-x49", steps=[1000, 50])
    assert [c.source for c in other.checkpoints] == ["hub:stanford-crfm/battlestar-gpt2-small-x49@checkpoint-50",
                                                     "hub:stanford-crfm/battlestar-gpt2-small-x49@checkpoint-1000"]
    py = resolve_series("pythia-70m-deduped", steps=[0, 512, 143000])
    assert [c.label for c in py.checkpoints] == ["step0", "step512", "step143000"]
    assert py.checkpoints[1].tokens == 512 * 2_097_152 == 512 * PYTHIA_TOKENS_PER_STEP
    assert py.total_tokens == 143_000 * 1024 * 2048
    with pytest.raises(SeriesError, match=r"'crfm-gpt2-small' has no checkpoint at step\(s\) \[1234\]"):
        resolve_series("crfm-gpt2-small", steps=[1234])
    with pytest.raises(SeriesError, match=r"'pythia-70m' has no checkpoint at step\(s\) \[3\]"):
        resolve_series("pythia-70m", steps=[3])
    with pytest.raises(SeriesError, match="no Pythia of size '5m'"):
        resolve_series("pythia-5m")
    with pytest.raises(SeriesError, match="unknown checkpoint series 'gpt-5-series'"):
        resolve_series("gpt-5-series")
    assert series_for_model("gpt2") == "crfm-gpt2-small"
    # Pythia models belong to the Pythia family (the paper's compute-equivalent); their own checkpoints are the
    # training-progress reference.
    assert series_for_model("EleutherAI/pythia-160m-deduped") == "pythia-family-deduped"
    assert series_for_model("EleutherAI/pythia-160m-deduped", kind="training_progress") == "pythia-160m-deduped"
    assert series_for_model("EleutherAI/pythia-6.9b") == "pythia-family:14m,31m,70m,160m,410m,1b,1.4b,6.9b"
    assert series_for_model("gpt2", kind="model_family") is None
    assert series_for_model("default") is None and series_for_model("/some/folder") is None


def test_hub_checkpoints_load_through_load_model_with_their_revision(monkeypatch):
    import huggingface_hub.constants

    import saelab.models
    import saelab.models.loading as loading

    calls = []
    monkeypatch.setattr(saelab.models, "load_model", lambda spec, **kw: calls.append((spec, kw)) or "lm")
    series = resolve_series("pythia-70m", steps=[1000])
    assert series.checkpoints[0].load() == "lm"
    assert calls == [("EleutherAI/pythia-70m", {"device": "cpu", "dtype": torch.float32, "revision": "step1000"})]
    # load_model hands the revision to from_pretrained for hub ids, and refuses it for local files.
    seen = []

    def fake_load_dir(path, dtype, tokenizer=None, **kw):
        seen.append((path, kw))
        raise OSError("offline")
    monkeypatch.setattr(loading, "_load_dir", fake_load_dir)
    monkeypatch.setattr(loading, "_fetch_weights", lambda spec, revision: None)  # the network: tested on its own
    # The revision goes through whether the hub is reachable (behind a proxy: no name lookup) or not
    # (offline mode: the local cache only).
    for offline, kwargs in ((False, {}), (True, {"local_files_only": True})):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.saelab-tests.invalid:3128")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        seen.clear()
        with pytest.raises(loading.ModelLoadError, match="'stanford-crfm/alias-gpt2-small-x21' at revision "
                                                         "'checkpoint-1000'"):
            loading.load_model("stanford-crfm/alias-gpt2-small-x21", revision="checkpoint-1000")
        assert seen == [("stanford-crfm/alias-gpt2-small-x21", {**kwargs, "revision": "checkpoint-1000"})]
    with pytest.raises(loading.ModelLoadError, match="applies only to hub ids"):
        loading.load_model(".", revision="step1")


def test_local_series_from_series_json_or_trainer_states(tmp_path):
    for step in (10, 20, 40):
        (tmp_path / "s" / f"checkpoint-{step}").mkdir(parents=True)
    (tmp_path / "s" / "series.json").write_text(json.dumps(
        {"tokens_per_step": 100, "checkpoints": [{"path": "checkpoint-20", "step": 20},
                                                 {"path": "checkpoint-10", "tokens": 1000},
                                                 {"path": "checkpoint-40", "step": 40}]}))
    s = local_series(tmp_path / "s")
    assert [(c.label, c.tokens) for c in s.checkpoints] == [("checkpoint-10", 1000), ("checkpoint-20", 2000),
                                                            ("checkpoint-40", 4000)]
    assert s.total_tokens == 4000 and s.tokens_per_step == 100
    # Trainer states only (HF Trainer's num_input_tokens_seen).
    for step in (5, 50):
        d = tmp_path / "t" / f"step{step}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "num_input_tokens_seen": step * 64}))
    assert [c.tokens for c in resolve_series(str(tmp_path / "t")).checkpoints] == [320, 3200]
    # Bad folders name what is missing.
    (tmp_path / "u" / "ck").mkdir(parents=True)
    with pytest.raises(SeriesError, match="no series.json and no subfolder with a trainer_state.json"):
        local_series(tmp_path / "u")
    (tmp_path / "u" / "ck" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    with pytest.raises(SeriesError, match="has no num_input_tokens_seen; put 'tokens_per_step'"):
        local_series(tmp_path / "u")
    with pytest.raises(SeriesError, match="no such folder"):
        resolve_series(str(tmp_path / "missing"))
    (tmp_path / "s" / "series.json").write_text(json.dumps({"checkpoints": [{"path": "checkpoint-10"}]}))
    with pytest.raises(SeriesError, match=r"checkpoints\[0\] needs 'tokens'"):
        local_series(tmp_path / "s")


def test_a_context_longer_than_a_loaded_checkpoint_takes_is_refused_before_its_forward(tiny_gpt2):
    """A checkpoint whose config cannot be read before its load (here one given only by its loader) ran eval
    contexts past its positions into the forward: an IndexError from the position embedding. The loaded model's
    own limit refuses them first, naming the checkpoint as the other refusals of a series do."""
    import torch

    from saelab.errors import ConfigError
    from saelab.evals.compute_equivalent import CheckpointSeries, SeriesCheckpoint, checkpoint_losses

    series = CheckpointSeries("loaded", [SeriesCheckpoint("only-a-loader", 100, lambda: tiny_gpt2)], 100)
    with pytest.raises(ConfigError) as e:
        checkpoint_losses(series, torch.ones(2, 130, dtype=torch.long), 0)
    assert str(e.value) == ("checkpoint only-a-loader: the eval context of 130 tokens exceeds the longest context of "
                            "tiny-gpt2 (128 tokens)")


# ---- the whole method on a series trained here -------------------------------------------------
@pytest.mark.slow  # ~40 s on 2 cores (1,000 refits over six checkpoints); .ci/run runs the slow tests
def test_compute_equivalent_on_a_trained_series(tiny_series, tiny_series_run, data_dir, tmp_path, monkeypatch):
    from saelab.data import token_contexts
    from saelab.models import load_model
    from saelab.pipeline import load_run

    sae, _ = load_run(tiny_series_run)
    lm = load_model(str(tiny_series / "checkpoint-120"))
    tokens = token_contexts(str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), lm.tokenize, 32,
                            n_contexts=48, bos_token_id=lm.bos_token_id)
    cfg = ComputeEquivalentConfig(series=str(tiny_series), fit_min_frac=0.1)
    res = run_compute_equivalent(lm, sae, tokens, cfg, cache_path=tmp_path / "losses.json")
    compute_equivalent_plot(res, tmp_path / "ce.png")  # the report layer draws it from the result
    json.dumps(res, allow_nan=False)
    losses = [r["loss"] for r in res["checkpoints"]]
    assert [r["tokens"] for r in res["checkpoints"]] == [s * 128 for s in (10, 20, 40, 60, 90, 120)]
    assert losses[0] > 9 and losses[-1] < losses[0] - 1.5  # a model in training
    # The SAE's model is the last checkpoint: its clean loss is that checkpoint's, on the same predictions.
    assert res["clean_loss"] == pytest.approx(losses[-1], abs=1e-5)
    assert res["n_predictions"] == 48 * 30  # position 0's prediction left out
    assert res["spliced_loss"] > res["clean_loss"]
    assert 0 < res["fraction"] < 1.1 and 0 < res["fraction_relative"] < 1
    assert res["fit"]["n_points"] == 5 and res["fit"]["b"] > 0  # checkpoint-10 is before 10 % of the run
    assert res["series"]["total_tokens"] == 120 * 128
    data = (tmp_path / "ce.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24])[0] > 300
    # A 95 % interval from 1,000 draws of the contexts (their documents unknown), the losses resampled together.
    assert res["interval_groups"] == "contexts" and res["interval_note"] is None
    for name in ("fraction", "clean_fraction", "fraction_relative"):
        ci = res["intervals"][name]
        assert ci["estimate"] == res[name] and ci["low"] <= res[name] <= ci["high"], (name, ci)
        assert (ci["n_boot"], ci["n_groups"]) == (1000, 48)
    assert sum(res["interval_draws"].values()) == 1000
    # Losses are cached per checkpoint, with each context's: a second run on the same tokens loads no checkpoint.
    import saelab.models

    monkeypatch.setattr(saelab.models, "load_model", lambda *a, **k: pytest.fail("checkpoint loaded again"))
    documents = torch.arange(48) // 6  # 8 documents of 6 contexts each
    again = run_compute_equivalent(lm, sae, tokens, cfg, cache_path=tmp_path / "losses.json", documents=documents)
    assert again["fraction"] == res["fraction"] and again["interval_groups"] == "documents"
    assert again["intervals"]["fraction"]["n_groups"] == 8
    # A cache from before the per-context losses were kept is read as it is: the same fraction, no interval, and
    # a note that says why and how to get one.
    cache = json.loads((tmp_path / "losses.json").read_text())
    for hit in cache["losses"].values():
        del hit["context_losses"]
    (tmp_path / "old.json").write_text(json.dumps(cache))
    old = run_compute_equivalent(lm, sae, tokens, cfg, cache_path=tmp_path / "old.json")
    assert {k: old[k] for k in ("fraction", "clean_fraction", "fraction_relative", "checkpoints")} == \
        {k: res[k] for k in ("fraction", "clean_fraction", "fraction_relative", "checkpoints")}
    assert old["intervals"] == {} and "interval_draws" not in old
    assert old["interval_note"].startswith("No interval: the losses of checkpoint-10, checkpoint-20") and \
        f"cached in {tmp_path / 'old.json'} were measured before" in old["interval_note"]
    with pytest.raises(ValueError, match="documents must hold one document per context"):
        run_compute_equivalent(lm, sae, tokens, cfg, documents=documents[:5])
    with pytest.raises(ValueError, match="context_sums must hold 'spliced' and 'clean' sums of each of the 48"):
        run_compute_equivalent(lm, sae, tokens, cfg, context_sums={"spliced": torch.zeros(48)})
    # Sums given without their means: the headline is their mean, the losses the interval resamples.
    sums = {"spliced": torch.full((48,), 30 * res["spliced_loss"] + 0.3, dtype=torch.float64),
            "clean": torch.full((48,), 30 * res["clean_loss"], dtype=torch.float64)}
    given = run_compute_equivalent(lm, sae, tokens, cfg, cache_path=tmp_path / "losses.json", context_sums=sums)
    assert given["spliced_loss"] == pytest.approx(res["spliced_loss"] + 0.01, rel=1e-12)
    assert given["clean_loss"] == pytest.approx(res["clean_loss"], rel=1e-12)
    monkeypatch.undo()
    # A bfloat16 model is set against references that ran in bfloat16 too (not the float32 losses cached).
    lm16 = load_model(str(tiny_series / "checkpoint-120"), dtype="bfloat16")
    res16 = run_compute_equivalent(lm16, sae, tokens[:8], cfg, cache_path=tmp_path / "losses.json")
    assert res16["series"]["dtype"] == "bfloat16" and "dtype" not in res["series"]
    assert res16["clean_loss"] == pytest.approx(res16["checkpoints"][-1]["loss"], abs=1e-5)
    assert res16["n_predictions"] == 8 * 30


@pytest.mark.slow
def test_whole_method_on_a_few_hundred_steps(data_dir, tmp_path):
    """The issue's offline check at its stated size: 300 steps, 10 checkpoints, an SAE on the last one."""
    from saelab.data import token_contexts
    from saelab.models import load_model
    from saelab.models.lm_series import LMSeriesConfig, train_checkpoint_series
    from saelab.pipeline import HarvestConfig, harvest, train_from_cache
    from saelab.train import TrainConfig

    wiki = data_dir / "wiki-en"
    folder = train_checkpoint_series(LMSeriesConfig(tokenizer=str(data_dir / "gpt2-tokenizer"), steps=300),
                                     tmp_path / "series", corpus=str(wiki / "wiki_train.jsonl.xz"))
    final = str(folder / "checkpoint-300")
    cache = harvest(HarvestConfig(model=final, hook="blocks.1.hook_resid_post", corpus=str(wiki / "wiki_train.jsonl.xz"),
                                  n_tokens=16384, context_size=32, buffer_tokens=16384), tmp_path / "acts", progress=False)
    sae = train_from_cache(cache, tmp_path / "run", TrainConfig(n_latents=256, k=8, batch_size=512, total_tokens=16384,
                                                                init_rows=4096), progress=False)
    lm = load_model(final)
    tokens = token_contexts(str(wiki / "wiki_eval.jsonl.xz"), lm.tokenize, 32, n_contexts=128,
                            bos_token_id=lm.bos_token_id)
    res = run_compute_equivalent(lm, sae, tokens, ComputeEquivalentConfig(series=str(folder), fit_min_frac=0.05))
    compute_equivalent_plot(res, tmp_path / "ce.png")
    assert len(res["checkpoints"]) == 10 and res["spliced_loss"] > res["clean_loss"]
    assert not res["extrapolated"] and 0 < res["fraction"] < 1
    assert res["fraction_interp"] == pytest.approx(res["fraction"], rel=0.5)
    assert (tmp_path / "ce.png").exists()


def test_checkpoint_loads_draw_their_bars_only_with_progress(tiny_dir, library_bars_on, capfd):
    """progress=False hides transformers' "Loading weights" bar of every checkpoint's load, a loader of the
    caller's own included (the CLI's --no-progress hid them already; the Python call did not), and puts the
    bars back after; progress=True shows them."""
    import torch
    from transformers.utils import logging as hf_logging

    from saelab.evals.compute_equivalent import CheckpointSeries, SeriesCheckpoint, checkpoint_losses
    from saelab.models import load_model

    series = CheckpointSeries("own", [SeriesCheckpoint("own-loader", 100, lambda: load_model(str(tiny_dir)))], 100)
    checkpoint_losses(series, torch.ones(2, 16, dtype=torch.long), 0)
    assert "Loading weights" not in capfd.readouterr().err and hf_logging.is_progress_bar_enabled()
    checkpoint_losses(series, torch.ones(2, 16, dtype=torch.long), 0, progress=True)
    assert "Loading weights" in capfd.readouterr().err


def _suite_record(tmp_path, result):
    """``result`` as the suite writes it, with the inputs whose absence marks an earlier saelab's record."""
    evals = tmp_path / "evals"
    evals.mkdir(exist_ok=True)
    inputs = {"model_dtype": "float32", "draw_pool": 4096}
    (evals / "compute_equivalent.json").write_text(json.dumps(
        {"metric": "compute_equivalent", "schema_version": 1, "status": "ok", "reason": None, "inputs": inputs,
         "sae": {}, "eval": {}, "wall_s": 2.0, "created": "2026-01-01T00:00:00Z", "result": result}))


def test_reports_print_the_interval_and_read_results_from_before_it(tmp_path):
    """The suite report gives each fraction its interval (an unbounded one as ∞) and says what the intervals are and
    how the draws outside the models' compute counted; a result from before intervals existed, or one whose losses
    were cached without them, renders (report and plot) without one."""
    from saelab.evals.compute_equivalent import INTERVAL_METHOD
    from saelab.report.paper import write_paper_report

    points, sums, spliced, clean = doc_sums(20, seed=5)
    res = compute_equivalent(points, spliced, clean_loss=clean, reference_compute=TOTAL, fit_min_frac=0,
                             loss_sums=sums, n_boot=100, series_name="tiny")
    res = {**res, "series": {"name": "tiny", "description": "d", "total_tokens": TOTAL}, "n_predictions": 1000,
           "interval_groups": "documents", "interval_note": None, "interval_method": INTERVAL_METHOD}
    ci = res["intervals"]
    _suite_record(tmp_path, res)
    text = write_paper_report(tmp_path).read_text()
    low, high = (f"{ci['fraction'][k]:.3g}" for k in ("low", "high"))
    assert f"training-progress equivalent {res['fraction']:.3g} [{low}, {high}] of the training tokens" in text
    assert f"**{res['fraction']:.4g}** [{ci['fraction']['low']:.4g}, {ci['fraction']['high']:.4g}] (power)" in text
    assert f"| fraction relative to the clean model | {res['fraction_relative']:.4g} [" in text
    assert "[low, high]: 95% paired bootstrap intervals over the 20 documents of the eval contexts, 100 draws" in text
    # An upper bound among unreachable draws, and the draws outside the models' compute, are said as such.
    unbounded = {**res, "intervals": {**ci, "fraction": {**ci["fraction"], "high": None, "n_infinite": 9}},
                 "interval_draws": {**res["interval_draws"], "inside": 80, "beyond_last": 11, "unreachable": 9}}
    _suite_record(tmp_path, unbounded)
    text = write_paper_report(tmp_path).read_text()
    assert f"training-progress equivalent {res['fraction']:.3g} [{low}, ∞) of" in text
    assert ("of the draws, 11 beyond the last model's compute and 0 before the first (extrapolated by the power law, "
            "counted where it places them); 9 at or below the fitted floor c (never reached: infinite compute") in text
    # Written before the interval existed, or with losses cached without its sums: no interval, and a note why.
    before = {k: v for k, v in res.items() if not k.startswith("interval")}
    assert "earlier saelab" not in text
    for result, note in ((before, "It has no intervals (an earlier saelab wrote it, before saelab computed them); the "
                                  "suite run again (`--metrics compute_equivalent` for it alone) computes it anew"),
                         ({**before, "intervals": {}, "interval_note": "No interval: the losses",
                           "interval_method": INTERVAL_METHOD}, "No interval: the losses.")):
        _suite_record(tmp_path, result)
        text = write_paper_report(tmp_path).read_text()
        assert "[low, high]" not in text and f"{res['fraction']:.3g} of the training tokens" in text
        assert (note in text) if note else "No interval" not in text
        assert ("earlier saelab" in text) == ("interval_method" not in result)
        compute_equivalent_plot(result, tmp_path / "ce.png")
