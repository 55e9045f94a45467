"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

A gate decides which latents are on; a magnitude path, sharing the gate's weights up to a
per-latent rescaling exp(r_mag), decides how much:
    π = W_enc (x_s − b_dec) + b_enc                       (b_enc is the gate bias b_gate)
    m = ReLU(exp(r_mag) ⊙ W_enc (x_s − b_dec) + b_mag)
    f = 1[π > 0] ⊙ m
    L = ‖x_s − x̂_s‖² + λ Σ_i ReLU(π)_i ‖W_dec[i]‖ + ‖x_s − (ReLU(π) W_dec' + b_dec')‖²
where W_dec', b_dec' are detached copies: the auxiliary term trains the gate to reconstruct
on its own without pulling the decoder towards the gate's (shrunk) activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysae.saes.base import SparseAutoencoder


class GatedSAE(SparseAutoencoder):
    sparsity_loss = "l1"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.r_mag = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_mag = nn.Parameter(torch.zeros(cfg.n_latents))

    def _paths(self, x_s: Tensor) -> tuple[Tensor, Tensor]:
        h = F.linear(x_s - self.b_dec, self.W_enc)
        pi = h + self.b_enc
        magnitude = F.relu(h * self.r_mag.exp() + self.b_mag)
        return pi, magnitude

    def _encode_scaled(self, x_s: Tensor) -> Tensor:
        pi, magnitude = self._paths(x_s)
        return (pi > 0) * magnitude

    def _forward_scaled(self, x_s, dead_mask):
        pi, magnitude = self._paths(x_s)
        latents = (pi > 0).to(magnitude.dtype) * magnitude
        gate = F.relu(pi)
        l1 = (gate * self.W_dec.norm(dim=-1)).sum(-1).mean()
        x_gate = gate @ self.W_dec.detach() + self.b_dec.detach()
        gated_aux = (x_s - x_gate).pow(2).sum(-1).mean()
        return self._decode_scaled(latents), latents, {"l1": l1, "gated_aux": gated_aux}

    def loss_coefficients(self) -> dict[str, float]:
        return {"reconstruction": 1.0, "l1": self.cfg.l1_coefficient, "gated_aux": 1.0}

    def _fold_scale_extra_(self, s: Tensor) -> None:
        self.b_mag /= s
