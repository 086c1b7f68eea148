"""Training configuration: named recipes (the paper's, and a short-run one for CPU budgets),
every item switchable. Why each default is what it is, with measurements: docs/training.md."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from saelab.errors import ConfigError
from saelab.utils.config import switch

LOG_TARGETS = ("tensorboard", "wandb")
"""Where training metrics may also go besides metrics.jsonl (--log-to; train/metric_sinks.py opens them)."""


@dataclass
class TrainConfig:
    """How to train one SAE. The defaults shown are the 'short-run' recipe's; --recipe paper (Gao et al.
    2024) or relu-l1 starts from its own (docs/training.md), and each option typed overrides the recipe."""

    recipe: Literal["short-run", "paper", "relu-l1"] = "short-run"
    """The recipe these settings start from: 'short-run' (tuned for runs of a few hundred steps,
    the CPU default), 'paper' (Gao et al. 2024 and OpenAI's code) or 'relu-l1' (the ReLU + L1
    baseline with its usual recipe); docs/training.md lists each item and its source. Options
    given explicitly override the recipe's value."""
    n_latents: int = 8192
    """Number of latents n."""
    k: int = 32
    """Active latents per token."""
    batch_size: int = 4096
    """Activation rows per optimizer step."""
    total_tokens: int = 1_048_576
    """Activation rows to train on (each seen once)."""
    lr: float | None = None
    """Adam learning rate; None scales it with the latent count n as --lr-base / sqrt(n / 2^14), at
    most --lr-max."""
    lr_base: float = 4e-3
    """Learning rate at n = 2^14 latents when --lr is None."""
    lr_max: float = 1e-2
    """Cap of the scaled learning rate when --lr is None (small n would otherwise get rates at which
    short runs diverge)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 6.25e-10
    """Adam epsilon (OpenAI's value)."""
    warmup_steps: int | None = None
    """Linear learning-rate warmup steps; None: 1/32 of the run."""
    decay_fraction: float = 0.6
    """Fraction of the run, at the end, over which the learning rate decays linearly to 0."""
    input_norm: Literal["none", "layernorm"] = "none"
    """'none', or 'layernorm' (per-token normalization inside the SAE, undone on decode, as OpenAI v5)."""
    unit_norm_decoder: bool = switch(True)
    """Rescale decoder rows to unit norm after every step."""
    project_decoder_grad: bool = switch(True)
    """Remove the gradient component parallel to each decoder row before the step."""
    tied_init: bool = switch(True)
    """Initialise the encoder as the transpose of the decoder."""
    geometric_median_init: bool = switch(True)
    """Initialise the pre-encoder bias (the paper's b_pre) to the geometric median of a sample of
    activations (else the mean)."""
    decoder_init: Literal["auto", "random", "data"] = "auto"
    """'random' (unit-norm Gaussian rows, the paper), 'data' (rows start at distinct centred
    directions of the initialisation sample, mixed with random ones), or 'auto': 'data' when each
    latent expects at least 16 activations per batch (--batch-size x --k / --n-latents >= 16; a ReLU SAE,
    which has no k, counts 32), else 'random'."""
    decoder_init_max_cos: float = 0.75
    """With --decoder-init data: a sample direction whose cosine to an already chosen row exceeds
    this is skipped (near-duplicate latents compete and one of them dies); 1 keeps duplicates."""
    decoder_init_noise: float = 1.25
    """With --decoder-init data: each row is normalize(data direction + this * random unit
    direction); 0 is pure data directions."""
    scale_encoder_init: bool = switch(True)
    """Rescale the tied encoder so the initial reconstruction has the least-squares magnitude."""
    init_rows: int | None = None
    """Rows taken from the start of the data for the pre-encoder bias, the loss normalizer and the data
    directions of the decoder; None: 32,768, or max(32,768, 4 n) with data directions, at most
    --total-tokens."""
    auxk: bool = switch(True)
    """Train dead latents to reconstruct the residual (AuxK)."""
    k_aux: int = 256
    """Dead latents used by AuxK (all of them when fewer are dead; a --k-aux typed above --n-latents is refused,
    the default above it takes every dead latent)."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int | None = None
    """A latent is dead (AuxK trains it) if it has not fired in this many training tokens;
    None: 1/8 of the run, at most the paper's 10 M (so AuxK acts in short runs too)."""
    multi_topk: bool = switch(False)
    """Also reconstruct with the top --multi-topk-factor x --k latents (Multi-TopK)."""
    multi_topk_factor: int = 4
    """With --multi-topk: Multi-TopK uses this many times --k latents."""
    multi_topk_coef: float = 1 / 8
    """With --multi-topk: weight of the Multi-TopK loss."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999) and save it
    as the final SAE; 0 or None disables (--ema-decay 0 turns off the paper recipe's 0.999)."""
    seed: int = 0
    """Seed for initialisation."""
    checkpoint_every: int = 50
    """Steps between checkpoints (also written at the end and on interruption)."""
    log_every: int = 10
    """Steps between metrics lines."""
    architecture: Literal["topk", "relu"] = "topk"
    """'topk' (this paper's SAE), or 'relu': the ReLU + L1 baseline (SAELens 'standard'; --k is unused,
    AuxK and Multi-TopK are off; its recipe: docs/training.md, "ReLU + L1 baseline")."""
    l1_coefficient: float = 5.0
    """With --architecture relu: lambda of the L1 penalty (each latent's activation times the norm of its
    decoder row, summed over latents), warmed up linearly over the first 5 % of steps (Anthropic's
    April 2024 update; units in docs/training.md)."""

    def __post_init__(self) -> None:
        _check_choices(self)
        _check_sizes(self)
        _check_rates(self)
        if self.ema_decay == 0:  # one spelling of "off", which a recipe's default cannot fill back in
            self.ema_decay = None

    @classmethod
    def from_recipe(cls, recipe: str = "short-run", **overrides: Any) -> "TrainConfig":
        """The named recipe's settings, then ``overrides``: ``TrainConfig.from_recipe("paper", n_latents=32768)``."""
        if recipe not in RECIPES:
            raise ConfigError(f"recipe {recipe!r} unknown; expected one of {', '.join(RECIPES)}")
        return cls(**{**RECIPES[recipe], **overrides, "recipe": recipe})

    @classmethod
    def entries_giving(cls, recorded: dict[str, Any]) -> dict[str, Any]:
        """A run's recorded settings (``to_dict``) as the option entries that give them again: its recipe and
        the settings that differ from the recipe's. A recipe or setting this version does not know is kept,
        to be refused."""
        if recorded.get("recipe", "short-run") not in RECIPES:
            return dict(recorded)
        base = asdict(cls.from_recipe(recorded.get("recipe", "short-run")))
        return {k: v for k, v in recorded.items() if k == "recipe" or k not in base or base[k] != v}

    def changes_from_recipe(self) -> dict[str, Any]:
        """Settings that differ from this config's recipe (what a report prints beside its name)."""
        base = asdict(TrainConfig.from_recipe(self.recipe))
        keep = ("recipe", "n_latents", "k", "total_tokens", "seed", "checkpoint_every", "log_every")
        return {k: v for k, v in asdict(self).items() if k not in keep and base[k] != v}

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_size

    @property
    def effective_decoder_init(self) -> str:
        return resolved_decoder_init(self.decoder_init, self.batch_size, self.k, self.n_latents, self.architecture)

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
    def scaled_lr(self) -> float:
        """--lr-base scaled to the latent count, before --lr-max caps it."""
        return self.lr_base / math.sqrt(self.n_latents / 2**14)

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else min(self.scaled_lr, self.lr_max)

    @property
    def lr_capped(self) -> bool:
        """Whether --lr-max, not the scaled rate, set the learning rate (a report says so)."""
        return self.lr is None and self.scaled_lr > self.lr_max

    @property
    def effective_k_aux(self) -> int:
        """The most dead latents AuxK can take: each step takes min(k_aux, the dead latents), so a k_aux above
        the latent count (the default 256 at a small --n-latents) acts as every latent."""
        return min(self.k_aux, self.n_latents)

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
            raise ConfigError(f"unknown training options: {sorted(unknown)}")
        return cls(**d)


RELU_INIT_K = 32
"""Active latents per row that 'auto' decoder init assumes of a ReLU SAE, which has no k: the default k, by which
the ReLU runs the CLI trains (it refuses -k with them) have always resolved it. A k given to a ReLU config through
Python acts on nothing, as its comparison with another run takes it (``unused_settings``)."""


def resolved_decoder_init(decoder_init: str, batch_size: int, k: int, n_latents: int,
                          architecture: str = "topk") -> str:
    """--decoder-init with 'auto' resolved: 'data' when each latent expects at least 16 activations per
    batch (k active per row; a ReLU SAE: RELU_INIT_K), else 'random'."""
    if decoder_init != "auto":
        return decoder_init
    per_row = k if architecture == "topk" else RELU_INIT_K
    return "data" if batch_size * per_row >= 16 * n_latents else "random"


RELU_HAS_NONE = ("a ReLU SAE (architecture relu, the relu-l1 recipe) keeps every positive latent and has no k, "
                 "AuxK or Multi-TopK; its sparsity is set by --l1-coefficient")

# Training options that act only with another setting, in the order they are checked: (the options' fields,
# whether settings ({field: value}) use them, why not). Given where they have no effect, they would be silently
# ignored (the CLI refuses them), and the report would list them as a change to the recipe; recorded where they
# have none (a ReLU run's default k), they are no difference between two runs (unused_settings).
APPLIES_ONLY_WITH: list[tuple[tuple[str, ...], Callable[[dict], bool], str]] = [
    (("k", "k_aux", "auxk", "auxk_coef", "multi_topk", "multi_topk_factor", "multi_topk_coef"),
     lambda s: s["architecture"] == "topk", RELU_HAS_NONE),
    (("l1_coefficient",), lambda s: s["architecture"] == "relu",
     "applies only with --architecture relu (the relu-l1 recipe); a top-k SAE's sparsity is set by --k"),
    (("multi_topk_factor", "multi_topk_coef"), lambda s: s["multi_topk"], "applies only with --multi-topk"),
    (("k_aux", "auxk_coef"), lambda s: s["auxk"], "applies only with --auxk (AuxK is off)"),
    (("decoder_init_max_cos", "decoder_init_noise"),  # auto draws it at random on too few activations per latent
     lambda s: resolved_decoder_init(s["decoder_init"], s["batch_size"], s["k"], s["n_latents"],
                                     s["architecture"]) != "random",
     "applies only to a decoder initialized from data (--decoder-init data, or auto where --batch-size x --k / "
     "--n-latents >= 16, a ReLU SAE's --k taken as 32); here it is drawn at random"),
    (("lr_base", "lr_max"), lambda s: s["lr"] is None,
     "sets the learning rate only when --lr is unset; --lr gives it outright"),
]


def unused_settings(recorded: dict[str, Any]) -> set[str]:
    """The fields of training settings (``to_dict``'s, as a run records them; a field left out has its recipe's
    value) that act on nothing under the others (APPLIES_ONLY_WITH): a ReLU run's k, AuxK's k_aux with AuxK off.
    None where the recipe or a value is one this version does not know (its refusal names it)."""
    try:
        settings = {**TrainConfig.from_recipe(recorded.get("recipe", "short-run")).to_dict(), **recorded}
        return {field for fields, applies, _ in APPLIES_ONLY_WITH if not applies(settings) for field in fields}
    except (ConfigError, KeyError, TypeError, ValueError):
        return set()


def _check_choices(c: TrainConfig) -> None:
    for name in ("recipe", "input_norm", "decoder_init", "architecture"):
        allowed = _literal_values(name)
        if getattr(c, name) not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(c, name)!r}")


def _literal_values(name: str) -> tuple[str, ...]:
    import typing

    hints = typing.get_type_hints(TrainConfig)
    return typing.get_args(hints[name])


def _check_sizes(c: TrainConfig) -> None:
    for name in ("n_latents", "k", "batch_size", "k_aux", "multi_topk_factor", "checkpoint_every", "log_every"):
        if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {getattr(c, name)!r}")
    if c.k > c.n_latents:
        raise ConfigError(f"k={c.k} exceeds n_latents={c.n_latents}; expected k <= n_latents")
    if c.total_tokens < c.batch_size:
        raise ConfigError(f"total_tokens={c.total_tokens} must be at least one batch of batch_size={c.batch_size}")
    for name in ("init_rows", "dead_tokens"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            raise ConfigError(f"{name} must be >= 1 or unset, got {getattr(c, name)}")
    if c.warmup_steps is not None and c.warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0 or unset, got {c.warmup_steps}")
    if c.multi_topk and c.multi_topk_factor * c.k > c.n_latents:
        raise ConfigError(f"multi_topk_factor={c.multi_topk_factor} times k={c.k} exceeds n_latents={c.n_latents}; "
                          "Multi-TopK's second top-k keeps factor x k latents")


def check_warmup(c: TrainConfig, named: str | None = None, run: str | None = None) -> None:
    """Refuse a warmup longer than the run. Not checked as the settings are built: a run on a small cache trains
    fewer steps than its settings say until total_tokens is lowered to the cache, so this is called on the
    settings a run trains with. ``named``: how the setting was given ("--warmup-steps"; default warmup_steps=);
    ``run``: what sets the run's steps, when not the run's own settings ("--grid total-tokens=8192")."""
    if c.warmup_steps is not None and c.warmup_steps > c.total_steps:
        shown = f"{named} {c.warmup_steps}" if named else f"warmup_steps={c.warmup_steps}"
        steps = f"the {c.total_steps:,} steps of {run}" if run else f"the run's {c.total_steps:,} steps"
        raise ConfigError(f"{shown} exceeds {steps} (total tokens / batch size); the learning rate would never "
                          "reach its peak")


def _check_rates(c: TrainConfig) -> None:
    for f in fields(c):
        v = getattr(c, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{f.name} must be a finite number, got {v}")
    for name in ("lr", "lr_base", "lr_max", "adam_eps"):
        if getattr(c, name) is not None and getattr(c, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(c, name)}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(c, name) < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {getattr(c, name)}")
    if c.ema_decay is not None and not 0 <= c.ema_decay < 1:
        raise ConfigError(f"ema_decay must be in [0, 1) (0: no average), got {c.ema_decay}")
    if not 0 <= c.decay_fraction <= 1:
        raise ConfigError(f"decay_fraction must be in [0, 1], got {c.decay_fraction}")
    if c.l1_coefficient < 0:
        raise ConfigError(f"l1_coefficient must be >= 0, got {c.l1_coefficient}")
    if c.auxk_coef < 0 or c.multi_topk_coef < 0:
        raise ConfigError(f"auxk_coef and multi_topk_coef must be >= 0, got {c.auxk_coef} and {c.multi_topk_coef}")
    if not 0 < c.decoder_init_max_cos <= 1 or c.decoder_init_noise < 0:
        raise ConfigError(f"decoder_init_max_cos must be in (0, 1] and decoder_init_noise >= 0, got "
                          f"{c.decoder_init_max_cos} and {c.decoder_init_noise}")


PAPER_LR_AT_2_14 = 1e-4 * math.sqrt(2)
"""OpenAI's 1e-4 at n = 2^15, moved to this module's reference size n = 2^14 by the 1/sqrt(n) rule."""

RECIPES: dict[str, dict[str, Any]] = {
    # The baseline the paper compares against, with Anthropic's April 2024 recipe (docs/training.md).
    "relu-l1": {
        "architecture": "relu", "l1_coefficient": 5.0, "decay_fraction": 0.2, "warmup_steps": 0,
        "unit_norm_decoder": False, "project_decoder_grad": False, "decoder_init": "random",
        "scale_encoder_init": False, "auxk": False,
    },
    # The defaults above: tuned for runs of a few hundred steps (docs/training.md has the measurements).
    "short-run": {},
    # Gao et al. 2024 and OpenAI's sparse_autoencoder; sources per item in docs/training.md.
    "paper": {
        "input_norm": "layernorm",      # paper 2.1: inputs centred over d_model and scaled (OpenAI: LayerNorm)
        "decoder_init": "random",       # random unit-norm rows, encoder tied to them
        "tied_init": True,
        "scale_encoder_init": False,    # not in the paper or OpenAI's code
        "geometric_median_init": True,  # b_pre = geometric median (OpenAI)
        "lr_base": PAPER_LR_AT_2_14,    # lr proportional to 1/sqrt(n); 1e-4 at n = 2^15 (OpenAI)
        "lr_max": 1.0,                  # no cap
        "warmup_steps": 0,
        "decay_fraction": 0.0,          # constant learning rate
        "k_aux": 512,                   # the paper's k_aux (OpenAI's code uses 256)
        "auxk_coef": 1 / 32,
        "dead_tokens": 10_000_000,      # dead = not fired in 10 M tokens
        "ema_decay": 0.999,             # the EMA of the weights is what the paper evaluates
        "adam_eps": 6.25e-10,
        "multi_topk": False,
    },
}
