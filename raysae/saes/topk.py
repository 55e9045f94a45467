"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and evaluating SAEs").

    f = ReLU(TopK_k(W_enc (x_s − b_dec) + b_enc))       at most k nonzeros per token
    x̂_s = Σ_{i ∈ active} f_i W_dec[i] + b_dec           sparse gather, never a dense matmul

AuxK: the residual e = x_s − x̂_s (detached) is reconstructed from the top k_aux *dead*
latents, without b_dec (the residual already has b_dec removed; sparsify #132 and SAELens
added it), and the loss is normalised by the residual's variance about its batch mean:
    L_aux = ‖e − ê‖² / ‖e − mean(e)‖²
It gives dead latents a gradient that points them at what the live ones miss.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from raysae.saes.base import SparseAutoencoder
from raysae.saes.sparse import SparseLatents, sparse_decode, topk_encode


def auxk_losses(
    sae: SparseAutoencoder, pre: Tensor, dead_mask: Optional[Tensor], x_s: Tensor, x_hat_s: Tensor
) -> dict[str, Tensor]:
    """{"auxk": L_aux} for pre-activations (B, n) and dead mask (n,), or {} with no dead latent."""
    aux = auxk_loss(pre, dead_mask, (x_s - x_hat_s).detach(), sae.W_dec, sae.cfg.effective_k_aux)
    return {} if aux is None else {"auxk": aux}


def auxk_loss(
    pre: Tensor, dead_mask: Optional[Tensor], residual: Tensor, W_dec: Tensor, k_aux: int
) -> Optional[Tensor]:
    """AuxK loss from pre-activations (B, n), dead mask (n,), detached residual (B, d); None if no dead."""
    if dead_mask is None:
        return None
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return None
    k = min(k_aux, n_dead)
    values, indices = pre.masked_fill(~dead_mask, float("-inf")).topk(k, dim=-1, sorted=False)
    e_hat = sparse_decode(indices, values.relu(), W_dec)  # no b_dec: see module docstring
    baseline = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    return (e_hat - residual).pow(2).sum(-1).mean() / baseline


class TopKSAE(SparseAutoencoder):
    def _encode_scaled(self, x_s: Tensor) -> Tensor:
        values, indices, _ = topk_encode(x_s, self.W_enc, self.b_enc, self.cfg.k, self.b_dec)
        return torch.zeros(
            x_s.shape[0], self.cfg.n_latents, dtype=values.dtype, device=values.device
        ).scatter_(1, indices, values)

    def _forward_scaled(self, x_s, dead_mask):
        values, indices, pre = topk_encode(x_s, self.W_enc, self.b_enc, self.cfg.k, self.b_dec)
        x_hat_s = sparse_decode(indices, values, self.W_dec) + self.b_dec
        latents = SparseLatents.from_topk(indices, values, self.cfg.n_latents)
        return x_hat_s, latents, auxk_losses(self, pre, dead_mask, x_s, x_hat_s)

    def loss_coefficients(self) -> dict[str, float]:
        return {"reconstruction": 1.0, "auxk": self.cfg.aux_coefficient}
