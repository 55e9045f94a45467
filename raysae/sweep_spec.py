"""Sweep specs: one YAML file → the list of SAE run configs a sweep trains.

    name: quickstart                 # the sweep's name: resuming needs the same name and output
    output: out/quickstart           # local directory or s3://bucket/prefix
    base:                            # a run config (raysae train's format) every point starts from
      sae: {d_in: 576, n_latents: 2048}
      train: {total_tokens: 200_000, batch_size: 1024}
      data: {uri: data/smollm2/layer_3}
      scaling: {num_workers: 1}
    space:                           # dotted run-config keys → values
      sae.n_latents: [1024, 2048]    #   a list: grid over its values
      train.lr: {loguniform: [1e-4, 1e-2]}   # a distribution: sampled (num_samples times)
    architectures:                   # per-architecture sub-spaces (grid over architectures)
      topk: {sae.k: [16, 32]}        #   k only for the TopK family,
      relu: {sae.l1_coefficient: {loguniform: [1, 10]}}   # the L1 coefficient only for relu
    num_samples: 1                   # draws of the distributions per grid point
    seed: 0                          # seeds the draws: the same spec gives the same points
    pack: 1                          # SAEs trained together on the same batches in one trial
    max_concurrent_trials: 1
    scheduler: {type: asha, metric: fvu, grace_tokens: 50_000}   # optional early stopping
    harvest: {model: ..., layers: [3], output: data/smollm2}  # or toy_dataset: make data if missing
    tracking: {trackers: [tensorboard, mlflow]}   # optional: one tracker run per SAE

Every key is checked when the spec is loaded (raysae.settings.from_dict, and every point is
built), so a misspelt key anywhere fails before anything is written, naming it.

Expansion is done here, not by Tune's samplers, so that sub-spaces, packing and the point list
are explicit, reproducible and testable without Ray; Tune then runs one trial per pack.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from raysae.config import RunConfig, ToyDataConfig, TrackingConfig
from raysae.data.storage import absolute
from raysae.harvest import HarvestConfig, layer_uri
from raysae.settings import (
    ConfigError,
    Location,
    check_choices,
    check_non_negative,
    check_positive,
    from_dict,
    read_yaml,
    set_dotted,
    to_dict,
    with_absolute_paths,
)
from raysae.tracking import check_places

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
MAX_POINTS = 10_000
"""The most points a sweep expands to: a guard against a typo'd num_samples or grid."""


@dataclass(frozen=True)
class SchedulerSpec:
    """Early stopping with ASHA (Li et al. 2020) on a reported metric."""

    type: Literal["asha"] = "asha"
    """Only asha for now."""
    metric: str = "fvu"
    """Metric to compare trials on (any reported training metric, e.g. fvu, mse)."""
    mode: Literal["min", "max"] = "min"
    """Whether lower (min) or higher (max) values of the metric are better."""
    grace_tokens: int = 100_000
    """Tokens a trial trains before it can be stopped."""
    reduction_factor: int = 2
    """ASHA's η: the fraction 1/η of trials continues at each rung."""

    def __post_init__(self) -> None:
        check_choices(self, where="scheduler")
        check_positive(self, "grace_tokens", where="scheduler")
        if self.reduction_factor < 2:
            raise ConfigError(f"scheduler.reduction_factor={self.reduction_factor} must be >= 2")


@dataclass(frozen=True)
class ToyDatasetSpec:
    """Toy activations with known ground-truth features (raysae.synthetic), written to
    base.data.uri when it holds no dataset yet."""

    n_tokens: int
    """Rows to write (the last base.data.eval_parts parts are held out for evaluation)."""
    rows_per_part: int
    """Rows per Parquet part."""
    features: ToyDataConfig = field(default_factory=ToyDataConfig)
    """The true features and how they fire; their dimension is base.sae.d_in."""

    def __post_init__(self) -> None:
        check_positive(self, "n_tokens", "rows_per_part", where="toy_dataset")


@dataclass(frozen=True)
class SweepSpec:
    """A sweep: a base run config and a search space over its fields."""

    name: str
    """Sweep name; the Tune experiment and the output folder are named after it."""
    output: Location
    """Where results go: a local directory or s3://bucket/prefix."""
    base: RunConfig
    """A run config (sae, train, data, scaling) every point starts from."""
    space: dict = field(default_factory=dict)
    """Dotted run-config keys → a list (grid) or a distribution {uniform|loguniform|randint|choice: …}."""
    architectures: dict = field(default_factory=dict)
    """Architecture → its own sub-space (same format); the sweep grids over these architectures."""
    num_samples: int = 1
    """Draws of the distributions per grid point."""
    seed: int = 0
    """Seed of the draws."""
    pack: int = 1
    """SAEs trained together in one trial, on the same batches (each its own optimizer)."""
    max_concurrent_trials: int = 1
    """Trials running at once (each takes scaling.num_workers × cpus_per_worker CPUs)."""
    scheduler: Optional[SchedulerSpec] = None
    """Optional early stopping."""
    max_failures: int = 1
    """Retries of a failed trial (it resumes from its checkpoint)."""
    harvest: Optional[HarvestConfig] = None
    """Optional: the harvest (raysae harvest's settings) that makes base.data.uri when it holds
    no dataset yet; base.data.uri must be one of its layers' outputs."""
    toy_dataset: Optional[ToyDatasetSpec] = None
    """Optional: toy data written to base.data.uri when it holds no dataset yet."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment trackers (TensorBoard, MLflow, W&B): one tracker run per SAE, packed or not,
    in OUTPUT/NAME/tensorboard and OUTPUT/NAME/mlruns unless set; fixed when the sweep starts
    (`--resume` keeps the first run's)."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"name={self.name!r}: give a non-empty name without '/'")
        if not self.output:
            raise ConfigError("output='': give a local directory or s3://bucket/prefix")
        check_positive(self, "num_samples", "pack", "max_concurrent_trials", where="")
        check_non_negative(self, "max_failures", where="")
        if self.harvest is not None and self.toy_dataset is not None:
            raise ConfigError("give at most one of harvest and toy_dataset")
        check_places(self.tracking, self.output)  # e.g. an s3:// output: where do they go?
        toy = self.toy_dataset
        if (
            toy is not None
            and math.ceil(toy.n_tokens / toy.rows_per_part) <= self.base.data.eval_parts
        ):
            raise ConfigError(
                f"toy_dataset: {toy.n_tokens} tokens in parts of {toy.rows_per_part} rows make "
                f"{math.ceil(toy.n_tokens / toy.rows_per_part)} part(s), and base.data.eval_parts="
                f"{self.base.data.eval_parts} would hold out all of them: lower "
                "toy_dataset.rows_per_part"
            )
        if self.harvest is not None and self.base.data.uri is not None:
            outputs = [layer_uri(self.harvest.output, layer) for layer in self.harvest.layers]
            if absolute(self.base.data.uri) not in map(absolute, outputs):
                raise ConfigError(
                    f"base.data.uri={self.base.data.uri} is not one of the harvest's outputs "
                    f"({', '.join(outputs)})"
                )


def load_sweep_spec(path: str) -> SweepSpec:
    """Read and validate a sweep YAML (see parse_sweep_spec)."""
    return parse_sweep_spec(read_yaml(path, "sweep spec"))


def parse_sweep_spec(data: Any) -> SweepSpec:
    """The SweepSpec of plain data (a YAML file's), every key checked and every point built, so
    that a bad spec fails here, before anything is written; local paths made absolute."""
    spec = with_absolute_paths(from_dict(SweepSpec, data or {}, ""))
    expand(spec)  # validates every point
    return spec


def expand(spec: SweepSpec) -> list[RunConfig]:
    """Every point of the sweep as a validated RunConfig, in a deterministic order."""
    if not spec.space and not spec.architectures:
        raise ConfigError("the sweep's space is empty: give values in space or architectures")
    rng = random.Random(spec.seed)
    arch_spaces = spec.architectures or {None: {}}
    points: list[RunConfig] = []
    n_points = 0
    for arch, sub in arch_spaces.items():
        if not isinstance(sub, (dict, type(None))):
            raise ConfigError(
                f"architectures: {arch}={sub!r}: give its sub-space as a mapping of dotted keys "
                f"to values, e.g. {arch}: {{sae.k: [16, 32]}}"
            )
        space = {**spec.space, **(sub or {})}
        if arch is not None:
            space["sae.architecture"] = [arch]
        grid_keys = [k for k, v in space.items() if isinstance(v, list)]
        dist_keys = [k for k, v in space.items() if not isinstance(v, list)]
        for key in dist_keys:
            _check_distribution(key, space[key])
        for k in grid_keys:
            if not space[k]:
                raise ConfigError(f"space: {k} has an empty list of values")
        n_points += math.prod(len(space[k]) for k in grid_keys) * (
            spec.num_samples if dist_keys else 1
        )
        if n_points > MAX_POINTS:
            raise ConfigError(
                f"the sweep has more than {MAX_POINTS:,} points; split it into smaller sweeps"
            )
        for combo in itertools.product(*(space[k] for k in grid_keys)):
            for _ in range(spec.num_samples if dist_keys else 1):
                values = dict(zip(grid_keys, combo))
                values.update({k: _draw(space[k], rng) for k in dist_keys})
                points.append(_point(spec.base, values))
    if not points:
        raise ConfigError("the sweep's space is empty: give values in space or architectures")
    if any(p.tracking != TrackingConfig() for p in points):
        raise ConfigError(
            "base.tracking: a sweep's trackers are set in its own top-level tracking: section, "
            "for every SAE of the sweep (not in base, nor in the space)"
        )
    _check_packable(points, spec.pack)
    return points


def packs(points: list[RunConfig], pack: int) -> list[list[RunConfig]]:
    """Consecutive groups of `pack` points (the last may be smaller): one trial each."""
    return [points[i : i + pack] for i in range(0, len(points), pack)]


def _point(base: RunConfig, values: dict) -> RunConfig:
    data = to_dict(base)
    for dotted, value in values.items():
        set_dotted(RunConfig, data, dotted, value, what="space key")
    where = ", ".join(f"{k}={v}" for k, v in values.items())
    try:
        return from_dict(RunConfig, data, "")
    except ConfigError as e:
        raise ConfigError(f"sweep point ({where}): {e}") from None


def _check_distribution(key: str, dist: Any) -> None:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ConfigError(
            f"space: {key}={dist!r}: give a list (grid) or one of "
            f"{{{' | '.join(DISTRIBUTIONS)}: ...}}"
        )
    ((kind, args),) = dist.items()
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"space: {key}: choice needs a non-empty list")
        return
    if not (
        isinstance(args, list)
        and len(args) == 2
        and all(isinstance(a, (int, float)) and math.isfinite(a) for a in args)
        and args[0] < args[1]
    ):
        raise ConfigError(f"space: {key}: {kind} needs [low, high] with low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"space: {key}: loguniform needs low > 0, got {args[0]}")


def _draw(dist: dict, rng: random.Random):
    ((kind, args),) = dist.items()
    if kind == "choice":
        return rng.choice(args)
    low, high = args
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.randint(int(low), int(high))  # randint: both ends included


def _check_packable(points: list[RunConfig], pack: int) -> None:
    """Packed SAEs share every batch: they must agree on the data and the token budget."""
    if pack == 1:
        return
    for group in packs(points, pack):
        first = group[0]
        for other in group[1:]:
            for section, key in (
                ("data", None),
                ("train", "total_tokens"),
                ("train", "batch_size"),
                ("sae", "d_in"),
                ("scaling", None),
            ):
                a, b = getattr(first, section), getattr(other, section)
                if key:
                    a, b = getattr(a, key), getattr(b, key)
                if a != b:
                    name = f"{section}.{key}" if key else section
                    raise ConfigError(
                        f"pack={pack}: packed points must share {name}; "
                        "sweep it in separate trials (pack: 1)"
                    )
