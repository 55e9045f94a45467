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

Expansion is done here, not by Tune's samplers, so that sub-spaces, packing and the point list
are explicit, reproducible and testable without Ray; Tune then runs one trial per pack.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Optional

from raysae.config import ConfigError, RunConfig, from_dict, read_yaml, to_dict

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


@dataclass(frozen=True)
class SchedulerSpec:
    """Early stopping with ASHA (Li et al. 2020) on a reported metric."""

    type: str = "asha"
    """Only "asha" for now."""
    metric: str = "fvu"
    """Metric to compare trials on (any reported training metric, e.g. fvu, mse)."""
    mode: str = "min"
    """"min" or "max"."""
    grace_tokens: int = 100_000
    """Tokens a trial trains before it can be stopped."""
    reduction_factor: int = 2
    """ASHA's η: the fraction 1/η of trials continues at each rung."""

    def __post_init__(self) -> None:
        if self.type != "asha":
            raise ConfigError(f"scheduler.type={self.type!r}: only 'asha' is supported")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"scheduler.mode={self.mode!r} must be 'min' or 'max'")
        if self.grace_tokens <= 0 or self.reduction_factor < 2:
            raise ConfigError("scheduler: grace_tokens must be > 0 and reduction_factor >= 2")


@dataclass(frozen=True)
class SweepSpec:
    """A sweep: a base run config and a search space over its fields."""

    name: str
    """Sweep name; the Tune experiment and the output folder are named after it."""
    output: str
    """Where results go: a local directory or s3://bucket/prefix."""
    base: dict
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
    harvest: Optional[dict] = None
    """Optional harvest settings (raysae harvest's) used when base.data.uri holds no dataset yet."""
    toy_dataset: Optional[dict] = None
    """Optional toy data written to base.data.uri when it holds no dataset yet:
    {n_tokens, rows_per_part, features: {ToyDataConfig fields}} (see raysae.synthetic)."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"name={self.name!r}: give a non-empty name without '/'")
        for key in ("num_samples", "pack", "max_concurrent_trials"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures={self.max_failures} must be >= 0")
        if self.harvest is not None and self.toy_dataset is not None:
            raise ConfigError("give at most one of harvest and toy_dataset")
        if self.toy_dataset is not None:
            unknown = set(self.toy_dataset) - {"n_tokens", "rows_per_part", "features"}
            if unknown or not {"n_tokens", "rows_per_part"} <= set(self.toy_dataset):
                raise ConfigError(
                    "toy_dataset: give n_tokens, rows_per_part and optionally "
                    f"features (got {sorted(self.toy_dataset)})"
                )


def load_sweep_spec(path: str) -> SweepSpec:
    """Read and validate a sweep YAML (every point is built, so bad values fail here)."""
    data = read_yaml(path, "sweep spec")
    spec = with_absolute_paths(from_dict(SweepSpec, data or {}, ""))
    expand(spec)  # validates every point
    return spec


def with_absolute_paths(spec: SweepSpec) -> SweepSpec:
    """Relative local paths (output, base.data.uri, harvest.output) made absolute: Tune runs
    each trial in its own working directory."""
    from raysae.data.storage import absolute

    base = {**spec.base}
    if isinstance(base.get("data"), dict) and base["data"].get("uri"):
        base["data"] = {**base["data"], "uri": absolute(base["data"]["uri"])}
    harvest = spec.harvest
    if harvest and harvest.get("output"):
        harvest = {**harvest, "output": absolute(harvest["output"])}
    return dataclasses.replace(spec, output=absolute(spec.output), base=base, harvest=harvest)


def expand(spec: SweepSpec) -> list[RunConfig]:
    """Every point of the sweep as a validated RunConfig, in a deterministic order."""
    if not spec.space and not spec.architectures:
        raise ConfigError("the sweep's space is empty: give values in space or architectures")
    rng = random.Random(spec.seed)
    arch_spaces = spec.architectures or {None: {}}
    points: list[RunConfig] = []
    for arch, sub in arch_spaces.items():
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
        for combo in itertools.product(*(space[k] for k in grid_keys)):
            for _ in range(spec.num_samples if dist_keys else 1):
                values = dict(zip(grid_keys, combo))
                values.update({k: _draw(space[k], rng) for k in dist_keys})
                points.append(_point(spec.base, values))
    if not points:
        raise ConfigError("the sweep's space is empty: give values in space or architectures")
    _check_packable(points, spec.pack)
    return points


def packs(points: list[RunConfig], pack: int) -> list[list[RunConfig]]:
    """Consecutive groups of `pack` points (the last may be smaller): one trial each."""
    return [points[i : i + pack] for i in range(0, len(points), pack)]


def _point(base: dict, values: dict) -> RunConfig:
    data = to_dict(from_dict(RunConfig, base, "base")) if base else {}
    for dotted, value in values.items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"space key {dotted!r}: {p!r} is not a config section")
            node = node[p]
        if last not in node:
            raise ConfigError(
                f"space key {dotted!r}: {last!r} is not a field of {'.'.join(parents)}"
            )
        node[last] = value
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
        and all(isinstance(a, (int, float)) for a in args)
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
