"""Tests of saelab.data on real files, the real Wikipedia sample, GPT-2's tokenizer and a tiny GPT-2."""

from __future__ import annotations

import contextlib
import gzip
import json
import lzma
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from saelab.data import (
    ActivationCache,
    ActivationStream,
    IncompleteCacheError,
    batched,
    cache_rows_written,
    default_corpus,
    hf_tokenize_fn,
    iter_texts,
    pack_contexts,
    token_contexts,
    write_activation_cache,
)
from saelab.data.cache import OVERWRITE_STAGE, ActivationCacheError
from saelab.errors import CorpusError, InterruptedBeforeAnyResult, NonFiniteError, RunExistsError
from saelab.utils.folder_lock import RunFolderBusyError, RunLock

DATA = Path(__file__).resolve().parents[1] / "data"
WIKI_TRAIN = DATA / "wiki-en" / "wiki_train.jsonl.xz"
WIKI_EVAL = DATA / "wiki-en" / "wiki_eval.jsonl.xz"
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def tok():
    return GPT2TokenizerFast.from_pretrained(str(DATA / "gpt2-tokenizer"))


@pytest.fixture(scope="module")
def wiki_docs():
    return list(iter_texts(WIKI_EVAL, limit_docs=6))


class TinyGPT2:
    """A small random GPT-2 exposing the ActivationModel protocol via hidden states."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128)
        self.lm = GPT2LMHeadModel(cfg).eval()
        self.calls = 0

    def hook_width(self, hook: str) -> int:
        return self.lm.config.n_embd

    def activations(self, tokens_BT: torch.Tensor, hook: str) -> torch.Tensor:
        layer = int(re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook).group(1))
        self.calls += 1
        out = self.lm.transformer(tokens_BT, output_hidden_states=True)
        return out.hidden_states[layer + 1]  # index 0 is the embedding output


class NaNAt:
    """Wraps a model and puts a NaN into the activations of its ``bad_call``-th forward."""

    def __init__(self, base: TinyGPT2, bad_call: int):
        self.base, self.bad_call, self.calls = base, bad_call, 0

    def hook_width(self, hook: str) -> int:
        return self.base.hook_width(hook)

    def activations(self, tokens_BT, hook):
        acts = self.base.activations(tokens_BT, hook).clone()
        self.calls += 1
        if self.calls - 1 == self.bad_call:
            acts[1, 3, 5] = float("nan")
        return acts


@pytest.fixture(scope="module")
def model():
    return TinyGPT2()


@pytest.fixture(scope="module")
def contexts(tok, wiki_docs):
    ctx = list(pack_contexts(wiki_docs, hf_tokenize_fn(tok), 16, bos_token_id=tok.bos_token_id, max_contexts=40))
    assert len(ctx) == 40
    return torch.stack(ctx)


def sort_rows(x: torch.Tensor) -> np.ndarray:
    a = x.detach().cpu().numpy()
    return a[np.lexsort(a.T[::-1])]


# --- text ------------------------------------------------------------------------------------


def write_jsonl(path: Path, objs, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for o in objs:
            f.write((json.dumps(o) if not isinstance(o, str) else o) + "\n")


@pytest.mark.parametrize("suffix,opener", [(".jsonl", open), (".jsonl.xz", lzma.open), (".jsonl.gz", gzip.open)])
def test_jsonl_readers(tmp_path, suffix, opener):
    path = tmp_path / f"c{suffix}"
    write_jsonl(path, [{"text": "alpha"}, "", {"text": "beta", "id": 2}, {"text": ""}, {"text": "gamma"}], opener)
    assert list(iter_texts(str(path))) == ["alpha", "beta", "gamma"]
    assert list(iter_texts(path, limit_docs=2)) == ["alpha", "beta"]


def test_jsonl_text_field_and_missing_field(tmp_path):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [{"body": "x"}, {"text": "y"}])
    assert list(iter_texts(path, text_field="body", limit_docs=1)) == ["x"]
    with pytest.raises(CorpusError, match=r"line 1.*'text'"):
        list(iter_texts(path))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"text": "ok"}, "", '{"text": "broken'])
    it = iter_texts(path)
    assert next(it) == "ok"
    with pytest.raises(CorpusError, match=r"bad\.jsonl.*line 3"):
        next(it)


def test_txt_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second doc\nline two", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first doc", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert list(iter_texts(tmp_path / "b.txt")) == ["second doc\nline two"]
    assert list(iter_texts(str(tmp_path))) == ["first doc", "second doc\nline two"]


def test_missing_and_empty_corpus(tmp_path):
    for missing in (str(tmp_path / "nope.jsonl"), "data/nope.txt", "./nope"):
        with pytest.raises(CorpusError, match=re.escape(missing)):
            iter_texts(missing)
    empty = tmp_path / "empty.jsonl"
    write_jsonl(empty, ["", {"text": "  "}, {"text": ""}])
    it = iter_texts(empty)  # lazily: no error until iteration finds nothing
    with pytest.raises(CorpusError, match=r"empty\.jsonl.*no non-empty text"):
        list(it)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CorpusError, match="emptydir' holds no text to read: expected .txt, .jsonl"):
        list(iter_texts(tmp_path / "emptydir"))


def test_hub_dataset_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(CorpusError, match=r"someone/corpus.*datasets"):
        iter_texts("someone/corpus:en")


def test_real_wiki_corpus_and_default(tmp_path, monkeypatch):
    docs = list(iter_texts(WIKI_EVAL))
    assert len(docs) == 521 and all(isinstance(d, str) and d.strip() for d in docs)
    assert Path(default_corpus("train")) == WIKI_TRAIN.resolve()
    monkeypatch.chdir(tmp_path)  # found relative to the repo root too
    monkeypatch.delenv("SAELAB_CORPUS_DIR", raising=False)
    assert Path(default_corpus("eval")) == WIKI_EVAL.resolve()
    write_jsonl(tmp_path / "wiki_eval.jsonl.xz", [{"text": "x"}], lzma.open)
    monkeypatch.setenv("SAELAB_CORPUS_DIR", str(tmp_path))
    assert Path(default_corpus("eval")) == (tmp_path / "wiki_eval.jsonl.xz").resolve()
    with pytest.raises(ValueError):
        default_corpus("dev")


def test_a_recorded_corpus_is_shared_by_its_base_name_even_after_it_moved(tmp_path, monkeypatch):
    """An SAE records its training corpus as the harvest was given it; shared, it is named without the folders of
    this disk, also once the file has moved or gone (then only its recorded path is left to name it)."""
    from saelab.data.text import shared_corpus_name

    monkeypatch.delenv("SAELAB_CORPUS_DIR", raising=False)
    here = tmp_path / "home" / "me" / "wiki.jsonl"
    here.parent.mkdir(parents=True)
    write_jsonl(here, [{"text": "x"}])
    assert shared_corpus_name(str(here)) == "wiki.jsonl"
    assert shared_corpus_name(str(tmp_path / "gone" / "train.jsonl.xz")) == "train.jsonl.xz"
    assert shared_corpus_name(str(tmp_path / "gone" / "texts") + "/") == "texts"  # a folder, as typed
    assert shared_corpus_name("Skylion007/openwebtext") == "Skylion007/openwebtext"  # a hub dataset as given
    assert shared_corpus_name("wikitext:wikitext-2-raw-v1") == "wikitext:wikitext-2-raw-v1"
    assert shared_corpus_name("") == ""  # none recorded (a SAELens folder without metadata.dataset_path)
    assert shared_corpus_name(default_corpus("train")) == ("English Wikipedia 2015 sample (saelab "
                                                           "data/wiki-en/wiki_train.jsonl.xz)")
    # the shipped sample of a clone moved (or removed) since the harvest: still named as what it is
    moved = tmp_path / "old-clone" / "data" / "wiki-en" / "wiki_eval.jsonl.xz"
    assert shared_corpus_name(str(moved)) == "English Wikipedia 2015 sample (saelab data/wiki-en/wiki_eval.jsonl.xz)"
    # an exported SAE exported again: its names stay as they are (the shipped sample's read like a path)
    for named in ("English Wikipedia 2015 sample (saelab data/wiki-en/wiki_eval.jsonl.xz)", "wiki.jsonl", "texts"):
        assert shared_corpus_name(named) == named


def test_texts_read_once_open_the_corpus_once_and_hand_out_every_document_in_order(tmp_path, monkeypatch):
    """Checks read the first documents (each time from the first, the second time from memory), then the
    whole stream comes out once in the corpus's order, those read first included, from one opening."""
    import saelab.data.text
    from saelab.data import TextsReadOnce

    docs = list(iter_texts(WIKI_EVAL))
    real, opened = saelab.data.text._open_source, []

    def counted(*args, **kwargs):  # the real opening, counted
        opened.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(saelab.data.text, "_open_source", counted)
    texts = TextsReadOnce(WIKI_EVAL)
    assert opened == []  # opened on first need, as a check that is deferred reads nothing
    assert [d for d, _ in zip(texts.head(), range(3))] == docs[:3]
    assert [d for d, _ in zip(texts.head(), range(5))] == docs[:5]
    assert list(texts.all()) == docs and len(opened) == 1
    with pytest.raises(RuntimeError, match="no longer kept"):
        next(texts.head())
    short = tmp_path / "short.jsonl"
    write_jsonl(short, [{"text": "one"}, {"text": "two"}])
    texts = TextsReadOnce(short)
    assert list(texts.head()) == list(texts.head()) == ["one", "two"]  # the stream's end, met twice
    assert list(texts.all()) == ["one", "two"]
    empty = tmp_path / "empty.jsonl"
    write_jsonl(empty, [{"text": " "}])
    with pytest.raises(CorpusError, match="no non-empty text"):  # as iter_texts says it, at the check
        list(TextsReadOnce(empty).head())


# --- tokens ----------------------------------------------------------------------------------


def reference_stream(docs, tok, sep):
    out = []
    for i, d in enumerate(docs):
        if i and sep is not None:
            out.append(sep)
        out.extend(tok.encode(d))
    return out


@pytest.mark.parametrize("prepend_bos,sep,doc_batch", [(True, None, 2), (True, 50255, 64), (False, None, 1)])
def test_pack_contexts_reproduces_token_stream(tok, wiki_docs, prepend_bos, sep, doc_batch):
    T, bos = 64, tok.bos_token_id
    ctx = list(pack_contexts(wiki_docs, hf_tokenize_fn(tok), T, bos_token_id=bos, prepend_bos=prepend_bos,
                             separator_token_id=sep, doc_batch=doc_batch))
    assert all(c.shape == (T,) and c.dtype == torch.long for c in ctx)
    ctx_NT = torch.stack(ctx)
    stream = reference_stream(wiki_docs, tok, bos if sep is None else sep)
    window = T - 1 if prepend_bos else T
    if prepend_bos:
        assert (ctx_NT[:, 0] == bos).all()
        body = ctx_NT[:, 1:]
    else:
        body = ctx_NT
    assert len(ctx) == len(stream) // window  # only the trailing partial window is lost
    assert body.reshape(-1).tolist() == stream[: len(ctx) * window]
    if sep is not None:  # a token absent from the documents: every occurrence is a separator
        assert sep not in reference_stream(wiki_docs, tok, None)
        assert (body == sep).sum() == len(wiki_docs) - 1 - stream[len(ctx) * window :].count(sep)


def test_pack_contexts_limits_and_errors(tok, wiki_docs):
    fn = hf_tokenize_fn(tok)
    ctx = list(pack_contexts(wiki_docs, fn, 32, bos_token_id=50256, max_contexts=7))
    assert len(ctx) == 7
    full = list(pack_contexts(wiki_docs, tok, 32, bos_token_id=50256))  # a tokenizer object is accepted
    assert torch.equal(torch.stack(ctx), torch.stack(full[:7]))
    with pytest.raises(ValueError, match="bos_token_id"):
        next(pack_contexts(wiki_docs, fn, 32, bos_token_id=None))
    assert len(list(pack_contexts(["a b c"] * 3, fn, 64, bos_token_id=0))) == 0


def test_sample_contexts_spreads_over_the_pool_deterministically(tok, wiki_docs):
    from saelab.data import sample_contexts

    full = torch.stack(list(pack_contexts(wiki_docs, tok, 32, bos_token_id=50256)))
    assert full.shape[0] > 40
    got = torch.stack(list(sample_contexts(iter(full), 10, full.shape[0], seed=3)))
    again = torch.stack(list(sample_contexts(iter(full), 10, full.shape[0], seed=3)))
    assert torch.equal(got, again)  # resumable: the same windows every time
    rows = [int((full == c).all(dim=1).nonzero()[0]) for c in got]
    assert rows == sorted(rows) and len(set(rows)) == 10  # distinct windows of the pool, in corpus order
    assert rows[-1] - rows[0] > 20  # not the first ten
    assert not torch.equal(got, torch.stack(list(sample_contexts(iter(full), 10, full.shape[0], seed=4))))
    pool_only = torch.stack(list(sample_contexts(iter(full), 5, 12)))  # drawn from the first 12 only
    assert all(bool((full[:12] == c).all(dim=1).any()) for c in pool_only)
    assert torch.equal(torch.stack(list(sample_contexts(iter(full[:6]), 10, 100))), full[:6])  # small pool: all
    assert list(sample_contexts(iter(full), 0, 10)) == []


def test_batched_and_token_contexts(tok):
    rows = [torch.full((4,), i) for i in range(10)]
    sizes = [b.shape for b in batched(iter(rows), 4)]
    assert sizes == [(4, 4), (4, 4), (2, 4)]
    assert torch.equal(torch.cat(list(batched(iter(rows), 3))), torch.stack(rows))
    ctx = token_contexts(WIKI_EVAL, tok, 64, n_tokens=1000, bos_token_id=tok.bos_token_id, limit_docs=5)
    assert ctx.shape == (16, 64) and ctx.dtype == torch.long
    # Shorter than one context: what it holds, what a context takes, and the setting that shrinks it.
    with pytest.raises(CorpusError, match=re.escape("corpus the given texts holds 2 tokens, too few for one context "
                                                    "of 64 (BOS and 63 tokens of text); expected a corpus of at least "
                                                    "63 tokens, or context_size <= 3")):
        token_contexts(["tiny text"], tok, 64, n_contexts=2, bos_token_id=tok.bos_token_id)
    with pytest.raises(CorpusError, match="gave only 1 context of 64 tokens; 2 requested"):
        token_contexts([" word" * 80], tok, 64, n_contexts=2, bos_token_id=tok.bos_token_id)


def test_a_count_of_one_reads_in_the_singular(tok):
    """A one-token corpus read "holds 1 tokens", one context "gave only 1 contexts of 1 tokens", one row of NaN
    "in 1 of 1 rows": every message that can print a count of 1 says "1 token", through one helper."""
    from saelab.sae import SAEConfig, TopKSAE
    from saelab.utils.words import plural

    assert [plural(n, "token") for n in (0, 1, 2)] == ["tokens", "token", "tokens"]
    with pytest.raises(CorpusError) as e:
        token_contexts(["Hi"], tok, 3, bos_token_id=tok.bos_token_id)
    assert str(e.value) == ("corpus the given texts holds 1 token, too few for one context of 3 (BOS and 2 tokens of "
                            "text); expected a corpus of at least 2 tokens, or context_size <= 2")
    with pytest.raises(CorpusError, match=r"gave only 1 context of 1 token; 2 requested$"):
        token_contexts(["Hi"], tok, 1, n_contexts=2, bos_token_id=tok.bos_token_id, prepend_bos=False)
    with pytest.raises(NonFiniteError, match=r"contain NaN or inf in 1 of 1 row; expected finite numbers"):
        TopKSAE(SAEConfig(d_in=4, n_latents=8, k=2)).check_input(torch.full((1, 4), float("nan")))
    one_latent = TopKSAE(SAEConfig(d_in=4, n_latents=1, k=1))
    with pytest.raises(IndexError, match=r"^latent 3 out of range: the SAE has 1 latent$"):
        one_latent.check_latents([3])
    with pytest.raises(TypeError, match=r"an integer index of a latent \(the SAE has 1 latent\)$"):
        one_latent.check_latents([0.5])
    from saelab.errors import ConfigError
    from saelab.evals.n2g import check_latents

    with pytest.raises(ConfigError, match=r"out of range: the SAE has 1 latent \(0 to 0\)$"):
        check_latents([3], 1)


# --- harvest ---------------------------------------------------------------------------------


def direct_rows(model, contexts, exclude_first=True):
    with torch.no_grad():
        acts = model.activations(contexts, HOOK)
    if exclude_first:
        acts = acts[:, 1:]
    return acts.reshape(-1, acts.shape[-1])


def test_stream_in_order_matches_model_and_excludes_first(model, contexts):
    expected = direct_rows(model, contexts)
    s = ActivationStream(model, HOOK, contexts, batch_size=50, lm_batch_size=7, buffer_tokens=0,
                         drop_last=False, progress=False)
    out = list(s)
    assert [b.shape[0] for b in out[:-1]] == [50] * (len(out) - 1)
    got = torch.cat(out)
    assert s.tokens_seen == 40 * 15 == got.shape[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with_first = torch.cat(list(ActivationStream(model, HOOK, contexts, batch_size=50, buffer_tokens=0,
                                                 exclude_first=False, drop_last=False, progress=False)))
    assert with_first.shape[0] == 40 * 16
    torch.testing.assert_close(with_first.view(40, 16, -1)[:, 1:].reshape(-1, 64), expected, rtol=1e-5, atol=1e-5)


def test_an_in_order_stream_hands_out_no_empty_batch(model, contexts):
    """A model batch too small to complete a batch hands out nothing, not an empty batch (counted as a batch)."""
    out = list(ActivationStream(model, HOOK, contexts, batch_size=50, lm_batch_size=1, buffer_tokens=0,
                                drop_last=False, progress=False))
    assert [b.shape[0] for b in out] == [50] * 12


def test_shuffle_buffer_emits_every_row_once_deterministically(model, contexts):
    expected = direct_rows(model, contexts)  # 600 rows

    def run(seed, **kw):
        s = ActivationStream(model, HOOK, contexts, batch_size=32, lm_batch_size=8, buffer_tokens=200, seed=seed,
                             progress=False, **kw)
        return list(s)

    a = run(0, drop_last=False)
    assert all(b.shape == (32, 64) for b in a[:-1]) and a[-1].shape[0] == 600 - 32 * (len(a) - 1)
    got = torch.cat(a)
    np.testing.assert_allclose(sort_rows(got), sort_rows(expected), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, expected)  # actually shuffled
    assert torch.equal(got, torch.cat(run(0, drop_last=False)))  # deterministic
    assert not torch.equal(got, torch.cat(run(1, drop_last=False)))
    dropped = run(0)
    assert len(dropped) == 600 // 32 and all(b.shape[0] == 32 for b in dropped)


def test_stream_max_tokens_and_store_dtype(model, contexts):
    s = ActivationStream(model, HOOK, contexts, batch_size=16, buffer_tokens=64, max_tokens=100,
                         drop_last=False, store_dtype=torch.float16, progress=False)
    out = torch.cat(list(s))
    assert out.shape == (100, 64) and out.dtype == torch.float32 and s.tokens_seen == 100
    assert s.contexts_seen == 32  # 100 rows of 15 need 7 contexts, but a forward takes lm_batch_size=32
    ref = direct_rows(model, contexts)[:100].half().float()
    np.testing.assert_array_equal(sort_rows(out), sort_rows(ref))


def test_nan_raises_naming_hook_and_batch(model, contexts):
    s = ActivationStream(NaNAt(model, bad_call=2), HOOK, contexts, batch_size=8, lm_batch_size=4, buffer_tokens=0,
                         progress=False)
    with pytest.raises(NonFiniteError, match=rf"{re.escape(HOOK)}.*batch 2"):
        list(s)


# --- cache -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_rows():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1000, 24, generator=g) * 3 + torch.linspace(-20, 20, 24)


def src_batches(rows, bs=64, fail_after=None):
    for i, b in enumerate(rows.split(bs)):
        if fail_after is not None and i == fail_after:
            raise KeyboardInterrupt("simulated interruption")
        yield b


META = {"model": "tiny-gpt2", "hook": HOOK, "context_size": 16}


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-3), ("bfloat16", 8e-3), ("float32", 0)])
def test_cache_round_trip(tmp_path, source_rows, dtype, tol):
    cache = write_activation_cache(src_batches(source_rows), tmp_path / "c", meta=META, dtype=dtype,
                                   shard_rows=300, progress=False)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["complete"] and m["n_rows"] == 1000 and m["d"] == 24 and m["dtype"] == dtype
    assert [s["rows"] for s in m["shards"]] == [300, 300, 300, 100] and m["meta"] == META
    cache = ActivationCache(tmp_path / "c")
    assert (cache.d, cache.n_rows, cache.meta) == (24, 1000, META)
    ordered = torch.cat(list(cache.batches(128, shuffle=False, drop_last=False)))
    assert ordered.dtype == torch.float32
    torch.testing.assert_close(ordered, source_rows, rtol=tol, atol=tol * 3)
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    assert torch.equal(ordered, source_rows.to(torch_dtype).float())  # exactly the stored values
    assert torch.equal(cache.read(250, 650), ordered[250:650])
    # Training on a GPU reads the rows as stored, into page-locked memory (pinning itself needs CUDA)
    from saelab.pipeline import batch_form

    assert batch_form(cache, to_gpu=True) == {"dtype": torch_dtype, "pin_memory": True}
    stored = next(cache.batches(128, shuffle=False, **{**batch_form(cache, to_gpu=True), "pin_memory": False}))
    assert stored.dtype == torch_dtype and torch.equal(stored.float(), ordered[:128])
    assert batch_form(cache, to_gpu=False) == {}


def test_cache_shuffled_batches(tmp_path, source_rows):
    cache = write_activation_cache(src_batches(source_rows), tmp_path / "c", meta=META, dtype="float32",
                                   shard_rows=300, progress=False)
    a = list(cache.batches(64, seed=3, epochs=2))
    assert len(a) == cache.n_batches(64, epochs=2) == 2000 // 64 and all(b.shape == (64, 24) for b in a)
    one_epoch = torch.cat(list(cache.batches(100, seed=3, drop_last=False)))
    np.testing.assert_array_equal(sort_rows(one_epoch), sort_rows(source_rows))  # every row once
    assert not torch.equal(one_epoch, source_rows)
    assert all(torch.equal(x, y) for x, y in zip(a, cache.batches(64, seed=3, epochs=2)))
    assert not torch.equal(a[0], next(cache.batches(64, seed=4)))
    resumed = list(cache.batches(64, seed=3, epochs=2, start_batch=11))  # straddles shards and chunks
    assert len(resumed) == len(a) - 11 and all(torch.equal(x, y) for x, y in zip(resumed, a[11:]))
    mixed = torch.cat(list(cache.batches(100, seed=3, mix_shards=2, drop_last=False)))
    np.testing.assert_array_equal(sort_rows(mixed), sort_rows(source_rows))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_part_of_each_batch_is_its_slice_read_alone(tmp_path, source_rows, dtype):
    """part=(i, n): process i of n's rows of every batch (what data-parallel training reads), equal to that slice
    of the whole batch, across shards, chunks and epochs, shuffled or not, resumed or not."""
    cache = write_activation_cache(src_batches(source_rows), tmp_path / "c", meta=META, dtype=dtype, shard_rows=300,
                                   progress=False)
    for batch, n, kw in [(64, 2, {"seed": 3, "epochs": 2}), (96, 3, {"seed": 3, "start_batch": 4}),
                         (64, 4, {"shuffle": False, "start_batch": 1}), (100, 2, {"seed": 5, "mix_shards": 2}),
                         (600, 2, {"seed": 3, "epochs": 3, "start_batch": 2, "dtype": cache.torch_dtype})]:
        whole = list(cache.batches(batch, **kw))
        per = batch // n
        for i in range(n):
            part = list(cache.batches(batch, part=(i, n), **kw))
            assert len(part) == len(whole), (batch, n, i)  # a part of the short last batch is never yielded
            assert all(p.shape == (per, 24) and torch.equal(p, w[i * per:(i + 1) * per]) for p, w in zip(part, whole))
    with pytest.raises(ValueError, match=r"^part=\(0, 3\) of batch_size=64: expected \(i, n\) with 0 <= i < n and n "
                                         r"dividing batch_size$"):
        next(cache.batches(64, part=(0, 3)))
    with pytest.raises(ValueError, match=r"^part=\(2, 2\) of batch_size=64"):
        next(cache.batches(64, part=(2, 2)))
    with pytest.raises(ValueError, match=r"^part=\(0, 2\) with drop_last=False: a short last batch does not split "
                                         r"evenly; expected drop_last=True$"):
        next(cache.batches(64, part=(0, 2), drop_last=False))


def test_cache_resume_after_interruption(tmp_path, source_rows):
    ref = write_activation_cache(src_batches(source_rows), tmp_path / "ref", meta=META, shard_rows=300,
                                 progress=False)
    folder = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        write_activation_cache(src_batches(source_rows, fail_after=12), folder, meta=META, shard_rows=300,
                               progress=False)
    assert cache_rows_written(folder) == 600  # 12 batches of 64 = 768 rows: two full shards are listed
    assert json.loads((folder / "manifest.json").read_text())["partial_rows"] == 168  # and the rest saved aside
    with pytest.raises(CorpusError, match=r"incomplete \(768 rows written\); finish it with write_activation_cache"):
        ActivationCache(folder)  # the rows saved aside counted too, as the interruption's message counts them
    with pytest.raises(RunExistsError, match="resume=True"):
        write_activation_cache(src_batches(source_rows), folder, meta=META, shard_rows=300, progress=False)
    with pytest.raises(CorpusError, match="meta"):
        write_activation_cache(src_batches(source_rows), folder, meta={**META, "hook": "x"}, shard_rows=300,
                               resume=True, progress=False)
    cache = write_activation_cache(src_batches(source_rows), folder, meta=META, shard_rows=300, resume=True,
                                   progress=False)
    for s in range(4):
        name = f"shard_{s:05d}.npy"
        assert (folder / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert torch.equal(cache.read(), ref.read())
    assert not (folder / "partial.npy").exists() and "partial_rows" not in cache.manifest
    # the caller may instead position its input itself (after the whole shards: the partial rows are dropped)
    folder2 = tmp_path / "c2"
    with pytest.raises(KeyboardInterrupt):
        write_activation_cache(src_batches(source_rows, fail_after=6), folder2, meta=META, shard_rows=300,
                               progress=False)
    done = cache_rows_written(folder2)
    cache2 = write_activation_cache(src_batches(source_rows[done:]), folder2, meta=META, shard_rows=300,
                                    resume=True, skip_written=False, progress=False)
    assert torch.equal(cache2.read(), ref.read())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_interruption_before_the_first_shard_keeps_its_rows(tmp_path, source_rows, dtype, capsys):
    """A harvest smaller than one shard (the README's first look) keeps what it gathered when interrupted."""
    ref = write_activation_cache(src_batches(source_rows), tmp_path / "ref", meta=META, dtype=dtype, shard_rows=300,
                                 progress=False)
    folder = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):  # before any row: said as it is
        write_activation_cache(src_batches(source_rows, fail_after=0), folder, meta=META, dtype=dtype,
                               shard_rows=300, progress=False)
    assert "holds no rows yet" in capsys.readouterr().err and not folder.exists()
    for fail_after in (2, 4):  # 128 rows, then (the same call again, interrupted later) 256
        with pytest.raises(KeyboardInterrupt):
            write_activation_cache(src_batches(source_rows, fail_after=fail_after), folder, meta=META, dtype=dtype,
                                   shard_rows=300, resume=True, progress=False)
        assert f"keeps the {64 * fail_after} rows written so far" in capsys.readouterr().err
        assert json.loads((folder / "manifest.json").read_text())["partial_rows"] == 64 * fail_after
    cache = write_activation_cache(src_batches(source_rows), folder, meta=META, dtype=dtype, shard_rows=300,
                                   resume=True, progress=False)
    for s in range(4):  # the shards an uninterrupted write makes
        name = f"shard_{s:05d}.npy"
        assert (folder / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert torch.equal(cache.read(), ref.read()) and not (folder / "partial.npy").exists()
    # An overwrite of an interrupted cache leaves none of its partial rows behind.
    with pytest.raises(KeyboardInterrupt):
        write_activation_cache(src_batches(source_rows, fail_after=2), tmp_path / "e", meta=META, dtype=dtype,
                               shard_rows=300, progress=False)
    assert (tmp_path / "e" / "partial.npy").exists()
    write_activation_cache(src_batches(source_rows), tmp_path / "e", meta={**META, "context_size": 32}, dtype=dtype,
                           shard_rows=300, overwrite=True, progress=False)
    assert not (tmp_path / "e" / "partial.npy").exists()
    # A partial file that does not match the manifest is not trusted: those rows are written again.
    with pytest.raises(KeyboardInterrupt):
        write_activation_cache(src_batches(source_rows, fail_after=2), tmp_path / "d", meta=META, dtype=dtype,
                               shard_rows=300, progress=False)
    np.save(tmp_path / "d" / "partial.npy", np.zeros((5, 24), dtype=np.float32))
    again = write_activation_cache(src_batches(source_rows), tmp_path / "d", meta=META, dtype=dtype, shard_rows=300,
                                   resume=True, progress=False)
    assert torch.equal(again.read(), ref.read())


def test_interruption_while_a_shard_is_written_finishes_that_shard(tmp_path, source_rows, monkeypatch, capsys):
    from saelab.data import cache as cache_module

    ref = write_activation_cache(src_batches(source_rows), tmp_path / "ref", meta=META, shard_rows=300,
                                 progress=False)
    save, cut = cache_module._ShardWriter._save, []

    def cut_once(writer, path):  # Ctrl-C arrives while the second shard is being written
        if path.name == "shard_00001.npy" and not cut:
            cut.append(path)
            raise KeyboardInterrupt
        save(writer, path)

    monkeypatch.setattr(cache_module._ShardWriter, "_save", cut_once)
    folder = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        write_activation_cache(src_batches(source_rows), folder, meta=META, shard_rows=300, progress=False)
    assert "keeps the 600 rows written so far" in capsys.readouterr().err  # the cut shard finished, listed
    m = json.loads((folder / "manifest.json").read_text())
    assert m["n_rows"] == 600 and "partial_rows" not in m and not (folder / "partial.npy").exists()
    cache = write_activation_cache(src_batches(source_rows), folder, meta=META, shard_rows=300, resume=True,
                                   progress=False)
    assert torch.equal(cache.read(), ref.read())
    for s in range(4):
        name = f"shard_{s:05d}.npy"
        assert (folder / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_interrupted_overwrite_keeps_the_old_cache_and_resumes(tmp_path, source_rows, capsys):
    folder, other = tmp_path / "c", {**META, "context_size": 32}
    old = write_activation_cache(src_batches(source_rows), folder, meta=META, shard_rows=300, progress=False)
    old_rows, old_files = old.read(), {p.name: p.read_bytes() for p in folder.glob("shard_*")}
    new_rows = source_rows.flip(0)[:700]
    with pytest.raises(KeyboardInterrupt):  # after two of the new cache's shards
        write_activation_cache(src_batches(new_rows, fail_after=10), folder, meta=other, shard_rows=300,
                               overwrite=True, progress=False)
    assert "keeps the 640 rows written so far; the same call reads the input again up to there" in capsys.readouterr().err
    assert torch.equal(ActivationCache(folder).read(), old_rows)  # the old cache still whole and listed
    assert {p.name: p.read_bytes() for p in folder.glob("shard_*")} == old_files
    assert (folder / OVERWRITE_STAGE).is_dir()
    (folder / OVERWRITE_STAGE / ".shard_00002.npy.x1.tmp").write_bytes(b"left by a SIGKILL")
    cache = write_activation_cache(src_batches(new_rows), folder, meta=other, shard_rows=300, overwrite=True,
                                   progress=False)
    ref = write_activation_cache(src_batches(new_rows), tmp_path / "ref", meta=other, shard_rows=300,
                                 progress=False)
    assert torch.equal(cache.read(), ref.read()) and cache.meta == other
    assert sorted(p.name for p in folder.iterdir()) == [".saelab.lock", "manifest.json", "shard_00000.npy",
                                                        "shard_00001.npy", "shard_00002.npy"]


def test_finishing_the_original_cache_discards_an_unfinished_overwrite(tmp_path, source_rows, capsys):
    """Ctrl-C in a write, Ctrl-C in an overwrite of it, then the plain call again: it finishes the original
    cache, and the overwrite it was to be replaced by, given up, does not stay hidden beside it."""
    folder, stage = tmp_path / "c", tmp_path / "c" / OVERWRITE_STAGE
    ref = write_activation_cache(src_batches(source_rows), tmp_path / "ref", meta=META, shard_rows=300,
                                 progress=False)
    with pytest.raises(KeyboardInterrupt):
        write_activation_cache(src_batches(source_rows, fail_after=6), folder, meta=META, shard_rows=300,
                               progress=False)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):  # the same call with overwrite, before its first row
        write_activation_cache(src_batches(source_rows, fail_after=0), folder, meta=META, shard_rows=300,
                               overwrite=True, progress=False)
    assert capsys.readouterr().err == (f"saelab: activation cache {folder} (its overwrite) holds no rows yet (a "
                                       "shuffled harvest writes its first rows once its shuffle buffer is full); "
                                       "the same call starts over\n")  # not the stage's folder
    with pytest.raises(KeyboardInterrupt):  # and again, after a shard and some rows toward the next
        write_activation_cache(src_batches(source_rows, fail_after=7), folder, meta=META, shard_rows=300,
                               overwrite=True, progress=False)
    err = capsys.readouterr().err
    assert f"activation cache {folder} (its overwrite) keeps the 448 rows written so far" in err
    assert OVERWRITE_STAGE not in err
    assert {p.name for p in stage.iterdir()} == {"manifest.json", "shard_00000.npy", "partial.npy"}
    cache = write_activation_cache(src_batches(source_rows), folder, meta=META, shard_rows=300, resume=True,
                                   progress=False)
    assert torch.equal(cache.read(), ref.read()) and not stage.exists()
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"saelab: activation cache {folder}: discarded the unfinished overwrite in {stage} (this call finished "
        "the cache it was to replace)")
    assert sorted(p.name for p in folder.iterdir()) == [".saelab.lock", "manifest.json", *shard_bytes(ref.folder)]
    # A finished cache returned as it is (nothing written) leaves an overwrite of it to its own call.
    with pytest.raises(KeyboardInterrupt):
        write_activation_cache(src_batches(source_rows, fail_after=7), folder, meta={**META, "context_size": 32},
                               shard_rows=300, overwrite=True, progress=False)
    staged = {p.name: p.read_bytes() for p in stage.iterdir()}
    capsys.readouterr()
    write_activation_cache(src_batches(source_rows), folder, meta=META, shard_rows=300, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in stage.iterdir()} == staged
    assert capsys.readouterr().err == (f"saelab: note: activation cache {folder} (its overwrite) is unfinished; run "
                                       "the overwrite=True call that started it again to resume it, or delete "
                                       f"{stage} to discard it\n")  # it was kept without a word


def test_an_overwrite_cut_off_while_moving_in_is_finished(tmp_path, source_rows):
    folder = tmp_path / "c"
    write_activation_cache(src_batches(source_rows), folder, meta=META, shard_rows=200, progress=False)
    stage = folder / OVERWRITE_STAGE
    new = write_activation_cache(src_batches(source_rows[:500]), stage, meta=META, shard_rows=300,
                                 progress=False)
    want = new.read()
    (folder / "manifest.json").unlink()  # the state after the first steps of the move
    (stage / "shard_00000.npy").replace(folder / "shard_00000.npy")
    mtime = (stage / "shard_00001.npy").stat().st_mtime_ns
    cache = write_activation_cache(src_batches(source_rows[:500]), folder, meta=META, shard_rows=300,
                                   overwrite=True, progress=False)  # the same overwrite call, run again
    assert torch.equal(cache.read(), want) and not stage.exists()
    assert sorted(p.name for p in folder.glob("shard_*")) == ["shard_00000.npy", "shard_00001.npy"]
    assert (folder / "shard_00001.npy").stat().st_mtime_ns == mtime  # moved in, not written a second time


def test_an_overwrite_with_an_unpositioned_input_starts_its_stage_over(tmp_path, source_rows):
    """skip_written=False: the caller cannot position its input inside a staged write it does not see."""
    folder = tmp_path / "c"
    write_activation_cache(src_batches(source_rows[:300]), folder, meta=META, shard_rows=200, progress=False)
    with pytest.raises(KeyboardInterrupt):
        write_activation_cache(src_batches(source_rows[300:], fail_after=7), folder, meta=META, shard_rows=200,
                               overwrite=True, skip_written=False, progress=False)
    assert cache_rows_written(folder / OVERWRITE_STAGE) == 400
    cache = write_activation_cache(src_batches(source_rows[300:]), folder, meta=META, shard_rows=200,
                                   overwrite=True, skip_written=False, progress=False)
    assert torch.equal(cache.read(), source_rows[300:].half().float())


def test_a_cache_has_one_writer(tmp_path, source_rows):
    folder = tmp_path / "c"
    holder = RunLock(folder, "activation cache").acquire()
    try:
        with pytest.raises(RunFolderBusyError, match=f"activation cache {folder} is being written by another "
                                                     f"process \\(pid {os.getpid()}\\)"):
            write_activation_cache(src_batches(source_rows), folder, meta=META, progress=False)
    finally:
        holder.release()
    write_activation_cache(src_batches(source_rows), folder, meta=META, progress=False)


def test_cache_refuses_overwrite_and_checks_files(tmp_path, source_rows):
    folder = tmp_path / "c"
    write_activation_cache(src_batches(source_rows), folder, meta=META, shard_rows=300, progress=False)
    with pytest.raises(RunExistsError, match="overwrite=True"):
        write_activation_cache(src_batches(source_rows), folder, meta=META, progress=False)
    cache = write_activation_cache(src_batches(source_rows[:500]), folder, meta=META, shard_rows=200,
                                   overwrite=True, progress=False)
    assert cache.n_rows == 500 and sorted(p.name for p in folder.glob("shard_*")) == [
        "shard_00000.npy", "shard_00001.npy", "shard_00002.npy"]

    shard = folder / "shard_00001.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(CorpusError, match=r"shard_00001\.npy.*bytes"):
        ActivationCache(folder)
    shard.unlink()
    with pytest.raises(CorpusError, match=r"shard_00001\.npy.*missing"):
        ActivationCache(folder)
    shard.write_bytes(data)
    ActivationCache(folder)
    (folder / "manifest.json").write_text('{"format": "saelab-activation-cache", "d": ')
    with pytest.raises(CorpusError, match=re.escape(str(folder))):
        ActivationCache(folder)
    with pytest.raises(CorpusError, match="manifest.json not found"):
        ActivationCache(tmp_path / "nothing")


def test_cache_rejects_nonfinite_and_fp16_overflow(tmp_path, source_rows):
    bad = source_rows.clone()
    bad[70, 3] = float("inf")
    with pytest.raises(NonFiniteError, match="batch 1"):
        write_activation_cache(src_batches(bad), tmp_path / "a", meta=META, progress=False)
    with pytest.raises(NonFiniteError, match="overflows float16"):
        write_activation_cache(src_batches(source_rows * 1e4), tmp_path / "b", meta=META, progress=False)
    cache = write_activation_cache(src_batches(source_rows * 1e4), tmp_path / "c", meta=META, dtype="bfloat16",
                                   progress=False)
    assert torch.isfinite(cache.read()).all()


def test_harvest_to_cache_end_to_end(tmp_path, model, contexts):
    stream = ActivationStream(model, HOOK, contexts, batch_size=50, buffer_tokens=200, progress=False)
    cache = write_activation_cache(stream, tmp_path / "c", meta={**META, "seed": 0}, shard_rows=256,
                                   progress=False)
    assert cache.n_rows == 600 and cache.d == 64
    expected = direct_rows(model, contexts).half().float()
    np.testing.assert_allclose(sort_rows(cache.read()), sort_rows(expected), rtol=1e-3, atol=1e-3)


def test_float16_underflow_is_reported_not_silent(tmp_path, capsys):
    """In one line on stderr as saelab's other warnings, not Python's warning with its source line."""
    rows = torch.full((8, 4), 1.0)
    rows[0, 0] = 1e-9  # below float16's smallest subnormal: stored as 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_activation_cache(iter([rows, rows]), tmp_path / "f16", meta={}, dtype="float16", progress=False)
    assert capsys.readouterr().err.splitlines() == [  # once per cache
        f"saelab: warning: batch 0: 1 nonzero activations underflow to 0 in float16 in activation cache "
        f"{str(tmp_path / 'f16')!r}; the dtype bfloat16 or float32 keeps them (harvest --dtype, quickstart "
        "--harvest-dtype)"]
    # an overwrite writes in a stage inside the folder: the warning names the folder the caller gave
    write_activation_cache(iter([rows]), tmp_path / "f16", meta={"n": 1}, dtype="float16", overwrite=True,
                           progress=False)
    assert capsys.readouterr().err.startswith(
        f"saelab: warning: batch 0: 1 nonzero activations underflow to 0 in float16 in activation cache "
        f"{str(tmp_path / 'f16')!r} (its overwrite); the dtype")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 keeps it: no warning
        write_activation_cache(iter([rows]), tmp_path / "f32", meta={}, dtype="float32", progress=False)
    assert capsys.readouterr().err == ""


def test_a_cache_with_other_settings_names_the_setting_that_differs(tmp_path):
    batches = [torch.randn(8, 4) for _ in range(2)]
    write_activation_cache(batches, tmp_path / "c", meta={"model": "m", "seed": 5}, progress=False)
    with pytest.raises(ActivationCacheError) as e:
        write_activation_cache(batches, tmp_path / "c", meta={"model": "m", "seed": 0}, resume=True, progress=False)
    assert "cannot reuse activation cache" in str(e.value) and "it was written with meta.seed 5, not 0" in str(e.value)
    assert "'model'" not in str(e.value)  # the one setting, not the whole meta
    # A setting left at its default (None) is named as such, not as a value to type.
    write_activation_cache(batches, tmp_path / "d", meta={"corpus": None}, progress=False)
    with pytest.raises(ActivationCacheError, match=r"it was written with meta.corpus unset \(the default\), not 'a.txt'"):
        write_activation_cache(batches, tmp_path / "d", meta={"corpus": "a.txt"}, resume=True, progress=False)


class StopAt:
    """Wraps a model, counts the contexts of each forward, and raises KeyboardInterrupt (a Ctrl-C) on the
    forward ``stop_at`` names (1-based; 0: never)."""

    def __init__(self, base: TinyGPT2, stop_at: int = 0):
        self.base, self.stop_at, self.calls = base, stop_at, []

    def hook_width(self, hook: str) -> int:
        return self.base.hook_width(hook)

    def activations(self, tokens_BT, hook):
        if len(self.calls) + 1 == self.stop_at:
            raise KeyboardInterrupt
        self.calls.append(tokens_BT.shape[0])
        return self.base.activations(tokens_BT, hook)


def stopping_writer(monkeypatch, stop_at: int) -> None:
    """A Ctrl-C while the cache writer takes its ``stop_at``-th batch (the stream waits inside a round)."""
    from saelab.data import cache as cache_module

    add, seen = cache_module._ShardWriter.add, []

    def add_or_stop(writer, acts_BD, what):
        seen.append(1)
        if len(seen) == stop_at:
            raise KeyboardInterrupt
        return add(writer, acts_BD, what)

    monkeypatch.setattr(cache_module._ShardWriter, "add", add_or_stop)


def harvest_once(model, contexts, folder, buffer_tokens, seed=0, dtype="float32", overwrite=False, meta=META):
    """600 rows (40 contexts of 15) in model batches of 4 contexts, shards of 100 rows."""
    stream = ActivationStream(model, HOOK, contexts, batch_size=32, lm_batch_size=4, buffer_tokens=buffer_tokens,
                              seed=seed, drop_last=False, progress=False)
    return write_activation_cache(stream, folder, meta=meta, dtype=dtype, shard_rows=100, resume=True,
                                  overwrite=overwrite, progress=False)


@contextlib.contextmanager
def files_at_most(n_bytes: int):
    """A disk that refuses to write a file past ``n_bytes`` (RLIMIT_FSIZE; the write fails, no signal kills)."""
    import resource

    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, old_limit[1]))
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard_*.npy"))}


@pytest.mark.parametrize("buffer_tokens", [128, 0])
@pytest.mark.parametrize("where,stop_at", [("model", 4), ("model", 7), ("writer", 3), ("writer", 8), ("writer", 18)])
def test_a_resumed_harvest_continues_where_its_stream_stopped(tmp_path, model, contexts, buffer_tokens, where,
                                                              stop_at, monkeypatch, capsys):
    """Ctrl-C during a harvest (in the model, while the buffer refills; in the writer, inside a round), then the
    same call: the shards of an uninterrupted harvest, and the model runs over each context once in all."""
    whole = StopAt(model)
    harvest_once(whole, contexts, tmp_path / "ref", buffer_tokens)
    ref = shard_bytes(tmp_path / "ref")
    assert len(ref) == 6

    folder, first = tmp_path / "c", StopAt(model, stop_at if where == "model" else 0)
    with monkeypatch.context() as m:
        if where == "writer":
            stopping_writer(m, stop_at)
        with pytest.raises(KeyboardInterrupt):
            harvest_once(first, list(contexts) if buffer_tokens else contexts, folder, buffer_tokens)
    err = capsys.readouterr().err
    assert "where its input stopped; the same call continues from there" in err
    assert (folder / "stream_state.safetensors").is_file()

    second = StopAt(model)
    harvest_once(second, list(contexts) if buffer_tokens else contexts, folder, buffer_tokens)
    assert "the input continues where it stopped" in capsys.readouterr().err
    assert shard_bytes(folder) == ref
    assert sum(first.calls) + sum(second.calls) == sum(whole.calls) == 40  # no context ran twice
    assert not (folder / "stream_state.safetensors").exists()


def test_a_cache_is_reused_and_resumed_whatever_corpus_fingerprint_it_records(tmp_path, model, contexts, capsys):
    """A harvest records its corpus's fingerprint and absolute path in the cache's meta: what the text read was and
    where, not settings. A cache an earlier saelab wrote, with neither, is reused, and resumed from where its
    stream stopped, by a harvest that takes them; the record of the call that started the cache stays."""
    from saelab.data import reusable_cache
    from saelab.data.text import CORPUS_FINGERPRINT, CORPUS_PATH

    recorded = {**META, CORPUS_FINGERPRINT: {"bytes": 3, "sha256": "0" * 64}, CORPUS_PATH: str(tmp_path / "t.txt")}
    harvest_once(StopAt(model), list(contexts), tmp_path / "ref", 128)
    assert reusable_cache(tmp_path / "ref", meta=recorded, dtype="float32").meta == META
    folder = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        harvest_once(StopAt(model, 7), list(contexts), folder, 128)
    second = StopAt(model)
    cache = harvest_once(second, list(contexts), folder, 128, meta=recorded)
    assert "the input continues where it stopped" in capsys.readouterr().err and sum(second.calls) < 40
    assert shard_bytes(folder) == shard_bytes(tmp_path / "ref") and cache.meta == META
    with pytest.raises(ActivationCacheError, match="it was written with meta.context_size 16, not 32"):
        reusable_cache(folder, meta={**recorded, "context_size": 32}, dtype="float32")  # a setting still counts


NO_ROWS_YET = "holds no rows yet (a shuffled harvest writes its first rows once its shuffle buffer is full)"


@pytest.mark.parametrize("buffer_tokens,where,stop_at", [(1024, "model", 4), (512, "model", 9), (512, "writer", 1)])
def test_a_harvest_interrupted_before_its_first_row_continues_where_its_stream_stopped(
        tmp_path, model, contexts, buffer_tokens, where, stop_at, monkeypatch, capsys):
    """Ctrl-C before a shuffled harvest wrote any row (its buffer not full yet, or its first round cut off in the
    writer): the folder keeps a manifest of 0 rows and the stream's state, and the same call runs the model only
    over the contexts after it, writing the shards of an uninterrupted harvest."""
    whole = StopAt(model)
    harvest_once(whole, contexts, tmp_path / "ref", buffer_tokens)
    folder, first = tmp_path / "c", StopAt(model, stop_at if where == "model" else 0)
    with monkeypatch.context() as m:
        if where == "writer":
            stopping_writer(m, stop_at)
        with pytest.raises(KeyboardInterrupt) as stopped:
            harvest_once(first, contexts, folder, buffer_tokens)
    assert not isinstance(stopped.value, InterruptedBeforeAnyResult)  # the command line: "... again to resume"
    assert capsys.readouterr().err == (f"saelab: activation cache {folder} {NO_ROWS_YET} and keeps where its input "
                                       "stopped; the same call continues from there (a harvest does not run the "
                                       "model again over the text it read)\n")
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "stream_state.safetensors"]
    m = json.loads((folder / "manifest.json").read_text())
    assert (m["n_rows"], m["complete"], m["shards"], m["d"]) == (0, False, [], model.hook_width(HOOK))
    # read as any unfinished cache: 0 rows written, refused for training, continued by the same call
    assert cache_rows_written(folder) == 0 and len(ActivationCache(folder, allow_incomplete=True)) == 0
    with pytest.raises(IncompleteCacheError, match=r"incomplete \(0 rows written\); finish it"):
        ActivationCache(folder)
    # other settings: said as what the folder is (no harvest wrote it), with the way to start it over
    with pytest.raises(ActivationCacheError) as other:
        write_activation_cache(iter([]), folder, meta={**META, "hook": "x"}, shard_rows=100, resume=True,
                               progress=False)
    assert str(other.value) == (f"cannot resume activation cache '{folder}': it holds no rows yet, from a harvest "
                                f"started with meta.hook '{META['hook']}', not 'x'; pass overwrite=True (--overwrite) "
                                "to start it over with these settings (it has no rows to lose)")
    second = StopAt(model)
    harvest_once(second, contexts, folder, buffer_tokens)
    assert capsys.readouterr().err == (f"saelab: resuming activation cache {folder}, which holds no rows yet: the "
                                       "input continues where it stopped (a harvest does not run the model again "
                                       "over the text it read)\n")
    assert shard_bytes(folder) == shard_bytes(tmp_path / "ref")
    assert sum(first.calls) > 0 and sum(first.calls) + sum(second.calls) == 40  # no context ran twice
    assert not (folder / "stream_state.safetensors").exists()


def test_an_overwrite_interrupted_before_its_first_row_continues_in_its_stage(tmp_path, model, contexts, capsys):
    """The same for an overwrite: its state waits in the stage while the old cache stays whole, and the same
    overwrite call continues it, then moves it in."""
    folder, stage = tmp_path / "c", tmp_path / "c" / OVERWRITE_STAGE
    harvest_once(StopAt(model), contexts, tmp_path / "ref", 1024)
    old = harvest_once(StopAt(model), contexts, folder, 128).read()
    first, second = StopAt(model, 4), StopAt(model)
    with pytest.raises(KeyboardInterrupt):
        harvest_once(first, contexts, folder, 1024, overwrite=True)
    assert f"activation cache {folder} (its overwrite) {NO_ROWS_YET} and keeps where" in capsys.readouterr().err
    assert sorted(p.name for p in stage.iterdir()) == ["manifest.json", "stream_state.safetensors"]
    assert torch.equal(ActivationCache(folder).read(), old)
    harvest_once(second, contexts, folder, 1024, overwrite=True)
    assert f"resuming activation cache {folder} (its overwrite), which holds no rows yet" in capsys.readouterr().err
    assert shard_bytes(folder) == shard_bytes(tmp_path / "ref") and not stage.exists()
    assert sum(first.calls) + sum(second.calls) == 40


def test_a_second_ctrl_c_while_the_first_rows_state_is_kept_leaves_no_lone_manifest(tmp_path, model, contexts,
                                                                                   monkeypatch):
    """Cut off between keeping the state and its manifest of 0 rows, a harvest before its first row left a manifest
    without a state, which refused the next call's other settings with nothing to resume: the state is saved first,
    and a state without its manifest is removed unused, the next call starting over with any settings."""
    import saelab.data.cache as cache_module

    saved = cache_module._save_stream_state

    def cut_off_after(*args, **kwargs):
        saved(*args, **kwargs)
        raise KeyboardInterrupt

    folder = tmp_path / "c"
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(cache_module, "_save_stream_state", cut_off_after)
        harvest_once(StopAt(model, 4), contexts, folder, 1024)
    assert not (folder / "manifest.json").exists()
    other = write_activation_cache(iter([torch.ones(3, 5)]), folder, meta={**META, "hook": "x"}, shard_rows=100,
                                   resume=True, progress=False)
    assert len(other) == 3 and not (folder / "stream_state.safetensors").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_a_harvest_before_its_first_row_whose_state_the_disk_refuses_keeps_nothing(tmp_path, model, contexts,
                                                                                 capsys):
    """Before the first row, a stream state the disk refuses leaves nothing to resume from: the manifest of 0 rows
    goes too, the folder is removed, and the interruption says the same call starts over, as for an input
    without a state."""
    harvest_once(StopAt(model), contexts, tmp_path / "ref", 1024)
    folder = tmp_path / "c"
    # the manifest (1 kB) fits, the state at this Ctrl-C does not: 180 buffered rows of 64 float32 (46 kB)
    with files_at_most(29_000), pytest.raises(InterruptedBeforeAnyResult):
        harvest_once(StopAt(model, 4), contexts, folder, 1024)
    err = capsys.readouterr().err
    assert f"saelab: note: could not save {folder / 'stream_state.safetensors'} (" in err
    assert err.endswith(f"saelab: activation cache {folder} {NO_ROWS_YET}; the same call starts over\n")
    assert not folder.exists()
    again = StopAt(model)
    harvest_once(again, contexts, folder, 1024)
    assert sum(again.calls) == 40 and shard_bytes(folder) == shard_bytes(tmp_path / "ref")


class TinyIn(StopAt):
    """StopAt whose activations of the context ``marked`` hold one value that float16 stores as 0."""

    def __init__(self, base: TinyGPT2, marked: torch.Tensor, stop_at: int = 0):
        super().__init__(base, stop_at)
        self.marked = marked

    def activations(self, tokens_BT, hook):
        acts_BTD = super().activations(tokens_BT, hook).clone()
        acts_BTD[(tokens_BT == self.marked).all(dim=1), -1, 0] = 1e-9
        return acts_BTD


@pytest.mark.parametrize("buffer_tokens", [128, 0])
def test_a_resumed_harvest_numbers_its_batches_from_the_harvest_start(tmp_path, model, contexts, buffer_tokens,
                                                                      capsys):
    """A float16 underflow after a resume names the batch an uninterrupted harvest names, not one counted
    from where the resume began."""
    def warnings_seen() -> list[str]:
        return [line for line in capsys.readouterr().err.splitlines() if "underflow" in line]

    harvest_once(TinyIn(model, contexts[-1]), contexts, tmp_path / "ref", buffer_tokens, dtype="float16")
    whole = warnings_seen()
    assert len(whole) == 1 and int(re.match(r"saelab: warning: batch (\d+): 1 nonzero", whole[0])[1]) > 10
    folder = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):  # before the model reads the last context
        harvest_once(TinyIn(model, contexts[-1], stop_at=7), contexts, folder, buffer_tokens, dtype="float16")
    assert warnings_seen() == []
    harvest_once(TinyIn(model, contexts[-1]), contexts, folder, buffer_tokens, dtype="float16")
    assert warnings_seen() == [whole[0].replace(repr(str(tmp_path / "ref")), repr(str(folder)))]


def edit_state(path: Path, rehash: bool = True, **changes) -> None:
    """Rewrite a saved stream state with some of its metadata, settings or counters changed; ``rehash``: its
    metadata checksum made to match again (to reach the checks behind it), else kept as it was."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    from saelab.data.cache import _state_checksum

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    settings, counters = json.loads(metadata["settings"]), json.loads(metadata["counters"])
    for key, value in changes.items():
        if key in settings:
            settings[key] = value
        elif key in counters:
            counters[key] = value
        else:
            metadata[key] = value
    metadata["settings"], metadata["counters"] = json.dumps(settings), json.dumps(counters)
    if rehash:
        metadata["checksum"] = _state_checksum(metadata)
    save_file(load_file(path), path, metadata=metadata)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "other seed", "other rows", "partial lost",
                                    "edited counter", "edited setting"])
def test_a_damaged_or_mismatched_stream_state_falls_back_to_reading_the_input_again(
        tmp_path, model, contexts, damage, capsys):
    """A saved stream state that is damaged, of other settings or of other rows written is not trusted: one
    note, then the input is read again from its start, and the shards are still those of an uninterrupted run."""
    harvest_once(StopAt(model), contexts, tmp_path / "ref", 128)
    folder = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        harvest_once(StopAt(model, 7), contexts, folder, 128)
    path = folder / "stream_state.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flipped byte":
        data[-5] ^= 0xFF  # in the generator's state: its checksum no longer matches
        path.write_bytes(bytes(data))
    elif damage == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "other seed":
        edit_state(path, seed=1)
    elif damage == "other rows":
        edit_state(path, rows_written="64")
    elif damage in ("edited counter", "edited setting"):  # the tensors intact: the metadata's checksum refuses it
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            seen = json.loads(f.metadata()["counters"])["contexts_seen"]
        edit_state(path, rehash=False, **({"contexts_seen": seen + 10} if damage == "edited counter" else {"seed": 1}))
    else:  # the rows toward the next shard are gone: the resume counts fewer rows written than the state
        (folder / "partial.npy").unlink()
    capsys.readouterr()
    again = StopAt(model)
    harvest_once(again, contexts, folder, 128)
    err = capsys.readouterr().err
    assert f"saelab: note: {path} is not used (" in err and "the input is read again from its start" in err
    if damage.startswith("edited"):
        assert "do not match its checksum" in err
    assert "re-reading the input up to the" in err
    assert sum(again.calls) == 40  # the full re-read
    assert shard_bytes(folder) == shard_bytes(tmp_path / "ref")
    assert not path.exists()


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_a_stream_state_the_disk_refuses_still_ends_as_an_interruption(tmp_path, model, contexts, capsys):
    """A file-size limit the shards fit under but the stream state does not (a full disk): safetensors' own
    error does not replace the Ctrl-C; one note, the usual message, and the resume re-reads to the same shards."""
    harvest_once(StopAt(model), contexts, tmp_path / "ref", 128)
    folder = tmp_path / "c"
    # shards: 100 rows x 64 float32 (25.7 kB); the state at this Ctrl-C: its buffered rows and more (32.8 kB)
    with files_at_most(29_000), pytest.raises(KeyboardInterrupt):
        harvest_once(StopAt(model, 7), contexts, folder, 128)
    err = capsys.readouterr().err
    assert f"saelab: note: could not save {folder / 'stream_state.safetensors'} (" in err
    assert "the same call reads the input again up to there" in err and "where its input stopped" not in err
    assert not list(folder.glob("*stream_state*"))  # no file, no temporary left
    again = StopAt(model)
    harvest_once(again, contexts, folder, 128)
    assert "re-reading the input up to the" in capsys.readouterr().err
    assert sum(again.calls) == 40
    assert shard_bytes(folder) == shard_bytes(tmp_path / "ref")


def test_a_re_read_interrupted_while_skipping_the_rows_written_saves_no_state(tmp_path, model, contexts, capsys):
    """A resume that re-reads (its state was lost) and is stopped again before it reaches the rows kept: its
    stream does not lead to them, so no state is saved and the message says the input is read again."""
    harvest_once(StopAt(model), contexts, tmp_path / "ref", 128)
    folder = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        harvest_once(StopAt(model, 7), contexts, folder, 128)
    (folder / "stream_state.safetensors").unlink()
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):  # the 2nd model batch: 60 rows read of the 256 kept
        harvest_once(StopAt(model, 2), contexts, folder, 128)
    err = capsys.readouterr().err
    assert "keeps the 256 rows written so far; the same call reads the input again up to there" in err
    assert "where its input stopped" not in err
    assert not (folder / "stream_state.safetensors").exists()
    again = StopAt(model)
    harvest_once(again, contexts, folder, 128)
    err = capsys.readouterr().err
    assert "is not used" not in err and "re-reading the input up to the 256 rows" in err
    assert shard_bytes(folder) == shard_bytes(tmp_path / "ref")


def test_a_stream_state_checksum_does_not_copy_the_tensor():
    """The checksum reads the tensor's bytes in place: no second copy of a shuffle buffer (GBs at large d)."""
    import hashlib
    import tracemalloc

    from saelab.data.cache import _tensor_sha256

    for dtype in (torch.float32, torch.bfloat16):
        t = torch.randn(1024, 1024).to(dtype)
        assert _tensor_sha256(t) == hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()
        tracemalloc.start()
        try:
            _tensor_sha256(t)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2**20, peak  # the tensor is 2-4 MiB
    assert _tensor_sha256(torch.empty(0, 64)) == hashlib.sha256(b"").hexdigest()


def test_a_resumed_harvest_interrupted_again_resumes_again(tmp_path, model, contexts, monkeypatch, capsys):
    """Ctrl-C during a resumed harvest, twice (in the model, then in the writer): the third call still writes
    the uninterrupted harvest's shards, and no context went through the model twice."""
    whole = StopAt(model)
    harvest_once(whole, contexts, tmp_path / "ref", 128)
    folder, runs = tmp_path / "c", [StopAt(model, 4), StopAt(model, 2), StopAt(model), StopAt(model)]
    with pytest.raises(KeyboardInterrupt):
        harvest_once(runs[0], contexts, folder, 128)
    with pytest.raises(KeyboardInterrupt):  # the model's second batch after the restore
        harvest_once(runs[1], contexts, folder, 128)
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):  # the writer's 2nd batch: inside a round
        stopping_writer(m, 2)
        harvest_once(runs[2], contexts, folder, 128)
    err = capsys.readouterr().err
    assert err.count("the input continues where it stopped") == 2
    harvest_once(runs[3], contexts, folder, 128)
    assert shard_bytes(folder) == shard_bytes(tmp_path / "ref")
    assert sum(sum(run.calls) for run in runs) == sum(whole.calls)  # each context through the model once
