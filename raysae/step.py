"""The SAE training step: `train_step(model, optimizer, batch, state, cfg)` is the whole of one
optimisation step, the same in one process and in every DDP worker (raysae.loop calls it).

Budgets and schedules are in tokens, so runs with different batch sizes or worker counts compare.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from raysae.config import TrainConfig
from raysae.saes import SAEOutput, SparseAutoencoder


class BadBatchError(ValueError):
    """A training batch has the wrong shape or non-finite values: bad input, which stops a run
    rather than being retried (raysae.loop.STOPS_RUN)."""


@dataclass
class TrainState:
    """Counters that, with the model and optimizer, fully determine where training is."""

    tokens: int = 0
    """Tokens trained on so far (all workers)."""
    step: int = 0
    """Optimizer steps taken."""
    tokens_since_fired: Optional[Tensor] = None
    """(n_latents,) int64: tokens since each latent last fired (batch granularity)."""

    @classmethod
    def fresh(cls, n_latents: int) -> "TrainState":
        return cls(tokens_since_fired=torch.zeros(n_latents, dtype=torch.int64))


def learning_rate(cfg: TrainConfig, base_lr: float, tokens: int) -> float:
    """Linear warm-up over warmup_tokens, constant, then linear decay to 0 over the last
    decay_fraction of the budget."""
    lr = base_lr
    if cfg.warmup_tokens and tokens < cfg.warmup_tokens:
        lr *= tokens / cfg.warmup_tokens
    decay_start = cfg.total_tokens * (1.0 - cfg.decay_fraction)
    if cfg.decay_fraction and tokens > decay_start:
        lr *= max(0.0, (cfg.total_tokens - tokens) / (cfg.total_tokens - decay_start))
    return lr


def sparsity_scale(cfg: TrainConfig, tokens: int) -> float:
    """Multiplier of the L1/L0 coefficient: linear warm-up from 0 (Conerly et al. 2024)."""
    if not cfg.sparsity_warmup_tokens:
        return 1.0
    return min(1.0, tokens / cfg.sparsity_warmup_tokens)


def make_optimizer(model: SparseAutoencoder, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam over the model's parameters (already on their device). The fused kernel does the
    whole update in one pass per tensor (BENCHMARKS.md, "SAE training step");
    the same Adam, equal to the unfused one up to float rounding."""
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.Adam(
        params, lr=cfg.effective_lr(model.cfg.n_latents), betas=cfg.adam_betas, fused=fused
    )


def autocast(
    cfg: TrainConfig, device: torch.device, sae: SparseAutoencoder
) -> contextlib.AbstractContextManager:
    """The training forward's mixed precision (`train.autocast`): torch.autocast in bfloat16,
    which runs the encoder and AuxK matmuls in bfloat16 while the parameters, their gradients
    and Adam stay float32; the sparse decode (embedding_bag over float32 W_dec) and the losses
    stay float32 (raysae.saes.sparse casts back). A no-op context when off, and under `auto`
    for an architecture that opts out (`SparseAutoencoder.auto_autocast`)."""
    dtype = cfg.autocast_dtype(device.type)
    if dtype is None or (cfg.autocast == "auto" and not sae.auto_autocast):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def check_batch(batch: Tensor, d_in: int, where: str) -> None:
    """Raise BadBatchError naming `where` if the batch is not (B, d_in) and finite."""
    if batch.ndim != 2 or batch.shape[1] != d_in:
        raise BadBatchError(
            f"{where}: batch has shape {tuple(batch.shape)}, expected (B, {d_in}); "
            "the data's activation width does not match sae.d_in"
        )
    # Finite extremes mean finite values (NaN propagates through min/max): one pass, no
    # (B, d_in) bool temporary. The data plane already checked rows read from a dataset
    # (raysae.data.check_finite, naming the part); this guards every other stream.
    if batch.numel() and not all(bool(torch.isfinite(v)) for v in torch.aminmax(batch)):
        bad_rows = (~torch.isfinite(batch)).any(-1).nonzero().flatten()
        raise BadBatchError(
            f"{where}: {len(bad_rows)} row(s) contain NaN/Inf (first: row "
            f"{int(bad_rows[0])}); the activations are corrupt or overflowed "
            "their dtype — re-harvest in float32/bfloat16"
        )


def train_step(
    model: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    batch: Tensor,
    state: TrainState,
    cfg: TrainConfig,
    n_tokens: Optional[int] = None,
    sync_fired: Callable[[Tensor], Tensor] = lambda fired: fired,
) -> SAEOutput:
    """One optimizer step on `batch` (B, d_in); updates `state` in place.

    n_tokens: tokens this step covers across all workers (default B). sync_fired: combines the
    per-latent "fired in this batch" flags across workers (an all-reduce MAX in DDP).
    """
    n_tokens = batch.shape[0] if n_tokens is None else n_tokens
    sae = getattr(model, "module", model)  # unwrap DDP for the SAE-specific methods
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(cfg, cfg.effective_lr(sae.cfg.n_latents), state.tokens)

    dead_mask = state.tokens_since_fired >= cfg.dead_tokens
    with autocast(cfg, batch.device, sae):
        out = model(batch, dead_mask=dead_mask.to(batch.device))
        loss = sae.total_loss(out.losses, sparsity_scale(cfg, state.tokens))

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_decoder_grad_()
    if cfg.grad_clip:
        params = [p for p in sae.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # Rescale only when over the limit: a pass over every gradient saved on most steps. The
        # comparison waits for the device, as the fired flags below do on every step anyway.
        if norm > cfg.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm)
    optimizer.step()
    sae.normalize_decoder_()

    # From the sparse form for the TopK family (no (B, n) tensor), else a column max > 0.
    fired = sync_fired(out.fired()).cpu()
    state.tokens_since_fired = torch.where(fired, 0, state.tokens_since_fired + n_tokens)
    state.tokens += n_tokens
    state.step += 1
    return out
