"""ReLU SAE with an L1 penalty weighted by decoder norms.

    f = ReLU(W_enc (x_s − b_dec) + b_enc)
    L = ‖x_s − x̂_s‖² + λ Σ_i f_i ‖W_dec[i]‖

Weighting the L1 term by ‖W_dec[i]‖ makes the penalty invariant to rescaling a latent's decoder
row against its encoder row (Anthropic, "Training SAEs", April 2024 update). Rows are also kept
at unit norm by the trainer; the weighting keeps the loss honest between renormalisations.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from raysae.saes.base import SparseAutoencoder


class ReLUSAE(SparseAutoencoder):
    sparsity_loss = "l1"

    def _encode_scaled(self, x_s: Tensor) -> Tensor:
        return F.relu(self._pre(x_s))

    def _forward_scaled(self, x_s, dead_mask):
        latents = self._encode_scaled(x_s)
        l1 = (latents * self.W_dec.norm(dim=-1)).sum(-1).mean()
        return self._decode_scaled(latents), latents, {"l1": l1}

    def loss_coefficients(self) -> dict[str, float]:
        return {"reconstruction": 1.0, "l1": self.cfg.l1_coefficient}
