"""Settings of the jobs (saelab.pipeline) that the command line reads before any model loads: a harvest's and
quickstart's. No torch here: the parser builds its options from these, and a value they refuse is refused before
torch loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from saelab.errors import ConfigError
from saelab.evals.config import EvalConfig
from saelab.models.config import check_hook_form
from saelab.train.config import TrainConfig
from saelab.utils.config import switch

DEFAULT_HOOK = "blocks.9.hook_resid_post"

HARVEST_BATCH = 4096
"""Rows per block the harvest stream hands to the cache (its shuffle buffer holds at least two)."""


@dataclass
class HarvestConfig:
    """Where activations come from."""

    model: str = "default"
    """Language model: 'default' (SmolLM2-135M-Instruct, offline), a hub id such as 'gpt2', a local
    model folder or a .gguf file."""
    hook: str = DEFAULT_HOOK
    """TransformerLens-style hook name, e.g. blocks.9.hook_resid_post."""
    corpus: str | None = None
    """Training text: a .txt/.jsonl/.jsonl.xz file, a folder of .txt, or a HF dataset name
    (e.g. 'Skylion007/openwebtext'). None: the offline Wikipedia corpus shipped in data/."""
    n_tokens: int = 1_048_576
    """Activation rows to harvest."""
    context_size: int = 64
    """Tokens per context (64 as in the paper)."""
    prepend_bos: bool = switch(True)
    """Start every context with BOS."""
    exclude_first: bool = switch(True)
    """Leave position 0 (BOS, the attention sink) out of the activations."""
    lm_batch_size: int = 32
    """Contexts per LM forward."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of the activation cache."""
    buffer_tokens: int = 262_144
    """Shuffle buffer (rows) between the LM and the cache; at least 2 * 4,096."""
    sample_pool_tokens: int = 16_777_216
    """Contexts are drawn at random from the first this-many corpus tokens, so that a harvest smaller
    than the corpus spans many documents instead of its first few; the pool is at most 16 times the
    tokens harvested (a smaller harvest tokenizes less text first); a pool smaller than the tokens
    harvested is raised to them (the harvest then takes the corpus's first contexts, as 0 does);
    0: contexts in corpus order."""
    seed: int = 0
    """Seed of the context draw and the shuffle."""

    def __post_init__(self) -> None:
        for name in ("n_tokens", "lm_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.buffer_tokens < 2 * HARVEST_BATCH:
            raise ConfigError(f"buffer_tokens must be >= {2 * HARVEST_BATCH:,} (two blocks of {HARVEST_BATCH:,} rows), "
                              f"got {self.buffer_tokens:,}")
        if self.context_size < 2 + self.exclude_first:
            raise ConfigError(f"context_size must be >= {2 + self.exclude_first} (BOS and text tokens), "
                              f"got {self.context_size}")
        if self.sample_pool_tokens < 0:
            raise ConfigError(f"sample_pool_tokens must be >= 0, got {self.sample_pool_tokens}")
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"dtype must be float16, bfloat16 or float32, got {self.dtype!r}")
        check_hook_form(self.hook)


@dataclass
class QuickstartConfig:
    """The main job: harvest, train, evaluate and report on the offline default."""

    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(n_latents=8192, k=32, total_tokens=1_048_576))
    eval: EvalConfig = field(default_factory=EvalConfig)
