"""Crosscoder (Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model
Diffing", Anthropic): one dictionary read from and written to S aligned sources — layers of
one model, or a base and a chat model, at the same tokens (`data.sources`).

    x = [x_1; …; x_S]                       the sources concatenated, d_in = S · d
    f = σ(Σ_s W_enc[:, s] (x_s − b_dec,s) + b_enc)     the encoder sums over sources
    x̂_s = Σ_i f_i W_dec[i, s] + b_dec,s                W_dec viewed as (n_latents, S, d)
    relu:  L = Σ_s ‖x_s − x̂_s‖² + λ Σ_i f_i Σ_s ‖W_dec[i, s]‖
    topk:  σ = ReLU(TopK_k(·)) with AuxK, as the TopK SAE

Summing the per-source encoders is one matmul over the concatenation, so the crosscoder is the
shared SAE on x with d_in = S·d; what differs is the sparsity penalty, weighted by the *sum* of
per-source decoder norms (an L1 over sources, which favours latents that write to one source
only), and the analysis: `relative_norms` (‖W_dec[i, B]‖ / (‖W_dec[i, A]‖ + ‖W_dec[i, B]‖)
for S = 2) says whether a latent is shared (≈ 0.5) or specific to one source (≈ 0 or 1).
Each decoder row is kept at unit norm over all sources (not per source), so the split between
sources is learnt. With S = 1 it is exactly the TopK or ReLU SAE (tests/test_crosscoder.py).
Not built: per-source input scaling (one scale for the concatenation, E‖x‖² = d_in).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from raysae.saes.base import SparseAutoencoder
from raysae.saes.sparse import SparseLatents, sparse_decode, topk_encode
from raysae.saes.topk import auxk_losses


class CrosscoderSAE(SparseAutoencoder):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.sparsity_loss = "l1" if cfg.crosscoder_sparsity == "relu" else None

    def source_norms(self) -> Tensor:
        """(n_latents, S) ‖W_dec[i, s]‖: how much latent i writes to each source."""
        n, S = self.cfg.n_latents, self.cfg.n_sources
        return self.W_dec.view(n, S, -1).norm(dim=-1)

    def relative_norms(self) -> Tensor:
        """(n_latents, S) each source's share of a latent's decoder norm (rows sum to 1)."""
        norms = self.source_norms().detach()
        return norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)

    def _encode_scaled(self, x_s: Tensor) -> Tensor:
        if self.cfg.crosscoder_sparsity == "relu":
            return F.relu(self._pre(x_s))
        values, indices, _ = topk_encode(x_s, self.W_enc, self.b_enc, self.cfg.k, self.b_dec)
        return values.new_zeros(x_s.shape[0], self.cfg.n_latents).scatter_(1, indices, values)

    def _forward_scaled(self, x_s, dead_mask):
        if self.cfg.crosscoder_sparsity == "relu":
            latents = F.relu(self._pre(x_s))
            l1 = (latents * self.source_norms().sum(-1)).sum(-1).mean()
            return self._decode_scaled(latents), latents, {"l1": l1}
        values, indices, pre = topk_encode(x_s, self.W_enc, self.b_enc, self.cfg.k, self.b_dec)
        x_hat_s = sparse_decode(indices, values, self.W_dec) + self.b_dec
        latents = SparseLatents.from_topk(indices, values, self.cfg.n_latents)
        return x_hat_s, latents, auxk_losses(self, pre, dead_mask, x_s, x_hat_s)

    def loss_coefficients(self) -> dict[str, float]:
        if self.cfg.crosscoder_sparsity == "relu":
            return {"reconstruction": 1.0, "l1": self.cfg.l1_coefficient}
        return {"reconstruction": 1.0, "auxk": self.cfg.aux_coefficient}
