"""Train small GPT-2-style language models from scratch: a checkpoint series, or a family of sizes.

The compute-equivalent metric (``saelab.evals.compute_equivalent``) compares an SAE's spliced loss
with the clean losses of reference models. Public references exist for GPT-2 small (Stanford CRFM
checkpoints) and Pythia (checkpoints and a suite of sizes); this module makes local ones, offline,
in a minute or so on a laptop CPU, so the whole method can be run and tested without the hub.

**Checkpoint series** (one training run, saved at several steps: the *training-progress*
equivalent)::

    from saelab.models.lm_series import LMSeriesConfig, train_checkpoint_series
    folder = train_checkpoint_series(LMSeriesConfig(tokenizer="path/to/gpt2-tokenizer"),
                                     "runs/tiny-series", corpus="wiki_train.jsonl.xz")
    # runs/tiny-series/checkpoint-{N}/  (save_pretrained model + tokenizer, trainer_state.json)
    # runs/tiny-series/series.json      {"tokens_per_step", "total_tokens", "checkpoints": [{"path", "step", "tokens"}]}

**Model family** (final models of increasing size and compute: the paper's compute-equivalent,
Gao et al. 2024 §4.1). Member i has N_i non-embedding parameters (``count_parameters``) and is
trained on D_i = ``tokens_per_param`` * N_i tokens (whole steps), the first D_i of one shuffled
stream of contexts, so its compute is C_i = 6 N_i D_i FLOPs::

    from saelab.models.lm_series import LMFamilyConfig, LMSeriesConfig, train_model_family
    folder = train_model_family(LMFamilyConfig(LMSeriesConfig(tokenizer="path/to/gpt2-tokenizer")),
                                "runs/tiny-family", corpus="wiki_train.jsonl.xz")
    # runs/tiny-family/l{L}-d{D}-h{H}/  one final model per member (save_pretrained + tokenizer, trainer_state.json)
    # runs/tiny-family/family.json      {"kind": "model_family", "name", "params": "non_embedding",
    #     "compute": "6 * params * tokens (FLOPs)", "config", "corpus",
    #     "members": [{"path", "n_layer", "n_embd", "n_head", "params" (non-embedding N), "params_total",
    #                  "steps", "tokens" (D), "compute" (6 N D), "train_loss"}, ...]}   (smallest first)

``saelab.evals.compute_equivalent.local_family`` reads ``family.json``: it needs only ``path`` and
``tokens`` per member (``params`` is counted after loading when absent), so a hand-written one can
list any local models that share a tokenizer (paths relative to the folder, or absolute).

The models are ``transformers.GPT2LMHeadModel`` with a small config (no dropout), trained with
AdamW on packed contexts (BOS first, as saelab packs them everywhere), linear warmup then cosine
decay to 10 % of the peak learning rate. ``series.json`` / ``family.json`` is written last, so a
folder that has it is complete; an interrupted run is started again from scratch (it is short).
Same seed, same corpus, same config: the same weights (single-threaded).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from saelab.errors import CorpusError, SaelabError
from saelab.utils.atomic import write_json
from saelab.utils.hub import hub_kwargs
from saelab.utils.words import plural

SERIES_FILE = "series.json"
FAMILY_FILE = "family.json"


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
    return AutoTokenizer.from_pretrained(spec, **hub_kwargs())


def _shuffled_contexts(cfg: LMSeriesConfig, tokenizer, bos: int, corpus: str, n_ctx: int | None = None) -> torch.Tensor:
    """The first ``n_ctx`` (default steps * batch_size) training contexts of the corpus, in a seeded random order."""
    from saelab.data import iter_texts, pack_contexts

    n_ctx = n_ctx or cfg.steps * cfg.batch_size
    contexts = list(pack_contexts(iter_texts(corpus), tokenizer, cfg.context_size, bos_token_id=bos,
                                  max_contexts=n_ctx))
    if len(contexts) < n_ctx:
        raise CorpusError(f"corpus {corpus!r} gave {len(contexts)} {plural(len(contexts), 'context')} of "
                          f"{cfg.context_size} tokens; "
                          f"{n_ctx // cfg.batch_size} steps of {cfg.batch_size} need {n_ctx}")
    data = torch.stack(contexts)
    g = torch.Generator().manual_seed(cfg.seed)
    return data[torch.randperm(data.shape[0], generator=g)]


def _new_model(cfg: LMSeriesConfig, tokenizer, bos: int):
    """The GPT-2-style model of ``cfg``, initialised from ``cfg.seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                                      n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=bos, eos_token_id=tokenizer.eos_token_id))


def _train(model, cfg: LMSeriesConfig, data: torch.Tensor, save, *, desc: str, progress: bool) -> None:
    """``cfg.steps`` AdamW steps on ``data`` (contexts in order); ``save(step, recent mean loss)`` at saved steps."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(cfg, s))
    saves = cfg.checkpoint_steps()
    if 0 in saves:
        save(0, None)
    model.train()
    recent: list[float] = []
    for step in tqdm(range(cfg.steps), desc=desc, unit="step", disable=not progress):
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


def _finished(marker: Path, record: dict, what: str) -> bool:
    """True when ``marker`` records a finished run of ``record``; refuses a folder trained otherwise."""
    if not marker.exists():
        return False
    old = json.loads(marker.read_text())
    if {"config": old.get("config"), "corpus": old.get("corpus")} == record:
        return True
    raise SaelabError(f"{marker.parent} already holds a {what} trained with other settings; "
                      "pick another folder or delete it")


def _tokenizer_and_bos(spec: str):
    try:
        tokenizer = _load_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise SaelabError(f"cannot load tokenizer {spec!r}: {e}") from e
    return tokenizer, tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def train_checkpoint_series(cfg: LMSeriesConfig, out_dir: str | Path, *, corpus: str,
                            progress: bool = False) -> Path:
    """Train the model of ``cfg`` on ``corpus`` and save ``out_dir/checkpoint-{step}`` folders.

    Returns ``out_dir``. A folder that already holds a finished series with the same config and
    corpus is returned as it is.
    """
    out_dir = Path(out_dir)
    record = {"config": asdict(cfg) | {"save_steps": list(cfg.save_steps)}, "corpus": str(corpus)}
    done = out_dir / SERIES_FILE
    if _finished(done, record, "checkpoint series"):
        return out_dir
    tokenizer, bos = _tokenizer_and_bos(cfg.tokenizer)
    data = _shuffled_contexts(cfg, tokenizer, bos, corpus)
    model = _new_model(cfg, tokenizer, bos)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints: list[dict[str, Any]] = []

    def save(step: int, loss: float | None) -> None:
        model.eval()
        _save(model, tokenizer, out_dir / f"checkpoint-{step}", step, cfg, loss)
        model.train()
        checkpoints.append({"path": f"checkpoint-{step}", "step": step, "tokens": step * cfg.tokens_per_step,
                            "train_loss": loss})

    _train(model, cfg, data, save, desc="LM series", progress=progress)
    write_json(done, {**record, "name": out_dir.name, "tokens_per_step": cfg.tokens_per_step,
                      "total_tokens": cfg.steps * cfg.tokens_per_step, "checkpoints": checkpoints})
    return out_dir


# ---- a family of models of increasing size and compute ------------------------------------------
def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(total, non_embedding)`` parameter counts of a causal LM (shared tensors counted once).

    Non-embedding = every parameter outside the embedding tables (each ``nn.Embedding``: tokens,
    learned positions) and the output (unembedding) layer, whether tied to the input embedding
    (GPT-2) or not (Pythia). This is Kaplan et al. (2020)'s N, the count in ``C = 6 N D`` and the
    "non-embedding params" column of the Pythia paper (pythia-70m: 18,915,328 of 70,426,624).
    The embeddings are left out because a lookup costs no multiply-adds per token (the unembedding
    does, but Kaplan et al. leave it out too and find cleaner laws so) and because in small models
    they dominate the total: a 2-layer d_model 64 GPT-2 has 0.1 M non-embedding and 3.3 M
    embedding parameters, so total counts would hardly grow along a small family.
    """
    params = list(model.parameters())  # deduplicated: a tied unembedding appears once
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        embedding |= {id(p) for p in head.parameters()}
    total = sum(p.numel() for p in params)
    return total, total - sum(p.numel() for p in params if id(p) in embedding)


@dataclass
class LMFamilyConfig:
    """A family of GPT-2-style models of increasing size, each trained on tokens in proportion to its size."""

    base: LMSeriesConfig = field(default_factory=LMSeriesConfig)
    """Tokenizer, context, batch, learning rate, weight decay and seed shared by every member; its
    n_layer, n_embd, n_head, steps, warmup_steps and save_steps are set per member."""
    sizes: tuple[tuple[int, int, int], ...] = ((1, 32, 4), (1, 48, 4), (1, 64, 4), (2, 64, 4))
    """(n_layer, n_embd, n_head) of each member; their non-embedding sizes must increase."""
    tokens_per_param: float = 0.3
    """Training tokens per non-embedding parameter: D = tokens_per_param * N, rounded up to whole
    steps (so compute C = 6 N D grows as N^2 along the family, as along a compute-optimal one;
    Chinchilla's ratio is about 20, far beyond a laptop's minute for these widths)."""
    min_steps: int = 1
    """Fewest optimizer steps of a member."""

    def __post_init__(self) -> None:
        if not self.sizes or any(len(s) != 3 or min(s) < 1 or s[1] % s[2] for s in self.sizes):
            raise ValueError(f"sizes must be (n_layer, n_embd, n_head) triples with n_embd divisible by n_head, "
                             f"got {self.sizes}")
        if self.tokens_per_param <= 0 or self.min_steps < 1:
            raise ValueError(f"tokens_per_param must be > 0 and min_steps >= 1, got {self.tokens_per_param}, "
                             f"{self.min_steps}")


def _member_config(cfg: LMFamilyConfig, size: tuple[int, int, int], params: int) -> LMSeriesConfig:
    """The member's own settings: its shape, and steps for tokens_per_param * params tokens."""
    tps = cfg.base.tokens_per_step
    steps = max(cfg.min_steps, math.ceil(cfg.tokens_per_param * params / tps))
    return replace(cfg.base, n_layer=size[0], n_embd=size[1], n_head=size[2], steps=steps, save_steps=(steps,),
                   warmup_steps=min(cfg.base.warmup_steps, max(1, steps // 10)))


def _family_members(cfg: LMFamilyConfig, tokenizer, bos: int) -> list[tuple[str, LMSeriesConfig, Any, int, int]]:
    """(folder name, settings, initialised model, total params, non-embedding params) per member."""
    members = []
    for size in cfg.sizes:
        shape = replace(cfg.base, n_layer=size[0], n_embd=size[1], n_head=size[2])
        model = _new_model(shape, tokenizer, bos)
        total, non_embedding = count_parameters(model)
        members.append((f"l{size[0]}-d{size[1]}-h{size[2]}", _member_config(cfg, size, non_embedding), model, total,
                        non_embedding))
    sizes = [m[4] for m in members]
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise SaelabError(f"family sizes {list(cfg.sizes)} have non-embedding parameter counts {sizes}; "
                          "expected them to increase")
    return members


def train_model_family(cfg: LMFamilyConfig, out_dir: str | Path, *, corpus: str, progress: bool = False) -> Path:
    """Train every member of ``cfg`` on ``corpus`` (the same contexts in the same order, each member
    the first D of them) and save each final model in ``out_dir/<member>/``, then ``family.json``.

    Returns ``out_dir``; a folder that already holds a finished family of the same config and corpus
    is returned as it is (module docstring: the folder format).
    """
    out_dir = Path(out_dir)
    record = {"config": json.loads(json.dumps(asdict(cfg))), "corpus": str(corpus)}
    marker = out_dir / FAMILY_FILE
    if _finished(marker, record, "model family"):
        return out_dir
    tokenizer, bos = _tokenizer_and_bos(cfg.base.tokenizer)
    plans = _family_members(cfg, tokenizer, bos)
    data = _shuffled_contexts(cfg.base, tokenizer, bos, corpus, max(m[1].steps for m in plans) * cfg.base.batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    members = []
    for name, mcfg, model, total, non_embedding in plans:
        final: dict[str, float | None] = {}
        _train(model, mcfg, data, lambda step, loss: final.update(loss=loss), desc=f"LM family {name}",
               progress=progress)
        model.eval()
        _save(model, tokenizer, out_dir / name, mcfg.steps, mcfg, final.get("loss"))
        tokens = mcfg.steps * mcfg.tokens_per_step
        members.append({"path": name, "n_layer": mcfg.n_layer, "n_embd": mcfg.n_embd, "n_head": mcfg.n_head,
                        "params": non_embedding, "params_total": total, "steps": mcfg.steps, "tokens": tokens,
                        "compute": 6 * non_embedding * tokens, "train_loss": final.get("loss")})
    write_json(marker, {**record, "kind": "model_family", "name": out_dir.name, "params": "non_embedding",
                        "compute": "6 * params * tokens (FLOPs)", "members": members})
    return out_dir


__all__ = ["FAMILY_FILE", "LMFamilyConfig", "LMSeriesConfig", "SERIES_FILE", "count_parameters",
           "train_checkpoint_series", "train_model_family"]
