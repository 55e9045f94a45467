"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning
Multi-Level Features with Matryoshka Sparse Autoencoders"; Nabeshima 2024).

The dictionary is cut into nested groups (`sae.matryoshka_groups`); prefix j is the latents of
groups 0..j. Every prefix must reconstruct the input on its own, from the same latents:

    x̂_j = b_dec + Σ_{i < end_j, i kept} f_i W_dec[i]          (kept: BatchTopK's k·B selection)
    L   = Σ_j w_j ‖x_s − x̂_j‖²                                 (w_j: `sae.matryoshka_weights`)

so the first latents must carry the coarse, frequent features (a parent), and later ones can
only refine them (its children) rather than absorb them: a child latent cannot take over its
parent's direction, because the prefixes without the child would then lose the parent. The
selection and the inference threshold are BatchTopK's; the last prefix is the whole SAE.

The loss terms: `reconstruction` (the whole dictionary, weight w_last), `matryoshka`
(Σ_{j < last} w_j ‖x_s − x̂_j‖²) and, for logging, `prefix_<j>` (each inner prefix's ‖x_s − x̂_j‖²).
Each kept latent is decoded once: prefix j's reconstruction is prefix j−1's plus group j's.
"""

from __future__ import annotations

from torch import Tensor

from raysae.saes.batchtopk import BatchTopKSAE
from raysae.saes.sparse import SparseLatents, ragged_decode
from raysae.saes.topk import auxk_losses


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.bounds = cfg.group_bounds
        weights = cfg.matryoshka_weights or (1.0,) * len(self.bounds)
        self.weights = tuple(float(w) for w in weights)

    def prefix_reconstructions(self, x_s: Tensor, latents: SparseLatents) -> list[Tensor]:
        """(B, d_in) reconstruction of each prefix, in the scaled space, from `latents`
        (sorted by row, as `_select` gives them)."""
        rows, cols, values = latents.rows, latents.cols, latents.values
        x_hat, out, start = self.b_dec.expand_as(x_s), [], 0
        for end in self.bounds:
            group = (cols >= start) & (cols < end)  # keeps rows ascending
            x_hat = x_hat + ragged_decode(
                rows[group], cols[group], values[group], self.W_dec, x_s.shape[0]
            )
            out.append(x_hat)
            start = end
        return out

    def _forward_scaled(self, x_s, dead_mask):
        pre = self._pre(x_s)
        latents = self._select(pre)
        *inner, x_hat_s = self.prefix_reconstructions(x_s, latents)
        losses = {f"prefix_{j}": (x - x_s).pow(2).sum(-1).mean() for j, x in enumerate(inner)}
        if inner:
            weighted = (w * losses[f"prefix_{j}"] for j, w in zip(range(len(inner)), self.weights))
            losses["matryoshka"] = sum(weighted)
        losses.update(auxk_losses(self, pre, dead_mask, x_s, x_hat_s))
        return x_hat_s, latents.detached(), losses

    def loss_coefficients(self) -> dict[str, float]:
        return {
            "reconstruction": self.weights[-1],
            "matryoshka": 1.0,
            "auxk": self.cfg.aux_coefficient,
        }
