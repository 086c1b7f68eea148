"""Train a small GPT-2-style language model from scratch, saving a checkpoint series on the way.

A checkpoint series (the same model at several points of its training) is what the
compute-equivalent metric (``saelab.evals.compute_equivalent``) needs. Public series exist for
GPT-2 small (Stanford CRFM) and Pythia; this trainer makes a local one, offline, in a minute or so
on a laptop CPU, so the whole method can be run and tested without the hub::

    from saelab.models.lm_series import LMSeriesConfig, train_checkpoint_series
    folder = train_checkpoint_series(LMSeriesConfig(tokenizer="path/to/gpt2-tokenizer"),
                                     "runs/tiny-series", corpus="wiki_train.jsonl.xz")
    # runs/tiny-series/checkpoint-{N}/  (save_pretrained model + tokenizer, trainer_state.json)
    # runs/tiny-series/series.json      {"tokens_per_step", "checkpoints": [{"path", "step", "tokens"}]}

The model is ``transformers.GPT2LMHeadModel`` with a small config (no dropout), trained with AdamW
on packed contexts (BOS first, as saelab packs them everywhere), linear warmup then cosine decay
to 10 % of the peak learning rate. ``series.json`` is written last, so a folder that has it is
complete; an interrupted run is started again from scratch (it is short). Same seed, same
corpus, same config: the same weights (single-threaded).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from saelab.errors import CorpusError, SaelabError
from saelab.utils.atomic import write_json

SERIES_FILE = "series.json"


@dataclass
class LMSeriesConfig:
    """A small GPT-2-style model and how long to train it."""

    tokenizer: str = "gpt2"
    """Tokenizer folder or hub id (GPT-2's byte-level BPE: the folder with vocab.json and merges.txt)."""
    n_layer: int = 2
    """Transformer layers."""
    n_embd: int = 64
    """Width d_model."""
    n_head: int = 4
    """Attention heads."""
    n_positions: int = 128
    """Longest context the model accepts (evaluation contexts must fit)."""
    context_size: int = 32
    """Tokens per training context."""
    batch_size: int = 8
    """Contexts per optimizer step."""
    steps: int = 300
    """Optimizer steps."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    save_steps: tuple[int, ...] = ()
    """Steps after which a checkpoint is saved; () = about 10 log-spaced steps from 1 to steps (0 = init too)."""
    seed: int = 0
    """Seed of the initialisation and of the context order."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.context_size < 2:
            raise ValueError(f"steps, batch_size must be >= 1 and context_size >= 2, got {self.steps}, "
                             f"{self.batch_size}, {self.context_size}")
        if self.context_size > self.n_positions:
            raise ValueError(f"context_size {self.context_size} exceeds n_positions {self.n_positions}")
        bad = [s for s in self.save_steps if not 0 <= int(s) <= self.steps]
        if bad:
            raise ValueError(f"save_steps {bad} outside 0..steps={self.steps}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_size

    def checkpoint_steps(self) -> list[int]:
        if self.save_steps:
            return sorted({int(s) for s in self.save_steps} | {self.steps})
        steps = {self.steps}
        steps.update(int(round(v)) for v in torch.logspace(0, math.log10(self.steps), 10).tolist())
        return sorted(s for s in steps if 1 <= s <= self.steps)


def _lr_factor(cfg: LMSeriesConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _save(model, tokenizer, folder: Path, step: int, cfg: LMSeriesConfig, loss: float | None) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # The fields HF's Trainer writes that a series reader needs (global_step, tokens seen).
    write_json(tmp / "trainer_state.json", {"global_step": step, "num_input_tokens_seen": step * cfg.tokens_per_step,
                                            "train_loss": loss})
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _load_tokenizer(spec: str):
    """A tokenizer from a hub id or folder; a bare folder of GPT-2 BPE files (vocab.json + merges.txt) too."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    folder = Path(spec).expanduser()
    has_config = (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists()
    if folder.is_dir() and (folder / "vocab.json").exists() and (folder / "merges.txt").exists() and not has_config:
        return GPT2TokenizerFast.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(spec)


def _shuffled_contexts(cfg: LMSeriesConfig, tokenizer, bos: int, corpus: str) -> torch.Tensor:
    """The steps * batch_size training contexts of the corpus, in a seeded random order."""
    from saelab.data import iter_texts, pack_contexts

    n_ctx = cfg.steps * cfg.batch_size
    contexts = list(pack_contexts(iter_texts(corpus), tokenizer, cfg.context_size, bos_token_id=bos,
                                  max_contexts=n_ctx))
    if len(contexts) < n_ctx:
        raise CorpusError(f"corpus {corpus!r} gave {len(contexts)} contexts of {cfg.context_size} tokens; "
                          f"{cfg.steps} steps of {cfg.batch_size} need {n_ctx}")
    data = torch.stack(contexts)
    g = torch.Generator().manual_seed(cfg.seed)
    return data[torch.randperm(data.shape[0], generator=g)]


def train_checkpoint_series(cfg: LMSeriesConfig, out_dir: str | Path, *, corpus: str,
                            progress: bool = False) -> Path:
    """Train the model of ``cfg`` on ``corpus`` and save ``out_dir/checkpoint-{step}`` folders.

    Returns ``out_dir``. A folder that already holds a finished series with the same config and
    corpus is returned as it is.
    """
    from tqdm.auto import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir = Path(out_dir)
    record = {"config": asdict(cfg) | {"save_steps": list(cfg.save_steps)}, "corpus": str(corpus)}
    done = out_dir / SERIES_FILE
    if done.exists():
        import json

        old = json.loads(done.read_text())
        if {"config": old.get("config"), "corpus": old.get("corpus")} == record:
            return out_dir
        raise SaelabError(f"{out_dir} already holds a checkpoint series trained with other settings; "
                          "pick another folder or delete it")
    try:
        tokenizer = _load_tokenizer(cfg.tokenizer)
    except (OSError, ValueError) as e:
        raise SaelabError(f"cannot load tokenizer {cfg.tokenizer!r}: {e}") from e
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    data = _shuffled_contexts(cfg, tokenizer, bos, corpus)
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                                       n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, bos_token_id=bos, eos_token_id=tokenizer.eos_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(cfg, s))
    saves = cfg.checkpoint_steps()
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints: list[dict[str, Any]] = []

    def save(step: int, loss: float | None) -> None:
        model.eval()
        _save(model, tokenizer, out_dir / f"checkpoint-{step}", step, cfg, loss)
        model.train()
        checkpoints.append({"path": f"checkpoint-{step}", "step": step, "tokens": step * cfg.tokens_per_step,
                            "train_loss": loss})

    if 0 in saves:
        save(0, None)
    model.train()
    recent: list[float] = []
    for step in tqdm(range(cfg.steps), desc="LM series", unit="step", disable=not progress):
        batch = data[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [float(loss.detach())])[-10:]
        if step + 1 in saves:
            save(step + 1, sum(recent) / len(recent))
    write_json(done, {**record, "name": out_dir.name, "tokens_per_step": cfg.tokens_per_step,
                      "total_tokens": cfg.steps * cfg.tokens_per_step, "checkpoints": checkpoints})
    return out_dir


__all__ = ["LMSeriesConfig", "SERIES_FILE", "train_checkpoint_series"]
