"""Compute-equivalent across a model family (paper §4.1): compute C = 6 N D with N the non-embedding
parameters, the fit and inversion shared with the training-progress equivalent, the Pythia family (hub
code paths, local copies), a family trained here end to end with a real SAE spliced into its largest
member, and results written before families existed."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

from saelab.evals.compute_equivalent import (
    PYTHIA_TOTAL_TOKENS,
    ComputeEquivalentConfig,
    SeriesError,
    checkpoint_losses,
    compute_equivalent,
    local_family,
    pythia_family,
    resolve_series,
    run_compute_equivalent,
    upgrade_result,
)
from saelab.models.lm_series import LMFamilyConfig, LMSeriesConfig, count_parameters, train_model_family
from saelab.report.plots import compute_equivalent_plot

HOOK = "blocks.1.hook_resid_post"
A, B, C_IRR = 300.0, 0.15, 2.0


def law(c):
    return A * np.asarray(c, dtype=np.float64) ** -B + C_IRR


def gpt2_non_embedding(n_layer: int, d: int) -> int:
    """A GPT-2 block: attention qkv (3d^2 + 3d) and out (d^2 + d), MLP d->4d->d (8d^2 + 5d), 2 LayerNorms
    (4d); plus the final LayerNorm (2d). Embeddings and the tied unembedding are not counted."""
    return n_layer * (12 * d * d + 13 * d) + 2 * d


def synthetic_family(sizes=(1e5, 4e5, 1.6e6, 6.4e6, 2.56e7), tokens_per_param=20):
    return [{"label": f"m{i}", "params": int(n), "tokens": int(tokens_per_param * n),
             "loss": float(law(6 * n * tokens_per_param * n))} for i, n in enumerate(sizes)]


# ---- the fit and its inversion, on known answers ----------------------------------------------
def test_family_fit_inverts_in_flops_relative_to_the_evaluated_member():
    pts = synthetic_family()
    ref = pts[-1]
    c_ref = 6.0 * ref["params"] * ref["tokens"]
    target = c_ref / 10
    res = compute_equivalent(pts, float(law(target)), reference_compute=c_ref, kind="model_family",
                             clean_loss=ref["loss"], fit_min_frac=0.5, series_name="syn", reference_label="m4")
    assert res["kind"] == "model_family" and res["compute_unit"] == "FLOPs"
    assert [r["compute"] for r in res["checkpoints"]] == [6.0 * p["params"] * p["tokens"] for p in pts]
    assert all(r["used_in_fit"] for r in res["checkpoints"])  # fit_min_frac is for checkpoint series only
    assert res["fit"]["b"] == pytest.approx(B, rel=1e-6) and res["fit"]["c"] == pytest.approx(C_IRR, rel=1e-5)
    assert res["compute_equivalent"] == pytest.approx(target, rel=1e-5)
    assert res["fraction"] == pytest.approx(0.1, rel=1e-5) and res["clean_fraction"] == pytest.approx(1, rel=1e-5)
    assert res["reference"] == {"how": "member", "label": "m4"} and res["reference_compute"] == c_ref
    assert not res["extrapolated"]
    # Not a member: the denominator is the compute the fit needs for the model's clean loss.
    res2 = compute_equivalent(pts, float(law(target)), reference_compute=None, kind="model_family",
                              clean_loss=float(law(c_ref / 2)))
    assert res2["reference"]["how"] == "clean_loss" and res2["reference_compute"] == pytest.approx(c_ref / 2, rel=1e-5)
    assert res2["fraction"] == pytest.approx(0.2, rel=1e-5) == res2["fraction_relative"]
    json.dumps(res, allow_nan=False)


def test_interval_of_a_family_whose_reference_is_the_clean_loss_moves_with_it():
    """A family member or not, each draw's denominator is the headline's: a member's fixed 6 N D, or (the evaluated
    model no member) the compute the draw's own curve needs for the draw's clean loss, so that the fraction and the
    fraction relative are one number in every draw, and the clean fraction is 1."""
    rng = np.random.default_rng(0)
    pts = synthetic_family()
    computes = [6.0 * p["params"] * p["tokens"] for p in pts]
    offset, G = rng.normal(0, 0.2, 24), 24
    per_doc = lambda c: law(c) + offset + rng.normal(0, 0.02, G)  # noqa: E731 (one prediction per document)
    sums = {"references": torch.tensor(np.stack([per_doc(c) for c in computes], 1)),
            "spliced": torch.tensor(per_doc(computes[-1] / 10)), "clean": torch.tensor(per_doc(computes[-1] / 2)),
            "n": torch.ones(G, dtype=torch.float64)}
    pts = [{**p, "loss": float(sums["references"][:, i].mean())} for i, p in enumerate(pts)]
    mean = {k: float(sums[k].mean()) for k in ("spliced", "clean")}
    for reference in (computes[-1], None):
        res = compute_equivalent(pts[::-1], mean["spliced"], reference_compute=reference, kind="model_family",
                                 clean_loss=mean["clean"], loss_sums={**sums, "references": sums["references"].flip(1)},
                                 n_boot=100)
        ci = res["intervals"]
        assert all(ci[k]["low"] < res[k] < ci[k]["high"] for k in ("fraction", "fraction_relative"))
        if reference is None:
            assert res["reference"]["how"] == "clean_loss" and ci["fraction"] == pytest.approx(ci["fraction_relative"])
            assert ci["clean_fraction"]["low"] == pytest.approx(1) == ci["clean_fraction"]["high"]
        else:  # against the member's fixed compute the clean fraction varies with the draws
            assert ci["clean_fraction"]["low"] < res["clean_fraction"] < ci["clean_fraction"]["high"]


def test_extrapolation_is_decided_by_where_c_star_lies_not_by_the_measured_losses(tmp_path):
    """A member off the fitted curve: a spliced loss between its measured and fitted loss is inside the
    measured losses, yet the fit inverts it to a compute beyond that member's."""
    from saelab.report.paper import write_paper_report

    pts = synthetic_family()
    pts[-1]["loss"] -= 0.02  # the largest member (the evaluated one) below the curve
    pts[0]["loss"] -= 0.05  # the smallest below it too
    c_ref = 6.0 * pts[-1]["params"] * pts[-1]["tokens"]
    run = lambda loss: compute_equivalent(pts, loss, reference_compute=c_ref, kind="model_family",  # noqa: E731
                                          clean_loss=pts[-1]["loss"], series_name="syn", reference_label="m4")
    rows = run(pts[-1]["loss"])["checkpoints"]
    measured, fitted = [r["loss"] for r in rows], [r["fitted_loss"] for r in rows]
    assert measured[-1] < fitted[-1] and measured[0] < fitted[0]
    compute = [r["compute"] for r in rows]
    # Worse than the clean loss, better than the fit at the largest member: C* past the largest compute.
    res = run((measured[-1] + fitted[-1]) / 2)
    assert min(measured) < res["spliced_loss"] < measured[0]
    assert res["compute_equivalent"] > compute[-1] and res["fraction"] > 1
    assert res["extrapolated"] and res["extrapolation"] == "beyond_last"
    # The SAE raised the loss, so the fraction > 1 is the fit's error at the member, not a compute-equivalent.
    assert res["below_fit_error"] and res["fraction_relative"] < 1
    # Above the smallest member's measured loss but below its fitted one: inside the fitted compute.
    inside = run((measured[0] + fitted[0]) / 2)
    assert compute[0] < inside["compute_equivalent"] < compute[-1]
    assert not inside["extrapolated"] and inside["extrapolation"] is None and not inside["below_fit_error"]
    assert run(fitted[0] + 0.01)["extrapolation"] == "before_first"
    # Without a fit's error to explain it: a spliced loss below the clean one is no such case.
    assert not run(measured[-1] - 0.01)["below_fit_error"]
    # The report says neither "inside the measured range" nor presents the fraction as the SAE's cost.
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "compute_equivalent.json").write_text(json.dumps(
        {"metric": "compute_equivalent", "schema_version": 1, "status": "ok", "reason": None, "inputs": {},
         "sae": {}, "eval": {}, "wall_s": 2.0, "created": "2026-01-01T00:00:00Z",
         "result": res | {"series": {"name": "syn", "kind": "model_family", "description": "synthetic"},
                          "n_predictions": 100}}))
    text = write_paper_report(tmp_path).read_text()
    assert "inside the measured range" not in text and "| extrapolated | beyond_last |" in text
    assert "(extrapolated: beyond_last); the spliced loss is worse than the clean loss, so this fraction >= 1 is " \
           "the fit's error at the evaluated model" in text
    assert "| below the fit's error |" in text
    assert f"relative to the clean model: {res['fraction_relative']:.4g}" in text


def test_family_messages_name_members_and_flops():
    pts = synthetic_family()
    with pytest.raises(SeriesError, match="model family 'syn' has 2 members; the fit needs at least 3 "
                                          r"\(FLOPs: loss = 1.2e\+12: "):
        compute_equivalent(pts[:2], 3.0, reference_compute=None, kind="model_family", series_name="syn")
    flat = [p | {"loss": 5.0 + 0.01 * i} for i, p in enumerate(pts)]
    with pytest.raises(SeriesError, match="model family 'syn' does not decrease.*expected models of increasing "
                                          "compute"):
        compute_equivalent(flat, 3.0, reference_compute=None, kind="model_family", series_name="syn")


# ---- N: the non-embedding parameter count ------------------------------------------------------
def test_count_parameters_matches_published_pythia_counts_and_gpt2_formula():
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    # Pythia-14m and -31m as published (model cards: "Non-Embedding Params" 1,189,888 and 4,739,072;
    # untied embed_in / embed_out of 50,304 x d_model each).
    for d, heads, published in ((128, 4, 1_189_888), (256, 8, 4_739_072)):
        neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50304, hidden_size=d, num_hidden_layers=6,
                                                num_attention_heads=heads, intermediate_size=4 * d,
                                                rotary_pct=0.25, tie_word_embeddings=False))
        assert count_parameters(neox) == (published + 2 * 50304 * d, published)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=4))
    total, non_embedding = count_parameters(gpt2)
    assert non_embedding == gpt2_non_embedding(2, 32)
    assert total - non_embedding == 1000 * 32 + 64 * 32  # tied unembedding counted once, with the embedding


# ---- the Pythia family ---------------------------------------------------------------------------
def test_pythia_family_members_tokens_and_hub_revisions(monkeypatch):
    import saelab.models

    fam = resolve_series("pythia-family")
    assert fam.kind == "model_family" and fam.name == "pythia-family" and fam.total_tokens is None
    assert [c.label for c in fam.checkpoints] == ["pythia-14m", "pythia-31m", "pythia-70m", "pythia-160m",
                                                  "pythia-410m", "pythia-1b", "pythia-1.4b"]
    assert PYTHIA_TOTAL_TOKENS == 143_000 * 1024 * 2048 == 299_892_736_000
    assert all(c.tokens == 299_892_736_000 and c.params is None for c in fam.checkpoints)
    assert fam.checkpoints[2].source == "hub:EleutherAI/pythia-70m@step143000"
    assert fam.checkpoints[2].model_id == "EleutherAI/pythia-70m"
    dd = resolve_series("pythia-family-deduped:160m,70m")
    assert [c.label for c in dd.checkpoints] == ["pythia-70m-deduped", "pythia-160m-deduped"]
    assert dd.info()["kind"] == "model_family" and dd.info()["params"] == "non_embedding"
    calls = []
    monkeypatch.setattr(saelab.models, "load_model", lambda spec, **kw: calls.append((spec, kw)) or "lm")
    assert dd.checkpoints[0].load() == "lm"
    assert calls == [("EleutherAI/pythia-70m-deduped", {"device": "cpu", "dtype": torch.float32, "revision": "step143000"})]
    with pytest.raises(SeriesError, match=r"no Pythia of size\(s\) \['5m'\] in the Pythia family \(--series\)"):
        resolve_series("pythia-family:70m,5m")
    with pytest.raises(SeriesError, match="--series-steps apply to a checkpoint series, not to the model family"):
        resolve_series("pythia-family", steps=[1000])
    with pytest.raises(SeriesError, match=r"unknown checkpoint series 'pythia-familie' \(--series\): expected a "
                                          "model family"):
        resolve_series("pythia-familie")


def test_pythia_family_from_local_copies_counts_n_after_load(data_dir, tmp_path):
    """Pythia-architecture models (GPT-NeoX, untied unembedding) in local folders: loaded by load_model,
    N counted after loading, D = Pythia's tokens, losses cached with the count."""
    from transformers import GPT2TokenizerFast, GPTNeoXConfig, GPTNeoXForCausalLM

    from saelab.data import token_contexts
    from saelab.models import load_model

    tok = GPT2TokenizerFast.from_pretrained(str(data_dir / "gpt2-tokenizer"))
    widths = {"14m": 32, "31m": 64}
    for size, d in widths.items():
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50304, hidden_size=d, num_hidden_layers=1,
                                                 num_attention_heads=4, intermediate_size=4 * d,
                                                 tie_word_embeddings=False, bos_token_id=tok.eos_token_id,
                                                 eos_token_id=tok.eos_token_id))
        model.save_pretrained(tmp_path / "pythia" / f"pythia-{size}")
        tok.save_pretrained(tmp_path / "pythia" / f"pythia-{size}")
    fam = pythia_family(["31m", "14m"], local_root=tmp_path / "pythia")
    lm = load_model(str(tmp_path / "pythia" / "pythia-14m"))
    tokens = token_contexts(str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), lm.tokenize, 16, n_contexts=4,
                            bos_token_id=lm.bos_token_id)
    rows = checkpoint_losses(fam, tokens, 1, cache_path=tmp_path / "losses.json")
    # 1 layer: 12 d^2 + 13 d, final LayerNorm 2 d (as GPT-2's block, with a parallel residual).
    assert [r["params"] for r in rows] == [12 * d * d + 15 * d for d in widths.values()]
    assert [r["compute"] for r in rows] == [6.0 * r["params"] * 299_892_736_000 for r in rows]
    assert all(8 < r["loss"] < 13 for r in rows)  # random models: about log(50304) = 10.8
    cached = json.loads((tmp_path / "losses.json").read_text())["losses"]
    assert sorted(v["params"] for v in cached.values()) == [r["params"] for r in rows]


# ---- a family trained here, end to end --------------------------------------------------------
FAMILY = LMFamilyConfig(sizes=((1, 32, 4), (1, 48, 4), (1, 64, 4), (2, 64, 4)), tokens_per_param=0.15)


@pytest.fixture(scope="module")
def tiny_family(data_dir, tmp_path_factory):
    """Four GPT-2-style sizes (N 12.8k to 100k non-embedding), each trained on 0.15 N tokens (15 to 118 steps
    of 4 x 32 tokens) of Wikipedia with the real GPT-2 tokenizer (about a minute on 2 CPU cores)."""
    cfg = LMFamilyConfig(LMSeriesConfig(tokenizer=str(data_dir / "gpt2-tokenizer"), batch_size=4, context_size=32),
                         FAMILY.sizes, FAMILY.tokens_per_param)
    return train_model_family(cfg, tmp_path_factory.mktemp("family") / "tiny-family",
                              corpus=str(data_dir / "wiki-en" / "wiki_train.jsonl.xz"))


@pytest.fixture(scope="module")
def family_sae_run(tiny_family, data_dir, tmp_path_factory):
    """A finished SAE run (n=128, k=2) on the largest member's last residual stream (blocks.1.hook_resid_post)."""
    from saelab.pipeline import HarvestConfig, harvest, train_from_cache
    from saelab.train import TrainConfig

    base = tmp_path_factory.mktemp("family-run")
    cfg = HarvestConfig(model=str(tiny_family / "l2-d64-h4"), hook=HOOK, context_size=32, n_tokens=8192,
                        corpus=str(data_dir / "wiki-en" / "wiki_train.jsonl.xz"), buffer_tokens=8192)
    cache = harvest(cfg, base / "acts", progress=False)
    train_from_cache(cache, base / "run", TrainConfig(n_latents=128, k=2, batch_size=256, total_tokens=8192,
                                                      init_rows=2048), progress=False)
    return base / "run"


@pytest.mark.slow  # ~30 s on 2 cores: trains the family (module fixture); .ci/run runs the slow tests
def test_trained_family_folder(tiny_family, data_dir):
    from saelab.models import load_model

    meta = json.loads((tiny_family / "family.json").read_text())
    assert meta["kind"] == "model_family" and meta["params"] == "non_embedding"
    members = meta["members"]
    assert [m["path"] for m in members] == ["l1-d32-h4", "l1-d48-h4", "l1-d64-h4", "l2-d64-h4"]
    for m in members:
        assert m["params"] == gpt2_non_embedding(m["n_layer"], m["n_embd"])
        assert m["params"] == count_parameters(load_model(str(tiny_family / m["path"])).model)[1]
        assert m["steps"] == math.ceil(FAMILY.tokens_per_param * m["params"] / 128) and m["tokens"] == m["steps"] * 128
        assert m["compute"] == 6 * m["params"] * m["tokens"]
    assert [m["compute"] for m in members] == sorted(m["compute"] for m in members)
    fam = local_family(tiny_family)
    assert fam.kind == "model_family" and [c.params for c in fam.checkpoints] == [m["params"] for m in members]
    # A finished family is returned as it is; other settings in the same folder are refused.
    cfg = LMFamilyConfig(LMSeriesConfig(tokenizer=str(data_dir / "gpt2-tokenizer"), batch_size=4, context_size=32),
                         FAMILY.sizes, FAMILY.tokens_per_param)
    corpus = str(data_dir / "wiki-en" / "wiki_train.jsonl.xz")
    assert train_model_family(cfg, tiny_family, corpus=corpus) == tiny_family
    from saelab.errors import SaelabError

    with pytest.raises(SaelabError, match="already holds a model family trained with other settings"):
        train_model_family(LMFamilyConfig(cfg.base, FAMILY.sizes, 0.1), tiny_family, corpus=corpus)


def test_sizes_must_grow(data_dir, tmp_path):
    from saelab.errors import SaelabError

    cfg = LMFamilyConfig(LMSeriesConfig(tokenizer=str(data_dir / "gpt2-tokenizer")), sizes=((1, 64, 4), (1, 32, 4)))
    with pytest.raises(SaelabError, match=r"non-embedding parameter counts \[50112, 12768\]; expected them to "
                                          "increase"):
        train_model_family(cfg, tmp_path / "f", corpus=str(data_dir / "wiki-en" / "wiki_train.jsonl.xz"))


@pytest.mark.slow  # with the trained family; .ci/run runs the slow tests
def test_compute_equivalent_on_a_trained_family(tiny_family, family_sae_run, data_dir, tmp_path):
    from saelab.data import token_contexts
    from saelab.models import load_model
    from saelab.pipeline import load_run

    sae, _ = load_run(family_sae_run)
    lm = load_model(str(tiny_family / "l2-d64-h4"))
    tokens = token_contexts(str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), lm.tokenize, 32, n_contexts=48,
                            bos_token_id=lm.bos_token_id)
    res = run_compute_equivalent(lm, sae, tokens, ComputeEquivalentConfig(series=str(tiny_family)))
    json.dumps(res, allow_nan=False)
    rows, fit = res["checkpoints"], res["fit"]
    assert res["kind"] == "model_family" and res["series"]["kind"] == "model_family"
    assert [r["label"] for r in rows] == ["l1-d32-h4", "l1-d48-h4", "l1-d64-h4", "l2-d64-h4"]
    assert all(r["compute"] == 6.0 * r["params"] * r["tokens"] for r in rows)
    losses = [r["loss"] for r in rows]
    assert losses == sorted(losses, reverse=True) and losses[0] - losses[-1] > 1  # more compute, lower loss
    # The evaluated model is the largest member: it is the reference, and its clean loss is that member's.
    assert res["reference"] == {"how": "member", "label": "l2-d64-h4"}
    assert res["reference_compute"] == rows[-1]["compute"]
    assert res["clean_loss"] == pytest.approx(losses[-1], abs=1e-5)
    # Its own loss maps back to its own compute within the fit's error: no residual exceeds sqrt(n) * rmse, so
    # the clean loss lies within that band of the fitted curve at its compute.
    band = math.sqrt(fit["n_points"]) * fit["rmse_log"]
    fitted = rows[-1]["fitted_loss"]
    inv = lambda y: (fit["a"] / (y - fit["c"])) ** (1 / fit["b"]) if y > fit["c"] else math.inf  # noqa: E731
    lo, hi = (inv(fitted * math.exp(sign * band)) / res["reference_compute"] for sign in (1, -1))
    assert lo <= res["clean_fraction"] <= hi and 0.5 < res["clean_fraction"] < 2
    assert fit["rmse_log"] < 0.02 and fit["b"] > 0
    # The SAE raises the loss: less compute than the model's own.
    assert res["spliced_loss"] > res["clean_loss"] and 0 < res["fraction"] < res["clean_fraction"]
    assert res["fraction_relative"] == pytest.approx(res["fraction"] / res["clean_fraction"], rel=1e-9)
    # A worse splice is worth less compute; a loss beyond the family's range is flagged.
    points = [{k: r[k] for k in ("label", "tokens", "params", "loss")} for r in rows]
    again = lambda loss: compute_equivalent(points, loss, reference_compute=res["reference_compute"],  # noqa: E731
                                            kind="model_family", clean_loss=res["clean_loss"])
    assert again(res["spliced_loss"])["fraction"] == pytest.approx(res["fraction"], rel=1e-12)
    assert again(res["spliced_loss"] + 0.2)["fraction"] < res["fraction"]
    assert again(losses[-1] - 0.05)["extrapolation"] == "beyond_last"
    assert again(losses[-1] - 0.05)["fraction"] > res["clean_fraction"]
    assert again(losses[0] + 0.05)["extrapolation"] == "before_first"
    # Between an end member's measured and fitted loss, the flag follows where C* lies, not the measured losses.
    compute = [r["compute"] for r in rows]
    for end in (0, -1):
        there = again((losses[end] + rows[end]["fitted_loss"]) / 2)
        assert there["extrapolated"] == (not compute[0] <= there["compute_equivalent"] <= compute[-1])
        assert there["below_fit_error"] == (there["spliced_loss"] > res["clean_loss"] and there["fraction"] >= 1)
    compute_equivalent_plot(res, tmp_path / "ce.png")
    data = (tmp_path / "ce.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24])[0] > 300


@pytest.mark.slow  # with the trained family; .ci/run runs the slow tests
def test_paper_suite_with_a_family_and_its_report(tiny_family, family_sae_run, data_dir, tmp_path, capsys):
    """saelab eval --suite paper --series FAMILY_FOLDER: the compute-equivalent in FLOPs, named as such."""
    from saelab.cli import main

    corpus = data_dir / "wiki-en" / "wiki_eval.jsonl.xz"
    argv = ["eval", str(family_sae_run), "--suite", "paper", "--series", str(tiny_family), "--out", str(tmp_path),
            "--metrics", "core", "compute_equivalent", "--corpus", str(corpus), "--downstream-tokens", "1024",
            "--recon-tokens", "2048", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    rec = json.loads((tmp_path / "evals" / "compute_equivalent.json").read_text())
    assert rec["status"] == "ok" and rec["result"]["kind"] == "model_family"
    report = (tmp_path / "evals" / "report.md").read_text()
    assert "compute-equivalent" in report and "of the compute of `l2-d64-h4` (6 N D, family `tiny-family`)" in report
    assert "| l2-d64-h4 | 100,096 |" in report and "training-progress" not in report
    r, compute = rec["result"], [c["compute"] for c in rec["result"]["checkpoints"]]
    assert r["extrapolated"] == (not compute[0] <= r["compute_equivalent"] <= compute[-1])
    assert ("| extrapolated | no (inside the measured range) |" in report) == (not r["extrapolated"])
    assert r["below_fit_error"] == (r["spliced_loss"] > r["clean_loss"] and r["fraction"] >= 1)
    # An unknown family is one line naming the option.
    capsys.readouterr()
    assert main(argv[:5] + ["pythia-family:3m"] + argv[6:]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("saelab ")]
    assert len(err) == 1 and "(--series)" in err[0] and "'3m'" in err[0], err


# ---- results written before families existed ----------------------------------------------------
OLD_RESULT = {
    "metric": "compute_equivalent", "hook": "blocks.1.hook_resid_post",
    "series": {"name": "tiny-series", "source": "/x", "total_tokens": 15360, "tokens_per_step": 128,
               "description": "local checkpoint series in /x"},
    "checkpoints": [{"label": f"checkpoint-{s}", "tokens": s * 128, "loss": float(law(s * 128)), "source": "",
                     "used_in_fit": True, "fitted_loss": float(law(s * 128))} for s in (20, 40, 60, 90, 120)],
    "fit": {"form": "L(C) = a * C^-b + c (C: training tokens)", "method": "power", "a": A, "b": B, "c": C_IRR,
            "b_se": 0.0, "c_se": 0.0, "rmse_log": 0.0, "n_points": 5, "min_tokens": 1536},
    "spliced_loss": float(law(7680)), "clean_loss": float(law(15360)), "n_predictions": 1440,
    "tokens_equivalent": 7680.0, "fraction": 0.5, "fraction_power": 0.5, "fraction_interp": 0.5,
    "tokens_equivalent_interp": 7680.0, "clean_tokens_equivalent": 15360.0, "clean_fraction": 1.0,
    "fraction_relative": 0.5, "extrapolated": False, "extrapolation": None, "checkpoint_s": 1.0, "wall_s": 2.0}


def test_old_results_read_as_training_progress(tmp_path):
    from saelab.report.paper import write_paper_report

    new = upgrade_result(OLD_RESULT)
    assert new["kind"] == "training_progress" and new["compute_equivalent"] == 7680.0
    assert new["reference_compute"] == 15360 and new["fit"]["min_compute"] == 1536
    assert [c["compute"] for c in new["checkpoints"]] == [c["tokens"] for c in OLD_RESULT["checkpoints"]]
    assert "kind" not in OLD_RESULT and upgrade_result(new) is new
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "compute_equivalent.json").write_text(json.dumps(
        {"metric": "compute_equivalent", "schema_version": 1, "status": "ok", "reason": None, "inputs": {},
         "sae": {}, "eval": {}, "wall_s": 2.0, "created": "2026-01-01T00:00:00Z", "result": OLD_RESULT}))
    text = write_paper_report(tmp_path).read_text()
    assert "training-progress equivalent 0.5 of the training tokens of `tiny-series`" in text
    assert "**training-progress equivalent**" in text and "| checkpoint-120 | 15,360 |" in text
    assert "with >= 1,536 tokens" in text
    assert (tmp_path / "evals" / "compute_equivalent.png").read_bytes()[:4] == b"\x89PNG"  # drawn from it
