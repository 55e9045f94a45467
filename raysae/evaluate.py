"""Evaluate a trained SAE: its metrics, baselines on the same data, decoder geometry; `raysae eval`.

`evaluate` is one pass of the mergeable accumulators (raysae.metrics) over a batch stream; the
trainer's final evaluation uses it. `evaluate_with_baselines` is the report `raysae eval` prints,
made in two passes over the first n_tokens rows of a restartable stream:

  1. fit: the data's exact mean and covariance (metrics.Moments), the first `kmeans_tokens` rows
     for k-means, and, unless PCA's k is given, the SAE's L0 (PCA is compared at the same L0);
  2. score: the SAE and every baseline (raysae.baselines) through the same ReconstructionStats
     (FVU_B about the exact mean from pass 1) and SparsityStats.

Baselines are fitted in-sample on the evaluated tokens, which flatters them: an SAE that beats
them here beats them. Pass 2 checks that the stream restarted on the same tokens (otherwise the
mean predictor's FVU would not be 1).

With `splice` settings, `eval_command` also splices the SAE into the language model
(raysae.splice: CE loss recovered and KL); its model, layer and text default to those of the
harvested dataset given as data, and are checked against the SAE before anything long runs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from raysae.baselines import default_kmeans_k, default_pca_k, fit_baselines
from raysae.checkpoint import load_sae
from raysae.config import load_run_config
from raysae.geometry import decoder_geometry
from raysae.metrics import Moments, ReconstructionStats, SparsityStats
from raysae.saes import SparseAutoencoder
from raysae.settings import to_dict
from raysae.synthetic import HELD_OUT_STREAM, ToyData, feature_recovery, recovery_line

TOY_PREFIX = "toy:"
"""`--data toy:RUN.yaml`: toy activations from a run config's data.toy section."""

Forward = Callable[[Tensor], tuple[Tensor, Tensor]]
"""x (B, d_in) → (x̂ (B, d_in), latents (B, n_latents)): an SAE or a baseline."""


class DataSourceError(ValueError):
    """The evaluation data cannot be read, or does not fit the SAE."""


@dataclass(frozen=True)
class EvalData:
    """A restartable stream of activations to evaluate on."""

    description: str
    """What the data are, for the report."""
    open: Callable[[], Iterable[Tensor]]
    """Each call starts the same stream from its first row: (B, d_in) float batches."""
    true_directions: Optional[Tensor] = None
    """Toy data only: (n_features, d_in) ground-truth feature directions."""


def open_data(spec: str, d_in: int, batch_size: int) -> EvalData:
    """`toy:RUN.yaml` (the held-out toy stream of a run config) or a dataset path / URI."""
    if spec.startswith(TOY_PREFIX):
        return _toy_data(spec[len(TOY_PREFIX) :], d_in, batch_size)
    return _dataset(spec, batch_size)


def _toy_data(path: str, d_in: int, batch_size: int) -> EvalData:
    cfg = load_run_config(path)
    if cfg.data.toy is None:
        raise DataSourceError(
            f"--data toy:{path}: the config has no data.toy section; give the "
            "run config the SAE was trained with"
        )
    if cfg.sae.d_in != d_in:
        raise DataSourceError(
            f"--data toy:{path}: sae.d_in={cfg.sae.d_in} there but the "
            f"checkpoint has d_in={d_in}; give the run config the SAE was "
            "trained with"
        )
    toy = cfg.data.toy
    return EvalData(
        f"toy data of {path} (held-out stream)",
        lambda: ToyData(toy, d_in, stream=HELD_OUT_STREAM).batches(batch_size),
        ToyData(toy, d_in).directions,
    )


def _dataset(uri: str, batch_size: int) -> EvalData:
    from raysae import data

    dataset = data.open_dataset(uri)  # once: both passes read the same value
    return EvalData(
        f"dataset {uri}", lambda: data.iter_batches(dataset, batch_size, dtype=torch.float32)
    )


def take(
    batches: Iterable[Tensor], n_tokens: int, d_in: int, device: Optional[torch.device] = None
) -> Iterator[Tensor]:
    """The first n_tokens rows of `batches`, checked to be (B, d_in), moved to `device`."""
    seen = 0
    for batch in batches:
        if batch.ndim != 2 or batch.shape[1] != d_in:
            raise DataSourceError(
                f"evaluation batch at token {seen} has shape "
                f"{tuple(batch.shape)}, but the SAE takes (B, d_in={d_in}); "
                "evaluate on activations of the layer it was trained on"
            )
        batch = batch[: n_tokens - seen].to(device)
        seen += batch.shape[0]
        yield batch
        if seen >= n_tokens:
            return


def sae_forward(model: SparseAutoencoder) -> Forward:
    """The SAE as a Forward, on inputs cast to its parameters' dtype."""

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        out = model(x.to(model.W_enc.dtype))
        return out.x_hat, out.latents

    return forward


@torch.no_grad()
def score(
    models: dict[str, Forward],
    batches: Iterable[Tensor],
    d_in: int,
    reference_mean: Optional[Tensor],
    dead_window: int,
) -> dict[str, tuple[ReconstructionStats, SparsityStats]]:
    """Run every model on every batch, accumulating its reconstruction and sparsity stats."""
    recon = {name: ReconstructionStats(d_in, reference_mean) for name in models}
    sparsity: dict[str, SparsityStats] = {}
    for x in batches:
        for name, forward in models.items():
            x_hat, latents = forward(x)
            recon[name].update(x, x_hat)
            if name not in sparsity:  # latent count known once the model has run
                sparsity[name] = SparsityStats(latents.shape[1], dead_window)
            sparsity[name].update(latents)
    if not sparsity:
        raise DataSourceError("the evaluation stream is empty: no batches to evaluate on")
    return {name: (recon[name], sparsity[name]) for name in models}


@torch.no_grad()
def evaluate(
    model: SparseAutoencoder,
    batches: Iterable[Tensor],
    n_tokens: int,
    reference_mean: Optional[Tensor] = None,
    dead_window: Optional[int] = None,
) -> dict:
    """Reconstruction and sparsity metrics of `model` (in inference mode) on up to n_tokens rows.

    dead_window defaults to n_tokens: a latent is dead if it never fired during the evaluation.
    """
    with model.evaluating():
        rows = take(batches, n_tokens, model.cfg.d_in, model.W_dec.device)
        recon, sparsity = score(
            {"sae": sae_forward(model)},
            rows,
            model.cfg.d_in,
            reference_mean,
            dead_window or n_tokens,
        )["sae"]
    return {**recon.compute(), **sparsity.compute()}


def data_mean(batches: Iterable[Tensor], n_tokens: int, d_in: int) -> Tensor:
    """(d_in,) float64 mean of the first n_tokens rows: a reference mean for FVU_B."""
    moments = Moments(d_in)
    for x in take(batches, n_tokens, d_in):
        moments.update(x)
    return moments.mean.cpu()


@torch.no_grad()
def evaluate_with_baselines(
    model: SparseAutoencoder,
    data: Callable[[], Iterable[Tensor]],
    n_tokens: int,
    *,
    pca_ks: Optional[Sequence[int]] = None,
    kmeans_ks: Optional[Sequence[int]] = None,
    kmeans_tokens: int = 65_536,
    seed: int = 0,
) -> dict:
    """The SAE, the baselines and the decoder geometry on the first n_tokens rows of data().

    pca_ks defaults to [the SAE's L0, rounded]; kmeans_ks to [n_latents], capped so each
    centroid has at least 4 sample tokens. Returns {"n_tokens", "sae": metrics (with
    per-latent "latent_frequencies"), "baselines": {name: metrics}, "decoder_geometry"}.
    """
    with model.evaluating():
        d_in, device = model.cfg.d_in, model.W_dec.device
        moments, sample, l0 = _fit_pass(model, data(), n_tokens, kmeans_tokens, pca_ks is None)
        pca_ks = [default_pca_k(l0, d_in)] if pca_ks is None else list(pca_ks)
        kmeans_ks = (
            [default_kmeans_k(model.cfg.n_latents, len(sample))]
            if kmeans_ks is None
            else list(kmeans_ks)
        )
        baselines = fit_baselines(moments, sample, pca_ks, kmeans_ks, seed)
        models = {"sae": sae_forward(model), **{b.name: b for b in baselines}}
        scores = score(
            models,
            take(data(), n_tokens, d_in, device),
            d_in,
            moments.mean.cpu(),
            dead_window=max(moments.n, 1),
        )
    _check_same_tokens(moments, scores["sae"][0].moments)
    report = {name: {**r.compute(), **s.compute()} for name, (r, s) in scores.items()}
    sae = report.pop("sae")
    sae["latent_frequencies"] = scores["sae"][1].frequencies().tolist()
    return {
        "n_tokens": moments.n,
        "sae": sae,
        "baselines": report,
        "decoder_geometry": decoder_geometry(model.W_dec, seed=seed),
    }


def _fit_pass(
    model: SparseAutoencoder,
    batches: Iterable[Tensor],
    n_tokens: int,
    kmeans_tokens: int,
    need_l0: bool,
) -> tuple[Moments, Tensor, float]:
    """Pass 1: full moments of the data, the k-means sample, and the SAE's L0 if needed."""
    d_in = model.cfg.d_in
    moments, sample, nonzeros = Moments(d_in, full=True), [], 0
    for x in take(batches, n_tokens, d_in, model.W_dec.device):
        if moments.n < kmeans_tokens:
            sample.append(x[: kmeans_tokens - moments.n].cpu())
        moments.update(x)
        if need_l0:
            nonzeros += int((model.encode(x) != 0).sum())
    if moments.n == 0:
        raise DataSourceError("the evaluation stream is empty: no batches to evaluate on")
    return moments, torch.cat(sample), nonzeros / moments.n


def _check_same_tokens(first: Moments, second: Moments) -> None:
    same = first.n == second.n and torch.allclose(
        first.mean.cpu(),
        second.mean.cpu(),
        rtol=1e-9,
        atol=1e-9 * float(first.mean.abs().max().clamp_min(1.0)),
    )
    if not same:
        raise DataSourceError(
            f"the data stream gave different tokens on its second pass "
            f"({first.n:,} then {second.n:,} tokens, or different means); "
            "evaluation needs a stream that restarts identically (no shuffling)"
        )


def eval_command(
    checkpoint: str | os.PathLike,
    data_spec: str,
    *,
    out: Optional[str] = None,
    n_tokens: int = 65_536,
    batch_size: int = 4096,
    pca_ks: Optional[Sequence[int]] = None,
    kmeans_ks: Optional[Sequence[int]] = None,
    kmeans_tokens: int = 65_536,
    seed: int = 0,
    device: Optional[str] = None,
    splice: Optional[dict] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """`raysae eval`: evaluate a checkpoint, print the report, write it as JSON to `out`.

    splice: raysae.splice_config.SpliceConfig fields (None = from the dataset's manifest) to also
    splice the SAE into its language model; None skips that part.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_sae(checkpoint, device)
    if splice is not None:  # the data plane and the LM are needed only here
        from raysae import splice as splicing
        from raysae.splice_config import resolve_config

        splice_cfg, notes = resolve_config(data_spec, **splice)
        for line in notes:
            splicing.print_progress(line)
        splicing.check_model(model, splice_cfg)  # bad input fails now, not after the eval
    data = open_data(data_spec, model.cfg.d_in, batch_size)
    report = {
        "checkpoint": str(checkpoint),
        "data": data.description,
        "sae_config": to_dict(model.cfg),
        **evaluate_with_baselines(
            model,
            data.open,
            n_tokens,
            pca_ks=pca_ks,
            kmeans_ks=kmeans_ks,
            kmeans_tokens=kmeans_tokens,
            seed=seed,
        ),
    }
    if data.true_directions is not None:
        recovery = feature_recovery(data.true_directions, model.W_dec)
        report["feature_recovery"] = {k: v for k, v in recovery.items() if k != "max_cos"}
    if splice is not None:
        report["splice"] = splicing.run_splice(
            model, splice_cfg, device=device, progress=splicing.print_progress
        )
    log(format_report(report))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        # NaN (e.g. FVU of constant data) is not JSON: written as null.
        Path(out).write_text(json.dumps(_json_safe(report), indent=2))
        log(f"wrote {out}")
    return report


_COLUMNS = (
    ("fvu", "fvu"),
    ("explained_variance", "expl_var"),
    ("fvu_b", "fvu_b†"),
    ("mse", "mse"),
    ("cos_sim", "cos_sim"),
    ("l2_ratio", "l2_ratio"),
    ("relative_reconstruction_bias", "rel_bias"),
    ("l0", "l0"),
    ("l1", "l1"),
    ("dead_fraction", "dead"),
    ("dense_fraction", "dense"),
)


def format_report(report: dict) -> str:
    """The console form of an `evaluate_with_baselines` report (every metric but per-latent)."""
    rows = {"sae": report["sae"], **report["baselines"]}
    width = max(len(name) for name in rows) + 2
    lines = [
        f"{report.get('checkpoint', 'SAE')} on {report.get('data', 'data')}: "
        f"{report['n_tokens']:,} tokens",
        " " * width + "".join(f"{label:>10}" for _, label in _COLUMNS),
    ]
    for name, m in rows.items():
        lines.append(
            f"{name:<{width}}" + "".join(f"{m.get(key, math.nan):>10.4g}" for key, _ in _COLUMNS)
        )
    lines.append(
        "† fvu_b: the SAELens/SAEBench legacy FVU, mean over tokens of "
        "‖x−x̂‖²/‖x−μ‖² (μ: mean of the evaluated tokens); fvu = Σ‖x−x̂‖²/Σ‖x−μ‖²"
    )
    hist = report["sae"]["frequency_histogram"]
    lines.append(
        "SAE latent firing frequency, log10 bins from -8 to 0: "
        f"{' '.join(map(str, hist['counts']))} | never fired: {hist['never_fired']}"
    )
    geo = report["decoder_geometry"]
    for label, key in (("SAE decoder", "decoder"), ("random directions", "random_baseline")):
        g = geo[key]
        if g.get("count"):
            lines.append(
                f"max cos to another latent, {label}: mean {g['mean']:.3f} median "
                f"{g['median']:.3f} p99 {g['p99']:.3f} max {g['max']:.3f} "
                f"near-duplicates (≥ 0.9) {g['near_duplicate_fraction']:.2%}"
            )
    lines.append(
        f"expected max cos of random directions √(2 ln n / d): {geo['random_expected_max']:.3f}"
    )
    rec = report.get("feature_recovery")
    if rec:
        lines.append(recovery_line(rec))
    if "splice" in report:
        from raysae.splice import report_lines

        lines.extend(report_lines(report["splice"]))
    return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
