"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders").

Training: keep the k·B largest ReLU'd pre-activations across the whole batch of B tokens, so
tokens that need more latents get them, on average k per token. Inference cannot depend on the
rest of the batch, so it uses a global threshold θ, the EMA of the smallest activation kept in
each training batch:  f = z · 1[z > θ]  (a JumpReLU with one shared threshold).
AuxK for dead latents is shared with the TopK SAE.
"""

from __future__ import annotations

import torch
from torch import Tensor

from raysae.saes.base import SparseAutoencoder
from raysae.saes.sparse import SparseLatents, ragged_decode
from raysae.saes.topk import auxk_losses


class BatchTopKSAE(SparseAutoencoder):
    def __init__(self, cfg):
        super().__init__(cfg)
        # 0 means "not yet estimated": the first training batch sets it directly.
        self.register_buffer("threshold", torch.tensor(0.0))

    def _encode_scaled(self, x_s: Tensor) -> Tensor:
        z = self._pre(x_s)
        return z * (z > self.threshold.clamp_min(0.0))

    def _forward_scaled(self, x_s, dead_mask):
        pre = self._pre(x_s)
        latents = self._select(pre)
        rows, cols, values = latents.rows, latents.cols, latents.values
        x_hat_s = ragged_decode(rows, cols, values, self.W_dec, pre.shape[0]) + self.b_dec
        return x_hat_s, latents.detached(), auxk_losses(self, pre, dead_mask, x_s, x_hat_s)

    def _select(self, pre: Tensor) -> SparseLatents:
        """The kept latents of pre-activations (B, n), rows ascending, values differentiable:
        the batch's top k·B in training, those over the threshold at inference."""
        B, n = pre.shape
        if self.training:
            values, flat = pre.relu().flatten().topk(min(self.cfg.k * B, B * n), sorted=False)
            keep = values > 0
            values, flat = values[keep], flat[keep]
            self._update_threshold_(values)
        else:
            nz = (pre > self.threshold.clamp_min(0.0)).flatten().nonzero().squeeze(1)
            flat, values = nz, pre.flatten()[nz]
        order = flat.argsort()  # ragged_decode wants rows ascending
        flat, values = flat[order], values[order]
        return SparseLatents(flat // n, flat % n, values, B, n)

    @torch.no_grad()
    def _update_threshold_(self, kept: Tensor) -> None:
        if kept.numel() == 0:
            return
        smallest = kept.min().to(self.threshold.dtype)  # bfloat16 under autocast
        if self.threshold <= 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.lerp_(smallest, 1.0 - self.cfg.threshold_decay)

    def loss_coefficients(self) -> dict[str, float]:
        return {"reconstruction": 1.0, "auxk": self.cfg.aux_coefficient}

    def _fold_scale_extra_(self, s: Tensor) -> None:
        self.threshold /= s
