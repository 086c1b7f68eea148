"""End to end on real components at small scale: the default model on real Wikipedia, the CLI verbs chained
on a real local model folder, and resuming a training run after a real kill."""

from __future__ import annotations

import json
import lzma
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import saelab.pipeline
from saelab.cli import main
from saelab.data import ActivationCache, write_activation_cache
from saelab.errors import CheckpointError, CorpusError, RunExistsError
from saelab.evals.core import eval_settings
from saelab.models import DEFAULT_MODEL_HUB_ID
from saelab.pipeline import WORK_STAGES, EvalConfig, HarvestConfig, QuickstartConfig, harvest, load_run, quickstart
from saelab.run_folder import LATENT_FREQUENCIES, model_for, read_latent_frequencies
from saelab.sae import load_sae, save_sae
from saelab.train import TrainConfig
from saelab.train.checkpoint import CHECKPOINT, load_checkpoint
from saelab.utils.folder_lock import LOCK

HOOK = "blocks.1.hook_resid_post"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100, (path, width, height)


def wiki_jsonl(data_dir: Path, path: Path, first: int, n: int) -> Path:
    """Articles first..first+n-1 of the real Wikipedia eval split, as a JSON Lines corpus file."""
    with lzma.open(data_dir / "wiki-en" / "wiki_eval.jsonl.xz", "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(first + n)][first:]
    path.write_text("".join(json.dumps({"text": json.loads(line)["text"]}) + "\n" for line in lines))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main([*argv])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    return code, json.loads(out)


# ---- quickstart on the real default model ------------------------------------------------------------------


def _tiny_quickstart(tiny_dir, train_corpus, eval_corpus) -> QuickstartConfig:
    """A quickstart of the tiny model small enough for a test: 1,000 tokens, 64 latents."""
    return QuickstartConfig(harvest=HarvestConfig(model=str(tiny_dir), hook=HOOK, corpus=str(train_corpus),
                                                  context_size=32, n_tokens=1000, buffer_tokens=8192),
                            train=TrainConfig(n_latents=64, k=4, batch_size=250, total_tokens=1000, init_rows=500),
                            eval=EvalConfig(corpus=str(eval_corpus), recon_tokens=256, downstream_tokens=128))


@pytest.mark.slow  # ~20 s on 2 cores (.ci/newcomer.sh also runs a quickstart); .ci/run runs the slow tests
def test_quickstart_on_default_model(smollm2, data_dir, tmp_path, capsys, monkeypatch):
    wiki = data_dir / "wiki-en"
    cfg = QuickstartConfig(
        harvest=HarvestConfig(model="default", corpus=str(wiki / "wiki_train.jsonl.xz"), context_size=32,
                              n_tokens=8192, buffer_tokens=8192),
        train=TrainConfig(n_latents=256, k=8, batch_size=512, total_tokens=8192),
            # No ablation baselines: each costs one more full forward of the model; CE recovered is checked
        # in the CLI test below on the tiny model.
        eval=EvalConfig(corpus=str(wiki / "wiki_eval.jsonl.xz"), recon_tokens=2048, downstream_tokens=1024,
                        ablations=()),
    )
    run = tmp_path / "qs"
    metrics = quickstart(cfg, run, lm=smollm2, progress=False)

    assert (run / "sae" / "cfg.json").is_file() and (run / "sae" / "sae_weights.safetensors").is_file()
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("nmse", "l0", "dead_frac", "delta_ce", "kl", "ce_clean", "ce_spliced"):
        assert math.isfinite(on_disk[key]), key
    assert 0 < on_disk["l0"] <= 8 and 0 <= on_disk["dead_frac"] < 1
    assert on_disk["kl"] >= 0
    assert on_disk["n_tokens"] == 2048 and on_disk["n_predictions"] >= 1000
    assert (on_disk["model"], on_disk["hook"], on_disk["context_size"]) == \
        (DEFAULT_MODEL_HUB_ID, "blocks.9.hook_resid_post", 32)
    assert on_disk["model_source"]["spec"] == "default"
    every_eval, quickstart_adds = _documented_metrics_keys()
    ablations = {"ce_zero_abl", "ce_recovered_zero", "ce_mean_abl", "ce_recovered_mean"}  # none asked for
    assert set(on_disk) == (every_eval | quickstart_adds) - ablations
    # A trained SAE: 16 steps on 8k tokens reach nMSE ~0.53 on held-out text (predicting the mean scores 1).
    assert on_disk["nmse"] < 0.7
    assert set(on_disk["wall_seconds"]) >= {"check_inputs", "harvest", "train", "evaluate", "total"}
    assert on_disk["stage_seconds"] == on_disk["wall_seconds"]  # one call ran every stage
    assert "calls behind these results" not in (run / "report.md").read_text()  # one call did everything

    cache = ActivationCache(run / "activations")
    assert (cache.n_rows, cache.d, cache.meta["hook_name"]) == (8192, 576, "blocks.9.hook_resid_post")
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    sae, metrics_again = load_run(run)
    # The SAE names the model by its hub id (so it resolves outside saelab) and records what saelab loaded.
    assert (sae.cfg.model_name, sae.cfg.hook_name, sae.cfg.d_in, sae.cfg.n_latents, sae.cfg.k) == \
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "blocks.9.hook_resid_post", 576, 256, 8)
    assert sae.cfg.extra["model_source"]["spec"] == "default" and "dequantized" in sae.cfg.extra["model_source"]["weights"]
    assert model_for(sae) == "default"
    assert metrics_again == on_disk

    report = (run / "report.md").read_text()
    ci = {k: f"[{on_disk['intervals'][k]['low']:.4f}, {on_disk['intervals'][k]['high']:.4f}]" for k in ("nmse", "kl")}
    assert f"| nMSE (FVU), raw activation space | {on_disk['nmse']:.4f} {ci['nmse']} |" in report
    assert f"| KL(clean \\|\\| spliced) per prediction | {on_disk['kl']:.4f} {ci['kl']} |" in report  # one row, not split
    assert "![training curves](training_curves.png)" in report and "![latent density](density.png)" in report
    # 8,192 tokens: too short to tell which latents went 262,144 tokens without firing.
    assert "not fired in the last 262,144 training tokens: not measured (the run saw 8,192 tokens)" in report
    assert_png(run / "training_curves.png")
    assert_png(run / "density.png")

    # Killed during the evaluation: the rerun reuses the finished training and evaluates again.
    (run / "metrics.json").unlink()
    checkpoint_mtime = (run / "checkpoint.pt").stat().st_mtime_ns
    again = quickstart(cfg, run, lm=smollm2, progress=False)
    assert again["reused"] == ["harvest", "train"] and "evaluate" in again["wall_seconds"]
    assert "already holds this harvest, 8,192 activations (--overwrite-activations harvests again)" in \
        capsys.readouterr().err
    assert "harvest" not in again["wall_seconds"] and "Reused from an earlier run" in (run / "report.md").read_text()
    assert (run / "checkpoint.pt").stat().st_mtime_ns == checkpoint_mtime and again["nmse"] == on_disk["nmse"]
    # the harvest's time, lost with the interrupted call's metrics.json, is the cache's own record of its writing
    written = json.loads((run / "activations" / "manifest.json").read_text())["seconds"]
    assert 0 < written <= on_disk["stage_seconds"]["harvest"] and again["stage_seconds"]["harvest"] == written
    # An overwrite of the activations cut off (Ctrl-C) lies beside them: kept, and named with both ways out.
    cache = ActivationCache(run / "activations")

    def cut_off():
        yield cache.read(0, 512)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_activation_cache(cut_off(), cache.folder, meta={**cache.meta, "dataset": "other"}, dtype=cache.dtype,
                               shard_rows=256, overwrite=True, progress=False)
    capsys.readouterr()
    # Finished and evaluated: nothing runs again, and the stages keep the times of the calls that ran them.
    # --overwrite retrains but keeps the activation cache.
    with monkeypatch.context() as m:  # nothing to run: the model is not even loaded
        m.setattr(saelab.pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        third = quickstart(cfg, run, progress=False)
    stage = cache.folder / ".overwrite"
    assert capsys.readouterr().err == (f"saelab: note: activation cache {cache.folder} (its overwrite) is "
                                       "unfinished; run the --overwrite-activations call that started it again to "
                                       f"resume it, or delete {stage} to discard it\n")
    shutil.rmtree(stage)  # as the note says; the checks below see the cache alone
    assert third["reused"] == ["harvest", "train", "evaluate"] and set(third["wall_seconds"]) == {"check_inputs",
                                                                                                  "total"}
    earlier = {stage: t for stage, t in again["stage_seconds"].items() if stage != "total"}
    assert set(earlier) == {"check_inputs", "harvest", "load_model", "train", "evaluate"}
    assert third["stage_seconds"] == {**earlier, "total": round(sum(earlier.values()), 1)}
    assert f"| evaluate | reused (calls behind these results: {again['stage_seconds']['evaluate']:,.1f}) |" in \
        (run / "report.md").read_text()
    # Other eval settings would replace the evaluation: refused as `saelab eval` refuses, before any work.
    before = (run / "metrics.json").read_bytes()
    with pytest.raises(RunExistsError, match=r"evaluation with other settings \(eval.recon_tokens 2048 -> 1024\)"):
        quickstart(replace(cfg, eval=replace(cfg.eval, recon_tokens=1024)), run, lm=smollm2, progress=False)
    assert (run / "metrics.json").read_bytes() == before

    def cache_files():  # the manifest and shards, not the lock file each writer (or reuse) takes
        return {p.name: p.stat().st_mtime_ns for p in (run / "activations").iterdir() if p.name != LOCK}

    shards = cache_files()
    redone = quickstart(cfg, run, lm=smollm2, overwrite=True, progress=False)
    assert redone["reused"] == ["harvest"] and {"train", "evaluate"} <= set(redone["wall_seconds"])
    assert cache_files() == shards and len(shards) == 2


# ---- the CLI verbs chained on a real local model folder -------------------------------------------------------


def test_cli_harvest_train_eval_report(tiny_dir, data_dir, tmp_path, capsys):
    train_corpus = wiki_jsonl(data_dir, tmp_path / "train.jsonl", 0, 3)
    eval_corpus = wiki_jsonl(data_dir, tmp_path / "eval.jsonl", 3, 2)  # other articles: held out
    acts, run = tmp_path / "acts", tmp_path / "run"

    assert main(["harvest", "--model", str(tiny_dir), "--hook", HOOK, "--corpus", str(train_corpus), "--out",
                 str(acts), "--n-tokens", "3000", "--context-size", "32", "--buffer-tokens", "8192", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"cache": str(acts), "rows": 3000, "d": 64}  # exactly the rows asked for
    assert "Loading weights" not in err and "it/s" not in err  # --no-progress hides the libraries' bars too
    assert "warning" not in err  # the corpus had enough text
    assert main(["harvest", "--model", str(tiny_dir), "--hook", HOOK, "--corpus", str(train_corpus), "--out",
                 str(tmp_path / "short"), "--n-tokens", "10000000", "--context-size", "32", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)["rows"]
    assert rows < 10_000_000 and (f"saelab: warning: the corpus {train_corpus} gave {rows:,} activations, fewer "
                                  "than the 10,000,000 asked (--n-tokens)") in err

    _, out = run_cli(capsys, "train", "--activations", str(acts), "--out", str(run), "--n-latents", "128",
                     "--k", "8", "--batch-size", "250", "--total-tokens", "3000", "--init-rows", "1000",
                     "--log-every", "2", "--no-progress")
    assert out == {"sae": str(run / "sae"), "n_latents": 128, "activation": "topk", "k": 8}
    assert json.loads((run / "status.json").read_text())["state"] == "finished"

    _, metrics = run_cli(capsys, "eval", str(run), "--corpus", str(eval_corpus), "--recon-tokens", "1024",
                         "--downstream-tokens", "512", "--no-progress")  # the model comes from the SAE's config
    assert metrics["model"] == str(tiny_dir.resolve()) and metrics["hook"] == HOOK
    assert metrics["eval_corpus"] == str(eval_corpus) and metrics["n_tokens"] == 1024
    for key in ("nmse", "l0", "dead_frac", "delta_ce", "kl", "ce_zero_abl", "ce_mean_abl"):
        assert math.isfinite(metrics[key]), key
    # This barely trained model's CE falls when the hook is ablated: no scale from ablation to clean, so no
    # CE recovered (null, not a ratio of noise)
    for ablation in ("zero", "mean"):
        assert metrics[f"ce_{ablation}_abl"] < metrics["ce_clean"] and metrics[f"ce_recovered_{ablation}"] is None
    # 12 steps on the tiny model's activations reach nMSE ~0.40 on held-out text (predicting the mean scores 1).
    assert 0 < metrics["l0"] <= 8 and metrics["kl"] >= 0 and metrics["nmse"] < 0.65
    assert json.loads((run / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert_png(run / "density.png")
    # Each latent's firing frequency is kept beside the metrics (plain tensors: loading runs no code), with
    # the SAE and the settings it measured; they sum to L0, and the zeros are the inactive latents.
    saved = read_latent_frequencies(run)
    assert (saved.sae_sha256, saved.evaluation) == (metrics["sae_sha256"], eval_settings(metrics))
    assert torch.equal(load_file(run / LATENT_FREQUENCIES)["frequencies"], saved.frequencies_N)
    assert saved.frequencies_N.shape == (128,) and saved.frequencies_N.sum().item() == pytest.approx(metrics["l0"])
    assert (saved.frequencies_N == 0).double().mean().item() == pytest.approx(metrics["dead_frac"])

    (run / "report.md").unlink()
    _, out = run_cli(capsys, "report", str(run))
    assert out == {"report": str(run / "report.md")}
    report = (run / "report.md").read_text()
    ci = metrics["intervals"]["nmse"]
    assert f"| nMSE (FVU), raw activation space | {metrics['nmse']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}] |" in report
    assert f"`{tiny_dir}`" in report and "bootstrap intervals over the documents" in report
    assert "![training curves](training_curves.png)" in report and "![latent density](density.png)" in report
    assert ("| AuxK / Multi-TopK / EMA | True (k_aux=128: the 256 set exceeds the SAE's 128 latents, so AuxK takes "
            "every dead latent) / False / off |") in report  # not "None"
    # 3,000 tokens: too short to tell which latents went 262,144 tokens without firing.
    assert "not fired in the last 262,144 training tokens: not measured (the run saw 3,000 tokens)" in report
    assert_png(run / "training_curves.png")

    sae, on_disk = load_run(run)
    assert (sae.cfg.model_name, sae.cfg.hook_name, sae.cfg.d_in, sae.cfg.context_size) == (str(tiny_dir), HOOK, 64, 32)
    assert on_disk == json.loads(json.dumps(metrics))


# ---- resuming after a real kill -----------------------------------------------------------------------------

TRAIN_ROWS = 8192


def test_a_small_harvest_tokenizes_only_the_pool_it_draws_from(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    """`saelab harvest --n-tokens 4096` at the default --sample-pool-tokens (16 M) tokenized the whole corpus
    into its pool before the first forward, with no bar moving: its pool is now 16 times the tokens it
    harvests (65,536), which the first batch of 64 documents holds, and a bar counts the pool's contexts."""
    from saelab.models import LanguageModel

    corpus = wiki_jsonl(data_dir, tmp_path / "train.jsonl", 0, 200)  # ~800k tokens
    tokenize, texts = LanguageModel.tokenize, []

    def counted(lm, batch):  # the real tokenizer, its texts counted
        texts.extend(batch)
        return tokenize(lm, batch)

    monkeypatch.setattr(LanguageModel, "tokenize", counted)
    capsys.readouterr()
    code = main(["harvest", "--model", str(tiny_dir), "--hook", HOOK, "--corpus", str(corpus),
                 "--out", str(tmp_path / "acts"), "--n-tokens", "4096", "--buffer-tokens", "8192"])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert len(texts) <= 64, len(texts)
    pool_bar = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("context pool")]
    assert pool_bar and "1.02k/1.02k" in pool_bar[-1], pool_bar[-1:]  # 65,536 tokens of 64-token contexts
    cache = ActivationCache(tmp_path / "acts")
    assert cache.n_rows == 4096 and cache.meta["sample_pool_tokens_drawn"] == 65536  # not resumed from a larger pool


def test_a_harvest_opens_its_corpus_once(tiny_dir, data_dir, tmp_path, monkeypatch):
    """The checks that the corpus fills a context (before the model loads, and with the loaded model's tokenizer)
    read the first documents of the stream the harvest then reads on: a hub dataset is opened once, not three
    times, and the harvest still packs every document in the corpus's order."""
    import saelab.data.text
    from saelab.data import iter_texts
    from saelab.models import LanguageModel

    articles = wiki_jsonl(data_dir, tmp_path / "articles.jsonl", 0, 6).read_text().splitlines()
    paragraphs = [p for line in articles for p in json.loads(line)["text"].split("\n") if p.strip()]
    corpus = tmp_path / "paragraphs.jsonl"  # short documents: the harvest reads past those the checks read
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    opened = _counting(monkeypatch, "_open_source", saelab.data.text)
    tokenize, texts = LanguageModel.tokenize, []

    def counted(lm, batch):  # the real tokenizer, its texts kept
        texts.extend(batch)
        return tokenize(lm, batch)

    monkeypatch.setattr(LanguageModel, "tokenize", counted)
    harvest(HarvestConfig(model=str(tiny_dir), hook=HOOK, corpus=str(corpus), n_tokens=8192, context_size=32,
                          buffer_tokens=8192, sample_pool_tokens=0), tmp_path / "acts", progress=False)
    assert len(opened) == 1
    assert len(texts) > 64 and texts == list(iter_texts(corpus))[:len(texts)]  # the checks read 64


def test_a_cache_an_earlier_saelab_finished_is_reused(tiny_dir, data_dir, tmp_path, capsys):
    """A finished cache harvested before the pool was sized to the harvest (its manifest without
    sample_pool_tokens_drawn) is a valid harvest of the same command: reused, not refused over a meta key no
    option sets; an unfinished one cannot be drawn on the same way, and is refused in the options' words."""
    corpus = wiki_jsonl(data_dir, tmp_path / "train.jsonl", 0, 12)
    out = tmp_path / "acts"
    argv = ["harvest", "--model", str(tiny_dir), "--hook", HOOK, "--corpus", str(corpus), "--out", str(out),
            "--n-tokens", "4096", "--context-size", "32", "--buffer-tokens", "8192", "--no-progress"]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["meta"]["sample_pool_tokens_drawn"]  # as the earlier release wrote it
    (out / "manifest.json").write_text(json.dumps(manifest))
    shards = {p.name: p.read_bytes() for p in out.glob("shard_*.npy")}
    capsys.readouterr()
    assert main(argv) == 0
    assert f"{out} already holds this harvest, 4,096 activations" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.glob("shard_*.npy")} == shards
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"saelab harvest: error: cannot resume activation cache '{out}': its harvest was started by an earlier "
                   "saelab, which drew its contexts from the whole --sample-pool-tokens pool (16,777,216 tokens), "
                   "not from 65,536: its rest cannot be drawn the same way; pass --overwrite to harvest it again"), err


@pytest.fixture(scope="module")
def kill_cache(tiny_gpt2, tiny_dir, data_dir, tmp_path_factory) -> Path:
    """8,192 real activation rows of the tiny GPT-2 (its saved folder named as the model)."""
    base = tmp_path_factory.mktemp("kill")
    corpus = wiki_jsonl(data_dir, base / "corpus.jsonl", 0, 6)
    cfg = HarvestConfig(model=str(tiny_dir), hook=HOOK, corpus=str(corpus), n_tokens=TRAIN_ROWS, context_size=32,
                        buffer_tokens=8192)
    harvest(cfg, base / "acts", lm=tiny_gpt2, progress=False)
    return base / "acts"


BATCH = 64
STEPS = TRAIN_ROWS // BATCH


@pytest.mark.parametrize("stop_at,kept", [(1, None), pytest.param(10, 0, marks=pytest.mark.slow),
                                          pytest.param(20, 4096, marks=pytest.mark.slow),
                                          pytest.param(30, 8192, marks=pytest.mark.slow)])
def test_an_interrupted_harvest_resumes_the_model_where_it_stopped(tiny_dir, data_dir, tmp_path, capsys, monkeypatch,
                                                                    stop_at, kept):
    """Ctrl-C during `saelab harvest`: the rows written (none yet before the shuffle buffer first fills) are kept
    with the stream's state, and the same command runs the model only over the text after it, writing the shards
    of an uninterrupted harvest. Stopped in its first forward, it has read nothing: nothing is kept."""
    from saelab.models import LanguageModel

    corpus = wiki_jsonl(data_dir, tmp_path / "train.jsonl", 0, 12)
    forward, calls, stop = LanguageModel.activations, [], []

    def counted(lm, tokens_BT, hook):  # the real forward, counted; a Ctrl-C arrives at the call stop names
        calls.append(tokens_BT.shape[0])
        if stop and len(calls) == stop[0]:
            raise KeyboardInterrupt
        return forward(lm, tokens_BT, hook)

    monkeypatch.setattr(LanguageModel, "activations", counted)

    def harvest_into(out: Path) -> tuple[int, str]:
        calls.clear()
        capsys.readouterr()
        code = main(["harvest", "--model", str(tiny_dir), "--hook", HOOK, "--corpus", str(corpus), "--out", str(out),
                     "--n-tokens", "16384", "--context-size", "32", "--lm-batch-size", "16",
                     "--sample-pool-tokens", "0", "--buffer-tokens", "8192", "--no-progress"])
        return code, capsys.readouterr().err

    assert harvest_into(tmp_path / "ref")[0] == 0
    whole = len(calls)
    # 16 contexts of 31 rows a call: the 8,192-row buffer fills at calls 17 and 25, each time emitting 4,096
    stop.append(stop_at)
    code, err = harvest_into(tmp_path / "acts")
    assert code == 130
    no_rows = (f"saelab: activation cache {tmp_path / 'acts'} holds no rows yet (a shuffled harvest writes its first "
               "rows once its shuffle buffer is full)")
    if kept is None:  # nothing read: said once, as it is, not as a resume
        assert [line for line in err.splitlines() if line][-2:] == [
            f"{no_rows}; the same call starts over",
            "saelab harvest: interrupted; nothing of this call was kept; the same command starts over"], err
        assert not (tmp_path / "acts").exists()
        stop.clear()
        assert harvest_into(tmp_path / "acts")[0] == 0 and len(calls) == whole
        return
    if kept:
        assert (f"activation cache {tmp_path / 'acts'} keeps the {kept:,} rows written so far and where its input "
                "stopped; the same call continues from there (a harvest does not run the model again over the text "
                "before them), then writes the rest") in err
    else:  # before the buffer first filled: no row, but where the input stopped
        assert (f"{no_rows} and keeps where its input stopped; the same call continues from there (a harvest does "
                "not run the model again over the text it read)") in err
    assert "interrupted; run the same command again to resume" in err
    stop.clear()
    code, err = harvest_into(tmp_path / "acts")
    assert code == 0
    after = f" after the {kept:,} rows already written" if kept else ", which holds no rows yet"
    assert (f"saelab: resuming activation cache {tmp_path / 'acts'}{after}: the input continues where it stopped (a "
            f"harvest does not run the model again over the text {'before them' if kept else 'it read'})") in err
    assert len(calls) == whole - (stop_at - 1)  # as the messages say: only the text after the stop
    ref = {p.name: p.read_bytes() for p in (tmp_path / "ref").glob("shard_*.npy")}
    assert ref and {p.name: p.read_bytes() for p in (tmp_path / "acts").glob("shard_*.npy")} == ref
    assert not (tmp_path / "acts" / "stream_state.safetensors").exists()


def train_command(cache: Path, run: Path) -> list[str]:
    """128 small steps, a checkpoint every 2 and a metrics line (fsynced) every step: a few seconds."""
    return [sys.executable, "-m", "saelab", "train", "--activations", str(cache), "--out", str(run),
            "--n-latents", "256", "--k", "8", "--batch-size", str(BATCH), "--total-tokens", str(TRAIN_ROWS),
            "--init-rows", "1024", "--checkpoint-every", "2", "--log-every", "1", "--no-progress"]


def start(cmd: list[str]) -> subprocess.Popen:
    # One thread in every run: the same reductions in the same order, so results can be compared bitwise.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for_checkpoint(proc: subprocess.Popen, run: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (run / CHECKPOINT).exists():
        assert proc.poll() is None, f"training exited before its first checkpoint: {proc.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference_run(kill_cache, tmp_path_factory):
    """The uninterrupted run, started here and left running beside the test that needs it."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = start(train_command(kill_cache, run))

    def result() -> Path:
        code, _, err = finish(proc)
        assert code == 0, err[-2000:]
        return run

    yield result
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def assert_same_sae(run: Path, reference: Path) -> None:
    for name in ("sae_weights.safetensors", "cfg.json"):
        assert (run / "sae" / name).read_bytes() == (reference / "sae" / name).read_bytes(), name
    a, b = load_sae(run / "sae"), load_sae(reference / "sae")
    for name, p in a.named_parameters():
        assert torch.equal(p, getattr(b, name)), name


@pytest.mark.slow  # ~16 s on 2 cores: a run killed and resumed; .ci/run runs the slow tests
def test_resume_after_sigkill_is_bitwise_identical(kill_cache, reference_run, tmp_path):
    run = tmp_path / "run"
    proc = start(train_command(kill_cache, run))
    wait_for_checkpoint(proc, run)
    time.sleep(0.05)  # then kill it wherever it is (mid-step, mid-write...)
    proc.send_signal(signal.SIGKILL)
    code, _, _ = finish(proc)
    assert code == -signal.SIGKILL
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "training" and not (run / "sae").exists()  # it really died mid-run
    killed_at = load_checkpoint(run)["step"]
    assert 2 <= killed_at < STEPS

    code, out, err = finish(start(train_command(kill_cache, run)))  # the same command again
    assert code == 0, err[-2000:]
    assert json.loads(out)["n_latents"] == 256
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # each step logged once, none lost, none twice
    assert_same_sae(run, reference_run())


@pytest.mark.slow  # ~30 s on 2 cores: a training killed in a child process, then resumed
def test_sigterm_marks_run_interrupted_and_resumes(kill_cache, reference_run, tmp_path):
    run = tmp_path / "run"
    proc = start(train_command(kill_cache, run))
    wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 130, err[-2000:]
    assert "saelab train: interrupted; run the same command again to resume" in err
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and not (run / "sae").exists()
    assert 1 <= status["step"] == load_checkpoint(run)["step"] < STEPS  # the checkpoint written on the way out

    code, _, err = finish(start(train_command(kill_cache, run)))
    assert code == 0, err[-2000:]
    assert f"saelab: resuming {run} from its checkpoint at step {status['step']:,} of {STEPS:,}" in err
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert_same_sae(run, reference_run())


def test_report_states_the_tokens_trained_in_whole_batches():
    from saelab.report.markdown import _training_tokens

    assert _training_tokens({"total_tokens": 8192, "batch_size": 4096}) == "8,192 in batches of 4,096"
    assert _training_tokens({"total_tokens": 10_000, "batch_size": 4096}) == \
        "8,192 in batches of 4,096 (10,000 asked: whole batches only)"


def test_eval_of_a_run_reuses_the_same_settings_and_keeps_other_ones(tiny_dir, data_dir, tmp_path, capsys,
                                                                      monkeypatch):
    """`saelab eval RUN` again: the same settings reuse metrics.json; other settings are refused unless
    --overwrite, so an earlier evaluation is never replaced by accident. The model was given as a relative
    path, and the evaluations run from another folder: it is recorded as the absolute path."""
    train_corpus = wiki_jsonl(data_dir, tmp_path / "train.jsonl", 0, 2)
    eval_corpus = wiki_jsonl(data_dir, tmp_path / "eval.jsonl", 3, 1)
    acts, run = tmp_path / "acts", tmp_path / "run"
    monkeypatch.chdir(tiny_dir.parent)
    run_cli(capsys, "harvest", "--model", tiny_dir.name, "--hook", HOOK, "--corpus", str(train_corpus), "--out",
            str(acts), "--n-tokens", "1000", "--context-size", "32", "--buffer-tokens", "8192", "--no-progress")
    monkeypatch.chdir(tmp_path)
    run_cli(capsys, "train", "--activations", str(acts), "--out", str(run), "--n-latents", "64", "--k", "4",
            "--batch-size", "250", "--total-tokens", "1000", "--init-rows", "500", "--no-progress")
    ev = ["eval", str(run), "--corpus", str(eval_corpus), "--downstream-tokens", "128", "--no-progress"]
    _, first = run_cli(capsys, *ev, "--recon-tokens", "256")
    before = (run / "metrics.json").read_bytes()
    _, again = run_cli(capsys, *ev, "--recon-tokens", "256")
    assert again == first and (run / "metrics.json").read_bytes() == before
    assert main([*ev, "--recon-tokens", "512"]) == 2
    assert "holds this SAE's evaluation with other settings (--recon-tokens 256 -> 512); pass --overwrite" \
        in capsys.readouterr().err
    assert (run / "metrics.json").read_bytes() == before
    # a corpus that is not there is named first: --overwrite or --out, as advised, would meet it next
    assert main(["eval", str(run), "--corpus", str(tmp_path / "missing.txt"), "--no-progress"]) == 2
    assert f"corpus path '{tmp_path / 'missing.txt'}' does not exist" in capsys.readouterr().err
    assert (run / "metrics.json").read_bytes() == before
    # The same into --out: written once, then reused; other settings there are refused.
    out = ["--out", str(tmp_path / "elsewhere")]
    _, written = run_cli(capsys, *ev, *out, "--recon-tokens", "256")
    kept = (tmp_path / "elsewhere" / "metrics.json").read_bytes()
    _, reused = run_cli(capsys, *ev, *out, "--recon-tokens", "256")
    assert reused == written and (tmp_path / "elsewhere" / "metrics.json").read_bytes() == kept
    assert main([*ev, *out, "--recon-tokens", "512"]) == 2  # named as into the run
    assert "already holds an evaluation of this SAE with other settings (--recon-tokens 256 -> 512); pass " \
        "--overwrite" in capsys.readouterr().err
    _, replaced = run_cli(capsys, *ev, "--recon-tokens", "512", "--overwrite")
    assert replaced["n_tokens"] == 512 and json.loads((run / "metrics.json").read_text())["n_tokens"] == 512
    # An evaluation written before the contexts were drawn read the first ones: --sample-pool-tokens 0 reuses it.
    older = json.loads((run / "metrics.json").read_text())
    del older["eval_config"]["sample_pool_tokens"], older["sample_pool_tokens"]
    (run / "metrics.json").write_text(json.dumps(older))
    _, reused = run_cli(capsys, *ev, "--recon-tokens", "512", "--sample-pool-tokens", "0")
    assert reused["n_tokens"] == 512 and "sample_pool_tokens" not in reused
    assert main([*ev, "--recon-tokens", "512"]) == 2
    assert "(--sample-pool-tokens 0 -> 4194304)" in capsys.readouterr().err


@pytest.mark.slow  # ~20-30 s on 2 cores: a trained run, evaluated again in the run and in --out
def test_an_evaluation_whose_intervals_an_earlier_saelab_made_is_evaluated_again(tiny_dir, data_dir, tmp_path,
                                                                                 capsys):
    """metrics.json of the same settings was reused as it was, though an earlier saelab made its intervals
    another way (core's read the whole draw's documents) or made none, and report.md showed them as this
    saelab's. An evaluation records how its intervals were made (interval_method): one that records none, as
    the earlier saelab wrote it, is evaluated again with a note naming the file, in the run and in --out DIR
    (not refused as an evaluation there already), and said so in the report while it stands; a current one is
    reused."""
    run, small_eval = _trained_run(capsys, tiny_dir, data_dir, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    no_intervals = ("intervals", "interval_groups", "interval_method")  # as saelab wrote it before intervals existed
    for argv, path, earlier in (([], run / "metrics.json", ("interval_method",)),
                                (["--out", str(elsewhere)], elsewhere / "metrics.json", no_intervals)):
        ev = ["eval", str(run), *small_eval, *argv]
        run_cli(capsys, *ev)
        written = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in written.items() if k not in earlier}))  # as an earlier saelab
        capsys.readouterr()
        assert main(ev) == 0
        why = ("its intervals are an earlier saelab's (it records no interval_method)" if len(earlier) == 1 else
               "it has no intervals (an earlier saelab wrote it, before saelab computed them)")
        assert capsys.readouterr().err.splitlines()[0] == f"saelab: note: {path} is evaluated again, not reused: {why}"
        again = json.loads(path.read_text())
        assert again["interval_method"] == written["interval_method"] and again["intervals"]["nmse"]["n_boot"] == 1000
        kept = path.read_bytes()
        assert main(ev) == 0 and "already holds this evaluation" in capsys.readouterr().err
        assert path.read_bytes() == kept
    from saelab.evals.core import INTERVAL_METHOD

    assert written["interval_method"] == INTERVAL_METHOD
    # The run's report says so of such an evaluation while it stands, and no more once it is made again.
    written = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({k: v for k, v in written.items() if k != "interval_method"}))
    _report_notes(capsys, run)
    assert ("Its intervals are an earlier saelab's (it records no interval_method); `saelab eval RUN` evaluates it "
            "anew.") in (run / "report.md").read_text()
    run_cli(capsys, "eval", str(run), *small_eval)
    assert "earlier saelab" not in (run / "report.md").read_text()


def test_quickstart_evaluates_again_an_evaluation_whose_intervals_an_earlier_saelab_made(tiny_dir, data_dir,
                                                                                        tmp_path, capsys):
    """A quickstart run again reused metrics.json as it was, intervals an earlier saelab made included; one that
    records no interval_method is evaluated again (harvest and training reused), with a note naming it."""
    cfg = _tiny_quickstart(tiny_dir, wiki_jsonl(data_dir, tmp_path / "train.jsonl", 0, 2),
                           wiki_jsonl(data_dir, tmp_path / "eval.jsonl", 3, 1))
    run = tmp_path / "qs"
    quickstart(cfg, run, progress=False)
    path = run / "metrics.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "interval_method"}))
    capsys.readouterr()
    again = quickstart(cfg, run, progress=False)
    assert again["reused"] == ["harvest", "train"]
    assert (f"saelab: note: {path} is evaluated again, not reused: its intervals are an earlier saelab's (it records "
            "no interval_method)") in capsys.readouterr().err.splitlines()
    from saelab.evals.core import INTERVAL_METHOD

    assert again["interval_method"] == json.loads(path.read_text())["interval_method"] == INTERVAL_METHOD
    assert quickstart(cfg, run, progress=False)["reused"] == list(WORK_STAGES)


def _small_run(capsys, model, data_dir, tmp_path, acts, run) -> None:
    """A run of 64 latents trained on 1,000 tokens of ``model`` read on two articles (train.jsonl in ``tmp_path``),
    for the tests of its evaluation."""
    run_cli(capsys, "harvest", "--model", str(model), "--hook", HOOK, "--corpus",
            str(wiki_jsonl(data_dir, tmp_path / "train.jsonl", 0, 2)), "--out", str(acts), "--n-tokens", "1000",
            "--context-size", "32", "--buffer-tokens", "8192", "--no-progress")
    run_cli(capsys, "train", "--activations", str(acts), "--out", str(run), "--n-latents", "64", "--k", "4",
            "--batch-size", "250", "--total-tokens", "1000", "--init-rows", "500", "--no-progress")


@pytest.mark.slow  # ~25 s on 2 cores: a trained run evaluated on several spellings of its corpus
def test_eval_reuse_compares_the_corpus_read_not_the_words_typed(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    """`--corpus ev.jsonl` typed in two folders names two files: the second evaluation does not take the first's
    numbers for its own. The shipped corpus and the SAE's context size typed out are the defaults they name."""
    from saelab.data import default_corpus

    acts, run = tmp_path / "acts", tmp_path / "run"
    for folder, first in (("a", 3), ("b", 4)):
        (tmp_path / folder).mkdir()
        wiki_jsonl(data_dir, tmp_path / folder / "ev.jsonl", first, 1)
    _small_run(capsys, tiny_dir, data_dir, tmp_path, acts, run)
    ev = ["eval", str(run), "--recon-tokens", "256", "--downstream-tokens", "128", "--no-progress"]
    monkeypatch.chdir(tmp_path / "a")
    run_cli(capsys, *ev, "--corpus", "ev.jsonl")
    before = (run / "metrics.json").read_bytes()
    monkeypatch.chdir(tmp_path / "b")
    assert main([*ev, "--corpus", "ev.jsonl"]) == 2
    err = capsys.readouterr().err
    assert re.search(r'with other settings \(--corpus "\.\.\./a/ev\.jsonl \([\d,]+ bytes, sha256 [0-9a-f]{12}\)" -> '
                     r'"\.\.\./b/ev\.jsonl \(', err), err  # the paths' common start elided
    assert (run / "metrics.json").read_bytes() == before
    shutil.copy(tmp_path / "b" / "ev.jsonl", tmp_path / "a" / "ev.jsonl")  # b's text, written anew
    assert main([*ev, "--corpus", str(tmp_path / "a" / "ev.jsonl")]) == 2  # a's path, b's text: not a's numbers
    assert re.search(r'--corpus "\.\.\./a/ev\.jsonl \(7,348 bytes, sha256 [0-9a-f]{12}\)" -> "\.\.\./a/ev\.jsonl \(16,235 '
                     r'bytes, sha256 [0-9a-f]{12}\)"', capsys.readouterr().err)
    run_cli(capsys, *ev, "--corpus", "ev.jsonl", "--overwrite")
    os.utime(tmp_path / "b" / "ev.jsonl", (1, 1))  # the same text, touched: still its evaluation
    kept = (run / "metrics.json").read_bytes()
    run_cli(capsys, *ev, "--corpus", "ev.jsonl")
    assert (run / "metrics.json").read_bytes() == kept
    for typed in ("./ev.jsonl", str(tmp_path / "b" / "ev.jsonl")):  # the same file typed another way: reused
        run_cli(capsys, *ev, "--corpus", typed)
        assert (run / "metrics.json").read_bytes() == kept, typed
    run_cli(capsys, *ev, "--overwrite")
    default = (run / "metrics.json").read_bytes()
    run_cli(capsys, *ev, "--corpus", default_corpus("eval"), "--context-size", "32")
    assert (run / "metrics.json").read_bytes() == default  # reused


def test_eval_reuse_compares_the_whole_text_of_the_corpus(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    """The corpus's identity hashes its first 16 MiB (here 64 bytes): an edit past them that keeps the size reused
    the evaluation of the text before, though the sample pool may read there. Its fingerprint is compared too; an
    evaluation that records none (an earlier saelab's) is judged by the identity alone."""
    monkeypatch.setattr("saelab.data.text.FINGERPRINT_BYTES", 64)
    acts, run, ev_file = tmp_path / "acts", tmp_path / "run", wiki_jsonl(data_dir, tmp_path / "ev.jsonl", 3, 1)
    _small_run(capsys, tiny_dir, data_dir, tmp_path, acts, run)
    ev = ["eval", str(run), "--recon-tokens", "256", "--downstream-tokens", "128", "--corpus", str(ev_file),
          "--no-progress"]
    run_cli(capsys, *ev)
    before = (run / "metrics.json").read_bytes()
    text = ev_file.read_text(encoding="utf-8")
    assert " the " in text[200:]
    ev_file.write_text(text[:200] + text[200:].replace(" the ", " tho "), encoding="utf-8")  # size kept
    assert main(ev) == 2
    err = capsys.readouterr().err
    assert f"(--corpus {ev_file.resolve()}" in err and "(its text changed since)" in err, err
    assert (run / "metrics.json").read_bytes() == before
    earlier = json.loads(before)
    del earlier["eval_as_read"]["corpus_fingerprint"]  # as an earlier saelab wrote it
    (run / "metrics.json").write_text(json.dumps(earlier))
    run_cli(capsys, *ev)  # reused: the identity alone is the same
    assert json.loads((run / "metrics.json").read_text()) == earlier


def test_a_corpus_folder_is_known_by_its_files_and_its_start(data_dir, tmp_path):
    """corpus_identity of a folder: its path, file count and size, and a hash that a file added, renamed or
    resized changes, and a touch does not."""
    from saelab.data import corpus_identity

    folder = tmp_path / "texts"
    folder.mkdir()
    wiki_jsonl(data_dir, folder / "a.jsonl", 3, 1)
    first = corpus_identity(str(folder), "eval")
    assert first.startswith(f"{folder} (") and " files, " not in first
    os.utime(folder / "a.jsonl", (1, 1))
    assert corpus_identity(str(folder), "eval") == first
    wiki_jsonl(data_dir, folder / "b.jsonl", 4, 1)
    second = corpus_identity(str(folder), "eval")
    assert second != first and "2 files, " in second
    (folder / "b.jsonl").rename(folder / "c.jsonl")
    assert corpus_identity(str(folder), "eval") not in (first, second)


def test_paper_suite_results_record_the_corpus_by_its_absolute_path(data_dir, tmp_path, monkeypatch):
    """The suite's per-metric records compare the corpus as a path: a relative one typed in two folders is two."""
    from saelab.evals.suite import _corpus_path

    seen = set()
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        wiki_jsonl(data_dir, tmp_path / folder / "ev.jsonl", 3, 1)
        monkeypatch.chdir(tmp_path / folder)
        seen.add(_corpus_path("ev.jsonl"))
    assert seen == {str(tmp_path / "a" / "ev.jsonl"), str(tmp_path / "b" / "ev.jsonl")}
    assert _corpus_path("some/hub-dataset") == "some/hub-dataset"


def _report_notes(capsys, run: Path) -> list[str]:
    """`saelab report RUN`: the notes it printed (it must succeed)."""
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("saelab: note:")]


SMALL_TRAINING = ("--n-latents", "64", "--batch-size", "250", "--total-tokens", "1000", "--init-rows", "500",
                  "--no-progress")


def _harvested(capsys, tiny_dir: Path, data_dir: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A small activation cache harvested from the command line on real text; (folder, the options of a small
    evaluation on held-out text)."""
    train_corpus = wiki_jsonl(data_dir, tmp_path / "train.jsonl", 0, 2)
    eval_corpus = wiki_jsonl(data_dir, tmp_path / "eval.jsonl", 3, 1)
    acts = tmp_path / "acts"
    run_cli(capsys, "harvest", "--model", str(tiny_dir), "--hook", HOOK, "--corpus", str(train_corpus), "--out",
            str(acts), "--n-tokens", "1000", "--context-size", "32", "--buffer-tokens", "8192", "--no-progress")
    return acts, ["--corpus", str(eval_corpus), "--recon-tokens", "256", "--downstream-tokens", "128", "--no-progress"]


def _trained_run(capsys, tiny_dir: Path, data_dir: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A small run folder trained from the command line on real text; (folder, the options of a small
    evaluation on held-out text)."""
    acts, small_eval = _harvested(capsys, tiny_dir, data_dir, tmp_path)
    run = tmp_path / "run"
    run_cli(capsys, "train", "--activations", str(acts), "--out", str(run), "--k", "4", *SMALL_TRAINING)
    return run, small_eval


def _evaluated_run(capsys, tiny_dir: Path, data_dir: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A small run folder, trained and evaluated from the command line on real text; (folder, metrics)."""
    run, small_eval = _trained_run(capsys, tiny_dir, data_dir, tmp_path)
    _, metrics = run_cli(capsys, "eval", str(run), *small_eval)
    return run, metrics


def test_an_export_names_the_training_corpus_by_its_base_name(tiny_dir, data_dir, tmp_path, capsys):
    """`saelab export` wrote the training corpus by its path on this disk (/home/me/data/train.jsonl) into the
    files made to be shared: SAELens' metadata.dataset_path, the saelab block and sparsify's saelab.json. They
    name it by its base name now; the run's own record keeps the path, by which an evaluation on the training
    text is told apart."""
    run, _ = _trained_run(capsys, tiny_dir, data_dir, tmp_path)
    corpus = tmp_path / "train.jsonl"
    assert load_sae(run).cfg.dataset == str(corpus)
    for fmt in ("saelens", "sparsify"):
        out = tmp_path / "exports" / fmt
        run_cli(capsys, "export", str(run), str(out), "--format", fmt)
        for f in out.glob("*.json"):
            assert str(tmp_path) not in f.read_text(encoding="utf-8"), f"{f} names a path of this disk"
        assert load_sae(out).cfg.dataset == "train.jsonl"
        assert torch.equal(load_sae(out).W_dec, load_sae(run).W_dec)
    cfg = json.loads((tmp_path / "exports" / "saelens" / "cfg.json").read_text())
    assert cfg["metadata"]["dataset_path"] == cfg["saelab"]["dataset"] == "train.jsonl"
    assert json.loads((tmp_path / "exports" / "sparsify" / "saelab.json").read_text())["dataset"] == "train.jsonl"
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "exports" / "saelens"), "--format", "saelens"]) == 0
    assert "already holds this export" in capsys.readouterr().err  # the same command again: the same files
    # an export written before (the corpus's local path in it): named as such, not as another SAE
    earlier = tmp_path / "exports" / "earlier"
    save_sae(load_sae(run), earlier, format="saelens")
    assert str(corpus) in (earlier / "cfg.json").read_text(encoding="utf-8")
    assert main(["export", str(run), str(earlier), "--format", "saelens"]) == 2
    said = (f"OUT {earlier} holds this export as an earlier saelab wrote it, with local paths (of the training corpus "
            "or the model) or without the corpus's fingerprint; pass --overwrite to write it again, fit to share")
    assert capsys.readouterr().err.strip().endswith(said)
    # one written with the corpus's base name but the model folder's path and no fingerprint: named so too, and
    # read as before (the model by its path, the training text by the corpus's name)
    from saelab.cli.share import _corpus_by_name

    before = load_sae(run)
    before.cfg = _corpus_by_name(before.cfg)
    save_sae(before, tmp_path / "exports" / "named", format="saelens")
    assert main(["export", str(run), str(tmp_path / "exports" / "named"), "--format", "saelens"]) == 2
    assert capsys.readouterr().err.strip().endswith(said.replace(str(earlier), str(tmp_path / "exports" / "named")))
    assert model_for(load_sae(tmp_path / "exports" / "named")) == str(tiny_dir.resolve())


def _paths_in(folder: Path, *roots: Path) -> list[str]:
    """The files of ``folder`` whose bytes hold any of ``roots`` (paths of this disk), as 'file: root'."""
    return [f"{f.name}: {root}" for f in sorted(folder.iterdir()) for root in roots
            if str(root).encode() in f.read_bytes()]


def test_an_export_records_a_local_model_by_base_name_and_a_hub_model_as_recorded(tmp_path, monkeypatch):
    """A model read from this disk, written as an absolute path (since moved or not) or as a folder relative to the
    export's folder, is recorded by its base name; the offline default and a hub id as recorded."""
    from saelab.cli.share import shared_model_record

    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    default = {"spec": "default", "weights": "from the package"}
    assert shared_model_record(DEFAULT_MODEL_HUB_ID, default) == (DEFAULT_MODEL_HUB_ID, default)
    assert shared_model_record("openai-community/gpt2", {"spec": "openai-community/gpt2"}) == (
        "openai-community/gpt2", {"spec": "openai-community/gpt2"})
    assert shared_model_record("my-model", {"spec": "my-model"}) == ("my-model", {"local_folder": "my-model"})
    moved = str(tmp_path / "gone" / "tiny-gpt2")
    assert shared_model_record(moved, {"spec": moved}) == ("tiny-gpt2", {"local_folder": "tiny-gpt2"})
    assert shared_model_record("/m/q4.gguf", None) == ("q4.gguf", {"local_file": "q4.gguf"})


def test_an_export_of_a_run_on_a_local_model_folder_names_it_and_asks_for_it(tiny_dir, data_dir, tmp_path, capsys,
                                                                              tmp_path_factory):
    """An export of a run trained on a local model folder held the folder's path (SAELens' metadata.model_name, the
    saelab block's model_name and model_source.spec, sparsify's saelab.json). It names the folder by its base name
    now, and saelab reading the export without --model refuses in one line, before the model loads, rather than
    load a hub model of that name; with --model it evaluates as the run does. The run keeps the path."""
    run, small_eval = _trained_run(capsys, tiny_dir, data_dir, tmp_path)
    assert model_for(load_sae(run)) == str(tiny_dir.resolve())  # the run is local: its record keeps the path
    roots = (tmp_path_factory.getbasetemp().resolve(), tiny_dir.resolve())  # the model folder is not in tmp_path
    for fmt in ("saelens", "sparsify"):
        out = tmp_path / "exports" / fmt
        run_cli(capsys, "export", str(run), str(out), "--format", fmt)
        assert _paths_in(out, *roots) == []
        sae = load_sae(out)
        assert (sae.cfg.model_name, sae.cfg.extra["model_source"]) == ("tiny-gpt2", {"local_folder": "tiny-gpt2"})
    export = tmp_path / "exports" / "saelens"
    assert json.loads((export / "cfg.json").read_text())["metadata"]["model_name"] == "tiny-gpt2"
    refusal = (f"SAE {export} was trained on a local model folder named 'tiny-gpt2', which the export does not "
               "carry; pass its path with --model")
    browse = ["--corpus", str(tmp_path / "eval.jsonl"), "--n-tokens", "248", "--no-progress"]
    for argv in (["eval", str(export), *small_eval],
                 ["eval", str(export), "--suite", "paper", "--out", str(tmp_path / "suite"), "--no-progress"],
                 ["top", str(export), "--latent", "0", "--corpus", str(tmp_path / "eval.jsonl"), "--no-progress"],
                 ["steer", str(export), "--latent", "0", "--value", "1"],
                 ["browse", str(export), "--out", str(tmp_path / "site"), *browse],
                 ["browse", str(export), "--export", "neuronpedia", str(tmp_path / "np"), *browse]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.strip() == f"saelab {argv[0]}: error: {refusal}", argv
    assert not any((tmp_path / name).exists() for name in ("suite", "site", "np"))
    _, by_run = run_cli(capsys, "eval", str(run), *small_eval)
    _, by_export = run_cli(capsys, "eval", str(export), "--model", str(tiny_dir), *small_eval)
    assert by_export["nmse"] == by_run["nmse"] and by_export["delta_ce"] == by_run["delta_ce"]
    # exported again: the record stays as it is (the folder's name, the corpus's fingerprint)
    run_cli(capsys, "export", str(export), str(tmp_path / "again"), "--format", "saelens", "--hook", HOOK)
    assert load_sae(tmp_path / "again").cfg.to_dict() == load_sae(export).cfg.to_dict()


def test_an_export_of_the_default_model_holds_no_local_path(tmp_path, capsys):
    """An SAE of the offline default model trained on the shipped corpus: its export names the model by its hub id
    and the corpus by what it is, with no path of this disk (neither the temporary folder nor saelab's own)."""
    from saelab.data import default_corpus
    from saelab.models import model_provenance
    from saelab.sae import SAEConfig, TopKSAE

    meta = model_provenance("default")
    trained = TopKSAE(SAEConfig(d_in=576, n_latents=64, k=4, hook_name="blocks.9.hook_resid_post",
                                model_name=meta["model_name"], dataset=default_corpus("train"),
                                extra={"model_source": meta["model_source"]}))
    save_sae(trained, tmp_path / "sae")
    assert default_corpus("train").encode() in (tmp_path / "sae" / "cfg.json").read_bytes()  # the SAE's own record
    for fmt in ("saelens", "sparsify"):
        out = tmp_path / "exports" / fmt
        run_cli(capsys, "export", str(tmp_path / "sae"), str(out), "--format", fmt)
        assert _paths_in(out, tmp_path, REPO, Path(default_corpus("train")).parent) == []
        sae = load_sae(out)
        assert (sae.cfg.model_name, sae.cfg.extra["model_source"]) == (DEFAULT_MODEL_HUB_ID, meta["model_source"])
        assert model_for(sae) == "default"


def test_an_evaluation_of_an_export_on_its_training_text_is_told_by_content(tiny_dir, data_dir, tmp_path, capsys,
                                                                            monkeypatch):
    """An export names its training corpus by its base name, so an evaluation in another folder on an unrelated
    file of that name warned that it ran on the training text, and one on a copy under another name did not. The
    export records the corpus's fingerprint (size, sha256) and the warning goes by it; the run's own evaluation
    still goes by the path."""
    from saelab.utils.file_digests import file_sha256

    run, small_eval = _trained_run(capsys, tiny_dir, data_dir, tmp_path)
    export = tmp_path / "export"
    run_cli(capsys, "export", str(run), str(export), "--format", "saelens")
    train = tmp_path / "train.jsonl"
    assert load_sae(export).cfg.extra["dataset_fingerprint"] == {"bytes": train.stat().st_size,
                                                                 "sha256": file_sha256(train)}
    (tmp_path / "elsewhere").mkdir()
    wiki_jsonl(data_dir, tmp_path / "elsewhere" / "train.jsonl", 5, 2)  # the same name, other text
    shutil.copy(train, tmp_path / "elsewhere" / "copy.jsonl")  # the same text, another name
    monkeypatch.chdir(tmp_path / "elsewhere")
    warning = "the text the SAE was trained on; the metrics are not held-out"
    small = [option for option in small_eval if option not in ("--corpus", str(tmp_path / "eval.jsonl"))]
    for corpus, trained_on in (("train.jsonl", False), ("copy.jsonl", True)):
        capsys.readouterr()
        assert main(["eval", str(export), "--model", str(tiny_dir), "--corpus", corpus, *small]) == 0
        out, err = capsys.readouterr()
        assert (warning in err, json.loads(out)["eval_text"]) == (
            trained_on, "training text (not held out)" if trained_on else "held-out text"), corpus
    # the run records the fingerprint too: its own evaluation on that file or on the copy warns, on the other not
    for corpus, trained_on in ((str(train), True), ("copy.jsonl", True), ("train.jsonl", False)):
        capsys.readouterr()
        assert main(["eval", str(run), "--corpus", corpus, "--overwrite", *small]) == 0
        assert (warning in capsys.readouterr().err) == trained_on, corpus
    # the file at the run's recorded path, grown since: it holds the text trained on still
    with train.open("a") as grown:
        grown.write(json.dumps({"text": "One more article."}) + "\n")
    assert main(["eval", str(run), "--corpus", str(train), "--overwrite", *small]) == 0
    assert warning in capsys.readouterr().err


def test_a_run_records_the_fingerprint_of_the_text_its_harvest_read(tiny_dir, data_dir, tmp_path, capsys,
                                                                      monkeypatch):
    """The corpus's fingerprint was taken by the export, only where the run named the corpus by an absolute path
    still there: a run given `--corpus train.jsonl` exported none, and an evaluation of the export on that text
    under another name read as held out. The harvest takes it now, of the text it read, and the run's SAE
    records it; the export carries it as it is, even after the file changed."""
    from saelab.utils.file_digests import file_sha256

    (tmp_path / "work").mkdir()
    train = wiki_jsonl(data_dir, tmp_path / "work" / "train.jsonl", 0, 2)
    trained_text, eval_corpus = train.read_bytes(), wiki_jsonl(data_dir, tmp_path / "eval.jsonl", 3, 1)
    monkeypatch.chdir(tmp_path / "work")
    run_cli(capsys, "harvest", "--model", str(tiny_dir), "--hook", HOOK, "--corpus", "train.jsonl", "--out", "acts",
            "--n-tokens", "1000", "--context-size", "32", "--buffer-tokens", "8192", "--no-progress")
    run_cli(capsys, "train", "--activations", "acts", "--out", "run", "--k", "4", *SMALL_TRAINING)
    fingerprint = {"bytes": len(trained_text), "sha256": file_sha256(train)}
    assert load_sae(tmp_path / "work" / "run").cfg.extra["dataset_fingerprint"] == fingerprint
    train.write_text("another text\n")  # the corpus edited since: the run's record is still the text trained on
    run_cli(capsys, "export", "run", str(tmp_path / "export"), "--format", "saelens")
    assert load_sae(tmp_path / "export").cfg.extra["dataset_fingerprint"] == fingerprint
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "copy.jsonl").write_bytes(trained_text)  # the text trained on, another name
    wiki_jsonl(data_dir, tmp_path / "elsewhere" / "train.jsonl", 5, 2)  # the same name, other text
    monkeypatch.chdir(tmp_path / "elsewhere")
    small = ["--recon-tokens", "256", "--downstream-tokens", "128", "--no-progress"]
    for corpus, trained_on in (("copy.jsonl", True), ("train.jsonl", False), (str(eval_corpus), False)):
        capsys.readouterr()
        assert main(["eval", str(tmp_path / "export"), "--model", str(tiny_dir), "--corpus", corpus, *small]) == 0
        out, err = capsys.readouterr()
        assert (json.loads(out)["eval_text"], "the text the SAE was trained on" in err) == (
            "training text (not held out)" if trained_on else "held-out text", trained_on), corpus


def test_a_run_of_a_relative_corpus_evaluated_on_that_file_grown_is_told_training_text(tiny_dir, data_dir, tmp_path,
                                                                                     capsys, monkeypatch):
    """A run harvested with `--corpus train.jsonl` (recorded as typed) and evaluated on that file after one more
    article was appended said `held-out text`, without a warning: the fingerprint no longer matched, and only a
    corpus recorded by an absolute path was the training text as a file. The harvest records the corpus's
    absolute path too, in the run's own records; the export carries no path of this disk."""
    from saelab.evals.core import held_out_label

    (tmp_path / "work").mkdir()
    train = wiki_jsonl(data_dir, tmp_path / "work" / "train.jsonl", 0, 2)
    monkeypatch.chdir(tmp_path / "work")
    run_cli(capsys, "harvest", "--model", str(tiny_dir), "--hook", HOOK, "--corpus", "train.jsonl", "--out", "acts",
            "--n-tokens", "1000", "--context-size", "32", "--buffer-tokens", "8192", "--no-progress")
    run_cli(capsys, "train", "--activations", "acts", "--out", "run", "--k", "4", *SMALL_TRAINING)
    recorded = load_sae(tmp_path / "work" / "run").cfg
    assert (recorded.dataset, recorded.extra["dataset_absolute_path"]) == ("train.jsonl", str(train.resolve()))
    with train.open("a") as grown:  # the training corpus grows by one more article
        grown.write(wiki_jsonl(data_dir, tmp_path / "extra.jsonl", 5, 1).read_text())
    small = ["--recon-tokens", "256", "--downstream-tokens", "128", "--no-progress"]
    for corpus in ("train.jsonl", str(train)):
        capsys.readouterr()
        assert main(["eval", "run", "--corpus", corpus, "--overwrite", *small]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["eval_text"] == "training text (not held out)", corpus
        assert "the text the SAE was trained on" in err, corpus
    before = load_sae(tmp_path / "work" / "run")  # a run recorded before the harvest took the path: as it was then
    del before.cfg.extra["dataset_absolute_path"]
    assert held_out_label(before, "train.jsonl") == "held-out text"
    run_cli(capsys, "export", "run", str(tmp_path / "export"), "--format", "saelens")
    assert _paths_in(tmp_path / "export", tmp_path.resolve(), tmp_path) == []


def test_a_site_an_export_or_a_model_given_for_an_sae_is_named(tiny_dir, data_dir, tmp_path, capsys):
    """A browser site, a Neuronpedia export or a language model's folder given where an SAE goes was refused as an
    SAE folder whose save may be incomplete (no cfg.json). Each is named for what it is now, by the files in it,
    with what to pass instead; a save cut short before its cfg.json is still named as one."""
    run, small_eval = _trained_run(capsys, tiny_dir, data_dir, tmp_path)
    browse = ["--corpus", str(tmp_path / "eval.jsonl"), "--n-tokens", "248", "--no-progress"]
    run_cli(capsys, "browse", str(run), *browse)  # the site goes into RUN/browser
    run_cli(capsys, "browse", str(run), "--export", "neuronpedia", str(tmp_path / "np"), *browse)
    refused = {
        run / "browser": f"{run / 'browser'} is a feature browser site (site.json), not an SAE; pass the run "
                         f"folder {run}",
        tmp_path / "np": f"{tmp_path / 'np'} is a Neuronpedia export (run_settings.json), not an SAE; pass the SAE "
                         "it was made from (its run folder or SAE folder)",
        tiny_dir: f"{tiny_dir} is a language model's folder (config.json, model.safetensors), not an SAE; pass it as "
                  "the model (--model) and, as the SAE, a run folder (saelab train)",
    }
    for path, message in refused.items():
        with pytest.raises(CheckpointError) as err:
            load_sae(path)
        assert str(err.value).startswith(message), err.value
        capsys.readouterr()
        assert main(["eval", str(path), *small_eval]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    cut_short = tmp_path / "cut"
    shutil.copytree(run / "sae", cut_short)
    (cut_short / "cfg.json").unlink()  # a save stopped before its last file
    with pytest.raises(CheckpointError, match=r"cut: folder has no cfg.json .* the save may be incomplete"):
        load_sae(cut_short)


def test_report_refuses_a_hand_edited_token_count(tiny_dir, data_dir, tmp_path, capsys):
    """A count in metrics.json that is not a non-negative integer, or a measurement that is not a number, is
    named in one line, as the file's other damage is; report.md and density.png stay as they were."""
    run, _ = _evaluated_run(capsys, tiny_dir, data_dir, tmp_path)
    path = run / "metrics.json"
    good = path.read_text()
    before = {name: (run / name).read_bytes() for name in ("report.md", "density.png")}
    count = "a non-negative integer (a count of tokens)"
    for key, value, expected in (("n_tokens", 1.5, count), ("n_tokens", "abc", count), ("n_tokens", -3, count),
                                 ("n_tokens", True, count), ("n_tokens", None, count),
                                 ("n_predictions", "1,024", count), ("nmse", "abc", "a number"),
                                 ("delta_ce", [0.1], "a number"), ("l0", False, "a number")):
        path.write_text(json.dumps({**json.loads(good), key: value}))
        assert main(["report", str(run)]) == 2, (key, value)
        assert capsys.readouterr().err.strip() == (
            f"saelab report: error: {path}: {key} is {value!r}, expected {expected}; "
            "the evaluation metrics file is damaged: remove it, or run the command that wrote it again with "
            "--overwrite")
        assert {name: (run / name).read_bytes() for name in before} == before
    path.write_text(good)
    assert main(["report", str(run)]) == 0


def test_report_refuses_a_json_file_that_is_no_text_or_nested_too_deep(tmp_path, capsys):
    """A run's JSON file that is binary, or nested deeper than the parser goes, is refused in one line naming
    it, as one that is no JSON is (the same reader as N2G result files): they ended in a traceback."""
    path = tmp_path / "run" / "train_config.json"
    path.parent.mkdir()
    advice = "the training config is damaged: remove it, or run the command that wrote it again with --overwrite"
    for content, problem in ((b"\xff\xfe\x00binary", "not a text file"),
                             (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deep to read"),
                             (b'{"train": {', "not JSON (line 1, column 12)")):
        path.write_bytes(content)
        assert main(["report", str(path.parent)]) == 2
        assert capsys.readouterr().err.strip() == f"saelab report: error: {path}: {problem}; {advice}"


def test_report_and_docs_name_the_kl_by_the_predictions_it_averages(tiny_dir, data_dir, tmp_path, capsys):
    """KL is the mean over the next-token predictions scored (n_predictions: none from a context's last token, nor
    from position 0 where it is left out), not over the eval tokens (n_tokens); report.md called it "per token"
    while docs/evals.md said "per prediction". Both name it by its predictions, in the same words."""
    run, metrics = _evaluated_run(capsys, tiny_dir, data_dir, tmp_path)
    contexts = metrics["n_predictions"] // (metrics["context_size"] - 2)  # position 0 excluded, last token: no next
    assert metrics["n_predictions"] == contexts * (metrics["context_size"] - 2) != metrics["n_tokens"]
    [row] = [line for line in (run / "report.md").read_text().splitlines() if line.startswith("| KL")]
    label = row.split(" | ")[0].removeprefix("| ")
    assert label == "KL(clean \\|\\| spliced) per prediction" and f"{metrics['kl']:.4f} [" in row
    docs = (REPO / "docs" / "evals.md").read_text()
    said = re.findall(r"KL\(clean ‖ spliced\) per \w+", docs)
    assert said and set(said) == {"KL(clean ‖ spliced) per prediction"}


def test_report_shows_the_k_aux_and_learning_rate_the_training_used(tiny_dir, data_dir, tmp_path, capsys):
    """A run of 64 latents at the defaults: AuxK takes at most the dead latents, so the default k_aux (256) acts
    as every latent (64), and lr_base scaled to 64 latents (0.004 / sqrt(64 / 2^14) = 0.064) is capped at lr_max
    (0.01). report.md showed k_aux=256 and 0.01 as if set so; it shows the values that acted and says which were
    clamped or capped. Values that acted as set are shown bare."""
    acts, _ = _harvested(capsys, tiny_dir, data_dir, tmp_path)
    capped, as_set = tmp_path / "capped", tmp_path / "as-set"
    run_cli(capsys, "train", "--activations", str(acts), "--out", str(capped), "--k", "4", "--log-every", "1",
            *SMALL_TRAINING)
    run_cli(capsys, "train", "--activations", str(acts), "--out", str(as_set), "--k", "4", "--k-aux", "32",
            "--lr-max", "0.1", "--log-every", "1", *SMALL_TRAINING)
    peak = {run: max(json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines())
            for run in (capped, as_set)}
    assert peak == {capped: pytest.approx(0.01), as_set: pytest.approx(0.064)}  # what the optimizer stepped with
    for run in (capped, as_set):
        _report_notes(capsys, run)
    report = (capped / "report.md").read_text()
    assert "| learning rate | 0.01 (capped by lr_max; lr_base 0.004 scaled to 64 latents gives 0.064) |" in report
    assert ("| AuxK / Multi-TopK / EMA | True (k_aux=64: the 256 set exceeds the SAE's 64 latents, so AuxK takes "
            "every dead latent) / False / off |") in report
    report = (as_set / "report.md").read_text()
    assert "| learning rate | 0.064 |" in report and "| AuxK / Multi-TopK / EMA | True (k_aux=32) / False / off |" \
        in report
    no_auxk = tmp_path / "no-auxk"  # AuxK off: its k_aux acts on nothing, and is not shown
    run_cli(capsys, "train", "--activations", str(acts), "--out", str(no_auxk), "--k", "4", "--no-auxk",
            *SMALL_TRAINING)
    _report_notes(capsys, no_auxk)
    assert "| AuxK / Multi-TopK / EMA | False / False / off |" in (no_auxk / "report.md").read_text()


def test_training_curves_leave_out_the_steps_where_auxk_was_inactive(tiny_dir, data_dir, tmp_path, capsys):
    """A real run whose latents die only after a few steps (--dead-tokens 200): metrics.jsonl records AuxK
    0.0 before, which the log axis cannot show; the curve leaves those steps out (gaps), and says so."""
    import numpy as np

    from saelab.report.plots import training_curves_figure

    corpus, acts, run = wiki_jsonl(data_dir, tmp_path / "train.jsonl", 0, 2), tmp_path / "acts", tmp_path / "run"
    run_cli(capsys, "harvest", "--model", str(tiny_dir), "--hook", HOOK, "--corpus", str(corpus), "--out",
            str(acts), "--n-tokens", "1000", "--context-size", "32", "--buffer-tokens", "8192", "--no-progress")
    run_cli(capsys, "train", "--activations", str(acts), "--out", str(run), "--n-latents", "64", "--k", "4",
            "--batch-size", "50", "--total-tokens", "1000", "--init-rows", "500", "--dead-tokens", "200",
            "--log-every", "1", "--no-progress")
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    auxk = np.array([m["auxk"] for m in log])
    assert (auxk == 0).any() and (auxk > 0).any(), auxk  # the case at hand: inactive, then active
    ax = training_curves_figure(log).axes[0]
    [line] = [l for l in ax.get_lines() if l.get_label().startswith("AuxK")]
    y = np.asarray(line.get_ydata(), dtype=float)
    assert not (y == 0).any()  # no point at 0 for the log axis to drop to
    assert np.array_equal(np.isnan(y), auxk == 0) and np.array_equal(y[auxk > 0], auxk[auxk > 0])
    assert line.get_label() == "AuxK loss (gaps: no latent dead at the step's start)"
    assert main(["report", str(run)]) == 0  # the report draws the same figure
    assert_png(run / "training_curves.png")


def test_training_curves_mark_an_auxk_step_between_two_gaps():
    """On a run long enough to draw lines without markers, a step where AuxK was active between two where it
    was not draws no segment: it gets a marker of the AuxK line's colour."""
    import numpy as np

    from saelab.report.plots import training_curves_figure

    auxk = [0.0] * 10 + [0.9] + [0.0] * 10 + [0.8, 0.7] + [0.0] * 17  # 40 log points: no markers on the lines
    log = [{"step": i, "tokens": 100 * (i + 1), "nmse": 0.5, "auxk": a, "dead_frac": 0.0, "inactive_frac": 0.0}
           for i, a in enumerate(auxk)]
    lines = training_curves_figure(log).axes[0].get_lines()
    [curve] = [l for l in lines if l.get_label().startswith("AuxK")]
    [alone] = [l for l in lines if l.get_marker() == "o"]
    assert np.array_equal(alone.get_xdata(), [1100]) and np.array_equal(alone.get_ydata(), [0.9])
    assert alone.get_color() == curve.get_color() and alone.get_linestyle() == "None"


def test_training_curves_read_at_a_glance():
    """Tick labels of a long run's token counts ran together ("10000120001400016000") and an all-zero share of
    latents drew its axis down to -0.04 %: ticks in k / M, the share's axis from 0, labels laid out apart."""
    from saelab.report.plots import training_curves_figure

    log = [{"step": i, "tokens": 1024 * (i + 1), "nmse": 0.5, "auxk": 0.0, "dead_frac": 0.0, "inactive_frac": 0.0}
           for i in range(16)]
    fig = training_curves_figure(log)
    losses, shares = fig.axes
    assert shares.get_ylim()[0] == 0
    assert [losses.xaxis.get_major_formatter()(t) for t in (2000, 16000, 2_000_000)] == ["2k", "16k", "2M"]
    assert fig.get_layout_engine() is not None


def test_training_curves_show_a_flat_share_inside_the_frame():
    """A dead share flat at 14 % was drawn on the panel's top edge, hidden by the frame, and a run shorter than the
    inactive window listed an "inactive" legend line that no curve matched: room above the highest share, and the
    unmeasured share said in words alone."""
    from saelab.report.plots import training_curves_figure

    log = [{"step": i, "tokens": 4096 * (i + 1), "nmse": 0.3, "auxk": 1.2, "dead_frac": 0.142, "inactive_frac": 0.0}
           for i in range(2)]
    shares = training_curves_figure(log).axes[1]
    assert shares.get_ylim()[1] > 14.2 * 1.05
    [unmeasured] = [l for l in shares.get_lines() if l.get_label().startswith("inactive")]
    assert unmeasured.get_label().startswith("inactive: not measured") and len(unmeasured.get_xdata()) == 0
    assert unmeasured.get_linestyle() == "None" and unmeasured.get_marker() in ("None", "", None)


def test_report_redraws_density_from_the_frequencies_the_evaluation_saved(tiny_dir, data_dir, tmp_path, capsys):
    """`saelab report RUN` draws density.png again from the latent frequencies the evaluation saved. Where
    it cannot (a run evaluated before they were saved, frequencies of other weights or of another
    evaluation, a damaged file, a retrained SAE) it keeps density.png and says why in one line."""
    from saelab.report import density_histogram
    from saelab.run_folder import write_latent_frequencies
    from saelab.sae.io import write_sae  # as a retraining writes sae/ (save_sae refuses a run's)

    run, metrics = _evaluated_run(capsys, tiny_dir, data_dir, tmp_path)
    saved = read_latent_frequencies(run)
    drawn_by_eval = (run / "density.png").read_bytes()
    (run / "density.png").unlink()
    assert _report_notes(capsys, run) == []
    assert (run / "density.png").read_bytes() == drawn_by_eval
    assert "![latent density](density.png)" in (run / "report.md").read_text()
    # Drawn from the saved file: other frequencies there draw another histogram.
    halved = saved.frequencies_N / 2
    write_latent_frequencies(run, replace(saved, frequencies_N=halved))
    assert _report_notes(capsys, run) == []
    expected = density_histogram(halved, tmp_path / "expected.png", metrics["n_tokens"]).read_bytes()
    assert (run / "density.png").read_bytes() == expected != drawn_by_eval

    def not_redrawn(reason: str) -> None:
        before = (run / "density.png").read_bytes()
        notes = _report_notes(capsys, run)
        assert len(notes) == 1 and notes[0].startswith("saelab: note: density.png not redrawn: "), notes
        assert reason in notes[0], notes
        assert (run / "density.png").read_bytes() == before

    where = run / LATENT_FREQUENCIES
    (run / LATENT_FREQUENCIES).unlink()  # a run evaluated before the frequencies were saved
    not_redrawn(f"{where} is missing (the run was evaluated before saelab saved the latents' firing frequencies); "
                f"`saelab eval {run} --overwrite` evaluates the SAE again and saves its latent frequencies")
    write_latent_frequencies(run, replace(saved, sae_sha256="0" * 20))
    not_redrawn(f"{where} measured other SAE weights than sae/")
    write_latent_frequencies(run, replace(saved, evaluation={**saved.evaluation, "n_tokens": 512}))
    not_redrawn(f"{where} comes from another evaluation than metrics.json")
    where.write_bytes(b"{not safetensors")
    not_redrawn(f"{where} is not a latent-frequencies file saelab wrote")
    write_latent_frequencies(run, replace(saved, frequencies_N=saved.frequencies_N * float("inf")))  # NaN, inf
    not_redrawn(f"{where} holds frequencies outside [0, 1] (or NaN)")
    write_latent_frequencies(run, replace(saved, frequencies_N=saved.frequencies_N[:5]))  # another SAE's count
    not_redrawn(f"{where} holds 5 frequencies for an SAE of {saved.frequencies_N.numel():,} latents")
    save_file({"frequencies": (saved.frequencies_N > 0).to(torch.int64)}, str(where),  # not fractions
              metadata={"sae_sha256": saved.sae_sha256, "evaluation": json.dumps(saved.evaluation)})
    not_redrawn("(torch.int64) and evaluation dict; expected one float per latent")
    write_latent_frequencies(run, saved)
    sae = load_sae(run / "sae")
    with torch.no_grad():
        sae.b_dec += 1  # the SAE changed since its evaluation
    write_sae(sae, run / "sae")
    not_redrawn("metrics.json describes other SAE weights than sae/ (the SAE changed since)")
    assert "latent density" not in (run / "report.md").read_text()


def _counting(monkeypatch, name: str, *modules) -> list:
    """The calls of function ``name`` as each module (which imported it) calls it: what each returned."""
    calls: list = []  # what each call returned
    original = getattr(modules[0], name)

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out)
        return out

    for module in modules:
        monkeypatch.setattr(module, name, counted)
    return calls


def test_eval_quickstart_and_report_draw_density_and_hash_the_sae_once(tiny_dir, data_dir, tmp_path, capsys,
                                                                      monkeypatch):
    """density.png is drawn once by `saelab eval` and by quickstart (their report does not draw it again from
    the frequencies the evaluation just saved), and `saelab report` hashes the SAE's weights once, paper
    suite included."""
    import saelab.report.markdown
    import saelab.run_folder

    run, small_eval = _trained_run(capsys, tiny_dir, data_dir, tmp_path)
    draws = _counting(monkeypatch, "density_histogram", saelab.pipeline, saelab.report.markdown)
    run_cli(capsys, "eval", str(run), *small_eval)
    assert len(draws) == 1 and "![latent density](density.png)" in (run / "report.md").read_text()
    run_cli(capsys, "eval", str(run), "--suite", "paper", "--metrics", "core", *small_eval)
    hashes = _counting(monkeypatch, "sae_sha256", saelab.run_folder, saelab.report.markdown)
    draws.clear()
    run_cli(capsys, "report", str(run))
    assert (len(hashes), len(draws)) == (1, 1)  # metrics.json, the frequencies and evals/ checked with one hash
    report = (run / "report.md").read_text()
    assert "## Paper metrics" in report and "| nMSE (FVU), raw activation space |" in report

    draws.clear()
    cfg = _tiny_quickstart(tiny_dir, tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    quickstart(cfg, tmp_path / "qs", progress=False)  # the corpora _trained_run wrote
    assert len(draws) == 1 and "![latent density](density.png)" in (tmp_path / "qs" / "report.md").read_text()
    quickstart(cfg, tmp_path / "qs", progress=False)  # every stage reused: the report draws it from the file
    assert len(draws) == 2


def test_eval_of_a_run_hashes_its_sae_once(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    """`saelab eval RUN` hashes the SAE's weights (which reads every weight) once: the up-to-date check, the
    evaluation's files and the report share the digest, whether the call evaluates, reuses the evaluation,
    or evaluates again weights that changed since."""
    import saelab.report.markdown
    import saelab.run_folder
    from saelab.run_folder import sae_sha256
    from saelab.sae.io import write_sae  # as a retraining writes sae/ (save_sae refuses a run's)

    run, small_eval = _trained_run(capsys, tiny_dir, data_dir, tmp_path)
    hashes = _counting(monkeypatch, "sae_sha256", saelab.pipeline, saelab.run_folder, saelab.report.markdown)
    loads = _loads(monkeypatch)
    _, first = run_cli(capsys, "eval", str(run), *small_eval)  # no evaluation yet
    assert len(hashes) == 1 and len(loads) == 1  # the SAE is loaded once, for the check, evaluation and report
    hashes.clear()
    _, again = run_cli(capsys, "eval", str(run), *small_eval)  # the same evaluation: reused
    assert len(hashes) == 1 and again == first
    sae = load_sae(run / "sae")
    with torch.no_grad():
        sae.b_dec += 1  # metrics.json now describes other weights: checked, then evaluated again
    write_sae(sae, run / "sae")
    hashes.clear()
    _, changed = run_cli(capsys, "eval", str(run), *small_eval)
    assert len(hashes) == 1
    digest = sae_sha256(load_sae(run / "sae"))
    assert changed["sae_sha256"] == digest != first["sae_sha256"]
    assert json.loads((run / "metrics.json").read_text())["sae_sha256"] == digest
    assert read_latent_frequencies(run).sae_sha256 == digest
    assert "![latent density](density.png)" in (run / "report.md").read_text()


def _hashes(monkeypatch) -> list[str]:
    """The digest of each hash of an SAE's weights, at every module that hashes one."""
    import saelab.cli.evaluate
    import saelab.evals.suite
    import saelab.report.markdown
    import saelab.run_folder

    return _counting(monkeypatch, "sae_sha256", saelab.pipeline, saelab.run_folder, saelab.report.markdown,
                     saelab.evals.suite, saelab.cli.evaluate)


def _loads(monkeypatch) -> list:
    """The SAEs loaded, at every module that loads one (open_sae imports it from saelab.sae when called)."""
    import saelab.report.markdown
    import saelab.sae

    return _counting(monkeypatch, "load_sae", saelab.pipeline, saelab.report.markdown, saelab.sae)


def test_eval_of_a_sweep_hashes_and_loads_each_sae_once(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    """`saelab eval SWEEP` hashes and loads each run's SAE once: its up-to-date check, its evaluation and its
    report share the digest and the SAE, whether the run is evaluated, kept, or evaluated again after its
    weights changed."""
    from saelab.run_folder import sae_sha256
    from saelab.sae.io import write_sae  # as a retraining writes sae/ (save_sae refuses a run's)

    acts, small_eval = _harvested(capsys, tiny_dir, data_dir, tmp_path)
    sweep = tmp_path / "sweep"
    run_cli(capsys, "sweep", "--activations", str(acts), "--out", str(sweep), "--grid", "k=4,8", *SMALL_TRAINING)
    hashes, loads = _hashes(monkeypatch), _loads(monkeypatch)
    run_cli(capsys, "eval", str(sweep), *small_eval)
    assert sorted(hashes) == sorted(sae_sha256(load_sae(sweep / run / "sae")) for run in ("k4", "k8"))
    assert len(loads) == 2
    sae = load_sae(sweep / "k4" / "sae")
    with torch.no_grad():
        sae.b_dec += 1  # its metrics.json now describes other weights: checked, then evaluated again
    write_sae(sae, sweep / "k4" / "sae")
    hashes.clear()
    loads.clear()
    _, out = run_cli(capsys, "eval", str(sweep), *small_eval)
    assert out["k8"] == "already evaluated" and "nmse" in out["k4"]
    assert sorted(hashes) == sorted(sae_sha256(load_sae(sweep / run / "sae")) for run in ("k4", "k8"))
    assert len(loads) == 2


def test_sweep_eval_hashes_each_sae_once_for_its_evaluation_and_scaling_study(tiny_dir, data_dir, tmp_path, capsys,
                                                                             monkeypatch):
    """`saelab sweep --eval` hashes and loads each run's SAE once: its scaling study takes the digests its
    evaluation just made. A standalone `saelab report` hashes every SAE, and one whose sae/ was written after
    the evaluation hashed it is hashed again, so its stale metrics.json is still left out."""
    from saelab.report import write_scaling_report
    from saelab.run_folder import SaeHashes, sae_sha256
    from saelab.sae.io import write_sae  # as a retraining writes sae/ (save_sae refuses a run's)

    acts, small_eval = _harvested(capsys, tiny_dir, data_dir, tmp_path)
    eval_options = [a.replace("--", "--eval-", 1) for a in small_eval[:-1]]  # --corpus X -> --eval-corpus X
    sweep = tmp_path / "sweep"
    hashes, loads = _hashes(monkeypatch), _loads(monkeypatch)
    run_cli(capsys, "sweep", "--activations", str(acts), "--out", str(sweep), "--grid", "k=4,8", *SMALL_TRAINING,
            "--eval", *eval_options)
    digests = sorted(sae_sha256(load_sae(sweep / run / "sae")) for run in ("k4", "k8"))
    study = json.loads((sweep / "scaling.json").read_text())
    assert sorted(r["sae_sha256"] for r in study["runs"]) == digests and study["other_weights"] == []
    assert sorted(hashes) == digests and len(loads) == 2
    hashes.clear()
    run_cli(capsys, "report", str(sweep))
    assert sorted(hashes) == digests

    kept = SaeHashes()
    for run in ("k4", "k8"):  # as the evaluation reads them
        kept.load(sweep / run)
    sae = load_sae(sweep / "k4" / "sae")
    with torch.no_grad():
        sae.b_dec += 1  # after the evaluation hashed it: metrics.json now describes other weights
    write_sae(sae, sweep / "k4" / "sae")
    hashes.clear()
    assert write_scaling_report(sweep, sae_hashes=kept)["other_weights"] == ["k4"]
    assert hashes == [sae_sha256(load_sae(sweep / "k4" / "sae"))]  # k8's kept digest still holds


def test_eval_into_an_out_folder_hashes_the_sae_once(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    """`saelab eval SAE --out DIR` hashes the SAE once, whether it evaluates it or finds this evaluation
    already in DIR."""
    from saelab.run_folder import sae_sha256

    run, small_eval = _trained_run(capsys, tiny_dir, data_dir, tmp_path)
    digest = sae_sha256(load_sae(run / "sae"))
    hashes = _hashes(monkeypatch)
    _, first = run_cli(capsys, "eval", str(run / "sae"), "--out", str(tmp_path / "out"), *small_eval)
    assert hashes == [digest] and first["sae_sha256"] == digest
    hashes.clear()
    _, again = run_cli(capsys, "eval", str(run / "sae"), "--out", str(tmp_path / "out"), *small_eval)  # reused
    assert hashes == [digest] and again == first


def test_quickstart_hashes_its_sae_once(tiny_dir, data_dir, tmp_path, monkeypatch):
    """quickstart hashes the SAE once: when it trains and evaluates it, when it evaluates a finished training
    again, and when every stage is reused (its checks, its evaluation and its report share the digest)."""
    from saelab.run_folder import sae_sha256

    cfg = _tiny_quickstart(tiny_dir, wiki_jsonl(data_dir, tmp_path / "train.jsonl", 0, 2),
                           wiki_jsonl(data_dir, tmp_path / "eval.jsonl", 3, 1))
    run = tmp_path / "qs"
    hashes = _hashes(monkeypatch)
    first = quickstart(cfg, run, progress=False)
    digest = sae_sha256(load_sae(run / "sae"))
    assert hashes == [digest] and first["sae_sha256"] == digest
    for reused in (["harvest", "train"], ["harvest", "train", "evaluate"]):
        if "evaluate" not in reused:
            (run / "metrics.json").unlink()  # the finished training is evaluated again
        hashes.clear()
        again = quickstart(cfg, run, progress=False)
        assert hashes == [digest] and again["reused"] == reused and again["sae_sha256"] == digest
    assert "| nMSE (FVU), raw activation space |" in (run / "report.md").read_text()
    # A finished run with no evaluation to check: its SAE is not hashed before the checks that refuse the call.
    (run / "metrics.json").unlink()
    hashes.clear()
    with pytest.raises(CorpusError, match="nope.jsonl"):
        quickstart(replace(cfg, eval=replace(cfg.eval, corpus=str(tmp_path / "nope.jsonl"))), run, progress=False)
    assert hashes == []


def test_paper_suite_of_a_run_and_its_report_hash_the_sae_once(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    """`saelab eval RUN --suite paper` hashes the SAE once for the suite and the run's report. With --hook
    the suite measures another SAE than the run's: the report checks the run's own."""
    from saelab.run_folder import sae_sha256

    run, small_eval = _trained_run(capsys, tiny_dir, data_dir, tmp_path)
    digest = sae_sha256(load_sae(run / "sae"))
    hashes = _hashes(monkeypatch)
    run_cli(capsys, "eval", str(run), *small_eval)
    hashes.clear()
    run_cli(capsys, "eval", str(run), "--suite", "paper", "--metrics", "core", *small_eval)
    assert hashes == [digest]
    # evals/core.json's result: metrics.json's keys but those docs/evals.md names, every one in its list
    core = set(json.loads((run / "evals" / "core.json").read_text())["result"])
    text = (Path(__file__).resolve().parents[1] / "docs" / "evals.md").read_text()
    section = text.split("\n### `core`\n", 1)[1].split("\n### ", 1)[0]
    left_out = set(re.findall(r"`(\w+)`", section.split(" except ", 1)[1].split("(", 1)[0]))
    assert core == _documented_metrics_keys()[0] - left_out
    assert core <= set(re.findall(r"`(\w+)`", section))
    report = (run / "report.md").read_text()
    assert "## Paper metrics" in report and "| nMSE (FVU), raw activation space |" in report
    hashes.clear()
    run_cli(capsys, "eval", str(run), "--suite", "paper", "--metrics", "core", "--hook", "blocks.0.hook_resid_post",
            "--overwrite", *small_eval)
    assert len(hashes) == 2 and digest in hashes  # the suite's SAE reads another hook: hashed apart
    report = (run / "report.md").read_text()
    assert "## Paper metrics" not in report and "| nMSE (FVU), raw activation space |" in report


def test_stage_seconds_count_the_calls_that_ran_each_stage(tmp_path):
    from saelab.pipeline import _stage_seconds
    from saelab.report.markdown import _wall_time_rows

    times = {"load_model": 2.0, "train": 30.0, "evaluate": 5.0}
    # A training resumed after 70 s in earlier calls; the harvest reused from a call that took 40 s.
    stages = _stage_seconds(tmp_path, {"harvest": 40.0, "train": 12.0}, times, ["harvest"], trained_before=70.0,
                            harvested=(33.0, True))  # the earlier call's record wins over the cache's writing
    assert stages == {"harvest": 40.0, "load_model": 2.0, "train": 100.0, "evaluate": 5.0, "total": 147.0}
    # An earlier call finished the harvest and was interrupted later (no record): the cache's writing time. A
    # harvest resumed now: this call's and the earlier calls' writing. An earlier saelab's cache records none.
    later = {"load_model": 2.0, "evaluate": 5.0}
    assert _stage_seconds(tmp_path, {}, later, ["harvest"], 0.0, (33.0, True))["harvest"] == 33.0
    assert _stage_seconds(tmp_path, {}, {**later, "harvest": 10.0}, [], 0.0, (25.0, False))["harvest"] == 35.0
    assert "harvest" not in _stage_seconds(tmp_path, {}, later, ["harvest"], 0.0, (None, True))
    # A call that found every stage done made none of the results: each keeps its record, the input checks (this
    # call's wall time) and the load too.
    done = {"check_inputs": 12.4, "harvest": 40.0, "load_model": 1.5, "train": 100.0, "evaluate": 5.0}
    for checks in ({}, {"check_inputs": 6.1}):
        assert _stage_seconds(tmp_path, {**done, "total": 158.9}, checks, ["harvest", "train", "evaluate"], 0.0,
                              (33.0, True)) == {**done, "total": 158.9}
    # The checks and the load every working call repeats add up as the calls behind the results do: an overwrite
    # keeping the cache adds its own to the calls' that made it; one replacing every result counts its own alone.
    overwrite = {"check_inputs": 3.0, "load_model": 1.0, "train": 50.0, "evaluate": 4.0}
    assert _stage_seconds(tmp_path, {**done, "total": 158.9}, overwrite, ["harvest"], 0.0, (33.0, True)) == {
        "check_inputs": 15.4, "harvest": 40.0, "load_model": 2.5, "train": 50.0, "evaluate": 4.0, "total": 111.9}
    # A second overwrite replaces the first's training and evaluation: its checks and load add to those of the
    # calls behind the cache alone (recorded apart); a record of an earlier saelab, without them, counts on whole.
    first_overwrite = {**done, "check_inputs": 15.4, "load_model": 2.5, "train": 50.0, "evaluate": 4.0}
    harvest_calls = {"check_inputs": 12.4, "load_model": 1.5}
    assert _stage_seconds(tmp_path, first_overwrite, overwrite, ["harvest"], 0.0, (33.0, True), harvest_calls) == {
        "check_inputs": 15.4, "harvest": 40.0, "load_model": 2.5, "train": 50.0, "evaluate": 4.0, "total": 111.9}
    assert _stage_seconds(tmp_path, first_overwrite, overwrite, ["harvest"], 0.0, (33.0, True))["check_inputs"] == 18.4
    anew = {**overwrite, "harvest": 20.0}
    assert _stage_seconds(tmp_path, {**done, "total": 158.9}, anew, [], 0.0, (None, False)) == {**anew, "total": 78.0}
    rows = _wall_time_rows({"wall_seconds": {**times, "total": 37.0}, "stage_seconds": stages})
    behind = "calls behind these results"
    assert rows == [("load_model", "2.0"), ("train", f"30.0 ({behind}: 100.0)"), ("evaluate", "5.0"),
                    ("harvest", f"reused ({behind}: 40.0)"), ("total", f"37.0 ({behind}: 147.0)")]


def test_stage_seconds_of_quickstart_reruns_count_the_calls_behind_the_results(tiny_dir, data_dir, tmp_path):
    """A rerun that found every stage done recorded no time (wall_seconds {"total": 0.0}), though it checked its
    inputs and whether every stage was done; and stage_seconds summed the calls that trained, but held the input
    checks and the model load of the latest call alone. The rerun's checks are its wall time now, and
    stage_seconds sums each stage over the calls whose work the results come from."""
    cfg = _tiny_quickstart(tiny_dir, wiki_jsonl(data_dir, tmp_path / "train.jsonl", 0, 2),
                           wiki_jsonl(data_dir, tmp_path / "eval.jsonl", 3, 1))
    run = tmp_path / "qs"
    first = quickstart(cfg, run, progress=False)
    assert first["stage_seconds"] == first["wall_seconds"]
    rerun = quickstart(cfg, run, progress=False)
    assert set(rerun["wall_seconds"]) == {"check_inputs", "total"} and rerun["reused"] == list(WORK_STAGES)
    assert rerun["wall_seconds"]["total"] == rerun["wall_seconds"]["check_inputs"]
    assert rerun["stage_seconds"] == first["stage_seconds"]  # the rerun made none of the results
    redone = quickstart(cfg, run, overwrite=True, progress=False)  # the cache kept: its call counts on
    wall, stages = redone["wall_seconds"], redone["stage_seconds"]
    assert redone["reused"] == ["harvest"] and stages["harvest"] == first["stage_seconds"]["harvest"]
    for stage in ("check_inputs", "load_model"):
        assert stages[stage] == round(first["stage_seconds"][stage] + wall[stage], 1), stage
    assert (stages["train"], stages["evaluate"]) == (wall["train"], wall["evaluate"])
    anew = quickstart(cfg, run, overwrite=True, overwrite_activations=True, progress=False)
    assert anew["reused"] == [] and anew["stage_seconds"] == anew["wall_seconds"]  # every result made anew


def test_repeated_overwrites_count_the_checks_of_the_calls_behind_the_results(tiny_dir, data_dir, tmp_path):
    """A second --overwrite keeping the cache added its input checks and model load to the first overwrite's
    record, though it replaced that call's training and evaluation: plain, --overwrite, --overwrite gave the
    checks of all three calls, where the first (the harvest) and the third (training, evaluation) alone are
    behind the results. The harvest's calls' share is recorded apart, and an overwrite adds its own to that."""
    from saelab.pipeline import SHARED_STAGES

    cfg = _tiny_quickstart(tiny_dir, wiki_jsonl(data_dir, tmp_path / "train.jsonl", 0, 2),
                           wiki_jsonl(data_dir, tmp_path / "eval.jsonl", 3, 1))
    run = tmp_path / "qs"
    calls = [quickstart(cfg, run, overwrite=overwrite, progress=False) for overwrite in (False, True, True)]
    assert calls[1]["wall_seconds"]["check_inputs"] > 0  # else the middle call's seconds could not show
    for stage in SHARED_STAGES:
        behind = calls[0]["wall_seconds"][stage] + calls[2]["wall_seconds"][stage]
        assert calls[2]["stage_seconds"][stage] == pytest.approx(behind, abs=0.051), stage
    recorded = json.loads((run / "metrics.json").read_text())
    assert recorded["stage_seconds"] == calls[2]["stage_seconds"]
    assert recorded["harvest_call_seconds"] == {stage: calls[0]["wall_seconds"][stage] for stage in SHARED_STAGES}


def test_cli_quickstart_prints_a_short_summary_and_its_metrics_as_json_on_request(tiny_dir, data_dir, tmp_path,
                                                                                   capsys):
    """The README's first command ended by printing the whole metrics.json (~140 lines); it prints the headline
    metrics with their intervals and where the report and metrics.json are, and --json prints the file alone
    (its stdout began with `report: PATH` once, which a pipe into a JSON reader refused; that path goes to
    stderr then, as every verb's words do). A line wider than a terminal's (the intervals note, ~200 characters)
    goes on indented below."""
    from saelab.report.markdown import SUMMARY_WIDTH, intervals_note

    train, held_out = (wiki_jsonl(data_dir, tmp_path / name, *docs) for name, docs in
                       (("train.jsonl", (0, 2)), ("eval.jsonl", (3, 1))))
    qs = tmp_path / "qs"
    command = ["quickstart", "--out", str(qs), "--harvest-model", str(tiny_dir), "--harvest-hook", HOOK,
               "--harvest-corpus", str(train), "--harvest-context-size", "32", "--n-tokens", "1000", "--n-latents",
               "64", "--k", "4", "--batch-size", "250", "--init-rows", "500", "--eval-corpus", str(held_out),
               "--eval-recon-tokens", "256", "--eval-downstream-tokens", "128", "--no-progress"]
    capsys.readouterr()
    code = main(command)
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    metrics = json.loads((qs / "metrics.json").read_text())
    lines = out.splitlines()
    assert len(lines) <= 12, out
    for key in ("nmse", "delta_ce", "kl"):  # each headline number with its interval, as report.md shows it
        interval = metrics["intervals"][key]
        assert f"{metrics[key]:.4f} [{interval['low']:.4f}, {interval['high']:.4f}]" in out, key
    assert f"{metrics['l0']:.2f}" in out and "held-out text" in lines[0]
    assert f"report:  {qs / 'report.md'}" in lines and any(line.startswith(f"metrics: {qs / 'metrics.json'}")
                                                            for line in lines)
    assert not any(line.startswith("reused:") for line in lines)
    # each line fits a terminal (the intervals note was one line of ~200 characters), saying what it said; only
    # a path is never broken
    widest = max(SUMMARY_WIDTH, len(f"metrics: {qs / 'metrics.json'}"))
    assert max(map(len, lines)) <= widest, out
    note = next(line for line in intervals_note(metrics) if line)
    assert len(note) > SUMMARY_WIDTH and note in " ".join(line.strip() for line in lines)
    # the same command again reuses every stage, and says so
    code = main(command)
    out, err = capsys.readouterr()
    assert code == 0 and max(map(len, out.splitlines())) <= widest, out
    assert "reused: harvest, train, evaluate (found done with these settings; --overwrite trains and evaluates " \
        "again, with --overwrite-activations harvests too)" in " ".join(line.strip() for line in out.splitlines())
    # --json prints the whole metrics.json and nothing else
    code = main([*command, "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out) == json.loads((qs / "metrics.json").read_text())
    assert f"saelab quickstart: report: {qs / 'report.md'}" in err.splitlines()


def _documented_metrics_keys() -> tuple[set[str], set[str]]:
    """(keys every evaluation writes, keys quickstart adds) as docs/evals.md's metrics.json table lists them."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "evals.md").read_text()
    section = text.split("\n## `metrics.json`\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    keys = {key.strip().strip("`"): meaning for key, meaning in rows}
    quickstart_only = {k for k, meaning in keys.items() if meaning.strip().startswith("quickstart only")}
    return set(keys) - quickstart_only, quickstart_only


@pytest.mark.slow  # ~25 s on 2 cores: an evaluation on the default model
def test_metrics_json_records_the_full_model_id_and_only_documented_keys(smollm2, tmp_path):
    """metrics.json names the offline default by its hub id, as report.md does (it wrote "default"); one
    written before, with "default", still reads as the same evaluation. Its keys are docs/evals.md's list."""
    from saelab.models import DEFAULT_MODEL, model_provenance
    from saelab.pipeline import evaluate, evaluation_is_current
    from saelab.report.markdown import frequencies_mismatch
    from saelab.sae import TopKSAE
    from saelab.sae.topk import SAEConfig

    provenance = model_provenance(DEFAULT_MODEL)
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=smollm2.hook_width("blocks.9.hook_resid_post"), n_latents=64, k=4,
                            hook_name="blocks.9.hook_resid_post", context_size=32,
                            model_name=provenance["model_name"], extra={"model_source": provenance["model_source"]}))
    assert model_for(sae) == DEFAULT_MODEL
    cfg = EvalConfig(recon_tokens=256, downstream_tokens=128)
    out = tmp_path / "out"
    metrics = evaluate(sae, lm=smollm2, cfg=cfg, out_dir=out, progress=False)
    written = json.loads((out / "metrics.json").read_text())
    assert written["model"] == metrics["model"] == DEFAULT_MODEL_HUB_ID
    every_eval, quickstart_adds = _documented_metrics_keys()
    assert set(written) == every_eval
    assert quickstart_adds == {"wall_seconds", "stage_seconds", "harvest_call_seconds", "reused"}
    assert written["model_source"] == provenance["model_source"]  # what was loaded: not the hub's weights
    assert evaluation_is_current(out, sae, cfg) and not evaluation_is_current(out, sae, cfg,
                                                                              model=DEFAULT_MODEL_HUB_ID)
    # A metrics.json written before, naming the model "default": the same evaluation, its frequencies its own.
    old = {k: v for k, v in {**written, "model": DEFAULT_MODEL}.items() if k != "model_source"}
    (out / "metrics.json").write_text(json.dumps(old))
    assert evaluation_is_current(out, sae, cfg) and not evaluation_is_current(out, sae, cfg,
                                                                              model=DEFAULT_MODEL_HUB_ID)
    assert eval_settings(old) == eval_settings(written)
    assert frequencies_mismatch(read_latent_frequencies(out), out, 64, written["sae_sha256"], eval_settings(old),
                                weights="sae/", evaluation="metrics.json") is None


def _opens_of(monkeypatch, corpus) -> list:
    """Each time a corpus source is opened (a hub dataset: a stream), the ones of ``corpus`` kept."""
    import saelab.data.text

    opened, original = [], saelab.data.text._open_source

    def counted(source, **kwargs):
        if os.fspath(source) == os.fspath(corpus):
            opened.append(source)
        return original(source, **kwargs)

    monkeypatch.setattr(saelab.data.text, "_open_source", counted)
    return opened


def test_quickstart_and_a_sweep_evaluation_read_the_eval_corpus_once(tiny_dir, data_dir, tmp_path, monkeypatch):
    """The check that the eval corpus holds the evaluation's tokens (before the model loads) reads the
    contexts the evaluation then uses: quickstart read the corpus twice, a sweep's evaluation once more per
    run, the paper suite twice; a hub dataset is streamed once. quickstart's training corpus too: its check
    opened it once and the harvest again."""
    from saelab.evals.suite import PaperSuiteConfig
    from saelab.pipeline import evaluate_sweep, paper_suite, sweep_from_cache

    eval_corpus = wiki_jsonl(data_dir, tmp_path / "eval.jsonl", 3, 1)
    train_corpus = wiki_jsonl(data_dir, tmp_path / "train.jsonl", 0, 2)
    cfg = _tiny_quickstart(tiny_dir, train_corpus, eval_corpus)
    opened, train_opened = _opens_of(monkeypatch, eval_corpus), _opens_of(monkeypatch, train_corpus)
    first = quickstart(cfg, tmp_path / "qs", progress=False)
    assert len(opened) == 1
    assert len(train_opened) == 1  # its check before the load reads the stream the harvest goes on with
    opened.clear()
    sweep_from_cache(tmp_path / "qs" / "activations", tmp_path / "sweep", cfg.train, {"k": [2, 4]}, progress=False)
    evaluate_sweep(tmp_path / "sweep", cfg.eval, progress=False)
    assert len(opened) == 1
    again = json.loads((tmp_path / "sweep" / "k4" / "metrics.json").read_text())
    assert again["nmse"] == first["nmse"]  # the same SAE, evaluated on the same contexts
    opened.clear()  # sweep --eval: the check before training reads the contexts its evaluation uses
    from saelab.cli import main

    assert main(["sweep", "--activations", str(tmp_path / "qs" / "activations"), "--out", str(tmp_path / "sweep2"),
                 "--grid", "k=4", "--n-latents", "64", "--batch-size", "250", "--total-tokens", "1000",
                 "--init-rows", "500", "--eval", "--eval-corpus", str(eval_corpus), "--eval-recon-tokens", "256",
                 "--eval-downstream-tokens", "128", "--device", "cpu", "--no-progress"]) == 0
    assert len(opened) == 1
    assert json.loads((tmp_path / "sweep2" / "k4" / "metrics.json").read_text())["nmse"] == first["nmse"]
    opened.clear()  # the paper suite: its core metric evaluates the contexts read before the load
    suite = paper_suite(tmp_path / "sweep" / "k4", eval_cfg=cfg.eval, cfg=PaperSuiteConfig(metrics=["core"]),
                        progress=False)
    assert len(opened) == 1 and suite["metrics"]["core"]["status"] == "ok"
    core = json.loads((tmp_path / "sweep" / "k4" / "evals" / "core.json").read_text())
    assert core["result"]["nmse"] == first["nmse"]


def test_undefined_measurements_are_null_in_metrics_json_and_explained_in_reports(tiny_gpt2, tmp_path):
    """A model whose logits ignore the hook (its unembedding zeroed): no ablation raises CE, so CE recovered is
    undefined: null in metrics.json (strict JSON, as the suite's core.json), and "—" with why in the reports,
    where it was a bare NaN and "nan%"."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from saelab.models import LanguageModel
    from saelab.pipeline import evaluate
    from saelab.sae.topk import SAEConfig, TopKSAE

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=50257, n_positions=128,
                                       tie_word_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    lm = LanguageModel(model, tiny_gpt2.tokenizer, "tiny-gpt2")
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=32, k=4, hook_name="blocks.0.hook_resid_post", context_size=16))
    evaluate(sae, lm=lm, cfg=EvalConfig(recon_tokens=150, downstream_tokens=150), out_dir=tmp_path, progress=False)

    def no_constant(name):
        raise AssertionError(f"metrics.json holds {name}, which strict JSON has not")

    metrics = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=no_constant)
    assert metrics["ce_zero_abl"] == metrics["ce_mean_abl"] == metrics["ce_clean"]
    assert metrics["ce_recovered_zero"] is None and metrics["ce_recovered_mean"] is None
    from saelab.report.markdown import metric_rows

    rows = dict(metric_rows(metrics))
    assert rows["CE recovered vs zero-ablation"] == \
        "— (zero-ablation does not raise CE above the clean model's: +0.0000)"
    earlier = dict(metric_rows({**metrics, "ce_recovered_mean": float("nan")}))  # an earlier saelab's file
    assert earlier["CE recovered vs mean-ablation"].startswith("— (mean-ablation does not raise CE")


def test_eval_reuse_compares_the_weights_of_a_model_folder(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    """`saelab eval RUN --model FOLDER`, then other weights saved into FOLDER (a fine-tuning writing where it read):
    the evaluation was reused by the folder's path, with the numbers of the weights before. metrics.json records
    the weights' fingerprint beside the model: the rerun is refused before the model loads, --overwrite measures the
    new weights; an evaluation an earlier saelab wrote, without it, is judged by the model's path as before."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tmp_path / "tiny"
    shutil.copytree(tiny_dir, model)
    acts, run, ev_file = tmp_path / "acts", tmp_path / "run", wiki_jsonl(data_dir, tmp_path / "ev.jsonl", 3, 1)
    _small_run(capsys, model, data_dir, tmp_path, acts, run)
    ev = ["eval", str(run), "--model", str(model), "--recon-tokens", "256", "--downstream-tokens", "128", "--corpus",
          str(ev_file), "--no-progress"]
    _, first = run_cli(capsys, *ev)
    before = (run / "metrics.json").read_bytes()
    assert len(first["model_fingerprint"]["sha256"]) == 64
    assert first["model_fingerprint"]["bytes"] == (model / "model.safetensors").stat().st_size
    torch.manual_seed(1)  # other weights of the same shape, saved where the first ones were
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=50257, n_positions=128)).save_pretrained(model)
    load_model = saelab.pipeline.load_model
    monkeypatch.setattr(saelab.pipeline, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(ev) == 2
    err = capsys.readouterr().err
    assert f"with other settings (--model {model} (its weights changed since)); pass --overwrite" in err, err
    assert (run / "metrics.json").read_bytes() == before
    monkeypatch.setattr(saelab.pipeline, "load_model", load_model)
    _, again = run_cli(capsys, *ev, "--overwrite")
    assert again["model_fingerprint"] != first["model_fingerprint"] and again["ce_clean"] != first["ce_clean"]
    written = (run / "metrics.json").read_bytes()
    run_cli(capsys, *ev)  # the same weights: reused
    assert (run / "metrics.json").read_bytes() == written
    earlier = json.loads(written)
    del earlier["model_fingerprint"]  # as an earlier saelab wrote it
    (run / "metrics.json").write_text(json.dumps(earlier))
    run_cli(capsys, *ev)  # reused: the model's path alone is the same
    assert json.loads((run / "metrics.json").read_text()) == earlier


def test_the_reuse_checks_compare_the_dtype_the_model_is_in(tiny_dir, data_dir, tmp_path, capsys):
    """metrics.json records the dtype the model was in, and the reuse checks compared it with the dtype asked
    (model_dtype, float32 unless given) although a model given loaded is in its own: the same quickstart, or
    evaluation, with a model loaded in bfloat16 was refused the second time (model_dtype "bfloat16" -> "float32"),
    and a dtype given as torch's (torch.bfloat16) never equalled its name. Both sides are now the dtype the model
    is in; another one is still refused."""
    from saelab.models import load_model
    from saelab.pipeline import PaperSuiteConfig, evaluate_run, paper_suite

    lm = load_model(str(tiny_dir), dtype="bfloat16")
    cfg = _tiny_quickstart(tiny_dir, wiki_jsonl(data_dir, tmp_path / "train.jsonl", 0, 2),
                           wiki_jsonl(data_dir, tmp_path / "eval.jsonl", 3, 1))
    run = tmp_path / "qs"
    assert quickstart(cfg, run, lm=lm, progress=False)["model_dtype"] == "bfloat16"
    assert quickstart(cfg, run, lm=lm, progress=False)["reused"] == list(WORK_STAGES)
    written = (run / "metrics.json").read_bytes()
    evaluate_run(run, cfg.eval, lm=lm, progress=False)
    evaluate_run(run, cfg.eval, model_dtype=torch.bfloat16, progress=False)
    assert (run / "metrics.json").read_bytes() == written
    suite = paper_suite(run, lm=lm, eval_cfg=cfg.eval, cfg=PaperSuiteConfig(metrics=("core",)), progress=False)
    assert suite["metrics"]["core"]["reused"]  # metrics.json's evaluation, of a model in this dtype
    with pytest.raises(RunExistsError, match=r'\(model_dtype "bfloat16" -> "float32"\); pass --overwrite'):
        evaluate_run(run, cfg.eval, progress=False)
