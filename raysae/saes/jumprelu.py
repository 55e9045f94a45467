"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity
with JumpReLU Sparse Autoencoders").

    z = W_enc (x_s − b_dec) + b_enc
    f = z · H(z − θ)            θ = exp(log_threshold) > 0, one per latent
    L = ‖x_s − x̂_s‖² + λ Σ_i H(z_i − θ_i)     (an L0 penalty)

H has zero gradient almost everywhere, so θ learns through straight-through estimators with a
rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth ε (paper, eqs. 11–12):
    ∂f/∂θ = −(θ/ε) K((z − θ)/ε),   ∂H(z − θ)/∂θ = −(1/ε) K((z − θ)/ε)
The threshold is applied exactly once (dictionary_learning #55 applied it twice).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from raysae.saes.base import SparseAutoencoder


def _rectangle(u: Tensor) -> Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        grad_z = g * (z > theta)
        grad_theta = (-(theta / ctx.eps) * _rectangle((z - theta) / ctx.eps) * g).sum(0)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        grad_theta = (-(1.0 / ctx.eps) * _rectangle((z - theta) / ctx.eps) * g).sum(0)
        return None, grad_theta, None


class JumpReLUSAE(SparseAutoencoder):
    sparsity_loss = "l0"
    # bfloat16 resolves pre-activations near 1 to ~0.008, coarser than the default bandwidth ε
    # (1e-3): the threshold's straight-through gradient would be noise.
    auto_autocast = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(
            torch.full((cfg.n_latents,), math.log(cfg.jumprelu_init_threshold))
        )

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def _encode_scaled(self, x_s: Tensor) -> Tensor:
        z = self._pre(x_s)
        return z * (z > self.threshold)

    def _forward_scaled(self, x_s, dead_mask):
        z = self._pre(x_s)
        theta = self.threshold
        latents = _JumpReLU.apply(z, theta, self.cfg.jumprelu_bandwidth)
        l0 = _Step.apply(z, theta, self.cfg.jumprelu_bandwidth).sum(-1).mean()
        return self._decode_scaled(latents), latents, {"l0": l0}

    def loss_coefficients(self) -> dict[str, float]:
        return {"reconstruction": 1.0, "l0": self.cfg.l0_coefficient}

    def _fold_scale_extra_(self, s: Tensor) -> None:
        self.log_threshold -= torch.log(s)
