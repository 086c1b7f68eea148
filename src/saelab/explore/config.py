"""Settings of the explore verbs that the command line reads before any model loads: steering's modes and the
feature browser's BrowseConfig (what each number it shows means: saelab.explore.browser.build). No torch here:
the parser builds its options from these, and a value they refuse is refused before torch loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saelab.errors import ConfigError
from saelab.evals.config import EvalConfig, N2GConfig
from saelab.models.config import MODEL_SPECS

STEER_MODES = ("add", "clamp", "ablate")
"""What steering does to a latent: add to it, clamp it to a value, or ablate it (clamp to 0)."""

DEFAULT_BANDS = 4


MAX_LOGITS = 1000
"""The most promoted (and suppressed) tokens a site lists per latent: 8,192 latents of 1,000 each take 200 MB
before their pages are written; 100,000 (a whole vocabulary) ran out of memory after the scoring pass."""


MAX_BINS = 512
"""The most histogram bins: a page draws the histogram 520 pixels wide (past 512 bins, bins share a pixel), and
the pass keeps n_latents x n_bins counts (--n-bins 2^30 asked for 8 TB of a 1,024-latent SAE)."""

SEED_BITS = 31
"""The bits of the seed the samples' hash reads (``stats.sample_keys``): a seed past them repeats another's."""


@dataclass
class BrowseConfig:
    """What the feature browser reads and shows."""

    n_tokens: int = 262_144
    """Tokens scored (position 0 excluded when the SAE excludes it); rounded up to whole contexts."""
    corpus: str | None = None
    """Text to read: a .txt/.jsonl/.jsonl.xz file, a folder of .txt, or a HF dataset name; None: the
    offline Wikipedia eval split (articles the SAEs were not trained on) when present."""
    context_size: int | None = None
    """Tokens per context; None: the (first) SAE's training context size."""
    sample_pool_tokens: int = EvalConfig.sample_pool_tokens
    """The contexts are drawn at random (seed 0) from the corpus's first this many tokens (all of the shipped eval
    split), as the evaluations draw theirs, so that a latent's top contexts come from many documents, not the first
    few; 0: the first contexts, in order."""
    model: str | None = None
    """Language model; None: the one the SAE was trained on."""
    hook: str | None = None
    """Hook the SAEs read; None: the SAE's own hook name."""
    n_top: int = 16
    """Top-activating contexts kept per latent (past the contexts read: all of them, each once)."""
    n_samples: int = 12
    """Contexts sampled at random per latent (among those where it fires) for the quantile bands (past the contexts
    read: all of them)."""
    n_bands: int = DEFAULT_BANDS
    """Quantile bands the samples are split into, at most one per sample (the default 4 is lowered to
    fewer samples)."""
    n_bins: int = 64
    """Histogram bins (a power of two, at most 512)."""
    window_before: int = 16
    """Tokens shown before the max-activating token of each context."""
    window_after: int = 8
    """Tokens shown after it."""
    n_logits: int = 10
    """Promoted and suppressed tokens listed per latent (direct logit effect), at most 1000."""
    n_neighbours: int = 8
    """Nearest latents by decoder cosine listed per latent, at most the SAE's other latents (the default is cut to a
    smaller SAE's; a number given past them is refused)."""
    lm_batch_size: int = 16
    """Contexts per LM forward."""
    n2g_file: str | None = None
    """N2G explanations to show: the evals/n2g.json that `saelab eval --suite paper` writes, or a JSON
    object with a 'per_latent' list; None: the run's evals/n2g.json (or n2g.json) if present."""
    n2g_n_latents: int = 0
    """Also build N2G explanations here for this many latents (random among the active), from their
    top contexts (about a few seconds per latent on a CPU); 0: none."""
    n2g_padding_token: str = N2GConfig.padding_token
    """Text of the replacement token of the N2G explanations that --n2g-n-latents builds (' _' by default, as
    for `saelab eval --suite paper`): one token of the model's tokenizer, checked before the text is scored."""
    family_min_score: float = 0.3
    """Feature families: a latent's parent in the next smaller SAE needs at least this score
    (the geometric mean of their decoder cosine and co-activation containment)."""
    seed: int = 0
    """Seed of the quantile samples and of the N2G latent choice, in -2^31..2^31 - 1."""

    def __post_init__(self) -> None:
        for name in ("n_tokens", "n_top", "n_samples", "n_bands", "lm_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("window_before", "window_after", "n_logits", "n_neighbours", "n2g_n_latents"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.sample_pool_tokens < 0:
            raise ConfigError(f"sample_pool_tokens must be >= 0 (0: the first contexts), got {self.sample_pool_tokens}")
        if self.n_logits > MAX_LOGITS:  # else found out after the whole pass, as the memory runs out
            raise ConfigError(f"n_logits must be <= {MAX_LOGITS} (each latent's page lists as many promoted and "
                              f"suppressed tokens), got {self.n_logits}")
        if self.n_bands > self.n_samples and self.n_bands == DEFAULT_BANDS:
            self.n_bands = self.n_samples  # --n-samples 2 alone: two bands of one, not a refusal of the default
        if self.n_bands > self.n_samples:  # the bands cut the samples: the bands past the samples stayed empty
            raise ConfigError(f"n_bands={self.n_bands} exceeds n_samples={self.n_samples}; expected n_bands <= "
                              "n_samples (each band holds at least one sampled context)")
        if self.n_bins < 2 or self.n_bins & (self.n_bins - 1):
            raise ConfigError(f"n_bins must be a power of two >= 2, got {self.n_bins}")
        if self.n_bins > MAX_BINS:  # else an allocator's traceback, or pages whose bars share pixels
            raise ConfigError(f"n_bins must be <= {MAX_BINS} (a page draws the histogram 520 pixels wide, and the pass "
                              f"keeps every latent's bins in memory), got {self.n_bins}")
        # a larger one also failed the N2G draw, after the whole pass; negative seeds were always taken
        if not -2**SEED_BITS <= self.seed < 2**SEED_BITS:
            raise ConfigError(f"seed must be in -2^{SEED_BITS}..2^{SEED_BITS} - 1 (the samples' hash reads {SEED_BITS} "
                              f"bits of it: another seed would repeat one of these), got {self.seed}")
        if self.context_size is not None and self.context_size < 3:
            raise ConfigError(f"context_size must be >= 3 (BOS and at least one scored token), got {self.context_size}")
        if self.model is not None and not self.model.strip():  # '' read as no model meant the SAE's own, unsaid
            raise ConfigError(f"model must name a language model ({MODEL_SPECS}), got {self.model!r}")
        if self.n2g_file is not None and not Path(self.n2g_file).expanduser().is_file():  # before the model loads
            raise ConfigError(f"n2g_file must name an existing file, got {str(self.n2g_file)!r}; expected an N2G "
                              "result: a paper suite's evals/n2g.json (saelab eval RUN --suite paper)")
        if not 0 <= self.family_min_score <= 1:  # a geometric mean of a cosine and a containment
            raise ConfigError(f"family_min_score must be in [0, 1], got {self.family_min_score}")
