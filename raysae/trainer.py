"""The SAE training step and a single-process training loop.

`train_step(model, optimizer, batch, state, cfg)` is the whole of one optimisation step; the Ray
Train workers (raysae.train) run the same function, with DDP, on their shard of the stream.
Budgets and schedules are in tokens, so runs with different batch sizes or worker counts compare.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor

from raysae.config import TrainConfig
from raysae.metrics import ReconstructionStats, SparsityStats, scalars
from raysae.saes import SAEOutput, SparseAutoencoder


class BadBatchError(ValueError):
    """A training batch has the wrong shape or non-finite values."""


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
    whole update in one pass per tensor (bench/step.py: ~7 % of a CPU step at d=768, n=16384);
    the same Adam, equal to the unfused one up to float rounding."""
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.Adam(
        params, lr=cfg.effective_lr(model.cfg.n_latents), betas=cfg.adam_betas, fused=fused
    )


def check_batch(batch: Tensor, d_in: int, where: str) -> None:
    """Raise BadBatchError naming `where` if the batch is not (B, d_in) and finite."""
    if batch.ndim != 2 or batch.shape[1] != d_in:
        raise BadBatchError(
            f"{where}: batch has shape {tuple(batch.shape)}, expected (B, {d_in}); "
            "the data's activation width does not match sae.d_in"
        )
    finite = torch.isfinite(batch)
    if not bool(finite.all()):
        bad_rows = (~finite).any(-1).nonzero().flatten()
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

    # Latents are never negative (every architecture ends in a ReLU or a threshold), so "fired
    # in this batch" is a column max > 0: one pass over (B, n), no boolean copy of it.
    fired = sync_fired(out.latents.amax(0) > 0).cpu()
    state.tokens_since_fired = torch.where(fired, 0, state.tokens_since_fired + n_tokens)
    state.tokens += n_tokens
    state.step += 1
    return out


def take_init_sample(batches: Iterator[Tensor], n_tokens: int) -> tuple[Tensor, list[Tensor]]:
    """Pull at least n_tokens rows from the stream; returns the sample and the batches consumed
    (so they are trained on, not wasted)."""
    taken, count = [], 0
    for batch in batches:
        taken.append(batch)
        count += batch.shape[0]
        if count >= n_tokens:
            break
    if not taken:
        raise ValueError("the data stream is empty: no batches to initialise or train on")
    return torch.cat(taken)[:n_tokens], taken


def fit(
    model: SparseAutoencoder,
    batches: Iterable[Tensor],
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Train `model` on `batches` until cfg.total_tokens; returns the logged metric records.

    Each record holds tokens, step, lr, the last step's loss terms, the reconstruction and
    sparsity metrics (raysae.metrics) of the batches since the previous record, and the fraction
    of latents dead over the last cfg.dead_tokens tokens of the run.
    """
    torch.manual_seed(cfg.seed)
    d_in, n_latents = model.cfg.d_in, model.cfg.n_latents
    stream = iter(batches)
    sample, consumed = take_init_sample(stream, cfg.init_tokens)
    check_batch(sample, d_in, "initialisation sample")
    model.init_from_sample_(sample)
    reference_mean = sample.double().mean(0)

    optimizer = make_optimizer(model, cfg)
    state = TrainState.fresh(n_latents)
    history: list[dict] = []
    recon = ReconstructionStats(d_in, reference_mean)
    sparsity = SparsityStats(n_latents, cfg.dead_tokens)
    next_log, t0, last_t, last_tokens = cfg.log_every_tokens, time.perf_counter(), 0.0, 0
    model.train()
    for batch in _chain(consumed, stream):
        if state.tokens >= cfg.total_tokens:
            break
        batch = batch[: cfg.total_tokens - state.tokens].to(model.W_enc.dtype)
        check_batch(batch, d_in, f"batch at token {state.tokens}")
        out = train_step(model, optimizer, batch, state, cfg)
        recon.update(batch, out.x_hat)
        sparsity.update(out.latents, start=state.tokens - batch.shape[0])  # stream positions

        done = state.tokens >= cfg.total_tokens
        if state.tokens >= next_log or done:
            now = time.perf_counter() - t0
            record = {
                "tokens": state.tokens,
                "step": state.step,
                "lr": optimizer.param_groups[0]["lr"],
                **{f"loss/{k}": float(v.detach()) for k, v in out.losses.items()},
                **recon.compute(),
                **scalars(sparsity.compute()),
                "tokens_per_s": (state.tokens - last_tokens) / max(now - last_t, 1e-9),
                "elapsed_s": now,
            }
            history.append(record)
            log(format_record(record, cfg.total_tokens))
            # A new interval; dead latents are still judged over the whole dead_tokens window.
            recon.reset(), sparsity.reset_counts()
            next_log += cfg.log_every_tokens
            last_t, last_tokens = now, state.tokens
    if state.tokens < cfg.total_tokens:
        log(f"data ran out after {state.tokens:,} of {cfg.total_tokens:,} tokens")
    return history


def _chain(first: list[Tensor], rest: Iterator[Tensor]) -> Iterator[Tensor]:
    yield from first
    yield from rest


def format_record(r: dict, total_tokens: int) -> str:
    """One console line for a metrics record."""
    return (
        f"tokens {r['tokens']:>12,}/{total_tokens:,} | fvu {r['fvu']:.4f} | l0 {r['l0']:7.2f} "
        f"| dead {r['dead_fraction']:.3f} | loss {r.get('loss/reconstruction', 0):.4g} "
        f"| {r['tokens_per_s']:,.0f} tok/s"
    )
