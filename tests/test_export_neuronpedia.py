"""Neuronpedia / SAEDashboard export of the browser's statistics: the layout SAEDashboard writes (schema transcribed
from its source), the numbers against the statistics and dense references, and, where sae-dashboard is installed,
its own loader and its converter to Neuronpedia's bulk-import layout."""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_browser_site import POOL

from saelab.data import token_contexts
from saelab.errors import ConfigError, CorpusError, RunExistsError
from saelab.evals.probe_tasks import token_strings
from saelab.explore.attribution import unembed_direction
from saelab.explore.browser.build import (
    BrowseConfig,
    SAESource,
    collect_statistics,
    equal_bin_counts,
    finish_statistics,
    read_tokens,
)
from saelab.explore.browser.export import LOGIT_HIST_BINS, export_neuronpedia, export_neuronpedia_run
from saelab.sae import SAEConfig, TopKSAE, save_sae

HOOK = "blocks.1.hook_resid_post"
N_TOKENS = 31 * 40  # 40 contexts of 32 tokens, position 0 not scored
DEAD = 7  # a latent made silent on purpose

# Field names and JSON types of SAEDashboard's Neuronpedia batch files, transcribed from
# jbloomAus/SAEDashboard sae_dashboard/neuronpedia/neuronpedia_dashboard.py at commit
# db4839a41116d729fc9f43c1878e7b8b157748ea (NeuronpediaDashboardBatch / NeuronpediaDashboardFeature /
# NeuronpediaDashboardActivation: constructor annotations and to_dict); the dfa_* fields are written only
# when DFA was computed. The same keys appear in that repository's tests/acceptance/test_simple/batch-0.json
# (a real runner output, older: without sae_id_suffix and vector) and are the ones read by
# sae_dashboard/neuronpedia/neuronpedia_export.py (_process_batch) at the same commit.
BATCH_SCHEMA = {"model_id": str, "layer": int, "sae_set": str, "sae_id_suffix": (str, type(None)), "features": list}
FEATURE_SCHEMA = {
    "feature_index": int,
    "neuron_alignment_indices": [int], "neuron_alignment_values": [float], "neuron_alignment_l1": [float],
    "correlated_neurons_indices": [int], "correlated_neurons_l1": [float], "correlated_neurons_pearson": [float],
    "correlated_features_indices": [int], "correlated_features_l1": [float], "correlated_features_pearson": [float],
    "neg_str": [str], "neg_values": [float], "pos_str": [str], "pos_values": [float],
    "frac_nonzero": float,
    "freq_hist_data_bar_values": [float], "freq_hist_data_bar_heights": [int],
    "logits_hist_data_bar_heights": [int], "logits_hist_data_bar_values": [float],
    "n_prompts_total": int, "n_tokens_in_prompt": int, "dataset": str,
    "decoder_weights_dist": [float], "activations": list, "vector": [float],
}
ACTIVATION_SCHEMA = {"bin_min": (int, float), "bin_max": (int, float), "bin_contains": (int, float), "tokens": [str],
                     "values": [float], "qualifying_token_index": int}


def check_schema(obj: dict, schema: dict, where: str) -> None:
    assert set(obj) == set(schema), f"{where}: keys {sorted(set(obj) ^ set(schema))} differ from SAEDashboard's"
    for key, want in schema.items():
        value = obj[key]
        if isinstance(want, list):
            assert isinstance(value, list), f"{where}.{key} is not a list"
            bad = [v for v in value if not isinstance(v, want[0]) or isinstance(v, bool)]
            assert not bad, f"{where}.{key}: {bad[:3]} are not {want[0].__name__}"
        else:
            assert isinstance(value, want) and not isinstance(value, bool), f"{where}.{key}={value!r}: wrong type"


@pytest.fixture(scope="module")
def corpus(data_dir) -> str:
    return str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")


def centred_sae(lm, corpus: str, n: int, seed: int) -> TopKSAE:
    """A random SAE whose b_dec is the mean activation (latents fire at varied rates), with one dead latent; it
    records ``lm`` by its name."""
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=n, k=6, hook_name=HOOK, model_name=lm.name, context_size=32))
    toks = token_contexts(corpus, lm.tokenize, 32, n_contexts=8, bos_token_id=lm.bos_token_id)
    with torch.no_grad():
        sae.b_dec.copy_(lm.activations(toks, HOOK)[:, 1:].reshape(-1, 64).mean(0))
        sae.b_enc[DEAD] = -1e4
    return sae


@pytest.fixture(scope="module")
def exported(tiny_gpt2, corpus, tmp_path_factory):
    sae = centred_sae(tiny_gpt2, corpus, 128, 0)
    cfg = BrowseConfig(n_tokens=N_TOKENS, corpus=corpus, sample_pool_tokens=POOL,
                       n_top=5, n_samples=8, n_bands=4, lm_batch_size=8)
    tokens = read_tokens(tiny_gpt2, sae, cfg)
    [stats], _, _ = collect_statistics(tiny_gpt2, [SAESource("res-small", "mem", sae)], tokens, cfg, hook=HOOK,
                                       progress=False)
    finish_statistics(tiny_gpt2, stats, tokens, HOOK, cfg, progress=False, logit_hist_bins=LOGIT_HIST_BINS)
    out = tmp_path_factory.mktemp("np") / "export"
    summary = export_neuronpedia(stats, tokens, tiny_gpt2, out, dataset=corpus, n_bands=cfg.n_bands,
                                 n_features_per_batch=50)
    batches = [json.loads((out / f"batch-{b}.json").read_text()) for b in range(summary["batches"])]
    return out, summary, batches, stats, tokens, cfg


def features_by_index(batches) -> dict[int, dict]:
    return {f["feature_index"]: f for b in batches for f in b["features"]}


def test_files_follow_saedashboard_layout(exported):
    out, summary, batches, stats, tokens, cfg = exported
    assert sorted(p.name for p in out.iterdir()) == ["batch-0.json", "batch-1.json", "batch-2.json",
                                                     "run_settings.json", "skipped_indexes.json"]
    assert summary == {"out": str(out), "batches": 3, "features": 127, "skipped": 1, "model_id": "tiny-gpt2",
                       "layer": 1, "sae_set": "res-small", "sae_id_suffix": None}
    for b, batch in enumerate(batches):
        check_schema(batch, BATCH_SCHEMA, f"batch-{b}")
        assert (batch["model_id"], batch["layer"], batch["sae_set"]) == ("tiny-gpt2", 1, "res-small")
        for f in batch["features"]:
            check_schema(f, FEATURE_SCHEMA, f"feature {f['feature_index']}")
            for a in f["activations"]:
                check_schema(a, ACTIVATION_SCHEMA, f"feature {f['feature_index']} activation")
    assert [len(b["features"]) for b in batches] == [50, 50, 27]
    skipped = json.loads((out / "skipped_indexes.json").read_text())
    assert skipped == {"model_id": "tiny-gpt2", "layer": "1", "sae_set": "res-small", "skipped_indexes": [DEAD]}
    assert sorted(features_by_index(batches)) == [i for i in range(128) if i != DEAD]


def test_numbers_are_the_browser_statistics(exported, tiny_gpt2):
    out, _, batches, stats, tokens, cfg = exported
    feats = features_by_index(batches)
    busy = int(stats.count_N.argmax())
    f = feats[busy]
    assert f["frac_nonzero"] == pytest.approx(int(stats.count_N[busy]) / N_TOKENS)
    assert sum(f["freq_hist_data_bar_heights"]) == int(stats.count_N[busy])
    assert f["n_prompts_total"] == tokens.shape[0]
    top = [a for a in f["activations"] if a["bin_min"] == -1]
    assert len(top) == cfg.n_top and all(a["bin_max"] == round(float(stats.max_N[busy]), 5) for a in top)
    for a, ctx, pos in zip(top, stats.top_ctx_NK[busy], stats.top_pos_NK[busy]):
        ids = tokens[int(ctx), 1:]  # the BOS token is left out, as SAEDashboard does
        assert "".join(a["tokens"]) == tiny_gpt2.tokenizer.decode(ids) and len(a["values"]) == len(ids)
        assert a["qualifying_token_index"] == int(pos) - 1
        assert a["values"][a["qualifying_token_index"]] == max(a["values"])
    assert max(top[0]["values"]) == top[0]["bin_max"]
    bands = [a for a in f["activations"] if a["bin_min"] != -1]
    assert len(bands) == cfg.n_samples
    assert sum({(a["bin_min"], a["bin_max"]): a["bin_contains"] for a in bands}.values()) == pytest.approx(1.0)
    assert all(a["bin_min"] <= max(a["values"]) <= a["bin_max"] for a in bands)
    assert [a["bin_max"] for a in bands] == sorted((a["bin_max"] for a in bands), reverse=True)  # highest band first


def test_n_tokens_in_prompt_is_the_length_of_every_record(exported, tiny_gpt2, corpus, tmp_path):
    """Neuronpedia reads n_tokens_in_prompt as the tokens of each activation shown; it held the context size
    (32) while each record left the BOS token out (31). An SAE trained with position 0 keeps all 32."""
    out, _, batches, _, tokens, _ = exported
    with_bos = centred_sae(tiny_gpt2, corpus, 64, 2)
    with_bos.cfg.exclude_first = False
    save_sae(with_bos, tmp_path / "with-bos" / "sae")
    cfg = BrowseConfig(n_tokens=32 * 4, corpus=corpus, sample_pool_tokens=POOL, n_top=2, n_samples=2, lm_batch_size=8)
    export_neuronpedia_run(tmp_path / "with-bos", tmp_path / "np", cfg, lm=tiny_gpt2, progress=False)
    for folder, feats, want in ((out, features_by_index(batches).values(), tokens.shape[1] - 1),
                                (tmp_path / "np", json.loads((tmp_path / "np" / "batch-0.json").read_text())["features"],
                                 32)):
        assert feats and {f["n_tokens_in_prompt"] for f in feats} == {want}
        assert {len(a["tokens"]) for f in feats for a in f["activations"]} == {want}
        settings = json.loads((folder / "run_settings.json").read_text())
        assert (settings["n_tokens_in_prompt"], settings["context_size"]) == (want, 32)


def test_logit_tables_histogram_and_alignment_against_dense(exported, tiny_gpt2, tmp_path):
    _, _, batches, stats, tokens, _ = exported
    # statistics finished without the vocabulary histogram: the export computes the same one itself
    bare = dataclasses.replace(stats, logits={k: v for k, v in stats.logits.items() if not k.startswith("hist")})
    export_neuronpedia(bare, tokens, tiny_gpt2, tmp_path / "bare", n_features_per_batch=50)
    again = json.loads((tmp_path / "bare" / "batch-0.json").read_text())["features"]
    assert [f["logits_hist_data_bar_heights"] for f in again] == [f["logits_hist_data_bar_heights"]
                                                                   for f in batches[0]["features"]]
    sae = stats.source.sae
    for i, f in list(features_by_index(batches).items())[:5]:
        eff = unembed_direction(tiny_gpt2, sae.W_dec[i:i + 1].detach()).float()[0]
        order = torch.argsort(eff, descending=True)
        assert f["pos_str"] == token_strings(tiny_gpt2.tokenizer, order[:10].tolist(), readable_bytes=True)
        np.testing.assert_allclose(f["pos_values"], eff[order[:10]].numpy(), atol=1e-5)
        np.testing.assert_allclose(f["neg_values"], eff[order.flip(0)[:10]].numpy(), atol=1e-5)
        lo, hi = float(eff.min()), float(eff.max())
        assert f["logits_hist_data_bar_heights"] == torch.histc(eff, 50, lo, hi).long().tolist()
        assert f["logits_hist_data_bar_values"][0] == pytest.approx(lo + (hi - lo) / 100, abs=1e-5)
        w = sae.W_dec[i].detach()
        best = torch.argsort(w, descending=True)[:3]
        assert f["neuron_alignment_indices"] == best.tolist()
        np.testing.assert_allclose(f["neuron_alignment_l1"], (w[best].abs() / w.abs().sum()).numpy(), atol=1e-5)


def test_equal_bin_counts_equal_histc_row_by_row():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 49152, generator=g) * torch.rand(64, 1, generator=g) * 3  # values on bin edges occur
    x[3] = 0.25  # a constant row: every value in the first bin, as histc does
    lo, hi = x.min(1).values, x.max(1).values
    want = torch.stack([torch.histc(r, 50, float(a), float(b)).long() for r, a, b in zip(x, lo, hi)])
    assert torch.equal(equal_bin_counts(x, lo, hi, 50), want)


def test_dead_latents_exported_on_request_and_names_checked(exported, tiny_gpt2, tmp_path):
    _, _, _, stats, tokens, cfg = exported
    summary = export_neuronpedia([stats], tokens, tiny_gpt2, tmp_path / "all", include_dead=True, model_id="gpt2-tiny",
                                 layer=4, sae_set="res-x", sae_id_suffix="k6")
    batch = json.loads((tmp_path / "all" / "batch-0.json").read_text())
    names = (batch["model_id"], batch["layer"], batch["sae_set"], batch["sae_id_suffix"])
    assert names == ("gpt2-tiny", 4, "res-x", "k6")
    dead = features_by_index([batch])[DEAD]
    assert summary["features"] == 128 and dead["activations"] == [] and dead["frac_nonzero"] == 0.0
    assert dead["freq_hist_data_bar_heights"] == []
    with pytest.raises(RunExistsError, match="earlier Neuronpedia export"):
        export_neuronpedia(stats, tokens, tiny_gpt2, tmp_path / "all")
    export_neuronpedia(stats, tokens, tiny_gpt2, tmp_path / "all", overwrite=True)
    assert json.loads((tmp_path / "all" / "skipped_indexes.json").read_text())["skipped_indexes"] == [DEAD]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunExistsError, match="not a saelab Neuronpedia export"):
        export_neuronpedia(stats, tokens, tiny_gpt2, tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    odd = dataclasses.replace(stats, source=SAESource("x", "x", TopKSAE(dataclasses.replace(
        stats.source.sae.cfg, hook_name="transformer.h.1"))))
    with pytest.raises(ConfigError, match="cannot read a layer number"):
        export_neuronpedia(odd, tokens, tiny_gpt2, tmp_path / "odd")
    with pytest.raises(ConfigError, match="n_features_per_batch"):
        export_neuronpedia(stats, tokens, tiny_gpt2, tmp_path / "odd", n_features_per_batch=0)
    with pytest.raises(ConfigError, match=r"model_id 'GPT 2': expected 2 to 32 lowercase letters"):
        export_neuronpedia(stats, tokens, tiny_gpt2, tmp_path / "odd", model_id="GPT 2")
    with pytest.raises(ConfigError, match=r"sae_set 'res\.': expected 1 to 64 lowercase letters"):
        export_neuronpedia(stats, tokens, tiny_gpt2, tmp_path / "odd", sae_set="res.")


def test_a_failed_final_rename_keeps_the_earlier_export(exported, tiny_gpt2, tmp_path, monkeypatch):
    """The OS refusing the rename that puts a new export in place (os.rename raising, as on an I/O error):
    the earlier export is back at its place, byte for byte, and nothing else is left beside it."""
    _, _, _, stats, tokens, _ = exported
    out = tmp_path / "np"
    export_neuronpedia(stats, tokens, tiny_gpt2, out, n_features_per_batch=50)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rename = os.rename

    def refuse_the_new_export(src, dst):
        if Path(src).name.endswith(".tmp") and Path(dst) == out:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", refuse_the_new_export)
    with pytest.raises(OSError, match="Input/output error"):
        export_neuronpedia(stats, tokens, tiny_gpt2, out, overwrite=True, n_features_per_batch=25)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["np"]
    # A file of the user's in the export's folder would go with it: refused, even with overwrite
    (out / "README.md").write_text("mine")
    with pytest.raises(RunExistsError, match=r"^export folder \S+ holds README.md beside a Neuronpedia export"):
        export_neuronpedia(stats, tokens, tiny_gpt2, out, overwrite=True, n_features_per_batch=25)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {**before, "README.md": b"mine"}


def test_run_folders_exported_in_one_pass(tiny_gpt2, corpus, tmp_path):
    for name, n, seed in (("small", 64, 2), ("large", 96, 3)):
        save_sae(centred_sae(tiny_gpt2, corpus, n, seed), tmp_path / name / "sae")
    cfg = BrowseConfig(n_tokens=31 * 16, corpus=corpus, sample_pool_tokens=POOL, n_top=3, n_samples=4, lm_batch_size=8)
    res = export_neuronpedia_run([tmp_path / "small", tmp_path / "large"], tmp_path / "np", cfg, lm=tiny_gpt2,
                                 progress=False)
    assert [r["features"] + r["skipped"] for r in res] == [64, 96]
    with pytest.raises(ConfigError, match="sae_set 'res' names one SAE's set, and 2 SAEs were given"):
        export_neuronpedia_run([tmp_path / "small", tmp_path / "large"], tmp_path / "np2", cfg, lm=tiny_gpt2,
                               progress=False, sae_set="res")
    for name in ("small", "large"):
        feats = json.loads((tmp_path / "np" / name / "batch-0.json").read_text())["features"]
        assert feats and all(len(f["logits_hist_data_bar_heights"]) == 50 for f in feats)
        assert all(f["dataset"] == "English Wikipedia 2015 sample (saelab data/wiki-en/wiki_eval.jsonl.xz)"
                   for f in feats)
    # One SAE's export kept, the other's to make: both are written again, so the kept one's folder is checked
    # before the pass for the user's files it would lose
    shutil.rmtree(tmp_path / "np" / "large")
    (tmp_path / "np" / "small" / "README.md").write_text("mine")
    with pytest.raises(RunExistsError, match=r"^export folder \S+small holds README.md beside a Neuronpedia export"):
        export_neuronpedia_run([tmp_path / "small", tmp_path / "large"], tmp_path / "np", cfg, lm="no-such-model",
                               progress=False)
    assert not (tmp_path / "np" / "large").exists()


def test_run_settings_say_how_the_contexts_were_drawn(exported, tiny_gpt2, corpus, tmp_path):
    """run_settings.json named the draw only by inputs.browse.sample_pool_tokens: absent where the contexts were read
    in order, and the setting's number where the draw pooled more tokens (those read), never how the contexts were
    drawn. It says so as site.json and top do (contexts_drawn); contexts given as tokens are said to be so."""
    save_sae(centred_sae(tiny_gpt2, corpus, 64, 2), tmp_path / "run" / "sae")
    for pool, words in ((0, "read from the corpus's start, in order"),
                        (64, f"drawn at random (seed 0) from the corpus's first {4 * 32:,} tokens")):  # 4 read
        cfg = BrowseConfig(n_tokens=31 * 4, corpus=corpus, sample_pool_tokens=pool, n_top=2, n_samples=2,
                           lm_batch_size=8)
        export_neuronpedia_run(tmp_path / "run", tmp_path / f"np{pool}", cfg, lm=tiny_gpt2, progress=False)
        assert json.loads((tmp_path / f"np{pool}" / "run_settings.json").read_text())["contexts_drawn"] == words
    out = exported[0]
    assert json.loads((out / "run_settings.json").read_text())["contexts_drawn"] == "given as a token tensor"


def test_the_corpus_is_named_without_its_local_path(tiny_gpt2, corpus, tmp_path):
    """The files are for upload to a public site: a local corpus is named by its base name, not by the
    path of the user's home folder; a folder by its name, a hub dataset as given."""
    from saelab.data import corpus_name

    mine = tmp_path / "home" / "me" / "my_text.jsonl.xz"
    mine.parent.mkdir(parents=True)
    shutil.copy(corpus, mine)
    save_sae(centred_sae(tiny_gpt2, corpus, 64, 2), tmp_path / "run" / "sae")
    cfg = BrowseConfig(n_tokens=31 * 4, corpus=str(mine), n_top=2, n_samples=2, lm_batch_size=8)
    export_neuronpedia_run(tmp_path / "run", tmp_path / "np", cfg, lm=tiny_gpt2, progress=False)
    feats = json.loads((tmp_path / "np" / "batch-0.json").read_text())["features"]
    assert feats and {f["dataset"] for f in feats} == {"my_text.jsonl.xz"}
    assert json.loads((tmp_path / "np" / "run_settings.json").read_text())["dataset"] == "my_text.jsonl.xz"
    shared = [*(tmp_path / "np").glob("batch-*.json"), tmp_path / "np" / "skipped_indexes.json"]
    assert not [f.name for f in shared if str(mine.parent) in f.read_text()]
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("Some text.")
    assert corpus_name(str(tmp_path / "texts"), "eval") == "texts"
    assert corpus_name("Salesforce/wikitext", "eval") == "Salesforce/wikitext"
    assert corpus_name(None, "eval") == "English Wikipedia 2015 sample (saelab data/wiki-en/wiki_eval.jsonl.xz)"


def test_run_settings_carry_no_local_path_and_reuse_goes_by_the_weights(tiny_gpt2, corpus, tmp_path):
    """run_settings.json recorded the SAE's and the corpus's paths as given (the exporter's home folder, in
    files meant for upload). It names them by their base names and the SAE by its weights' hash: the same
    export again is reused, other weights at the same path are not."""
    from saelab.run_folder import sae_sha256

    home = tmp_path / "home" / "me"
    text = home / "texts" / "my_text.jsonl.xz"
    text.parent.mkdir(parents=True)
    shutil.copy(corpus, text)
    sae = centred_sae(tiny_gpt2, corpus, 64, 2)
    save_sae(sae, home / "runs" / "n64" / "sae")
    cfg = BrowseConfig(n_tokens=31 * 4, corpus=str(text), n_top=2, n_samples=2, lm_batch_size=8)
    out = tmp_path / "np"
    assert export_neuronpedia_run(home / "runs" / "n64", out, cfg, lm=tiny_gpt2, progress=False)["reused"] is False
    recorded = (out / "run_settings.json").read_text()
    assert str(home) not in recorded and str(tmp_path) not in recorded
    settings = json.loads(recorded)
    assert (settings["sae"], settings["sae_sha256"]) == ("n64", sae_sha256(sae))
    assert settings["inputs"]["browse"]["corpus"] == "my_text.jsonl.xz"
    assert export_neuronpedia_run(home / "runs" / "n64", out, cfg, lm=tiny_gpt2, progress=False)["reused"] is True
    shutil.rmtree(home / "runs" / "n64" / "sae")  # retrained: other weights at the same path
    save_sae(centred_sae(tiny_gpt2, corpus, 64, 3), home / "runs" / "n64" / "sae")
    with pytest.raises(RunExistsError, match="made from other SAE files"):
        export_neuronpedia_run(home / "runs" / "n64", out, cfg, lm=tiny_gpt2, progress=False)


def test_each_sae_s_weights_are_hashed_once(tiny_gpt2, corpus, tmp_path, monkeypatch):
    """The export's key and its run_settings.json both name each SAE by its weights' hash, which reads every
    weight: it was computed twice per SAE."""
    import saelab.explore.browser.export as export
    import saelab.run_folder
    from saelab.run_folder import sae_sha256

    hashed = []

    def counted(sae):  # the real hash, its calls counted
        hashed.append(sae)
        return sae_sha256(sae)

    monkeypatch.setattr(export, "sae_sha256", counted)
    monkeypatch.setattr(saelab.run_folder, "sae_sha256", counted)
    saes = {name: centred_sae(tiny_gpt2, corpus, n, seed) for name, n, seed in (("small", 64, 2), ("large", 96, 3))}
    for name, sae in saes.items():
        save_sae(sae, tmp_path / name / "sae")
    cfg = BrowseConfig(n_tokens=31 * 4, corpus=corpus, sample_pool_tokens=POOL, n_top=2, n_samples=2, lm_batch_size=8)
    export_neuronpedia_run([tmp_path / "small", tmp_path / "large"], tmp_path / "np", cfg, lm=tiny_gpt2,
                           progress=False)
    assert len(hashed) == 2 and {s.n_latents for s in hashed} == {64, 96}
    for name, sae in saes.items():  # each SAE's record holds its own hash
        assert json.loads((tmp_path / "np" / name / "run_settings.json").read_text())["sae_sha256"] == sae_sha256(sae)


def test_the_same_corpus_and_sae_by_another_path_are_reused(tiny_gpt2, corpus, tmp_path, monkeypatch):
    """The key held the corpus path as typed: the same export asked for with absolute paths after relative
    ones (or from another folder) was refused as made from other inputs."""
    shutil.copy(corpus, tmp_path / "text.jsonl.xz")
    save_sae(centred_sae(tiny_gpt2, corpus, 64, 2), tmp_path / "runs" / "r1" / "sae")
    monkeypatch.chdir(tmp_path)
    cfg = BrowseConfig(n_tokens=31 * 4, corpus="text.jsonl.xz", n_top=2, n_samples=2, lm_batch_size=8)
    assert export_neuronpedia_run("runs/r1", "np", cfg, lm=tiny_gpt2, progress=False)["reused"] is False
    cfg = dataclasses.replace(cfg, corpus=str(tmp_path / "text.jsonl.xz"))
    monkeypatch.chdir(tmp_path / "runs")
    assert export_neuronpedia_run(tmp_path / "runs" / "r1", tmp_path / "np", cfg, lm=tiny_gpt2,
                                  progress=False)["reused"] is True


def test_a_corpus_of_the_same_name_elsewhere_is_not_called_changed(tiny_gpt2, corpus, tmp_path, monkeypatch):
    """The record names the corpus by its base name and the key by where it lies: a copy in another folder was
    refused as the corpus "changed since", though it had not; a corpus edited since still is."""
    shutil.copy(corpus, tmp_path / "text.jsonl.xz")
    (tmp_path / "d2").mkdir()
    shutil.copy(corpus, tmp_path / "d2" / "text.jsonl.xz")
    save_sae(centred_sae(tiny_gpt2, corpus, 64, 2), tmp_path / "runs" / "r1" / "sae")
    monkeypatch.chdir(tmp_path)
    cfg = BrowseConfig(n_tokens=31 * 4, corpus="text.jsonl.xz", n_top=2, n_samples=2, lm_batch_size=8)
    assert export_neuronpedia_run("runs/r1", "np", cfg, lm=tiny_gpt2, progress=False)["reused"] is False
    assert str(tmp_path) not in (tmp_path / "np" / "run_settings.json").read_text()
    elsewhere = dataclasses.replace(cfg, corpus="d2/text.jsonl.xz")
    with pytest.raises(RunExistsError, match=r"^np: an earlier Neuronpedia export made from other corpus text "
                       r"\(browse.corpus text.jsonl.xz is another corpus of that name, not the one read then\)"):
        export_neuronpedia_run("runs/r1", "np", elsewhere, lm=tiny_gpt2, progress=False)
    with open(tmp_path / "text.jsonl.xz", "ab") as f:  # edited: a larger file at the same place
        f.write(b"\0")
    with pytest.raises(RunExistsError, match=r"other corpus text \(browse.corpus text.jsonl.xz changed since\)"):
        export_neuronpedia_run("runs/r1", "np", cfg, lm=tiny_gpt2, progress=False)
    settings = json.loads((tmp_path / "np" / "run_settings.json").read_text())
    del settings["inputs"]["corpus_place"]  # as an earlier saelab recorded it: which it is cannot be told
    (tmp_path / "np" / "run_settings.json").write_text(json.dumps(settings))
    with pytest.raises(RunExistsError, match=r"\(browse.corpus text.jsonl.xz changed since, or is another corpus of "):
        export_neuronpedia_run("runs/r1", "np", elsewhere, lm=tiny_gpt2, progress=False)


def test_default_ids_follow_neuronpedia_s_rule_and_the_model_s_name_as_given(tiny_gpt2, tiny_dir, corpus, tmp_path,
                                                                            capsys):
    """A run named "ααα" gave the SAE set "", a model folder the 43-character id of where its link led: the
    default SAE set is checked before the model loads, and a model folder is named as given. A model id drawn
    from a name Neuronpedia cannot take was refused, though no id was typed: it is made to follow the rule, and
    the export says which it wrote."""
    sae = centred_sae(tiny_gpt2, corpus, 64, 2)
    sae.cfg.model_name = str(tiny_dir)  # read on links to it below: no note of another model
    save_sae(sae, tmp_path / "ααα" / "sae")
    save_sae(sae, tmp_path / "r1" / "sae")
    cfg = BrowseConfig(n_tokens=31 * 4, corpus=corpus, sample_pool_tokens=POOL, n_top=2, n_samples=2, lm_batch_size=8)
    with pytest.raises(ConfigError, match=r"^the default SAE set '', drawn from the SAE's name ααα: expected 1 "
                                          r"to 64 .*; pass one: sae_set=NAME \(--sae-set\)$"):
        export_neuronpedia_run(tmp_path / "ααα", tmp_path / "np", cfg, lm="no-such-model", progress=False)
    long = tmp_path / "Tiny-GPT2.Q4_1-054dac6ed241389e0123456789"
    long.symlink_to(tiny_dir)
    res = export_neuronpedia_run(tmp_path / "r1", tmp_path / "np-long", cfg, lm=str(long), progress=False)
    assert res["model_id"] == "tiny-gpt2.q4-1-054dac6ed241389e0"  # cut to 32 characters
    assert json.loads((tmp_path / "np-long" / "batch-0.json").read_text())["model_id"] == res["model_id"]
    assert said(capsys) == [f"saelab: note: the Neuronpedia model id is 'tiny-gpt2.q4-1-054dac6ed241389e0', "
                            f"made from the model's name {long} by Neuronpedia's rule for ids; pass "
                            "model_id=ID (--model-id) for another"]
    (tmp_path / "tiny-link").symlink_to(long)
    res = export_neuronpedia_run(tmp_path / "r1", tmp_path / "np", cfg, lm=str(tmp_path / "tiny-link"), progress=False)
    assert res["model_id"] == "tiny-link" and said(capsys) == []  # the name as it is: nothing to say
    assert json.loads((tmp_path / "np" / "batch-0.json").read_text())["model_id"] == "tiny-link"
    with pytest.raises(ConfigError, match=r"^model_id 'Tiny-Link': expected 2 to 32 "):  # typed: refused as typed
        export_neuronpedia_run(tmp_path / "r1", tmp_path / "np2", cfg, lm=str(long), model_id="Tiny-Link")


def said(capsys) -> list[str]:
    """saelab's lines on stderr (the model load's progress bars left out)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("saelab")]


@pytest.mark.parametrize("name, model_id", [("SmolLM2-135M", "smollm2-135m"), ("org/Tiny--Model..v2", "tiny-model.v2"),
                                            ("135m", "model-135m"), ("x", "model-x"), ("ααα", "model"),
                                            ("_Qwen2_5-", "qwen2-5"), ("m.gguf", "model-m"), ("a" * 40, "a" * 32),
                                            ("a" * 31 + ".-b", "a" * 31), ("gpt2-small", "gpt2-small")])
def test_a_default_model_id_is_made_to_follow_neuronpedia_s_rule(name, model_id):
    from saelab.explore.browser.export import check_neuronpedia_ids, default_model_id

    assert default_model_id(name) == model_id
    check_neuronpedia_ids(model_id, None)


def test_a_run_folder_s_n2g_explanations_are_named_as_left_out(tiny_gpt2, corpus, tmp_path, capsys):
    """The batch files have no place for an explanation: a run folder's N2G explanations (which its site
    shows) were left out of the export without a word. One line on stderr says so; a run without them, none."""
    save_sae(centred_sae(tiny_gpt2, corpus, 64, 2), tmp_path / "run" / "sae")
    save_sae(centred_sae(tiny_gpt2, corpus, 64, 3), tmp_path / "plain" / "sae")
    (tmp_path / "run" / "n2g.json").write_text(json.dumps({"per_latent": [
        {"latent": i, "patterns": [{"tokens": [" the"], "anchored": False, "value": 0.5, "count": 2}], "precision": 1.0}
        for i in (3, 5)]}))
    cfg = BrowseConfig(n_tokens=31 * 4, corpus=corpus, sample_pool_tokens=POOL, n_top=2, n_samples=2, lm_batch_size=8)
    export_neuronpedia_run(tmp_path / "plain", tmp_path / "np-plain", cfg, lm=tiny_gpt2, progress=False)
    assert capsys.readouterr().err == ""
    with pytest.raises(CorpusError):  # refused on the way: the refusal alone is said
        export_neuronpedia_run(tmp_path / "run", tmp_path / "np", dataclasses.replace(cfg, n_tokens=10**9),
                               lm=tiny_gpt2, progress=False)
    assert capsys.readouterr().err == ""
    for _ in range(2):  # written, then reused: still without them
        export_neuronpedia_run(tmp_path / "run", tmp_path / "np", cfg, lm=tiny_gpt2, progress=False)
        err = capsys.readouterr().err.strip()
        assert err == (f"saelab: warning: the run {tmp_path / 'run'} keeps N2G explanations of 2 latent(s); the "
                       "Neuronpedia export leaves them out (SAEDashboard's batch files have no place for them): "
                       f"browse {tmp_path / 'run'} without --export shows them")


# ---- sae-dashboard's own loader and its Neuronpedia converter (where installed) --------------------------------

VALIDATE = textwrap.dedent('''
    import glob, gzip, json, os, sys
    from sae_dashboard.neuronpedia.neuronpedia_dashboard import NeuronpediaDashboardBatch
    out, work = sys.argv[1], sys.argv[2]
    n_features = n_records = 0
    for path in sorted(glob.glob(os.path.join(out, "batch-*.json"))):
        data = json.load(open(path))
        batch = NeuronpediaDashboardBatch(**data)  # unknown or misnamed fields raise TypeError
        assert batch.to_dict() == data, path  # read back unchanged: nothing lost, nothing renamed
        n_features += len(data["features"])
        n_records += sum(len(f["activations"]) for f in data["features"])
    converted = 0
    try:
        from sae_dashboard.neuronpedia.neuronpedia_export import NeuronpediaExportConfig, export_neuronpedia_dashboards
    except ImportError:
        pass
    else:
        src = export_neuronpedia_dashboards(NeuronpediaExportConfig(
            saedashboard_output_dir=out, exports_dir=work, creator_name="saelab tests", creator_id="c0",
            release_id="saelab-test", release_title="saelab test", url="", model_name="tiny-gpt2",
            neuronpedia_source_set_id="res-small", neuronpedia_source_set_description="test",
            hf_weights_repo_id="none/none", hf_weights_path="sae/cfg.json", hook_point="hook_resid_post",
            layer_num=1, prompts_huggingface_dataset_path="wiki", n_prompts_total=40, n_tokens_in_prompt=32))
        rows = lambda kind: [json.loads(l) for p in sorted(glob.glob(os.path.join(src, kind, "*.jsonl.gz")))
                             for l in gzip.open(p, "rt")]
        feats, acts = rows("features"), rows("activations")
        assert len(feats) == n_features and len(acts) == n_records, (len(feats), len(acts))
        assert all(a["maxValue"] == a["values"][a["maxValueTokenIndex"]] for a in acts)
        converted = len(feats)
    print(json.dumps({"features": n_features, "records": n_records, "converted": converted}))
''')


def sae_dashboard_python() -> str | None:
    """A Python with sae-dashboard: this one, or the one named by SAELAB_SAE_DASHBOARD_PYTHON (a separate venv)."""
    if importlib.util.find_spec("sae_dashboard") is not None:
        return sys.executable
    return os.environ.get("SAELAB_SAE_DASHBOARD_PYTHON") or None


@pytest.mark.peers
def test_saedashboard_loads_it_and_converts_it_for_neuronpedia(exported, tmp_path):
    python = sae_dashboard_python()
    if python is None:
        pytest.skip("sae-dashboard not installed (install it, or set SAELAB_SAE_DASHBOARD_PYTHON to a venv's python)")
    out, summary, batches, _, _, _ = exported
    run = subprocess.run([python, "-c", VALIDATE, str(out), str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["features"] == summary["features"]
    assert result["records"] == sum(len(f["activations"]) for b in batches for f in b["features"])
    # sae-dashboard 0.8.0 on PyPI predates neuronpedia_export.py: then only its loader is checked
    assert result["converted"] in (0, summary["features"])


def test_the_export_options_are_checked_before_the_model_loads(tiny_gpt2, corpus, tmp_path, monkeypatch):
    """export_neuronpedia_run checked its options only in export_neuronpedia, after the statistics pass: 0
    features per batch and an unknown keyword were refused after it, a layer of -1 or a suffix of 5 written as
    they were, and an SAE that records no hook (read at cfg.hook) was refused for want of a layer after it.
    Each is refused before the model loads; an unknown keyword as Python names it."""
    import saelab.explore.browser.build as build
    import saelab.explore.browser.make as make

    sae = centred_sae(tiny_gpt2, corpus, 64, 2)
    save_sae(sae, tmp_path / "run" / "sae")
    cfg = BrowseConfig(n_tokens=31 * 4, corpus=corpus, sample_pool_tokens=POOL, n_top=2, n_samples=2, lm_batch_size=8)
    monkeypatch.setattr(make, "load_model_beside", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr(build, "collect_statistics", lambda *a, **k: pytest.fail("the statistics pass ran"))
    for option, refusal in (({"bogus": 1}, TypeError("export_neuronpedia_run() got an unexpected keyword argument "
                                                     "'bogus'")),
                            ({"n_features_per_batch": 0}, "n_features_per_batch: expected a positive integer, got 0"),
                            ({"n_features_per_batch": True}, "n_features_per_batch: expected a positive integer, "
                                                             "got True"),
                            ({"layer": -1}, "layer: expected the layer's number, an integer from 0 (or None: from "
                                            "the hook), got -1"),
                            ({"layer": 1.5}, "layer: expected the layer's number"),
                            ({"sae_id_suffix": 5}, "sae_id_suffix 5: expected 1 to 64 lowercase letters"),
                            ({"sae_id_suffix": "K6"}, "sae_id_suffix 'K6': expected 1 to 64 lowercase letters")):
        kind = type(refusal) if isinstance(refusal, Exception) else ConfigError
        with pytest.raises(kind, match=f"^{re.escape(str(refusal))}"):
            export_neuronpedia_run(tmp_path / "run", tmp_path / "np", cfg, lm=tiny_gpt2, progress=False, **option)
    sae.cfg.hook_name = ""
    save_sae(sae, tmp_path / "no-hook" / "sae")
    with pytest.raises(ConfigError, match="^hook '': cannot read a layer number from it .*; pass layer=$"):
        export_neuronpedia_run(tmp_path / "no-hook", tmp_path / "np", dataclasses.replace(cfg, hook=HOOK),
                               lm=tiny_gpt2, progress=False)
    assert not (tmp_path / "np").exists()


def test_a_published_export_confirms_no_guessed_model_path(tiny_gpt2, tiny_dir, corpus, tmp_path, monkeypatch):
    """run_settings.json recorded `key`, a plain sha256 over the settings with the --model folder's absolute path
    beside the SAE's weights' hash and the options, which are published too: anyone could confirm a guessed model
    path offline (with a hub corpus, nothing else in it was secret). Every hash it records is keyed by this
    machine's secret now: recomputed with the true path elsewhere (another secret), or the unkeyed way, it matches
    nothing published; the key changes with the secret. On this machine the same export is still reused; one
    recorded by an earlier saelab (its plain key) is built again, and one of other inputs still named."""
    from saelab.explore.browser.export import export_key
    from saelab.explore.browser.make import open_sources

    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    save_sae(centred_sae(tiny_gpt2, corpus, 64, 2), tmp_path / "run" / "sae")
    cfg = BrowseConfig(n_tokens=31 * 4, corpus=corpus, sample_pool_tokens=POOL,
                       model=str(tiny_dir), n_top=2, n_samples=2, lm_batch_size=8)
    out = tmp_path / "np"
    assert export_neuronpedia_run(tmp_path / "run", out, cfg, progress=False)["reused"] is False
    published = {p.name: p.read_text() for p in out.iterdir()}
    settings = json.loads(published["run_settings.json"])
    sources, _ = open_sources([tmp_path / "run"])

    def recomputed(cache: str):  # from the published fields and the model's true path, with the secret of `cache`
        monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / cache))
        return export_key(sources, cfg, "float32", {}, [settings["sae_sha256"]])

    theirs = recomputed("another-cache")
    assert theirs[0] != settings["key"], "the published key confirms the model's path"
    for field in ("sae_files", "corpus_files", "corpus_place"):
        assert theirs[1][field] != settings["inputs"][field], field
    mine = recomputed("cache")
    assert (mine[0], mine[1]) == (settings["key"], settings["inputs"]) and re.fullmatch(r"[0-9a-f]{8}:[0-9a-f]{16}",
                                                                                          mine[0])
    unkeyed = mine[2]  # the key and hashes as an earlier saelab recorded them
    assert not [(f, name) for f in unkeyed.values() for name, text in published.items() if f in text]
    key_file = tmp_path / "cache" / "local-key"
    secret = key_file.read_bytes()
    key_file.write_bytes(bytes(32))
    assert recomputed("cache")[0] != settings["key"]
    with pytest.raises(RunExistsError, match=r"made from inputs hashed with another local key"):
        export_neuronpedia_run(tmp_path / "run", out, cfg, lm="no-such-model", progress=False)
    key_file.write_bytes(secret)
    assert export_neuronpedia_run(tmp_path / "run", out, cfg, lm="no-such-model", progress=False)["reused"] is True
    # as an earlier saelab recorded this export: built again, recording the keyed hashes
    inputs = {k: v for k, v in settings["inputs"].items() if k != "corpus_place"}
    (out / "run_settings.json").write_text(json.dumps({**settings, "key": unkeyed["key"], "inputs": {
        **inputs, "sae_files": unkeyed["sae_files"], "corpus_files": unkeyed["corpus_files"]}}))
    assert export_neuronpedia_run(tmp_path / "run", out, cfg, progress=False)["reused"] is False
    assert json.loads((out / "run_settings.json").read_text())["key"] == settings["key"]
    # one of other SAE files then: named as before
    (out / "run_settings.json").write_text(json.dumps({**settings, "key": "0" * 16, "inputs": {
        **inputs, "sae_files": "0" * 16, "corpus_files": unkeyed["corpus_files"]}}))
    with pytest.raises(RunExistsError, match=r"made from other SAE files"):
        export_neuronpedia_run(tmp_path / "run", out, cfg, lm="no-such-model", progress=False)


def test_without_a_local_key_an_export_says_so_and_a_rerun_is_refused_as_such(tiny_gpt2, corpus, tmp_path,
                                                                            monkeypatch, capsys):
    """Where no local key can be made (SAELAB_CACHE_DIR under a regular file), the export recorded neither key nor
    inputs without a word, and the same export again was refused as "made from other inputs or settings", which
    was false. The export now says a rerun will not recognise it, and records its inputs (settings in full, the
    files' hashes as null): the rerun says they cannot be compared without a local key, and still names other
    settings. Nothing recorded names a local path."""
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    why = f"{tmp_path / 'afile' / 'cache' / 'local-key'} cannot be read or made (Not a directory)"
    save_sae(centred_sae(tiny_gpt2, corpus, 64, 2), tmp_path / "run" / "sae")
    cfg = BrowseConfig(n_tokens=31 * 4, corpus=corpus, sample_pool_tokens=POOL, n_top=2, n_samples=2, lm_batch_size=8)
    out = tmp_path / "np"
    capsys.readouterr()
    assert export_neuronpedia_run(tmp_path / "run", out, cfg, lm=tiny_gpt2, progress=False)["reused"] is False
    assert capsys.readouterr().err.strip() == (
        f"saelab: note: no local key ({why}): {out} records no key of its inputs, so a rerun will not recognise this "
        "Neuronpedia export as unchanged; set SAELAB_CACHE_DIR to a writable folder to keep a key")
    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["key"] is None and settings["inputs"]["sae_files"] is None
    assert not [p.name for p in out.iterdir() if str(tmp_path) in p.read_text()]
    with pytest.raises(RunExistsError) as e:
        export_neuronpedia_run(tmp_path / "run", out, cfg, lm="no-such-model", progress=False)
    assert str(e.value) == (f"{out}: an earlier Neuronpedia export made from inputs that cannot be compared without "
                            f"a local key ({why}) is there; pass overwrite=True (--overwrite) to replace it")
    with pytest.raises(RunExistsError, match=r"made from other settings \(browse.n_top 2 -> 3\)"):
        export_neuronpedia_run(tmp_path / "run", out, dataclasses.replace(cfg, n_top=3), lm="no-such-model",
                               progress=False)


def test_a_model_given_loaded_keys_the_export_by_its_own_dtype(tiny_dir, corpus, tmp_path):
    """An export's key and record took the dtype asked for (float32 unless given), not that of a model given loaded
    in bfloat16: a float32 export then reused its numbers. They take the dtype the model is in."""
    from saelab.models import load_model

    bf16 = load_model(str(tiny_dir), dtype="bfloat16")
    save_sae(centred_sae(bf16, corpus, 64, 2), tmp_path / "run" / "sae")
    cfg = BrowseConfig(n_tokens=31 * 4, corpus=corpus, n_top=2, n_samples=2, lm_batch_size=8)
    out = tmp_path / "np"
    assert export_neuronpedia_run(tmp_path / "run", out, cfg, lm=bf16, progress=False)["reused"] is False
    assert json.loads((out / "run_settings.json").read_text())["inputs"]["model_dtype"] == "bfloat16"
    assert export_neuronpedia_run(tmp_path / "run", out, cfg, lm=str(tiny_dir), model_dtype="bfloat16",
                                  progress=False)["reused"] is True
    with pytest.raises(RunExistsError, match=r'made from other settings \(model_dtype "bfloat16" -> "float32"\)'):
        export_neuronpedia_run(tmp_path / "run", out, cfg, lm=str(tiny_dir), progress=False)
