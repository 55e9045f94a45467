"""Evaluate a trained SAE: its metrics, baselines on the same data, decoder geometry; `raysae eval`.

`evaluate` is one pass of the mergeable accumulators (raysae.metrics) over a batch stream; the
trainer's final evaluation uses it. `evaluate_with_baselines` is the report `raysae eval` prints.
It scores the rows the SAE was not trained on (`open_data`: a dataset's held-out parts, as
training split them, or a toy config's held-out stream; every row on request) and fits the
baselines on its training rows, so an SAE and its baselines are both judged out of sample:

  1. fit, over the first n_tokens training rows: their exact mean and covariance
     (metrics.Moments), the first `kmeans_tokens` of them for k-means, and, unless PCA's k is
     given, the SAE's L0 on those (PCA is compared at the same L0);
  2. the scored rows' mean, the reference for FVU_B (per-token ratios need it in advance);
  3. score: the SAE and every baseline (raysae.baselines) through the same ReconstructionStats
     and SparsityStats over the first n_tokens scored rows.

Pass 3 checks that the scored stream restarted on the same tokens as pass 2. The mean baseline
predicts the training mean, so its held-out FVU is a little above 1 (exactly 1 in-sample).

With `splice` settings, `eval_command` also splices the SAE into the language model
(raysae.splice: CE loss recovered and KL); its model, layer and text default to those of the
harvested dataset given as data, and are checked against the SAE before anything long runs.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Protocol, Sequence

import torch
from torch import Tensor

from raysae.baselines import Baseline, default_kmeans_k, default_pca_k, fit_baselines
from raysae.checkpoint import load_sae
from raysae.config import RunConfig, load_run_config
from raysae.geometry import decoder_geometry
from raysae.metrics import Moments, ReconstructionStats, SparsityStats, latent_norms
from raysae.positions import PositionStats, bucket_edges, position_lines, window_positions
from raysae.saes import SparseAutoencoder
from raysae.settings import from_dict, to_dict
from raysae.synthetic import HELD_OUT_STREAM, ToyData, feature_recovery, recovery_line
from raysae.views import has_views, summary_lines, view_metrics

TOY_PREFIX = "toy:"
"""`--data toy:RUN.yaml`: toy activations from a run config's data.toy section."""

ROWS = ("held-out", "all")
"""Which rows of the data `raysae eval` scores: those the SAE was not trained on, or every one."""

LATENT_ELEMENTS = 2**24
"""At most this many latent values (rows × n_latents) at once in `token_pass` and `score`: 64 MiB of
float32, so a pass over n_latents = 131072 holds 128 rows at a time, not a (4096, n) slab."""


Forward = Callable[[Tensor], tuple[Tensor, Tensor]]
"""x (B, d_in) → (x̂ (B, d_in), latents (B, n_latents)): an SAE or a baseline."""


class DataSourceError(ValueError):
    """The evaluation data cannot be read, or does not fit the SAE."""


@dataclass(frozen=True)
class EvalData:
    """Restartable streams of activations: the rows to score and the SAE's training rows."""

    description: str
    """What the data are, for the report."""
    rows: str
    """Which rows `score` reads, for the report (e.g. "held-out: the last 3 of 15 parts")."""
    score: Callable[[], Iterable[Tensor]]
    """Each call starts the stream of scored rows from its first row: (B, d_in) float batches."""
    fit: Callable[[], Iterable[Tensor]]
    """The same for the rows the baselines are fitted on: the SAE's training rows."""
    fit_rows: str
    """Which rows `fit` reads, for the report."""
    true_directions: Optional[Tensor] = None
    """Toy data only: (n_features, d_in) ground-truth feature directions."""
    scored_dataset: Optional[object] = None
    """A dataset's scored rows as a raysae.data.Dataset (None for toy data), for the passes
    that read its token_id / doc_id / pos columns too (`token_pass`)."""


def open_data(
    spec: str,
    d_in: int,
    batch_size: int,
    *,
    rows: str = "held-out",
    checkpoint: Optional[str | os.PathLike] = None,
    eval_parts: Optional[int] = None,
) -> EvalData:
    """`toy:RUN.yaml` (a run config's toy streams) or a dataset path / URI, split as the SAE's
    training split it: held-out rows to score (or all, `rows="all"`), training rows to fit
    baselines on. For a dataset the held-out parts are its last `eval_parts`, by default the
    data.eval_parts of the run that wrote `checkpoint` (its metrics.json, next to it)."""
    if rows not in ROWS:
        raise DataSourceError(f"--rows {rows!r}: choose one of {', '.join(ROWS)}")
    if spec.startswith(TOY_PREFIX):
        return _toy_data(spec[len(TOY_PREFIX) :], d_in, batch_size, rows)
    return _dataset(spec, batch_size, rows, _held_out_parts(spec, checkpoint, eval_parts))


def _toy_data(path: str, d_in: int, batch_size: int, rows: str) -> EvalData:
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
    if rows != "held-out":
        raise DataSourceError(
            f"--data toy:{path} --rows {rows}: toy data are endless streams, not a set of "
            "rows; the held-out stream (never trained on) is the one scored: drop --rows"
        )
    toy = cfg.data.toy
    return EvalData(
        f"toy data of {path}",
        "held-out stream",
        lambda: ToyData(toy, d_in, stream=HELD_OUT_STREAM).batches(batch_size),
        lambda: ToyData(toy, d_in).batches(batch_size),
        "the training stream",
        ToyData(toy, d_in).directions,
    )


@dataclass(frozen=True)
class HeldOut:
    """How many of a dataset's last parts the SAE did not train on, and who says so."""

    parts: Optional[int]
    """data.eval_parts of the run; None: unknown."""
    source: str
    """Where the number comes from (or why it is unknown), for the report and errors."""


def _held_out_parts(
    uri: str, checkpoint: Optional[str | os.PathLike], given: Optional[int]
) -> HeldOut:
    """--eval-parts if given, else data.eval_parts of the run whose metrics.json sits next to
    the checkpoint (raysae train / sweep write OUT/sae and OUT/metrics.json)."""
    if given is not None:
        return HeldOut(given, "--eval-parts")
    if checkpoint is None:
        return HeldOut(None, "no checkpoint given")
    path = Path(checkpoint).parent / "metrics.json"
    if not path.exists():
        return HeldOut(None, f"no {path} next to the checkpoint")
    try:
        run = from_dict(RunConfig, json.loads(path.read_text())["config"], "config")
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and ConfigError included
        raise DataSourceError(
            f"{path}: cannot read the run's config ({e}); give --eval-parts N (the run's "
            "data.eval_parts) or --rows all"
        ) from None
    from raysae.data import storage

    source = f"data.eval_parts of {path}"
    trained_on = run.data.dataset  # data.uri, or data.sources joined by " + "
    if trained_on is None:
        return HeldOut(None, f"{path} says the SAE was trained on toy data, not on {uri}")

    def where(location: str) -> list[str]:
        return [storage.absolute(p).rstrip("/") for p in location.split(" + ")]

    if where(trained_on) != where(uri):
        source += f" (the run read {trained_on}: --data must hold the same parts)"
    return HeldOut(run.data.eval_parts, source)


def _dataset(uri: str, batch_size: int, rows: str, held_out: HeldOut) -> EvalData:
    from raysae import data

    # Once: every pass reads the same value. "A + B" is a crosscoder's paired sources.
    dataset = data.open_data(uri)
    n, parts = len(dataset.parts), held_out.parts
    if parts is None:
        if rows == "held-out":
            raise DataSourceError(
                f"cannot tell which rows of {uri} the SAE was trained on ({held_out.source}): "
                "give --eval-parts N (the run's data.eval_parts: its last N parts were held "
                "out) or --rows all (every row, baselines then fitted on the same rows)"
            )
        train, scored = dataset, dataset
        fit_rows = "every row (in-sample: the SAE's training rows are unknown)"
    elif parts == 0:
        if rows == "held-out":
            raise DataSourceError(
                f"the SAE's run held out no part of {uri} ({held_out.source} is 0): every row "
                "was trained on; give --rows all to score them (in-sample)"
            )
        train, scored = dataset, dataset
        fit_rows = f"every row, all trained on ({held_out.source} is 0)"
    else:
        if n <= parts:
            raise DataSourceError(
                f"{uri} has {n} part(s) but {held_out.source} is {parts}: this is not the "
                "dataset the SAE was split on; give --eval-parts N or --rows all"
            )
        train, held = dataset.split(parts)  # the split training used (raysae.train)
        scored = held if rows == "held-out" else dataset
        fit_rows = f"training rows: the first {n - parts} of {n} parts"
    label = (
        f"held-out: the last {parts} of {n} parts ({held_out.source})"
        if rows == "held-out"
        else f"all {n} parts"
    )
    return EvalData(
        f"dataset {uri}",
        label,
        lambda: scored.batches(batch_size, dtype=torch.float32),
        lambda: train.batches(batch_size, dtype=torch.float32),
        fit_rows,
        scored_dataset=scored,
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
    models: dict[str, SparseAutoencoder | Baseline],
    batches: Iterable[Tensor],
    d_in: int,
    reference_mean: Optional[Tensor],
    dead_window: int,
) -> dict[str, tuple[ReconstructionStats, SparsityStats]]:
    """Run every model on every batch, accumulating its reconstruction and sparsity stats."""
    forwards = {
        name: sae_forward(m) if isinstance(m, SparseAutoencoder) else m
        for name, m in models.items()
    }
    norms = {name: latent_norms(m) for name, m in models.items()}
    recon = {name: ReconstructionStats(d_in, reference_mean) for name in models}
    sparsity = {name: SparsityStats(len(norms[name]), dead_window) for name in models}
    # Rows at a time so no model's (rows, n_latents) latents exceed LATENT_ELEMENTS values (the
    # mean baseline has no latents at all).
    widest = max([len(n) for n in norms.values()] + [1])
    rows = max(1, LATENT_ELEMENTS // widest)
    empty = True
    for batch in batches:
        empty = False
        for x in batch.split(rows):
            for name, forward in forwards.items():
                x_hat, latents = forward(x)
                recon[name].update(x, x_hat)
                sparsity[name].update(latents, latent_norms=norms[name])
    if empty:
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
            {"sae": model}, rows, model.cfg.d_in, reference_mean, dead_window or n_tokens
        )["sae"]
    return {**recon.compute(), **sparsity.compute()}


def data_mean(batches: Iterable[Tensor], n_tokens: int, d_in: int) -> Tensor:
    """(d_in,) float64 mean of the first n_tokens rows: a reference mean for FVU_B."""
    return _moments(batches, n_tokens, d_in).mean.cpu()


def _moments(batches: Iterable[Tensor], n_tokens: int, d_in: int) -> Moments:
    moments = Moments(d_in)
    for x in take(batches, n_tokens, d_in):
        moments.update(x)
    if moments.n == 0:
        raise DataSourceError("the evaluation stream is empty: no batches to evaluate on")
    return moments


@torch.no_grad()
def evaluate_with_baselines(
    model: SparseAutoencoder,
    fit: Callable[[], Iterable[Tensor]],
    data: Callable[[], Iterable[Tensor]],
    n_tokens: int,
    *,
    pca_ks: Optional[Sequence[int]] = None,
    kmeans_ks: Optional[Sequence[int]] = None,
    kmeans_tokens: int = 16_384,
    seed: int = 0,
) -> dict:
    """The SAE and the baselines on the first n_tokens rows of data(), the baselines fitted on
    the first n_tokens rows of fit() (the SAE's training rows), and the decoder geometry.

    pca_ks defaults to [the SAE's L0 on the k-means sample, rounded]; kmeans_ks to [n_latents],
    capped so each centroid has at least 4 of the first `kmeans_tokens` fit rows. Returns
    {"n_tokens", "fit_tokens", "sae": metrics (with per-latent "latent_frequencies"),
    "baselines": {name: metrics}, "decoder_geometry"}.
    """
    with model.evaluating():
        d_in, device = model.cfg.d_in, model.W_dec.device
        moments, sample, l0 = _fit_pass(model, fit(), n_tokens, kmeans_tokens, pca_ks is None)
        pca_ks = [default_pca_k(l0, d_in)] if pca_ks is None else list(pca_ks)
        kmeans_ks = (
            [default_kmeans_k(model.cfg.n_latents, len(sample))]
            if kmeans_ks is None
            else list(kmeans_ks)
        )
        baselines = fit_baselines(moments, sample, pca_ks, kmeans_ks, seed)
        # FVU_B about the scored rows' own mean (as SAELens takes it), fixed before scoring.
        reference = _moments(data(), n_tokens, d_in)
        scores = score(
            {"sae": model, **{b.name: b for b in baselines}},
            take(data(), n_tokens, d_in, device),
            d_in,
            reference.mean.cpu(),
            dead_window=reference.n,
        )
        # A crosscoder's FVU per source, a Matryoshka SAE's per prefix and the crosscoder's
        # decoder-norm split (raysae.views): one more pass, only for architectures with views.
        parts = (
            view_metrics(model, take(data(), n_tokens, d_in, device), n_tokens)
            if has_views(model)
            else {}
        )
    _check_same_tokens(reference, scores["sae"][0].moments)
    report = {name: {**r.compute(), **s.compute()} for name, (r, s) in scores.items()}
    sae = report.pop("sae")
    sae["latent_frequencies"] = scores["sae"][1].frequencies().tolist()
    return {
        "n_tokens": reference.n,
        "fit_tokens": moments.n,
        "sae": sae,
        "baselines": report,
        "decoder_geometry": decoder_geometry(model.W_dec, seed=seed),
        **({"views": parts} if parts else {}),
    }


def _fit_pass(
    model: SparseAutoencoder,
    batches: Iterable[Tensor],
    n_tokens: int,
    kmeans_tokens: int,
    need_l0: bool,
) -> tuple[Moments, Tensor, float]:
    """The fit rows' full moments, the k-means sample, and, if needed, the SAE's L0 on that
    sample (it only picks PCA's k: encoding every fit row cost as much as seeding k-means)."""
    d_in = model.cfg.d_in
    moments, sample, nonzeros = Moments(d_in, full=True), [], 0
    for x in take(batches, n_tokens, d_in, model.W_dec.device):
        if moments.n < kmeans_tokens:
            rows = x[: kmeans_tokens - moments.n]
            if need_l0:  # in chunks: (16384, n_latents) latents would be 8 GiB at n=131072
                step = max(1, LATENT_ELEMENTS // model.cfg.n_latents)
                nonzeros += sum(int((model.encode(r) != 0).sum()) for r in rows.split(step))
            sample.append(rows.cpu())
        moments.update(x)
    if moments.n == 0:
        raise DataSourceError("the rows to fit the baselines on are empty: no batches")
    sample = torch.cat(sample)
    return moments, sample, nonzeros / len(sample)


class TokenObserver(Protocol):
    """Something `token_pass` shows every chunk of rows to (PositionStats, the latent browser)."""

    def observe(self, batch: dict[str, Tensor], x: Tensor, out, first_row: int) -> None:
        """batch: the chunk's columns (token_id, doc_id, pos, …: (B,)); x: its activations
        (B, d_in) on the SAE's device; out: the SAE's SAEOutput; first_row: its row number."""


@torch.no_grad()
def token_pass(
    model: SparseAutoencoder,
    batches: Iterable[dict[str, Tensor]],
    n_tokens: int,
    observers: Sequence[TokenObserver],
    progress: Optional[Callable[[str], None]] = None,
) -> int:
    """One pass of the SAE (inference mode) over the first n_tokens rows of column batches
    (`act` and any others), in chunks of at most LATENT_ELEMENTS latents, each shown to every
    observer. Returns the rows seen."""
    d_in, device = model.cfg.d_in, model.W_dec.device
    chunk = max(1, LATENT_ELEMENTS // model.cfg.n_latents)
    seen, start, last = 0, time.monotonic(), time.monotonic()
    with model.evaluating():
        for batch in batches:
            rows = min(len(batch["act"]), n_tokens - seen)
            for lo in range(0, rows, chunk):
                hi = min(lo + chunk, rows)
                part = {k: v[lo:hi] for k, v in batch.items()}
                x = next(take([part.pop("act")], hi - lo, d_in, device))
                out = model(x.to(model.W_enc.dtype))
                for observer in observers:
                    observer.observe(part, x, out, seen + lo)
            seen += rows
            if progress and time.monotonic() - last >= 10:
                last = time.monotonic()
                rate = seen / max(last - start, 1e-9)
                progress(f"token pass: {seen:,}/{n_tokens:,} rows, {rate:,.0f} rows/s")
            if seen >= n_tokens:
                break
    if not seen:
        raise DataSourceError("the evaluation stream is empty: no batches to evaluate on")
    return seen


class DatasetPositions:
    """A PositionStats fed from a harvested dataset's rows: the `pos` column (the index in the
    document) turned into the index in the harvest's window (raysae.positions)."""

    def __init__(self, d_in: int, context_length: int, prepend_bos: bool):
        self.context_length, self.prepend_bos = context_length, prepend_bos
        self.stats = PositionStats(d_in, bucket_edges(context_length), end=context_length)

    def observe(self, batch: dict[str, Tensor], x: Tensor, out, first_row: int) -> None:
        positions = window_positions(batch["pos"].to(torch.int64), *self._window)
        self.stats.update(x, out.x_hat, out.codes, positions.to(x.device))

    @property
    def _window(self) -> tuple[int, bool]:
        return self.context_length, self.prepend_bos

    @classmethod
    def of(cls, data: EvalData, d_in: int) -> "DatasetPositions":
        """From the scored dataset's manifest (harvest's context_length and prepend_bos)."""
        dataset = data.scored_dataset
        harvest = {} if dataset is None else (dataset.manifest.harvest or {})
        if "context_length" not in harvest:
            what = "toy data" if dataset is None else f"{dataset.uri} (not harvested from an LM)"
            raise DataSourceError(
                f"--by-position: {what} records no token positions in context windows; give a "
                "dataset written by raysae harvest, or add --splice-tokens N (a fresh LM pass, "
                "any --context-length)"
            )
        return cls(d_in, int(harvest["context_length"]), bool(harvest.get("prepend_bos", True)))


def _token_sections(
    model: SparseAutoencoder,
    data: EvalData,
    n_tokens: int,
    batch_size: int,
    by_position: bool,
    browse: bool,
    spliced: bool,
):
    """One `token_pass` over the scored rows for the `by_position` section (a harvested
    dataset's rows; skipped without positions when the splice's LM pass gives them) and the
    latent browser (`browse`): (LatentTops or None, report sections)."""
    from raysae.latents import LatentTops

    observers, positions, tops = [], None, None
    if by_position:
        try:
            positions = DatasetPositions.of(data, model.cfg.d_in)
            observers.append(positions)
        except DataSourceError:
            if not spliced:
                raise
    if browse:
        tops = LatentTops(model.cfg.n_latents)
        observers.append(tops)
    if observers:
        if data.scored_dataset is not None:
            from raysae.data.format import COLUMNS

            batches = data.scored_dataset.batches(batch_size, dtype=torch.float32, columns=COLUMNS)
        else:
            batches = ({"act": x} for x in data.score())
        token_pass(model, batches, n_tokens, observers, progress=_progress)
    if positions is None:
        return tops, {}
    source = f"{data.rows}, windows of {positions.context_length} tokens (the harvest's)"
    section = {"source": source, "context_length": positions.context_length}
    return tops, {"by_position": {**section, "buckets": positions.stats.compute()}}


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _write_report(
    out: str,
    report: dict,
    tops,
    model: SparseAutoencoder,
    data: EvalData,
    checkpoint,
    report_latents: int,
    seed: int,
    log: Callable[[str], None],
) -> None:
    """The report page and the latent browser's files in `out` (raysae.pages, raysae.latents)."""
    from raysae import pages
    from raysae.latents import publish

    manifest = None if data.scored_dataset is None else data.scored_dataset.manifest
    if manifest is not None and (manifest.harvest or {}).get("context_length"):
        report["harvest_context_length"] = manifest.harvest["context_length"]
    history = None
    run = Path(checkpoint).parent / "metrics.json"
    if run.exists():
        history = json.loads(run.read_text()).get("history")
    t0 = time.perf_counter()
    browser = publish(
        tops,
        model.W_dec.detach(),
        manifest,
        Path(out),
        publish_latents=report_latents,
        seed=seed,
        log=_progress,
    )
    page = pages.write_report(out, report, browser, history)
    log(f"wrote {page} ({time.perf_counter() - t0:.1f} s) — open it in a browser")


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
    rows: str = "held-out",
    eval_parts: Optional[int] = None,
    n_tokens: int = 65_536,
    batch_size: int = 4096,
    pca_ks: Optional[Sequence[int]] = None,
    kmeans_ks: Optional[Sequence[int]] = None,
    kmeans_tokens: int = 16_384,
    seed: int = 0,
    device: Optional[str] = None,
    splice: Optional[dict] = None,
    by_position: bool = False,
    report_dir: Optional[str] = None,
    report_latents: int = 4096,
    log: Callable[[str], None] = print,
) -> dict:
    """`raysae eval`: evaluate a checkpoint, print the report, write it as JSON to `out`.

    rows: "held-out" scores the rows the SAE was not trained on (the last `eval_parts` parts of
    a dataset, default the run's data.eval_parts; a toy config's held-out stream), "all" every
    row; either way the baselines are fitted on the training rows (see `open_data`).

    splice: raysae.splice_config.SpliceConfig fields (None = from the dataset's manifest) to also
    splice the SAE into its language model; None skips that part.

    by_position: metrics by token position (raysae.positions) of the scored rows of a harvested
    dataset (positions up to the harvest's context length) and, with `splice`, of the LM pass at
    the splice's context length (CE and KL too).

    report_dir: also write the report page there (raysae.pages: index.html, metrics.json and
    the latent browser's files, `report_latents` latents detailed; raysae.latents).
    """
    if report_dir and "://" in report_dir:
        raise DataSourceError(
            f"--report {report_dir}: the report is a local folder of files to open in a "
            "browser; give a local path (and copy it to object storage afterwards if needed)"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_sae(checkpoint, device)
    if splice is not None:  # the data plane and the LM are needed only here
        from raysae import splice as splicing
        from raysae.splice_config import resolve_config

        splice_cfg, notes = resolve_config(data_spec, **splice)
        for line in notes:
            splicing.print_progress(line)
        splicing.check_model(model, splice_cfg)  # bad input fails now, not after the eval
    data = open_data(
        data_spec,
        model.cfg.d_in,
        batch_size,
        rows=rows,
        checkpoint=checkpoint,
        eval_parts=eval_parts,
    )
    report = {
        "checkpoint": str(checkpoint),
        "data": data.description,
        "rows": rows,
        "scored_rows": data.rows,
        "fit_rows": data.fit_rows,
        "sae_config": to_dict(model.cfg),
        **evaluate_with_baselines(
            model,
            data.fit,
            data.score,
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
    tops = None
    if by_position or report_dir:
        tops, section = _token_sections(
            model, data, n_tokens, batch_size, by_position, report_dir, splice is not None
        )
        report.update(section)
    if splice is not None:
        report["splice"] = splicing.run_splice(
            model,
            splice_cfg,
            device=device,
            progress=splicing.print_progress,
            by_position=by_position,
        )
    log(format_report(report))
    if report_dir:
        _write_report(report_dir, report, tops, model, data, checkpoint, report_latents, seed, log)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        # NaN (e.g. FVU of constant data) is not JSON: written as null.
        Path(out).write_text(json.dumps(json_safe(report), indent=2))
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
        f"{report['n_tokens']:,} tokens, {report.get('scored_rows', 'rows not recorded')}",
        f"baselines fitted on {report.get('fit_tokens', 0):,} tokens, "
        f"{report.get('fit_rows', 'rows not recorded')}",
        " " * width + "".join(f" {label:>9}" for _, label in _COLUMNS),
    ]
    for name, m in rows.items():
        lines.append(
            f"{name:<{width}}" + "".join(f" {m.get(key, math.nan):>9.4g}" for key, _ in _COLUMNS)
        )
    lines.append(
        "† fvu_b: the SAELens/SAEBench legacy FVU, mean over tokens of "
        "‖x−x̂‖²/‖x−μ‖² (μ: mean of the evaluated tokens); fvu = Σ‖x−x̂‖²/Σ‖x−μ‖²"
    )
    lines.append(
        "l1: mean over tokens of Σ_i |f_i|·‖d_i‖, d_i what one unit of latent i adds to x̂, "
        "in input units (as in training: raysae.metrics.latent_norms)"
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
    lines.extend(summary_lines(report.get("views", {})))
    if "by_position" in report:
        section = report["by_position"]
        lines.extend(position_lines(section["buckets"], section["source"]))
    if "splice" in report:
        from raysae.splice import report_lines

        lines.extend(report_lines(report["splice"]))
        if "by_position" in report["splice"]:
            s = report["splice"]
            source = f"LM pass over {s['corpus']}, windows of {s['context_length']} tokens"
            lines.extend(position_lines(s["by_position"], source))
    return "\n".join(lines)


def json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
