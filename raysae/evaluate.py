"""Evaluate a trained SAE: its metrics, baselines on the same data, decoder geometry; `raysae eval`.

`evaluate` is one pass of the mergeable accumulators (raysae.metrics) over a batch stream; the
trainer's final evaluation uses it. `score_with_baselines` is the report `raysae eval` prints
(`evaluate_with_baselines`: the same over batches in this process).
It scores the rows the SAE was not trained on (`open_data`: a dataset's held-out parts, as
training split them, or a toy config's held-out stream; every row on request) and fits the
baselines on its training rows, so an SAE and its baselines are both judged out of sample:

  1. fit, over the first n_tokens training rows: their exact mean and covariance
     (metrics.Moments), the first `kmeans_tokens` of them for k-means, and, unless PCA's k is
     given, the SAE's L0 on those (PCA is compared at the same L0);
  2. the scored rows' mean, the reference for FVU_B (per-token ratios need it in advance);
  3. score: the SAE and every baseline (raysae.baselines) through the same ReconstructionStats
     and SparsityStats over the first n_tokens scored rows, each chunk encoded once and also
     shown to the SAE's observers (views, positions, the latent browser: raysae.scoring).

Passes 2 and 3 run here or on Ray Data actors (`Passes`, `--scoring`); pass 1 runs here.

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
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from raysae.baselines import Baseline, default_kmeans_k, default_pca_k, fit_baselines
from raysae.checkpoint import load_sae
from raysae.config import RunConfig, load_run_config
from raysae.geometry import decoder_geometry
from raysae.metrics import Moments, ReconstructionStats, SparsityStats
from raysae.positions import PositionStats, bucket_edges, position_lines, window_positions
from raysae.saes import SparseAutoencoder
from raysae.scoring import (
    LATENT_ELEMENTS,
    MomentsFold,
    Observer,
    RayPass,
    Scorer,
    choose,
    run_local,
    run_on_ray,
)
from raysae.settings import from_dict, to_dict
from raysae.synthetic import HELD_OUT_STREAM, ToyData, feature_recovery, recovery_line
from raysae.views import ViewStats, has_views, summary_lines, view_report

TOY_PREFIX = "toy:"
"""`--data toy:RUN.yaml`: toy activations from a run config's data.toy section."""

ROWS = ("held-out", "all")
"""Which rows of the data `raysae eval` scores: those the SAE was not trained on, or every one."""


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
    that read its token_id / doc_id / pos columns too, and for `--scoring ray`."""


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
    batches: Iterable[Tensor | dict[str, Tensor]],
    n_tokens: int,
    d_in: int,
    device: Optional[torch.device] = None,
) -> Iterator[Tensor | dict[str, Tensor]]:
    """The first n_tokens rows of `batches` (activation tensors, or dicts of columns with the
    activations under "act"), checked to be (B, d_in), activations moved to `device`."""
    seen = 0
    for batch in batches:
        x = batch["act"] if isinstance(batch, dict) else batch
        if x.ndim != 2 or x.shape[1] != d_in:
            raise DataSourceError(
                f"evaluation batch at token {seen} has shape "
                f"{tuple(x.shape)}, but the SAE takes (B, d_in={d_in}); "
                "evaluate on activations of the layer it was trained on"
            )
        b = min(x.shape[0], n_tokens - seen)
        seen += b
        if isinstance(batch, dict):
            yield {k: (v[:b].to(device) if k == "act" else v[:b]) for k, v in batch.items()}
        else:
            yield x[:b].to(device)
        if seen >= n_tokens:
            return


@torch.no_grad()
def score(
    models: dict[str, SparseAutoencoder | Baseline],
    batches: Iterable[Tensor],
    d_in: int,
    reference_mean: Optional[Tensor],
    dead_window: int,
) -> dict[str, tuple[ReconstructionStats, SparsityStats]]:
    """Run every model on every batch, accumulating its reconstruction and sparsity stats (one
    raysae.scoring pass in this process)."""
    scorer = Scorer(models, d_in, reference_mean, dead_window)
    state, seen = run_local(scorer, ({"act": x} for x in batches), sys.maxsize)
    if not seen:
        raise DataSourceError("the evaluation stream is empty: no batches to evaluate on")
    return {name: (state.recon[name], state.sparsity[name]) for name in models}


@torch.no_grad()
def evaluate(
    model: SparseAutoencoder,
    batches: Iterable[Tensor],
    n_tokens: int,
    reference_mean: Optional[Tensor] = None,
    dead_window: Optional[int] = None,
    views: bool = False,
) -> dict:
    """Reconstruction and sparsity metrics of `model` (in inference mode) on up to n_tokens rows;
    with `views`, also a crosscoder's or Matryoshka SAE's (raysae.views) from the same encoding.

    dead_window defaults to n_tokens: a latent is dead if it never fired during the evaluation.
    """
    observers = _WithViews(dict, views and has_views(model))
    scorer = Scorer(
        {"sae": model}, model.cfg.d_in, reference_mean, dead_window or n_tokens, observers
    )
    with model.evaluating():
        rows = take(batches, n_tokens, model.cfg.d_in, model.W_dec.device)
        state, seen = run_local(scorer, ({"act": x} for x in rows), sys.maxsize)
    if not seen:
        raise DataSourceError("the evaluation stream is empty: no batches to evaluate on")
    metrics = {**state.recon["sae"].compute(), **state.sparsity["sae"].compute()}
    if "views" in state.observers:
        metrics.update(view_report(model, state.observers["views"]))
    return metrics


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
    **options,
) -> dict:
    """The SAE and the baselines on the first n_tokens rows of data(), the baselines fitted on
    the first n_tokens rows of fit() (the SAE's training rows), and the decoder geometry: the
    report of `score_with_baselines` on the scored rows in this process."""
    return score_with_baselines(
        model, fit, Passes.local(data, model.cfg.d_in), n_tokens, **options
    )[0]


@torch.no_grad()
def score_with_baselines(
    model: SparseAutoencoder,
    fit: Callable[[], Iterable[Tensor]],
    scored: "Passes",
    n_tokens: int,
    *,
    pca_ks: Optional[Sequence[int]] = None,
    kmeans_ks: Optional[Sequence[int]] = None,
    kmeans_tokens: int = 16_384,
    seed: int = 0,
    observers: Callable[[], dict[str, Observer]] = dict,
) -> tuple[dict, dict[str, Observer]]:
    """The SAE and the baselines on the first n_tokens scored rows (`scored` runs the passes
    over them: here or on Ray Data), the baselines fitted on the first n_tokens rows of fit()
    (the SAE's training rows, in this process), and the decoder geometry.

    pca_ks defaults to [the SAE's L0 on the k-means sample, rounded]; kmeans_ks to [n_latents],
    capped so each centroid has at least 4 of the first `kmeans_tokens` fit rows. `observers`
    makes the extra observers of the scoring pass (raysae.scoring: positions, the latent
    browser); a crosscoder's and Matryoshka SAE's views are observed too. Returns ({"n_tokens",
    "fit_tokens", "sae": metrics (with per-latent "latent_frequencies"), "baselines": {name:
    metrics}, "decoder_geometry", "views" if any}, the observers after the pass).
    """
    with model.evaluating():
        d_in = model.cfg.d_in
        moments, sample, l0 = _fit_pass(model, fit(), n_tokens, kmeans_tokens, pca_ks is None)
        pca_ks = [default_pca_k(l0, d_in)] if pca_ks is None else list(pca_ks)
        kmeans_ks = (
            [default_kmeans_k(model.cfg.n_latents, len(sample))]
            if kmeans_ks is None
            else list(kmeans_ks)
        )
        baselines = fit_baselines(moments, sample, pca_ks, kmeans_ks, seed)
        # FVU_B about the scored rows' own mean (as SAELens takes it), fixed before scoring.
        reference, _ = scored.run(MomentsFold(d_in), n_tokens, "reference mean")
        if reference.n == 0:
            raise DataSourceError("the evaluation stream is empty: no batches to evaluate on")
        # One pass, each chunk encoded once: scores, a crosscoder's FVU per source and a
        # Matryoshka SAE's per prefix (raysae.views), the caller's observers.
        scorer = Scorer(
            {"sae": model, **{b.name: b for b in baselines}},
            d_in,
            reference.mean.cpu(),
            reference.n,
            _WithViews(observers, has_views(model)),
        )
        state, _ = scored.run(scorer, n_tokens, "scoring")
    _check_same_tokens(reference, state.recon["sae"].moments)
    observed = dict(state.observers)
    views = observed.pop("views", None)
    report = {
        name: {**state.recon[name].compute(), **state.sparsity[name].compute()}
        for name in state.recon
    }
    sae = report.pop("sae")
    sae["latent_frequencies"] = state.sparsity["sae"].frequencies().tolist()
    parts = view_report(model, views) if views is not None else {}
    return {
        "n_tokens": reference.n,
        "fit_tokens": moments.n,
        "sae": sae,
        "baselines": report,
        "decoder_geometry": decoder_geometry(model.W_dec, seed=seed),
        **({"views": parts} if parts else {}),
    }, observed


class _WithViews:
    """The caller's observers, and a ViewStats when the SAE has views (picklable for Ray)."""

    def __init__(self, observers: Callable[[], dict[str, Observer]], views: bool):
        self.observers, self.views = observers, views

    def __call__(self) -> dict[str, Observer]:
        return {**self.observers(), **({"views": ViewStats()} if self.views else {})}


class Passes:
    """Runs raysae.scoring folds over the first n_tokens scored rows, in this process or on Ray
    Data (`ray` given: the scored rows must be a raysae.data.Dataset's)."""

    def __init__(
        self,
        batches: Callable[[], Iterable[Tensor | dict[str, Tensor]]],
        d_in: int,
        dataset: Optional[object] = None,
        columns: tuple[str, ...] = ("act",),
        ray: Optional[RayPass] = None,
    ):
        if ray is not None and dataset is None:
            raise DataSourceError(
                "--scoring ray reads a dataset's parts on Ray Data; toy data are scored here: "
                "use --scoring local"
            )
        self.batches, self.d_in, self.dataset, self.columns, self.ray = (
            batches,
            d_in,
            dataset,
            columns,
            ray,
        )

    @classmethod
    def local(cls, batches: Callable[[], Iterable[Tensor]], d_in: int) -> "Passes":
        return cls(batches, d_in)

    def run(self, fold, n_tokens: int, what: str):
        """(the fold's state, rows folded)."""
        if self.ray is not None:
            return run_on_ray(fold, self.dataset, n_tokens, self.columns, self.ray, _progress, what)
        rows = (
            b if isinstance(b, dict) else {"act": b}
            for b in take(self.batches(), n_tokens, self.d_in, None)
        )
        return run_local(fold, rows, n_tokens, _progress, what)


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


class DatasetPositions:
    """A PositionStats fed from a harvested dataset's rows: the `pos` column (the index in the
    document) turned into the index in the harvest's window (raysae.positions)."""

    def __init__(self, d_in: int, context_length: int, prepend_bos: bool):
        self.context_length, self.prepend_bos = context_length, prepend_bos
        self.stats = PositionStats(d_in, bucket_edges(context_length), end=context_length)

    def observe(self, model, columns: dict[str, Tensor], x: Tensor, out, rows: Tensor) -> None:
        """raysae.scoring.Observer."""
        positions = window_positions(columns["pos"].to(torch.int64), *self._window)
        self.stats.update(x, out.x_hat, out.codes, positions.to(x.device))

    def merge(self, other: DatasetPositions) -> DatasetPositions:
        self.stats.merge(other.stats)
        return self

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


class _Observers:
    """Makes `raysae eval`'s observers of the scoring pass (picklable: Ray actors call it)."""

    def __init__(self, positions: Optional[tuple[int, int, bool]], tops: Optional[dict]):
        """positions: DatasetPositions' (d_in, context_length, prepend_bos); tops: LatentTops'
        keyword arguments."""
        self.positions, self.tops = positions, tops

    def __call__(self) -> dict[str, Observer]:
        from raysae.latents import LatentTops

        observers: dict[str, Observer] = {}
        if self.positions is not None:
            observers["positions"] = DatasetPositions(*self.positions)
        if self.tops is not None:
            observers["tops"] = LatentTops(**self.tops)
        return observers


def _observers(
    model: SparseAutoencoder, data: EvalData, by_position: bool, browse: bool, spliced: bool
) -> _Observers:
    """The observers for the `by_position` section (a harvested dataset's rows; skipped when
    the splice's LM pass gives positions and the rows have none) and the latent browser."""
    from raysae.latents import log_range_of

    positions = tops = None
    if by_position:
        try:
            p = DatasetPositions.of(data, model.cfg.d_in)
            positions = (model.cfg.d_in, p.context_length, p.prepend_bos)
        except DataSourceError:
            if not spliced:
                raise
    if browse:
        # The activation histogram's range, fixed before the pass so every share of it (Ray
        # actors) bins alike: from the SAE's latents on the first scored rows.
        rows = max(1, LATENT_ELEMENTS // model.cfg.n_latents)
        first = next(take(data.score(), rows, model.cfg.d_in, model.W_dec.device), None)
        if first is None:
            raise DataSourceError("the evaluation stream is empty: no batches to evaluate on")
        with model.evaluating():
            latents = model(first.to(model.W_enc.dtype)).latents.float().cpu()
        tops = {"n_latents": model.cfg.n_latents, "log_range": log_range_of(latents)}
    return _Observers(positions, tops)


def _passes(
    data: EvalData,
    d_in: int,
    batch_size: int,
    n_tokens: int,
    where: str,
    ray_pass: RayPass,
    observers: _Observers,
) -> Passes:
    """How the scored rows are passed over: their columns (token ids and positions only where
    an observer reads them), here or on Ray Data (`where`, see raysae.scoring.choose)."""
    dataset = data.scored_dataset
    try:
        rows = min(n_tokens, dataset.n_tokens) if dataset is not None else n_tokens
        where = choose(where, rows, dataset is not None)
    except ValueError as e:
        raise DataSourceError(str(e)) from None
    ray = ray_pass if where == "ray" else None
    if dataset is None:
        return Passes(data.score, d_in, ray=ray)
    from raysae.data.format import COLUMNS

    columns = COLUMNS if observers.positions or observers.tops else ("act",)
    return Passes(
        lambda: dataset.batches(batch_size, dtype=torch.float32, columns=columns),
        d_in,
        dataset,
        columns,
        ray,
    )


def _position_section(data: EvalData, positions: Optional[DatasetPositions]) -> dict:
    if positions is None:
        return {}
    source = f"{data.rows}, windows of {positions.context_length} tokens (the harvest's)"
    section = {"source": source, "context_length": positions.context_length}
    return {"by_position": {**section, "buckets": positions.stats.compute()}}


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
    scoring: str = "auto",
    ray_pass: RayPass = RayPass(),
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

    scoring: where the passes over the scored rows run (raysae.scoring.WHERE): "local" in this
    process, "ray" on Ray Data actors (`ray_pass`), "auto" on Ray from scoring.RAY_ROWS rows of
    a dataset.
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
    observers = _observers(model, data, by_position, bool(report_dir), splice is not None)
    passes = _passes(data, model.cfg.d_in, batch_size, n_tokens, scoring, ray_pass, observers)
    results, observed = score_with_baselines(
        model,
        data.fit,
        passes,
        n_tokens,
        pca_ks=pca_ks,
        kmeans_ks=kmeans_ks,
        kmeans_tokens=kmeans_tokens,
        seed=seed,
        observers=observers,
    )
    report = {
        "checkpoint": str(checkpoint),
        "data": data.description,
        "rows": rows,
        "scored_rows": data.rows,
        "fit_rows": data.fit_rows,
        "scoring": "on Ray Data" if passes.ray is not None else "in this process",
        "sae_config": to_dict(model.cfg),
        **results,
    }
    if data.true_directions is not None:
        recovery = feature_recovery(data.true_directions, model.W_dec)
        report["feature_recovery"] = {k: v for k, v in recovery.items() if k != "max_cos"}
    tops = observed.get("tops")
    report.update(_position_section(data, observed.get("positions")))
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
