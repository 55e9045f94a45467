"""Evaluate a trained SAE on held-out activations with the mergeable metric accumulators."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from raysae.metrics import ReconstructionStats, SparsityStats
from raysae.saes import SparseAutoencoder


@torch.no_grad()
def evaluate(model: SparseAutoencoder, batches: Iterable[Tensor], n_tokens: int,
             reference_mean: Optional[Tensor] = None, dead_window: Optional[int] = None) -> dict:
    """Reconstruction and sparsity metrics of `model` (in inference mode) on up to n_tokens rows.

    dead_window defaults to n_tokens: a latent is dead if it never fired during the evaluation.
    """
    was_training = model.training
    model.eval()
    recon = ReconstructionStats(model.cfg.d_in, reference_mean)
    sparsity = SparsityStats(model.cfg.n_latents, dead_window or n_tokens)
    seen = 0
    try:
        for batch in batches:
            batch = batch[: n_tokens - seen].to(model.W_enc.dtype)
            out = model(batch)
            recon.update(batch, out.x_hat)
            sparsity.update(out.latents)
            seen += batch.shape[0]
            if seen >= n_tokens:
                break
    finally:
        model.train(was_training)
    return {**recon.compute(), **sparsity.compute()}
