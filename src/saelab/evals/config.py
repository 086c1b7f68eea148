"""The evaluations' settings: the core metrics' (EvalConfig) and each paper metric's, and the names they take.

No torch here: the command line's parser builds its options from these classes, and a value they refuse is
refused before torch or any model loads. Each metric's module (core, ablation_sparsity, compute_equivalent,
n2g, probe, suite) documents what its settings mean for its definition.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Literal

from simple_parsing.helpers import field as cli_field

from saelab.errors import ConfigError
from saelab.evals.probe_tasks import DEFAULT_TASKS, SPLIT_UNITS, TOKEN_TASKS
from saelab.utils.config import switch

DEFAULT_N_BOOT = 1000
DEFAULT_LEVEL = 0.95


def run_option(default: Any) -> Any:
    """A config field the caller fills at run time (the hook, a progress flag): not a command-line option."""
    return cli_field(default=default, cmd=False)


def check_bootstrap_args(n_boot: int, level: float) -> None:
    """Refuse a replicate count or level that gives no interval (ConfigError naming the option)."""
    if not isinstance(n_boot, int) or n_boot < 0:
        raise ConfigError(f"n_boot must be an integer >= 0 (0 = no intervals), got {n_boot!r}")
    if not 0 < level < 1:
        raise ConfigError(f"ci_level must be in (0, 1), got {level!r}")


# ---- what the paper metrics share ---------------------------------------------------------------
@dataclass(kw_only=True)  # keyword-only: a metric's own settings keep their places in its constructor
class MetricSettings:
    """Where a paper metric reads the SAE: settings the caller fills at run time."""

    exclude_first: bool | None = run_option(None)
    """Leave position 0 out of what the metric edits and scores; None = follow the SAE's cfg.exclude_first."""
    hook: str | None = run_option(None)
    """Hook the SAE reads, where the metric splices or ablates; None = the SAE's cfg.hook_name."""


@dataclass(kw_only=True)
class SampledMetricSettings(MetricSettings):
    """A paper metric that samples what it measures, with bootstrap intervals."""

    seed: int = 0
    """Seed of the metric's sampling and of the bootstrap."""
    n_boot: int = DEFAULT_N_BOOT
    """Bootstrap replicates for the intervals (0 = no intervals)."""
    ci_level: float = DEFAULT_LEVEL
    """Coverage of the intervals."""

    def __post_init__(self) -> None:
        check_bootstrap_args(self.n_boot, self.ci_level)


SHARED_SETTINGS = ("seed", "n_boot", "ci_level", "exclude_first", "hook")
"""The shared settings in the order a metric's settings list them, after its own."""


def shared_settings_last(**help_texts: str) -> Callable[[type], type]:
    """A decorator of a metric's settings (a dataclass over :class:`MetricSettings`): the shared settings listed
    after its last command-line option, where they stood when each metric defined them (a base class's fields
    come first; the order is its --help's, a config file's list of options and its results' config), and worded
    for the metric where ``help_texts`` says (--help of ``seed=``: what its seed draws)."""
    def decorate(cls: type) -> type:
        fields = dict(cls.__dataclass_fields__)
        for name, text in help_texts.items():
            worded = copy.copy(fields[name])  # the base's field is every metric's: a copy of its own
            worded.metadata = MappingProxyType({**worded.metadata, "help": text})
            fields[name] = worded
        shared = [name for name in SHARED_SETTINGS if name in fields]
        own = [name for name in fields if name not in shared]
        at = max(i + 1 for i, name in enumerate(own) if fields[name].metadata.get("cmd", True))
        order = own[:at] + shared + own[at:]  # a run-time field (progress) stays after them
        cls.__dataclass_fields__ = {name: fields[name] for name in order}
        return cls
    return decorate


# ---- the core metrics ----------------------------------------------------------------------------
ABLATIONS = ("zero", "mean")


@dataclass
class EvalConfig:
    """How to evaluate an SAE on held-out text."""

    corpus: str | None = None
    """Held-out text; None: the offline Wikipedia eval split shipped in data/."""
    recon_tokens: int = 32_768
    """Tokens for nMSE, L0 and dead/dense latents."""
    downstream_tokens: int = 16_384
    """Tokens for delta CE, KL and CE recovered, at least (rounded up to whole contexts: the predictions
    counted in metrics.json are those of every context read; the layers below the hook run once, the rest
    once per variant: clean, spliced and each ablation)."""
    context_size: int | None = None
    """Context length; None: the SAE's training context size."""
    sample_pool_tokens: int = 4_194_304
    """The contexts are drawn at random from the corpus's first this many tokens (all of the shipped eval
    split), so the numbers describe many documents, not the first few; 0: the first contexts, in order."""
    lm_batch_size: int = 8
    """Contexts per LM forward."""
    ablations: tuple[Literal["zero", "mean"], ...] = ABLATIONS
    """Baselines for CE recovered: zero and/or mean ablation of the hook."""
    variants_per_forward: int = 4
    """Variants stacked in one forward of the layers after the hook; 1 holds the least logits memory
    (a GPU with long contexts). On a quiet 2-core CPU, 1 and 4 take about the same time; on a loaded
    one 4 was 2x faster (benchmarks/RESULTS.md)."""

    def __post_init__(self) -> None:
        for name in ("recon_tokens", "downstream_tokens", "lm_batch_size", "variants_per_forward"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sample_pool_tokens < 0:
            raise ConfigError(f"sample_pool_tokens must be >= 0 (0: the first contexts), got {self.sample_pool_tokens}")
        if self.context_size is not None and self.context_size < 3:
            raise ConfigError(f"context_size must be >= 3 (BOS and at least one prediction), got {self.context_size}")
        self.ablations = tuple(self.ablations)
        unknown = [a for a in self.ablations if a not in ABLATIONS]
        if unknown:
            raise ConfigError(f"ablations {unknown} unknown; expected some of {', '.join(ABLATIONS)}")


# ---- compute-equivalent: its settings and the reference series it knows by name ------------------
# Stanford CRFM's GPT-2 small re-trainings (github.com/stanford-crfm/mistral): OpenWebText,
# effective batch 512 sequences of 1024 tokens (conf/gpt2-mistral-small-config.yaml: effective_bsz 512;
# conf/models/gpt2-small.yaml: seq_len 1024), 400k steps (conf/trainers/gpt2-small.yaml: max_steps),
# checkpoints every 10 steps to 100, every 50 to 2,000, every 100 to 20,000, every 1,000 to 400,000
# (checkpoint_frequency), each a hub branch named checkpoint-{step}.
CRFM_TOKENS_PER_STEP = 512 * 1024
CRFM_TOTAL_STEPS = 400_000
CRFM_RUNS = {21: "alias", 49: "battlestar", 81: "caprica", 343: "darkmatter", 777: "expanse"}
CRFM_DEFAULT_STEPS = (400, 1000, 2000, 4000, 10_000, 20_000, 40_000, 100_000, 200_000, 300_000, 400_000)

# Pythia (github.com/EleutherAI/pythia, Biderman et al. 2023): every size trained on the same data
# in the same order, batch 1024 sequences of 2048 tokens (2,097,152 tokens per step), 143k steps;
# checkpoints step0, the log-spaced step1, 2, 4, ..., 512 and every 1,000 steps to step143000, each
# a hub branch named step{step}.
PYTHIA_TOKENS_PER_STEP = 1024 * 2048
PYTHIA_TOTAL_STEPS = 143_000
PYTHIA_TOTAL_TOKENS = PYTHIA_TOTAL_STEPS * PYTHIA_TOKENS_PER_STEP  # 299,892,736,000, every size (14m, 31m too)
PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
# The family by default: up to 1.4b (5.6 GB in float32, one GPU); 2.8b to 12b on request.
PYTHIA_FAMILY_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b")
PYTHIA_DEFAULT_STEPS = (128, 256, 512, 1000, 2000, 4000, 8000, 16_000, 32_000, 64_000, 100_000, 143_000)


def known_series_names() -> list[str]:
    return (["crfm-gpt2-small", "pythia-family", "pythia-family-deduped"]
            + [f"crfm-gpt2-small-x{s}" for s in CRFM_RUNS if s != 21]
            + [f"pythia-{s}" for s in PYTHIA_SIZES] + [f"pythia-{s}-deduped" for s in PYTHIA_SIZES])


@shared_settings_last()
@dataclass
class ComputeEquivalentConfig(MetricSettings):
    """Settings of the compute-equivalent metric."""

    series: str | None = run_option(None)
    """Reference models: a model family (pythia-family[-deduped][:SIZES] or a folder with family.json:
    the paper's compute-equivalent) or a checkpoint series (crfm-gpt2-small, pythia-<size>[-deduped]
    or a folder of checkpoints: the training-progress equivalent); None = the evaluated model's own
    (the Pythia family for Pythia models, crfm-gpt2-small for GPT-2), if it has one."""
    steps: tuple[int, ...] = run_option(())
    """Training steps of the hub series to measure; () = a default log-spaced subset (11-12 checkpoints)."""
    fit: str = "power"
    """'power': L(C) = a C^-b + c, inverted; 'interp': piecewise-linear in log C between reference models."""
    fit_min_frac: float = 0.01
    """Checkpoint series only: fit only checkpoints with at least this fraction of the full run's
    tokens: the default leaves out the learning-rate warmup (CRFM: 3,200 of 400k steps; Pythia: a
    hundredth of the run) and the initial plateau. A family's members are all fitted."""
    lm_batch_size: int = 8
    """Contexts per forward."""
    progress: bool = run_option(False)
    """Show a progress bar over reference models."""

    def __post_init__(self) -> None:
        if self.fit not in ("power", "interp"):
            raise ConfigError(f"fit must be 'power' or 'interp', got {self.fit!r}")
        # 1 would keep only the full run's own checkpoint: nothing left to fit a curve to.
        if not 0 <= self.fit_min_frac < 1:
            raise ConfigError(f"fit_min_frac must be in [0, 1), got {self.fit_min_frac:g}")
        if self.lm_batch_size < 1:
            raise ConfigError(f"lm_batch_size must be >= 1, got {self.lm_batch_size}")
        bad_steps = [s for s in self.steps if s < 0]  # step 0 is a series' first checkpoint (Pythia's step0)
        if bad_steps:
            raise ConfigError(f"steps must be >= 0, got {bad_steps[0]}")


# ---- ablation sparsity, probe loss, N2G ----------------------------------------------------------
CENTERS = ("median", "none")


@shared_settings_last(
    seed="Seed of the site, latent, channel and direction sampling and of the bootstrap.",
    n_boot="Bootstrap replicates of the documents the sites' contexts come from, for the intervals (0 = no intervals).")
@dataclass
class AblationSparsityConfig(SampledMetricSettings):
    """Settings of the ablation-sparsity metric."""

    n_future: int = 16
    """T: logit changes are read at the ablated position and the next T-1 positions (paper: 16)."""
    n_sites: int = 64
    """(context, position) sites sampled uniformly; every site ablates its active latents."""
    latents_per_site: int | None = None
    """Ablate at most this many of the site's active latents (drawn at random); None = all (at most the SAE's k)."""
    random_baseline: bool = switch(True)
    """Ablate, for every latent ablation, a random direction of the same norm (the matched baseline)."""
    channels_per_site: int = 16
    """Residual-stream channels zeroed per site for the older channel baseline (drawn at random); 0 = none."""
    center: str = "median"
    """'median': subtract each position's median logit change before scoring (paper); 'none'."""
    batch_size: int = 32
    """Ablations per forward pass (rows of one batch; one more row carries the clean run)."""
    progress: bool = run_option(False)
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.n_future < 1:
            raise ConfigError(f"n_future must be >= 1, got {self.n_future}")
        if self.n_sites < 1:
            raise ConfigError(f"n_sites must be >= 1, got {self.n_sites}")
        if self.center not in CENTERS:
            raise ConfigError(f"center must be one of {CENTERS}, got {self.center!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.channels_per_site < 0:
            raise ConfigError(f"channels_per_site must be >= 0, got {self.channels_per_site}")
        # None (the option left out) ablates every active latent; 0 would ablate none and measure nothing.
        if self.latents_per_site is not None and self.latents_per_site < 1:
            raise ConfigError(f"latents_per_site must be >= 1 (leave it out for all active latents), "
                              f"got {self.latents_per_site}")
        super().__post_init__()


FEATURES = ("pre", "post")


@shared_settings_last(seed="Seed of example sampling, the train/test split and the bootstrap.",
                      n_boot="Bootstrap replicates of the held-out groups for the intervals (0 = no intervals).")
@dataclass
class ProbeConfig(SampledMetricSettings):
    """Settings of the probe-loss metric."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    """Offline token tasks to run: some of number, in_parens, in_quotes, capitalized, sentence_start,
    topic_sports, topic_music, topic_military (the default runs them all)."""
    hf_tasks: tuple[str, ...] = ()
    """Hugging Face datasets ('name' or 'name:config', text + binary label) run as context tasks."""
    features: str = "pre"
    """'pre': encoder pre-activations (paper); 'post': the latents after TopK and ReLU."""
    baseline: bool = switch(True)
    """Also probe each residual-stream channel (the SAE input) as the baseline."""
    max_examples: int = 2000
    """Examples per task at most (after balancing), drawn at random."""
    min_per_class: int = 100
    """Tasks with fewer examples of either class are skipped (with few examples, picking the best of
    n latents overfits: the held-out loss can exceed the label entropy)."""
    balance: bool = switch(True)
    """Use as many negatives as positives (chance loss ln 2)."""
    test_frac: float = 0.3
    """Fraction of each task's examples held out for the reported loss (whole paragraphs or texts)."""
    split_unit: str = "paragraph"
    """Token tasks: what the train/test split keeps whole, 'paragraph' or 'document'."""
    l2: float = 1e-3
    """Ridge penalty l2/2 * w^2 on the weight of the standardized feature (keeps separable fits finite)."""
    newton_steps: int = 30
    """Newton iterations at most."""
    tol: float = 1e-9
    """Stop when no latent's loss improves by more than this."""
    latent_chunk: int = 2048
    """Latents fit together (memory: examples x chunk float64 values)."""
    pool: str = "last"
    """Context tasks: 'last' token's activation or 'mean' over the text's tokens."""
    lm_batch_size: int = 8
    """Contexts per LM forward."""

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise ConfigError(f"features must be one of {FEATURES}, got {self.features!r}")
        if not 0 < self.test_frac < 1:
            raise ConfigError(f"test_frac must be in (0, 1), got {self.test_frac}")
        if self.split_unit not in SPLIT_UNITS:
            raise ConfigError(f"split_unit must be one of {SPLIT_UNITS}, got {self.split_unit!r}")
        if self.pool not in ("last", "mean"):
            raise ConfigError(f"pool must be 'last' or 'mean', got {self.pool!r}")
        if self.l2 < 0:
            raise ConfigError(f"l2 must be >= 0, got {self.l2}")
        for name in ("min_per_class", "newton_steps", "latent_chunk", "lm_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_examples < 2:  # a probe needs an example of each class
            raise ConfigError(f"max_examples must be >= 2, got {self.max_examples}")
        self.tasks = tuple(self.tasks)
        unknown = [t for t in self.tasks if t not in TOKEN_TASKS]
        if unknown:  # else they would fail only after the model has read the probe contexts
            raise ConfigError(f"tasks {unknown} unknown; expected some of {', '.join(TOKEN_TASKS)}")
        super().__post_init__()


@shared_settings_last(seed="Seed of the latent sampling and of the bootstrap.",
                      n_boot="Bootstrap replicates of the held-out documents for the intervals (0 = no intervals).")
@dataclass
class N2GConfig(SampledMetricSettings):
    """Settings of the N2G explanation metric."""

    n_latents: int = 64
    """Latents explained, drawn at random among those that fire on the build split (0 = all of them)."""
    latents: tuple[int, ...] = ()
    """Explain exactly these latents instead of a random draw (the number of latents explained is then
    ignored)."""
    n_examples: int = 20
    """Top-activating contexts per latent used to build its explanation (one example per context)."""
    max_len: int = 16
    """N: the longest pattern, in tokens back from (and including) the max-activating token."""
    keep_frac: float = 0.5
    """A suffix explains an example when it keeps this fraction of the example's activation."""
    saliency_threshold: float = 0.5
    """Suffix tokens whose replacement keeps more than 1 - this of the activation become wildcards."""
    min_value: float = 0.0
    """Drop patterns whose value (activation as a fraction of the latent's largest activation on the
    build split) is below this (0: keep every pattern)."""
    padding_token: str = " _"
    """Text of the replacement token: one token of the model's tokenizer (OpenAI uses ' _' for GPT-2), checked
    before the paper suite runs any metric."""
    firing_frac: float = 0.0
    """A latent fires at a token when its activation exceeds this fraction of its largest activation
    on the build split (0: any nonzero)."""
    heldout_frac: float = 0.5
    """Fraction of the contexts held out for scoring and splicing (whole documents when known, else the last ones)."""
    splice: bool = switch(True)
    """Measure the LM loss with N2G-simulated activations spliced in."""
    splice_error_term: bool = switch(False)
    """Add the SAE's error (x - SAE(x)) back when splicing (isolates the latents' effect)."""
    seq_batch_size: int = 256
    """Short sequences per model call while building."""
    lm_batch_size: int = 8
    """Contexts per LM forward when reading activations and splicing."""
    max_patterns_reported: int = 20
    """Patterns listed per latent in the result (all are used)."""

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ConfigError(f"max_len must be >= 1, got {self.max_len}")
        if not 0 < self.heldout_frac < 1:
            raise ConfigError(f"heldout_frac must be in (0, 1), got {self.heldout_frac}")
        for name in ("n_examples", "seq_batch_size", "lm_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_latents", "max_patterns_reported"):  # 0: all latents that fire / no patterns listed
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.latents = tuple(self.latents)
        if any(l < 0 for l in self.latents):  # ids past the SAE's latents are refused once it is known
            raise ConfigError(f"latents must be >= 0, got {min(self.latents)}")
        # Fractions of an activation: keep_frac 0 would explain every example by its last token alone,
        # firing_frac 1 would leave no token above the latent's max.
        if not 0 < self.keep_frac <= 1:
            raise ConfigError(f"keep_frac must be in (0, 1], got {self.keep_frac:g}")
        if not 0 <= self.saliency_threshold <= 1:
            raise ConfigError(f"saliency_threshold must be in [0, 1], got {self.saliency_threshold:g}")
        if not 0 <= self.firing_frac < 1:
            raise ConfigError(f"firing_frac must be in [0, 1), got {self.firing_frac:g}")
        super().__post_init__()


# ---- the paper suite -----------------------------------------------------------------------------
PAPER_METRICS = ("core", "compute_equivalent", "ablation_sparsity", "probe", "n2g")


@dataclass
class PaperSuiteConfig:
    """Which paper metrics to run and on how much text. At these default sizes an n=16384 SAE on the default
    model takes about 20-35 minutes on 2 CPU cores (benchmarks/RESULTS.md: 19 minutes at n=16384 with half the
    ablation sites and N2G latents and no CE ablations, one thread)."""

    metrics: tuple[str, ...] = ()
    """Metrics to run, of core compute_equivalent ablation_sparsity probe n2g; unset: all that apply.
    A metric named here that does not apply is an error."""
    ablation_contexts: int = 64
    """Eval contexts the ablation-sparsity sites are drawn from."""
    probe_contexts: int = 512
    """Eval contexts whose tokens are labelled for the probe tasks."""
    n2g_contexts: int = 256
    """Eval contexts for N2G: the first part builds the explanations, the rest (N2G's held-out
    fraction) scores them."""
    # Each metric's own settings; the CLI adds them as option groups of their own (--ce-*, --abl-*, ...).
    compute_equivalent: ComputeEquivalentConfig = cli_field(default_factory=ComputeEquivalentConfig, cmd=False)
    ablation_sparsity: AblationSparsityConfig = cli_field(default_factory=AblationSparsityConfig, cmd=False)
    probe: ProbeConfig = cli_field(default_factory=ProbeConfig, cmd=False)
    n2g: N2GConfig = cli_field(default_factory=N2GConfig, cmd=False)

    def __post_init__(self) -> None:
        self.metrics = tuple(self.metrics)
        unknown = [m for m in self.metrics if m not in PAPER_METRICS]
        if unknown:
            raise ConfigError(f"metrics must be among the paper suite's ({', '.join(PAPER_METRICS)}), got unknown "
                              f"{', '.join(map(str, unknown))}")
        for name in ("ablation_contexts", "probe_contexts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n2g_contexts < 2:
            raise ConfigError(f"n2g_contexts must be >= 2 (build and held-out parts), got {self.n2g_contexts}")
