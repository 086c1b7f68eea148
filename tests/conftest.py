"""Fixtures shared by the test files: small real models and the data folder shipped with the repository."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# The suite compares runs bit for bit on the CPU; GPU tests (tests/test_cuda.py) name their device.
os.environ.setdefault("SAELAB_DEVICE", "cpu")

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
"""``data/`` of this repository: the offline Wikipedia slices and GPT-2's tokenizer files."""


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert (DATA_DIR / "wiki-en" / "wiki_eval.jsonl.xz").is_file(), f"{DATA_DIR} lacks the shipped corpus"
    return DATA_DIR


@pytest.fixture(scope="session")
def gpt2_tokenizer(data_dir):
    """GPT-2's real byte-level BPE tokenizer, loaded offline."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(data_dir / "gpt2-tokenizer"))


@pytest.fixture(scope="session")
def tiny_gpt2(gpt2_tokenizer):
    """A randomly initialised 2-layer GPT-2 (d_model 64) with the real GPT-2 tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from saelab.models import LanguageModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=50257, n_positions=128)
    return LanguageModel(GPT2LMHeadModel(config), gpt2_tokenizer, "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_dir(tiny_gpt2, tmp_path_factory) -> Path:
    """tiny_gpt2 saved with save_pretrained (model and tokenizer): a real local model folder for --model."""
    folder = tmp_path_factory.mktemp("model") / "tiny-gpt2"
    tiny_gpt2.model.save_pretrained(folder)
    tiny_gpt2.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def split_pad_dir(tiny_gpt2, data_dir, tmp_path_factory) -> Path:
    """tiny_gpt2 saved with GPT-2's real tokenizer less the merge that makes " _" one token: a model folder
    on whose tokenizer N2G's default padding token is 2 tokens."""
    from transformers import GPT2TokenizerFast

    files = tmp_path_factory.mktemp("split-pad-tokenizer")
    shutil.copy(data_dir / "gpt2-tokenizer" / "vocab.json", files)
    merges = (data_dir / "gpt2-tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()
    (files / "merges.txt").write_text("\n".join(m for m in merges if m != "Ġ _") + "\n", encoding="utf-8")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(files))
    assert len(tokenizer(" _", add_special_tokens=False)["input_ids"]) == 2
    folder = tmp_path_factory.mktemp("model") / "tiny-gpt2-split-pad"
    tiny_gpt2.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct); the first load ever dequantizes (~20 s)."""
    from saelab.models import load_model

    return load_model("default")


SERIES_HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="session")
def tiny_series(data_dir, tmp_path_factory) -> Path:
    """A 2-layer GPT-2-style model (d_model 64, the real GPT-2 tokenizer) trained 120 steps on Wikipedia:
    checkpoint-{10,20,40,60,90,120} and series.json (~15 s)."""
    from saelab.models.lm_series import LMSeriesConfig, train_checkpoint_series

    cfg = LMSeriesConfig(tokenizer=str(data_dir / "gpt2-tokenizer"), steps=120, batch_size=4,
                         context_size=32, save_steps=(10, 20, 40, 60, 90, 120))
    return train_checkpoint_series(cfg, tmp_path_factory.mktemp("series") / "tiny-series",
                                   corpus=str(data_dir / "wiki-en" / "wiki_train.jsonl.xz"))


@pytest.fixture(scope="session")
def tiny_series_run(tiny_series, data_dir, tmp_path_factory) -> Path:
    """A finished SAE run folder (n=128, k=2, context 32) on the last checkpoint's blocks.1.hook_resid_post.

    k=2 because this small model hardly uses the detail of its residual stream: SAEs with larger k
    spliced in change its loss by less than +-0.01 nats, either way; k=2 raises it consistently."""
    from saelab.pipeline import HarvestConfig, harvest, train_from_cache
    from saelab.train import TrainConfig

    base = tmp_path_factory.mktemp("series-run")
    cfg = HarvestConfig(model=str(tiny_series / "checkpoint-120"), hook=SERIES_HOOK, context_size=32,
                        corpus=str(data_dir / "wiki-en" / "wiki_train.jsonl.xz"), n_tokens=8192,
                        buffer_tokens=8192)
    cache = harvest(cfg, base / "acts", progress=False)
    train_from_cache(cache, base / "run", TrainConfig(n_latents=128, k=2, batch_size=256, total_tokens=8192,
                                                      init_rows=2048), progress=False)
    return base / "run"


@pytest.fixture
def library_bars_on():
    """transformers' and the hub's bars on for the test (an earlier test's --no-progress hid them for the
    whole process), put back as they were after it."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    hf_logging.enable_progress_bar()
    enable_progress_bars()
    yield
    (hf_logging.enable_progress_bar if was[0] else hf_logging.disable_progress_bar)()
    (disable_progress_bars if was[1] else enable_progress_bars)()


@pytest.fixture(scope="session")
def eval_article_of(data_dir, gpt2_tokenizer):
    """The index of the article of the shipped eval split that GPT-2 token ids were packed from, found by their text
    alone (independent of how saelab counts documents); None where their longest piece of text between document
    separators is too short to name one article."""
    import re

    from saelab.data.text import iter_texts

    articles = list(iter_texts(str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")))

    def article_of(ids) -> int | None:
        pieces = re.split(r"<\|endoftext\|>|\ufffd", gpt2_tokenizer.decode(list(ids)))  # separators, cut characters
        piece = max(pieces, key=len)
        hits = [i for i, text in enumerate(articles) if piece in text]
        assert hits, f"{piece!r} is in no article of the eval split"
        return hits[0] if len(hits) == 1 and len(piece) >= 20 else None

    return article_of
