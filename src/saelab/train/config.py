"""Training configuration: the paper's recipe, every item on by default and switchable."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class TrainConfig:
    """How to train one top-k SAE (Gao et al. 2024, with OpenAI's and sparsify's defaults)."""

    n_latents: int = 8192
    """Number of latents n."""
    k: int = 32
    """Active latents per token."""
    batch_size: int = 4096
    """Activation rows per optimizer step."""
    total_tokens: int = 1_048_576
    """Activation rows to train on (each seen once)."""
    lr: float | None = None
    """Adam learning rate; None scales it with n as lr_base / sqrt(n / 2^14), at most lr_max."""
    lr_base: float = 4e-3
    """Learning rate at n = 2^14 when lr is None. Higher than sparsify's 2e-4 because short
    runs (a few hundred steps) need it; stable thanks to the unit-norm decoder. Lower rates
    reconstruct slightly better but leave more latents that rarely or never fire."""
    lr_max: float = 1e-2
    """Cap of the scaled learning rate when lr is None (small n would otherwise get rates at
    which short runs diverge: 4e-3 / sqrt(128 / 2^14) = 0.045)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 6.25e-10
    """Adam epsilon (OpenAI's value)."""
    warmup_steps: int | None = None
    """Linear learning-rate warmup steps; None: 1/32 of the run (2 steps of a 64-step run, 8 of 256)."""
    decay_fraction: float = 0.6
    """Fraction of the run, at the end, over which the learning rate decays linearly to 0."""
    input_norm: str = "none"
    """'none', or 'layernorm' (per-token normalization inside the SAE, as OpenAI v5)."""
    unit_norm_decoder: bool = True
    """Rescale decoder rows to unit norm after every step."""
    project_decoder_grad: bool = True
    """Remove the gradient component parallel to each decoder row before the step."""
    tied_init: bool = True
    """Initialise the encoder as the transpose of the decoder."""
    geometric_median_init: bool = True
    """Initialise b_pre (b_dec) to the geometric median of a sample of activations (else the mean)."""
    decoder_init: str = "auto"
    """'random' (unit-norm Gaussian rows, the paper), 'data' (rows start at distinct centred
    directions of the initialisation sample, mixed with random ones: see decoder_init_max_cos
    and decoder_init_noise), or 'auto': 'data' when each latent expects at least 16 activations
    per batch (batch_size * k / n_latents >= 16), else 'random'. Data directions reconstruct
    better early on, but with fewer activations per latent and step many of them stop firing
    (measured on SmolLM2, 64 steps: n = 8,192 nMSE 0.198 vs 0.227 at ~1 % dead either way;
    n = 32,768: 36 % of latents dead vs 8 %)."""
    decoder_init_max_cos: float = 0.75
    """With decoder_init='data': a sample direction whose cosine to an already chosen row exceeds
    this is skipped (near-duplicate latents compete and one of them dies); 1 keeps duplicates."""
    decoder_init_noise: float = 1.25
    """With decoder_init='data': each row is normalize(data direction + this * random unit
    direction); 0 is pure data directions (best reconstruction, more rarely firing latents)."""
    scale_encoder_init: bool = True
    """Rescale the tied encoder so the initial reconstruction has the least-squares magnitude."""
    init_rows: int | None = None
    """Rows taken from the start of the data for b_pre, the loss normalizer and the data
    directions of the decoder; None: 32,768, or max(32,768, 4 n) with data directions, at most
    total_tokens."""
    auxk: bool = True
    """Train dead latents to reconstruct the residual (AuxK)."""
    k_aux: int = 256
    """Dead latents used by AuxK."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int | None = None
    """A latent is dead (AuxK trains it) if it has not fired in this many training tokens;
    None: 1/8 of the run, at most the paper's 10 M (so AuxK acts in short runs too)."""
    multi_topk: bool = False
    """Also reconstruct with the top multi_topk_factor*k latents (Multi-TopK)."""
    multi_topk_factor: int = 4
    """Multi-TopK uses this many times k latents."""
    multi_topk_coef: float = 1 / 8
    """Weight of the Multi-TopK loss."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999) and save it
    as the final SAE; None disables."""
    seed: int = 0
    """Seed for initialisation."""
    checkpoint_every: int = 50
    """Steps between checkpoints (also written at the end and on interruption)."""
    log_every: int = 10
    """Steps between metrics lines."""

    def __post_init__(self) -> None:
        if self.decoder_init not in ("auto", "random", "data"):
            raise ValueError(f"decoder_init must be 'auto', 'random' or 'data', got {self.decoder_init!r}")
        if not 0 < self.decoder_init_max_cos <= 1 or self.decoder_init_noise < 0:
            raise ValueError(f"decoder_init_max_cos must be in (0, 1] and decoder_init_noise >= 0, got "
                             f"{self.decoder_init_max_cos} and {self.decoder_init_noise}")
        if self.k > self.n_latents:
            raise ValueError(f"k={self.k} exceeds n_latents={self.n_latents}")
        if self.batch_size <= 0 or self.total_tokens < self.batch_size:
            raise ValueError(
                f"total_tokens={self.total_tokens} must be at least one batch of batch_size={self.batch_size}"
            )

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_size

    @property
    def effective_decoder_init(self) -> str:
        if self.decoder_init != "auto":
            return self.decoder_init
        return "data" if self.batch_size * self.k >= 16 * self.n_latents else "random"

    @property
    def effective_init_rows(self) -> int:
        if self.init_rows is not None:
            return self.init_rows
        # Data directions need several candidates per latent; b_pre and the normalizer need far fewer.
        want = 4 * self.n_latents if self.effective_decoder_init == "data" else 0
        return min(max(32_768, want), self.total_tokens)

    @property
    def effective_dead_tokens(self) -> int:
        return self.dead_tokens if self.dead_tokens is not None else min(10_000_000,
                                                                         max(self.batch_size, self.total_tokens // 8))

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else min(self.lr_base / math.sqrt(self.n_latents / 2**14), self.lr_max)

    def lr_at(self, step: int) -> float:
        """Warmup, constant, then linear decay to zero over the last decay_fraction of steps."""
        lr = self.effective_lr
        warmup = self.warmup_steps if self.warmup_steps is not None else max(1, self.total_steps // 32)
        if step < warmup:
            return lr * (step + 1) / warmup
        decay_start = int(self.total_steps * (1 - self.decay_fraction))
        if self.decay_fraction > 0 and step >= decay_start:
            remaining = max(self.total_steps - decay_start, 1)
            return lr * max(self.total_steps - step, 0) / remaining
        return lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training options: {sorted(unknown)}")
        return cls(**d)
