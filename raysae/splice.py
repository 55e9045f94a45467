"""The SAE spliced into the LM: CE loss recovered and KL (`raysae eval --splice-tokens N`).

Token windows are built exactly as `raysae harvest` builds them (raysae.text, with the same
TextWindows settings). For each batch of windows the causal LM runs four times:

    clean          the model as it is
    spliced        block L's output x replaced by the SAE's reconstruction x̂
    zero-ablated   block L's output replaced by 0
    mean-ablated   block L's output replaced by μ, its mean over the evaluated tokens

and at every scored position the next-token cross-entropy of each run and the KL divergence of
each run's next-token distribution from the clean one are summed in float64 (`SpliceStats`,
mergeable like raysae.metrics):

    ce_loss_recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean)
                        1: splicing loses nothing; 0: as bad as removing the residual stream
                        (`ce_loss_recovered_mean_ablation`: the same against CE_mean)
    kl_spliced        = mean over scored tokens of Σ_v p_clean(v) · log(p_clean(v) / p_spliced(v))

Where
    "Block L's output" is the residual stream after block L, the activation harvest records
    (`hidden_states[L + 1]`, `blocks.L.hook_resid_post`). A forward hook on the block replaces
    it (raysae.lm.replaced_output, for either form transformers' decoder layers return).

Which positions are replaced: BOS stays clean
    The positions harvest records: every real token except special ones (BOS, EOS, padding)
    when the dataset was harvested with `exclude_special_tokens` (the default). The SAE never
    saw a BOS activation in training — harvest leaves them out because their norm is an outlier
    (the attention sink) — so reconstructing them would measure the SAE off its training
    distribution, and a broken attention sink degrades every later position of the window: one
    token per window would dominate the result. Keeping BOS clean is the common practice. The
    ablations replace the same positions, so the three runs compare like with like.

Which positions are scored
    The predictions made at replaced positions whose next token lies inside the window (a
    window's last token has no target here). `n_tokens` of the config counts tokens as
    harvest's `n_tokens` does (the same windows); `n_tokens` of the result counts the scored
    predictions, which is fewer by about one per window.

Mean ablation
    μ is the mean of block L's output over the replaced positions of the evaluated windows
    (in-sample, like the baselines of raysae.evaluate), from a first pass that stops at block L.

Cost: per batch, four full forward passes and one up to block L, and the four runs' logits at
the scored positions held at once (4 · tokens · vocab float32 values: lower `batch_size` for a
large vocabulary). The evaluated windows are the first of the corpus, as harvest's are: when
the SAE was trained on activations harvested from the same corpus, these tokens are in its
training data.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from raysae.lm import (
    decoder_blocks,
    hook_name,
    load_config,
    load_model,
    load_tokenizer,
    replaced_output,
    resolve_package_path,
)
from raysae.positions import PositionStats, bucket_edges
from raysae.saes import SparseAutoencoder
from raysae.splice_config import SpliceConfig
from raysae.text import (
    Window,
    corpus_windows,  # harvest's windows of the corpus: the same windows here
    keep_mask,  # harvest's rule for which tokens are recorded: the same rule here
    pad_windows,  # harvest's right-padding of windows into (B, T) tensors
)

# ---------------------------------------------------------------- accumulator


_CHUNK_ELEMENTS = 2**24
"""Logits per chunk in SpliceStats.update (64 MiB of float32 per run)."""


class SpliceStats:
    """Float64 sums of per-token cross-entropies and KL divergences; `update`, `merge`, `compute`.

    Merging sums (never ratios) makes split-then-merge equal one pass over the concatenation.
    """

    RUNS = ("clean", "spliced", "zero_ablated", "mean_ablated")
    SUMS = (
        "ce_clean",
        "ce_spliced",
        "ce_zero_ablated",
        "ce_mean_ablated",
        "kl_spliced",
        "kl_zero_ablated",
        "kl_mean_ablated",
    )
    """Sums over scored tokens kept in `sums` (float64), in this order; KL from the clean run."""

    def __init__(self, mean_ablation: bool = True):
        self.mean_ablation = mean_ablation
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.sums = torch.zeros(len(self.SUMS), dtype=torch.float64)

    @torch.no_grad()
    def update(
        self,
        targets: Tensor,
        clean: Tensor,
        spliced: Tensor,
        zero_ablated: Tensor,
        mean_ablated: Tensor | None = None,
    ) -> None:
        """targets: (N,) next-token ids; clean, spliced, …: (N, vocab) logits at those tokens."""
        if (mean_ablated is not None) != self.mean_ablation:
            raise ValueError(
                f"SpliceStats(mean_ablation={self.mean_ablation}) got "
                f"{'no ' if mean_ablated is None else ''}mean-ablated logits"
            )
        runs = [clean, spliced, zero_ablated] + ([mean_ablated] if self.mean_ablation else [])
        if (
            targets.ndim != 1
            or any(r.ndim != 2 or r.shape != clean.shape for r in runs)
            or clean.shape[0] != targets.shape[0]
        ):
            raise ValueError(
                f"expected targets (N,) and logits (N, vocab) of one shape, got "
                f"{tuple(targets.shape)} and {[tuple(r.shape) for r in runs]}"
            )
        # Per token in float32, summed in float64: a float64 copy of (N, vocab) logits would
        # double the memory, which the vocabulary already makes the largest term. Row chunks
        # bound the temporaries of log_softmax.
        rows = max(1, _CHUNK_ELEMENTS // clean.shape[1])
        batch = torch.zeros(len(self.SUMS), dtype=torch.float64, device=clean.device)
        for i in range(0, targets.shape[0], rows):
            batch += self._sums(targets[i : i + rows], [r[i : i + rows] for r in runs])
        self.sums = self.sums.to(batch.device) + batch
        self.n += targets.shape[0]

    def _sums(self, targets: Tensor, runs: list[Tensor]) -> Tensor:
        """(len(SUMS),) float64 sums over one chunk of tokens."""
        log_p = [r.float().log_softmax(-1) for r in runs]
        p_clean = log_p[0].exp()
        ce = [-lp.gather(1, targets[:, None].long()).squeeze(1) for lp in log_p]
        # p log(p/q) with 0 · log 0 = 0, also where q underflows to 0 (a -inf log-probability).
        kl = [torch.where(p_clean > 0, p_clean * (log_p[0] - lp), 0.0).sum(-1) for lp in log_p[1:]]
        if not self.mean_ablation:  # keep the layout of SUMS
            ce, kl = ce + [torch.zeros_like(ce[0])], kl + [torch.zeros_like(kl[0])]
        return torch.stack([v.double().sum() for v in ce + kl])

    def merge(self, other: SpliceStats) -> SpliceStats:
        """Fold `other` into self; returns self."""
        if other.mean_ablation != self.mean_ablation:
            raise ValueError("cannot merge SpliceStats with and without mean ablation")
        self.sums = self.sums + other.sums.to(self.sums.device)
        self.n += other.n
        return self

    def compute(self) -> dict:
        """Mean CE per run, CE loss recovered (against zero and mean ablation), mean KL per run."""
        n = self.n
        means = {name: (s / n if n else math.nan) for name, s in zip(self.SUMS, self.sums.tolist())}
        if not self.mean_ablation:
            means["ce_mean_ablated"] = means["kl_mean_ablated"] = math.nan
        clean, spliced = means["ce_clean"], means["ce_spliced"]
        return {
            "n_tokens": n,
            **{k: means[k] for k in self.SUMS[:4]},
            "ce_loss_increase": spliced - clean,
            "ce_loss_recovered": _recovered(means["ce_zero_ablated"], spliced, clean),
            "ce_loss_recovered_mean_ablation": _recovered(means["ce_mean_ablated"], spliced, clean),
            **{k: means[k] for k in self.SUMS[4:]},
        }


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    gap = ablated - clean
    return (ablated - spliced) / gap if gap else math.nan


# ---------------------------------------------------------------- hooks


def _replace_rows(hidden: Tensor, mask: Tensor, rows: Callable[[Tensor], Tensor]) -> Tensor:
    """hidden (B, T, d) with hidden[mask] (N, d) replaced by rows(hidden[mask])."""
    out = hidden.clone()
    out[mask] = rows(hidden[mask]).to(hidden.dtype)
    return out


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the block it watches has run."""


# ---------------------------------------------------------------- evaluation


class Batch(NamedTuple):
    """A padded batch of windows and its masks, on the model's device."""

    input_ids: Tensor
    """(B, T) token ids, right-padded."""
    attention_mask: Tensor
    """(B, T) 1 for real tokens, 0 for padding."""
    replaced: Tensor
    """(B, T) bool: positions whose residual the SAE (or an ablation) replaces."""
    scored: Tensor
    """(B, T − 1) bool: replaced positions that have a next token in the window."""


def make_batch(windows: Sequence[Window], excluded: np.ndarray, device: torch.device) -> Batch:
    """Pad `windows` (harvest's padding) and mark the replaced and scored positions."""
    ids, _, attention = pad_windows([w.input_ids for w in windows], [w.pos for w in windows])
    real = attention.bool()
    replaced = real & torch.from_numpy(keep_mask(ids.numpy(), excluded))
    scored = replaced[:, :-1] & real[:, 1:]
    return Batch(ids.to(device), attention.to(device), replaced.to(device), scored.to(device))


def _logits(model: nn.Module, batch: Batch) -> Tensor:
    """(N, vocab) next-token logits at the scored positions."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits
    return logits[:, :-1][batch.scored]


@torch.no_grad()
def residual_mean(model: nn.Module, layer: int, batches: Sequence[Batch]) -> Tensor:
    """(d,) float64 mean of block `layer`'s output over the replaced positions of `batches`.

    Each forward pass stops once the block has run.
    """
    total, count = None, 0

    def capture(hidden: Tensor, mask: Tensor) -> Tensor:
        nonlocal total, count
        rows = hidden[mask].double()
        total = rows.sum(0) if total is None else total + rows.sum(0)
        count += rows.shape[0]
        raise _StopForward

    for batch in batches:
        try:
            with replaced_output(
                decoder_blocks(model)[layer], partial(capture, mask=batch.replaced)
            ):
                model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                )
        except _StopForward:
            pass
    if not count:
        raise ValueError("no tokens to evaluate: every position is special or padding")
    return total / count


@torch.no_grad()
def evaluate_splice(
    model: nn.Module,
    layer: int,
    sae: SparseAutoencoder,
    windows: Sequence[Window],
    *,
    excluded: np.ndarray,
    batch_size: int = 8,
    mean_ablation: bool = True,
    progress: Callable[[str], None] | None = None,
    by_position: PositionStats | None = None,
) -> SpliceStats:
    """Clean, spliced and ablated runs of `model` over `windows`, accumulated (module docstring).

    `excluded`: token ids left clean and unscored (harvest's `tokenizer.all_special_ids`).
    The SAE runs in inference mode on inputs cast to its dtype; no hook outlives the call.
    `by_position` (a PositionStats with splice sums) also gets the SAE's reconstruction of the
    replaced rows and every run's logits by position in the window (raysae.positions).
    """
    device = next(model.parameters()).device
    block = decoder_blocks(model)[layer]
    batches = [
        make_batch(windows[i : i + batch_size], excluded, device)
        for i in range(0, len(windows), batch_size)
    ]
    mean = None
    if mean_ablation:
        if progress:
            progress(f"splice: mean of block {layer}'s output (a pass up to block {layer})")
        mean = residual_mean(model, layer, batches)
    stats = SpliceStats(mean_ablation)
    replacements: dict[str, Callable[[Tensor], Tensor]] = {
        "spliced": lambda x: sae(x.to(sae.W_enc.dtype)).x_hat,
        "zero_ablated": torch.zeros_like,
    }
    if mean is not None:
        replacements["mean_ablated"] = lambda x: mean.to(x).expand_as(x)
    start = last_report = time.monotonic()
    with sae.evaluating():
        for i, batch in enumerate(batches):
            if by_position is not None:
                replacements["spliced"] = partial(_spliced_by_position, sae, by_position, batch)
            runs = {"clean": _logits(model, batch)}
            for name, rows in replacements.items():
                with replaced_output(block, partial(_replace_rows, mask=batch.replaced, rows=rows)):
                    runs[name] = _logits(model, batch)
            targets = batch.input_ids[:, 1:][batch.scored]
            stats.update(targets, **runs)
            if by_position is not None:
                by_position.update_splice(_columns(batch.scored)[batch.scored], targets, **runs)
            now = time.monotonic()
            if progress and (now - last_report >= 10 or i == len(batches) - 1):
                last_report = now
                progress(
                    f"splice: batch {i + 1}/{len(batches)}, {stats.n:,} tokens scored, "
                    f"{stats.n / max(now - start, 1e-9):,.0f} tokens/s"
                )
    return stats


def _columns(mask: Tensor) -> Tensor:
    """(B, T) int64: each entry's column, its position in the window."""
    return torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)


def _spliced_by_position(
    sae: SparseAutoencoder, stats: PositionStats, batch: Batch, x: Tensor
) -> Tensor:
    """The SAE's reconstruction of the replaced rows x (N, d), recorded by position."""
    out = sae(x.to(sae.W_enc.dtype))
    stats.update(x, out.x_hat, out.codes, _columns(batch.replaced)[batch.replaced])
    return out.x_hat


# ---------------------------------------------------------------- one run, checked


def check_model(sae: SparseAutoencoder, cfg: SpliceConfig) -> Any:
    """The model's transformers config, after checking that the SAE fits it at cfg.layer.

    Cheap (reads the config, not the weights): call it before anything long.
    """
    path = resolve_package_path(cfg.model)
    looks_local = path.endswith(".gguf") or path.startswith(("/", ".", "~"))
    if looks_local and not Path(path).expanduser().exists():
        raise FileNotFoundError(
            f"model {cfg.model}: no such file or directory; pass --model "
            "with a hub id, a local model directory or a .gguf file"
        )
    config = load_config(cfg.model, cfg.revision)
    n_blocks, width = config.num_hidden_layers, config.hidden_size
    if not 0 <= cfg.layer < n_blocks:
        raise ValueError(
            f"layer {cfg.layer}: model {cfg.model} has {n_blocks} blocks; "
            f"choose --layer in 0..{n_blocks - 1}"
        )
    if sae.cfg.d_in != width:
        raise ValueError(
            f"the SAE has d_in={sae.cfg.d_in} but model {cfg.model} has "
            f"hidden_size={width}; splice the SAE into the model it was trained on "
            "(--model, --layer)"
        )
    return config


def run_splice(
    sae: SparseAutoencoder,
    cfg: SpliceConfig,
    *,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
    by_position: bool = False,
) -> dict:
    """Check, build the windows, load the model, evaluate; the report's `splice` section
    (with `by_position`, also its `by_position` rows: raysae.positions)."""
    check_model(sae, cfg)
    windows, excluded = corpus_windows(cfg, load_tokenizer(cfg.model, cfg.revision), cfg.n_tokens)
    model = load_model(cfg.model, revision=cfg.revision, dtype=cfg.model_dtype).to(device)
    if progress:
        progress(
            f"splice: {cfg.model} at {hook_name(cfg.layer)}, {len(windows):,} windows "
            f"of ≤ {cfg.context_length} tokens from {cfg.corpus}"
        )
    positions = (
        PositionStats(
            sae.cfg.d_in,
            bucket_edges(cfg.context_length),
            splice=True,
            mean_ablation=cfg.mean_ablation,
            end=cfg.context_length,
        )
        if by_position
        else None
    )
    stats = evaluate_splice(
        model,
        cfg.layer,
        sae.to(device),
        windows,
        excluded=excluded,
        batch_size=cfg.batch_size,
        mean_ablation=cfg.mean_ablation,
        progress=progress,
        by_position=positions,
    )
    extra = {"by_position": positions.compute()} if positions is not None else {}
    return {
        "model": cfg.model,
        "layer": cfg.layer,
        "hook": hook_name(cfg.layer),
        "corpus": cfg.corpus,
        "context_length": cfg.context_length,
        "windows": len(windows),
        "bos": "clean" if cfg.exclude_special_tokens else "replaced",
        **stats.compute(),
        **extra,
    }


def print_progress(line: str) -> None:
    """Default progress display: lines on stderr (stdout carries the report)."""
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- report


def report_lines(section: dict) -> list[str]:
    """The console form of run_splice's report section."""
    s = section
    return [
        (
            f"SAE spliced into {s['model']} at {s['hook']} (BOS {s['bos']}), {s['n_tokens']:,} "
            f"next-token predictions in {s['windows']:,} windows of {s['corpus']}:"
        ),
        (
            f"  CE loss (nats/token): clean {s['ce_clean']:.4f}, spliced {s['ce_spliced']:.4f} "
            f"(+{s['ce_loss_increase']:.4f}), zero-ablated {s['ce_zero_ablated']:.4f}, "
            f"mean-ablated {s['ce_mean_ablated']:.4f}"
        ),
        (
            f"  CE loss recovered: {s['ce_loss_recovered']:.4f} against zero ablation, "
            f"{s['ce_loss_recovered_mean_ablation']:.4f} against mean ablation"
        ),
        (
            f"  KL(clean ‖ run) (nats/token): spliced {s['kl_spliced']:.4g}, zero-ablated "
            f"{s['kl_zero_ablated']:.4g}, mean-ablated {s['kl_mean_ablated']:.4g}"
        ),
    ]
