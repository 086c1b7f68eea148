"""The top-k sparse autoencoder of Gao et al. (2024).

    z     = ReLU(TopK(W_enc^T (x - b_dec) + b_enc))      (TopK first, then ReLU, as OpenAI's model.py)
    x_hat = W_dec^T z + b_dec

``b_dec`` is the paper's pre-bias ``b_pre``: subtracted before encoding, added back after decoding.
Weights follow SAELens' layout (``W_enc [d_in, n]``, ``W_dec [n, d_in]``) so our files load there.

With ``input_norm="layernorm"`` the input is normalized per token before encoding and the
normalization undone after decoding, as OpenAI's released v5 SAEs do (``model.py``: ``LN`` and
``Autoencoder.decode``; SAELens' ``normalize_activations="layer_norm"`` is the same):
``x -> (x - mean) / (std_unbiased + 1e-5)`` on the way in, ``x_hat -> x_hat * std_unbiased + mean``
on the way out. The eps is only in the division, so the two are not exact inverses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from saelab.errors import ConfigError, NonFiniteError, ShapeMismatchError
from saelab.sae.config import check_latents_once
from saelab.utils.device import same_device
from saelab.utils.tensors import all_finite
from saelab.utils.words import plural

INPUT_NORMS = ("none", "layernorm")
LN_EPS = 1e-5


@dataclass
class SAEConfig:
    """Shape and provenance of one SAE."""

    d_in: int
    """Width of the activations the SAE reads (d_model for a residual stream)."""
    n_latents: int
    """Number of latents n (SAELens: d_sae)."""
    k: int
    """Latents kept per token by TopK."""
    input_norm: str = "none"
    """'none', or 'layernorm' (per-token mean/std normalization undone on decode, as OpenAI v5)."""
    model_name: str = ""
    """Language model the SAE was trained on (a hub id, a path, or 'default')."""
    hook_name: str = ""
    """TransformerLens-style hook the SAE reads and writes, e.g. 'blocks.9.hook_resid_post'."""
    context_size: int = 64
    """Tokens per context the SAE was trained on."""
    prepend_bos: bool = True
    """Whether every context started with a BOS token."""
    exclude_first: bool = True
    """Whether position 0 (the BOS / attention-sink position) was left out of training."""
    dataset: str = ""
    """Corpus the SAE was trained on."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (training config, source file, ...)."""

    def __post_init__(self) -> None:
        # Checked here so that a config read from a file with a value of the wrong type (e.g. a list
        # for hook_name) is refused when loading, not where the value is first used.
        for name in ("d_in", "n_latents", "k", "context_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"SAEConfig.{name} must be a positive integer, got {value!r}")
        if self.k > self.n_latents:
            raise ConfigError(f"SAEConfig.k={self.k} exceeds n_latents={self.n_latents}")
        if not isinstance(self.input_norm, str) or self.input_norm not in INPUT_NORMS:
            raise ConfigError(f"SAEConfig.input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")
        for name, kind in (("model_name", str), ("hook_name", str), ("dataset", str), ("prepend_bos", bool),
                           ("exclude_first", bool), ("extra", dict)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"SAEConfig.{name} must be a {kind.__name__}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def d_sae(self) -> int:
        """SAELens' name for ``n_latents``."""
        return self.n_latents

    @property
    def metadata(self) -> "SAEMetadata":
        """Provenance under SAELens' names (``cfg.metadata.hook_name`` etc.), a read-only view."""
        return SAEMetadata(
            model_name=self.model_name,
            hook_name=self.hook_name,
            context_size=self.context_size,
            prepend_bos=self.prepend_bos,
            dataset_path=self.dataset,
            # SAELens expresses "skip position 0" as a slice over positions.
            seqpos_slice=(1, None) if self.exclude_first else (None,),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class SAEMetadata:
    """The ``metadata`` block of a SAELens config, derived from an :class:`SAEConfig`."""

    model_name: str
    hook_name: str
    context_size: int
    prepend_bos: bool
    dataset_path: str
    seqpos_slice: tuple[int | None, ...]
    hook_head_index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seqpos_slice": list(self.seqpos_slice)}


class TopKOutput(NamedTuple):
    vals_BK: torch.Tensor
    """Kept latent values (after ReLU)."""
    idx_BK: torch.Tensor
    """Indices of the kept latents."""
    pre_BN: torch.Tensor
    """All pre-activations (needed for AuxK)."""


class TopKSAE(nn.Module):
    def __init__(self, cfg: SAEConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 init: bool = True):
        """``init=False`` leaves the weights uninitialised, for loaders that overwrite them anyway."""
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.n_latents
        # [d, n] as SAELens lays it out, stored latent-major (a transposed [n, d] buffer): the sparse
        # kernels read and write whole latents, and this way need no transposed copies (sae/kernels.py).
        self.W_enc = nn.Parameter(torch.empty(n, d, dtype=dtype, device=device).t())
        self.b_enc = nn.Parameter(torch.zeros(n, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(torch.empty(n, d, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))
        self.last_input_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        """A LayerNorm SAE's (mean, std) of the last ``encode`` input, which ``decode`` undoes."""
        if init:
            self.reset_parameters()

    # ---- initialisation and decoder constraints -------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows; encoder = decoder transpose (tied init, not tied weights)."""
        w = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale every decoder row to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each (unit-norm) decoder row."""
        g = self.W_dec.grad
        if g is None:
            return
        # In place: g -= parallel * W would write one more [n, d] temporary (vecdot still makes one).
        parallel = torch.linalg.vecdot(g, self.W_dec).unsqueeze(1)
        g.addcmul_(parallel, self.W_dec, value=-1)

    # ---- shape checks ----------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def d_sae(self) -> int:
        """SAELens' name for ``n_latents``."""
        return self.cfg.n_latents

    @classmethod
    def from_pretrained(cls, repo_id: str, sae_id: str = "", **kwargs: Any) -> "TopKSAE":
        """Load the SAE in folder ``sae_id`` of Hugging Face hub repository ``repo_id`` (SAELens or sparsify
        layout, or an OpenAI ``.pt`` file). Unlike SAELens, ``repo_id`` is the repository itself, not a
        release name; keyword arguments go to ``saelab.sae.io.load_from_hub`` (revision, device, ...)."""
        from saelab.sae.io import load_from_hub  # io imports this module

        return load_from_hub(repo_id, sae_id, **kwargs)

    def check_input(self, x: torch.Tensor, name: str = "activations") -> None:
        """Refuse input of the wrong width, or with NaN/inf (which would silently become NaN output)."""
        trained_on = f" (trained on {self.cfg.hook_name})" if self.cfg.hook_name else ""
        if x.shape[-1] != self.cfg.d_in:
            raise ShapeMismatchError(
                f"{name} have width {x.shape[-1]} but the SAE expects d_in={self.cfg.d_in}{trained_on}"
            )
        if not all_finite(x):
            rows = x.reshape(-1, x.shape[-1])
            n_bad = int((~torch.isfinite(rows)).any(dim=1).sum())
            raise NonFiniteError(f"{name} given to the SAE{trained_on} contain NaN or inf in {n_bad} of "
                                 f"{rows.shape[0]} {plural(rows.shape[0], 'row')}; expected finite numbers")

    def check_device(self, device: torch.device, name: str) -> None:
        """Refuse to run beside a model on another device (the SAE is spliced into its forward)."""
        mine = self.W_dec.device
        if not same_device(mine, device):
            raise ConfigError(f"the SAE is on {mine} but {name} is on {device}; move it with sae.to({str(device)!r})")

    def check_latents(self, latents) -> None:
        """Refuse latent ids this SAE lacks: a negative one would index from the end, silently another latent,
        and 2.9 or True would be read as 2 or 1; and a latent given twice (:func:`check_latents_once`)."""
        for i in latents:
            if isinstance(i, bool) or not float(i).is_integer():
                raise TypeError(f"latent {i!r}: expected an integer index of a latent (the SAE has {self.n_latents} "
                                f"{plural(self.n_latents, 'latent')})")
            if not 0 <= int(i) < self.n_latents:
                raise IndexError(f"latent {int(i)} out of range: the SAE has {self.n_latents} "
                                 f"{plural(self.n_latents, 'latent')}")
        check_latents_once([int(i) for i in latents])

    # ---- input normalization ---------------------------------------------------------------
    def normalize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        if self.cfg.input_norm == "none":
            return x, None
        mu = x.mean(dim=-1, keepdim=True)
        xc = x - mu
        std = xc.std(dim=-1, keepdim=True)
        return xc / (std + LN_EPS), (mu, std)

    def denormalize_output(self, x_hat: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        if state is None:
            return x_hat
        mu, std = state
        # No eps here: OpenAI's decode (and SAELens' layer_norm) multiply by the bare std.
        return x_hat * std + mu

    # ---- the autoencoder, in the normalized space ------------------------------------------
    def pre_acts(self, x_n: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations W_enc^T (x - b_dec) + b_enc, shape [..., n]."""
        return torch.addmm(self.b_enc, (x_n - self.b_dec).reshape(-1, self.d_in), self.W_enc).reshape(
            *x_n.shape[:-1], self.n_latents
        )

    def topk(self, pre: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK over the last dim, then ReLU on the kept values."""
        vals, idx = pre.topk(k or self.cfg.k, dim=-1, sorted=False)
        return F.relu(vals), idx

    def encode_topk(self, x_n: torch.Tensor, k: int | None = None) -> TopKOutput:
        """Top-k latents of input that is already normalized (``normalize_input(x)[0]``); the building
        block of training and the kernels. For raw activations use ``encode_sparse`` or ``encode``."""
        pre = self.pre_acts(x_n)
        vals, idx = self.topk(pre, k)
        return TopKOutput(vals, idx, pre)

    def decode_topk(self, vals: torch.Tensor, idx: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """Sum of the selected decoder rows weighted by their values (no dense [B, n] tensor)."""
        lead = vals.shape[:-1]
        out = F.embedding_bag(
            idx.reshape(-1, idx.shape[-1]),
            self.W_dec,
            per_sample_weights=vals.reshape(-1, vals.shape[-1]),
            mode="sum",
        ).reshape(*lead, self.d_in)
        return out + self.b_dec if bias else out

    def fired(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """[n] float, 1 for each latent with a positive value somewhere in (vals, idx), else 0.

        A scatter of max: a boolean index would wait for the GPU (its size is data) and, on CPU, took
        ~5x as long (1.6 vs 0.3 ms for batch 4,096, k = 32, on a quiet machine)."""
        out = vals.new_zeros(self.n_latents, dtype=torch.float32)
        return out.scatter_reduce_(0, idx.reshape(-1), (vals > 0).reshape(-1).float(), reduce="amax")

    # ---- public API in the activation space ------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents z [..., n] for raw activations x [..., d_in], whatever the input norm.

        For a LayerNorm SAE the per-token mean and std of ``x`` are kept (as SAELens does) so that a
        following ``decode(z)`` undoes the normalization; ``decode(z, norm=...)`` overrides them.
        """
        vals, idx, _ = self.encode_sparse(x)
        z = torch.zeros(*x.shape[:-1], self.n_latents, dtype=vals.dtype, device=vals.device)
        return z.scatter_(-1, idx, vals)

    def encode_sparse(self, x: torch.Tensor, k: int | None = None) -> TopKOutput:
        """Top-k latents (vals_BK, idx_BK, pre_BN) for raw activations x [..., d_in], whatever the input
        norm; like ``encode`` it keeps a LayerNorm SAE's input statistics for ``decode``."""
        self.check_input(x)
        x_n, state = self.normalize_input(x)
        self.last_input_stats = state
        return self.encode_topk(x_n, k)

    def decode(self, z: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Reconstruction x_hat [..., d_in] in the activation space from dense latents z [..., n].

        A LayerNorm SAE needs each token's input mean and std to undo its normalization: ``norm`` =
        ``normalize_input(x)[1]``, or by default those kept by the last ``encode`` / ``encode_sparse``
        (which must have had z's leading shape).
        """
        if z.shape[-1] != self.n_latents:
            raise ShapeMismatchError(f"latents have width {z.shape[-1]} but the SAE has d_sae={self.n_latents}")
        lead = z.shape[:-1]
        x_hat = torch.addmm(self.b_dec, z.reshape(-1, self.n_latents).to(self.W_dec.dtype), self.W_dec)
        x_hat = x_hat.reshape(*lead, self.d_in)
        if self.cfg.input_norm == "none":
            return x_hat
        state = norm if norm is not None else self.last_input_stats
        if state is None:
            raise ConfigError("decode of a LayerNorm SAE needs the input's mean and std: call encode(x) first "
                              "or pass norm=sae.normalize_input(x)[1]")
        if state[0].shape[:-1] != lead:
            raise ShapeMismatchError(f"latents have leading shape {tuple(lead)} but the input statistics are for "
                                     f"{tuple(state[0].shape[:-1])}; pass norm=sae.normalize_input(x)[1] for this x")
        return self.denormalize_output(x_hat, state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction x_hat of raw activations x, in the same space as x."""
        self.check_input(x)
        x_n, state = self.normalize_input(x)
        vals, idx, _ = self.encode_topk(x_n)
        return self.denormalize_output(self.decode_topk(vals, idx), state)

    def forward_with_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_hat, vals_BK, idx_BK) for raw activations x."""
        self.check_input(x)
        x_n, state = self.normalize_input(x)
        vals, idx, _ = self.encode_topk(x_n)
        return self.denormalize_output(self.decode_topk(vals, idx), state), vals, idx

    def forward_normalized(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(x_hat, vals_BK, idx_BK, x_n, x_hat_n): ``forward_with_latents`` plus the SAE's own input
        space: x after the input normalization and the reconstruction before it is undone (the
        paper's nMSE is measured there). Without input normalization x_n is x and x_hat_n is x_hat."""
        self.check_input(x)
        x_n, state = self.normalize_input(x)
        vals, idx, _ = self.encode_topk(x_n)
        x_hat_n = self.decode_topk(vals, idx)
        return self.denormalize_output(x_hat_n, state), vals, idx, x_n, x_hat_n

    def check_finite(self) -> None:
        for name, p in self.named_parameters():
            if not all_finite(p):
                raise NonFiniteError(f"SAE parameter {name} contains NaN or inf")

    def __repr__(self) -> str:
        c = self.cfg
        return f"TopKSAE(d_in={c.d_in}, n_latents={c.n_latents}, k={c.k}, input_norm={c.input_norm!r}, hook={c.hook_name!r})"
