"""The shared base of every SAE architecture.

    x_s  = s · x                                  input scaled so E‖x_s‖² = d_in (s = input_scale)
    f    = encode(x_s)                            latents, (B, n_latents), architecture-specific
    x̂_s = f W_dec + b_dec                        decoder rows W_dec[i] are unit-norm directions
    x̂   = x̂_s / s

Losses are computed in the scaled space, so coefficients transfer between models whose
activations have different norms (Anthropic, "Training SAEs", April 2024 update). Exporting
folds s into the biases and thresholds (`fold_input_scale_`): the folded model takes raw
activations with s = 1 and gives the same reconstruction; its latents are the unfolded ones / s.

Shapes: W_enc (n_latents, d_in), b_enc (n_latents,), W_dec (n_latents, d_in), b_dec (d_in,).
W_dec is stored latent-major so a token's active rows can be gathered (see sparse.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysae.config import SAEConfig
from raysae.saes.sparse import SparseLatents

_DOT_BLOCK_ELEMENTS = 1 << 18
"""Elements (1 MiB of float32) per row block of `remove_parallel_decoder_grad_` on the CPU."""


class SAEOutput:
    """What `forward` returns: x_hat, latents and losses, and the latents' sparse form if any.

    The TopK family hands its active latents over as `sparse` (a SparseLatents) and `latents`
    is built from them on first access, so the training step, which reads only the fired flags
    and the sparsity metrics (from `codes`), never builds the (B, n_latents) tensor.
    """

    __slots__ = ("x_hat", "losses", "sparse", "_latents")

    x_hat: Tensor
    """(B, d_in) reconstruction, in the units of the input."""
    losses: dict[str, Tensor]
    """Unweighted scalar loss terms by metric name; `reconstruction` = mean_b ‖x_s − x̂_s‖²."""
    sparse: Optional[SparseLatents]
    """The active latents as coordinate lists (TopK family), or None."""

    def __init__(
        self,
        x_hat: Tensor,
        latents: Optional[Tensor],
        losses: dict[str, Tensor],
        sparse: Optional[SparseLatents] = None,
    ):
        if latents is None and sparse is None:
            raise ValueError("SAEOutput needs dense latents or their sparse form")
        self.x_hat, self.losses, self.sparse, self._latents = x_hat, losses, sparse, latents

    @property
    def latents(self) -> Tensor:
        """(B, n_latents) latent activations (units of the scaled input unless folded)."""
        if self._latents is None:
            self._latents = self.sparse.dense()
        return self._latents

    @property
    def codes(self) -> Union[Tensor, SparseLatents]:
        """The latents in their cheapest form: `sparse` if there is one, else `latents`; what
        `SparsityStats.update` takes."""
        return self.latents if self.sparse is None else self.sparse

    def fired(self) -> Tensor:
        """(n_latents,) bool: latents with an activation > 0 on some token of the batch."""
        if self.sparse is not None:
            return self.sparse.fired()
        # Latents are never negative (every architecture ends in a ReLU or a threshold), so
        # "fired" is a column max > 0: one pass over (B, n), no boolean copy of it.
        return self.latents.amax(0) > 0


class SparseAutoencoder(nn.Module):
    """Base class: parameters, scaling, decoder constraints, initialisation, loss weighting.

    Subclasses implement `_forward_scaled` (and `_encode_scaled`) on scaled inputs and name their
    loss terms in `loss_coefficients`; `sparsity_loss` names the term that is warmed up.
    """

    sparsity_loss: Optional[str] = None
    auto_autocast: bool = True
    """Whether `train.autocast: auto` may run this architecture's forward in bfloat16 (on CUDA);
    False where bfloat16 pre-activations (8 significant bits) break its training."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.n_latents, cfg.d_in
        W_dec = torch.randn(n, d)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # Encoder initialised to the decoder's transpose (Gao et al. 2024; Conerly et al. 2024).
        self.W_enc = nn.Parameter(W_dec.clone())
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("input_scale", torch.tensor(1.0))

    # -- architecture-specific -------------------------------------------------------------

    def _encode_scaled(self, x_s: Tensor) -> Tensor:
        """(B, d_in) scaled input → (B, n_latents) latents, inference behaviour."""
        raise NotImplementedError

    def _forward_scaled(
        self, x_s: Tensor, dead_mask: Optional[Tensor]
    ) -> tuple[Tensor, Union[Tensor, SparseLatents], dict]:
        """(B, d_in) scaled input → (x̂_s, latents, extra losses); latents dense (B, n_latents)
        or, for the TopK family, a SparseLatents. Default: encode then dense decode."""
        latents = self._encode_scaled(x_s)
        return self._decode_scaled(latents), latents, {}

    def loss_coefficients(self) -> dict[str, float]:
        """Weight of each loss term in the total loss."""
        return {"reconstruction": 1.0}

    def _fold_scale_extra_(self, s: Tensor) -> None:
        """Divide architecture-specific latent-space biases and thresholds by s."""

    # -- shared ----------------------------------------------------------------------------

    def _decode_scaled(self, latents: Tensor) -> Tensor:
        return latents @ self.W_dec + self.b_dec

    def _pre(self, x_s: Tensor) -> Tensor:
        """Encoder pre-activations W_enc (x_s − b_dec) + b_enc, (B, n_latents)."""
        return F.linear(x_s - self.b_dec, self.W_enc, self.b_enc)

    def encode(self, x: Tensor) -> Tensor:
        """(B, d_in) activations → (B, n_latents) latents."""
        return self._encode_scaled(self._check_input(x) * self.input_scale)

    def decode(self, latents: Tensor) -> Tensor:
        """(B, n_latents) latents → (B, d_in) reconstruction in input units."""
        return self._decode_scaled(latents) / self.input_scale

    def forward(self, x: Tensor, dead_mask: Optional[Tensor] = None) -> SAEOutput:
        """x: (B, d_in) activations; dead_mask: (n_latents,) bool, latents dead for AuxK."""
        x_s = self._check_input(x) * self.input_scale
        x_hat_s, latents, losses = self._forward_scaled(x_s, dead_mask)
        losses = {"reconstruction": (x_hat_s - x_s).pow(2).sum(-1).mean(), **losses}
        if isinstance(latents, SparseLatents):
            return SAEOutput(x_hat_s / self.input_scale, None, losses, sparse=latents)
        return SAEOutput(x_hat_s / self.input_scale, latents, losses)

    def total_loss(self, losses: dict[str, Tensor], sparsity_scale: float = 1.0) -> Tensor:
        """Σ coefficient · term; the sparsity term's coefficient is multiplied by sparsity_scale."""
        total = 0.0
        for name, coef in self.loss_coefficients().items():
            if name in losses:
                scale = sparsity_scale if name == self.sparsity_loss else 1.0
                total = total + coef * scale * losses[name]
        return total

    def _check_input(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"SAE input has shape {tuple(x.shape)}, expected (batch, d_in={self.cfg.d_in}); "
                "check that the data's activation width matches sae.d_in"
            )
        return x.to(self.W_enc.dtype)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale each decoder row W_dec[i] to unit norm (call after every optimizer step)."""
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Project out the gradient component parallel to each unit decoder row.

        The step then moves rows along the unit sphere (to first order), so the renormalisation
        after it does not fight the optimizer (Bricken et al. 2023).
        """
        if self.W_dec.grad is None:
            return
        g, w = self.W_dec.grad, self.W_dec
        # In place and never an (n, d) temporary (1.2 GB at n=131072, d=2304; BENCHMARKS.md,
        # "Large dictionaries"). On a GPU the row dot products are one batched (1, d) @ (d, 1);
        # on the CPU that GEMV ran 3.5-4.6x slower than products and sums over row blocks of
        # about a megabyte, each done while the block is in cache (3.2 -> 0.8 ms at n=4608,
        # d=576; 21 -> 4.5 ms at n=16384, d=768; 517 -> 148 ms at n=131072, d=2304; 2 threads).
        if g.device.type != "cpu":
            g.addcmul_(torch.bmm(g.unsqueeze(1), w.unsqueeze(2)).squeeze(-1), w, value=-1.0)
            return
        rows = max(1, _DOT_BLOCK_ELEMENTS // g.shape[1])
        for start in range(0, g.shape[0], rows):
            g_rows, w_rows = g[start : start + rows], w[start : start + rows]
            g_rows.addcmul_((g_rows * w_rows).sum(-1, keepdim=True), w_rows, value=-1.0)

    @torch.no_grad()
    def init_from_sample_(self, x: Tensor) -> None:
        """Set the input scale and b_dec from a (N, d_in) sample of training activations."""
        scale, b_dec = initial_values(self._check_input(x), self.cfg)
        self.input_scale.fill_(scale)
        self.b_dec.copy_(b_dec)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[SparseAutoencoder]:
        """The SAE in inference mode (`eval()`) inside the block; its mode restored after."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    @torch.no_grad()
    def fold_input_scale_(self) -> None:
        """Fold the input scale into biases and thresholds; afterwards input_scale = 1.

        For every architecture the pre-activations are affine in (s·x, b_dec, b_enc), so dividing
        b_dec, b_enc and any latent-space threshold by s divides the latents by s and leaves the
        (unit-norm) weights unchanged; the reconstruction in input units is the same.
        """
        s = self.input_scale.clone()
        self.b_dec /= s
        self.b_enc /= s
        self._fold_scale_extra_(s)
        self.input_scale.fill_(1.0)


@torch.no_grad()
def initial_values(x: Tensor, cfg: SAEConfig) -> tuple[float, Tensor]:
    """(input scale, b_dec) of an SAE with config `cfg` for a (N, d_in) sample `x` of its
    training activations. A function of the sample and the config alone, so a driver computes
    it without building the SAE (gigabytes at n_latents=131072, d_in=2304).

    The scale makes E‖s·x‖² = d_in (1 when `cfg.normalize_inputs` is off); b_dec is the
    geometric median or the mean of the scaled sample, or zero (`cfg.b_dec_init`). The scale
    is rounded to float32, the dtype of the buffer holding it, before b_dec is computed.
    """
    if x.ndim != 2 or x.shape[-1] != cfg.d_in:
        raise ValueError(
            f"initialisation sample has shape {tuple(x.shape)}, expected (N, {cfg.d_in})"
        )
    x = x.float().double()
    scale = 1.0
    if cfg.normalize_inputs:
        mean_sq_norm = x.pow(2).sum(-1).mean()
        if not mean_sq_norm > 0:  # the scale would be inf and every parameter NaN
            raise ValueError(
                f"the initialisation sample ({x.shape[0]} tokens) is all zeros, "
                "so inputs cannot be scaled to E‖x‖² = d_in; check the "
                "activations, or set sae.normalize_inputs: false"
            )
        scale = float(torch.tensor(float((cfg.d_in / mean_sq_norm).sqrt()), dtype=torch.float32))
    x_s = x * scale
    if cfg.b_dec_init == "geometric_median":
        return scale, geometric_median(x_s)
    if cfg.b_dec_init == "mean":
        return scale, x_s.mean(0)
    return scale, torch.zeros(cfg.d_in, dtype=torch.float64)


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-7) -> Tensor:
    """The point minimising Σ‖x_i − m‖ (Weiszfeld's algorithm). x: (N, d) → (d,)."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=-1).clamp_min(1e-8)
        m_new = (w[:, None] * x).sum(0) / w.sum()
        if (m_new - m).norm() <= tol * m.norm().clamp_min(1.0):
            return m_new
        m = m_new
    return m
