"""The run configuration: one small dataclass per concern, validated once at the boundary.

Every field is documented by the string under it. `__post_init__` only validates; values derived
from other fields (the default learning rate, `k_aux`) are computed by properties, never stored
back. YAML and CLI input becomes a config only through raysae.settings (`from_dict`, the dotted
overrides of `load_run_config`): unknown keys are errors.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from raysae.settings import (
    ConfigError,
    Location,
    check_choices,
    check_non_negative,
    check_positive,
    from_dict,
    read_yaml,
    set_dotted,
)

Architecture = Literal[
    "relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk", "crosscoder"
]
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka_batchtopk")
Tracker = Literal["tensorboard", "mlflow", "wandb"]


@dataclass(frozen=True)
class SAEConfig:
    """What the sparse autoencoder is: architecture and sizes."""

    d_in: int
    """Width of the activations (the model's d_model for residual-stream SAEs)."""
    n_latents: int
    """Dictionary size: number of latents (decoder columns)."""
    architecture: Architecture = "topk"
    """One of relu, topk, batchtopk, jumprelu, gated, matryoshka_batchtopk, crosscoder (see
    raysae/saes/)."""
    k: int = 32
    """TopK family: latents kept per token (BatchTopK: k·B kept per batch of B tokens)."""
    l1_coefficient: float = 5.0
    """relu, gated: weight of the L1 penalty Σ f_i‖W_dec,i‖ (Anthropic, April 2024 update)."""
    l0_coefficient: float = 1e-3
    """jumprelu: weight of the L0 penalty (mean active latents per token)."""
    jumprelu_init_threshold: float = 1e-3
    """jumprelu: initial threshold θ, in units of the scaled input."""
    jumprelu_bandwidth: float = 1e-3
    """jumprelu: width ε of the rectangle kernel of the straight-through estimator."""
    k_aux: Optional[int] = None
    """TopK family: dead latents used by the AuxK loss; None means d_in // 2 (Gao et al. 2024)."""
    aux_coefficient: float = 1 / 32
    """TopK family: weight of the AuxK loss (Gao et al. 2024, Appendix A.2)."""
    threshold_decay: float = 0.99
    """batchtopk: EMA decay of the inference threshold (smallest kept activation per batch)."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """How b_dec is initialised from a data sample."""
    normalize_inputs: bool = True
    """Scale inputs so E‖x‖² = d_in during training; the factor is folded into the weights on export."""
    matryoshka_groups: tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5625)
    """matryoshka_batchtopk: the nested groups' sizes, in order, as fractions of n_latents that
    sum to 1 or as latent counts that sum to n_latents; prefix j (groups 0..j) must reconstruct
    on its own (Bussmann et al. 2025)."""
    matryoshka_weights: Optional[tuple[float, ...]] = None
    """matryoshka_batchtopk: the loss weight of each prefix's reconstruction, one per group
    (the last is the whole dictionary's); None weighs every prefix 1."""
    n_sources: int = 1
    """crosscoder: sources read together (layers or models at the same tokens, data.sources);
    d_in is their summed width, d_in / n_sources each."""
    crosscoder_sparsity: Literal["topk", "relu"] = "topk"
    """crosscoder: TopK (k per token, AuxK) or ReLU with the L1 penalty Σ_i f_i Σ_s ‖W_dec[i, s]‖
    (Anthropic 2024)."""

    def __post_init__(self) -> None:
        check_positive(
            self,
            "d_in",
            "n_latents",
            "k",
            "jumprelu_init_threshold",
            "jumprelu_bandwidth",
            where="sae",
        )
        check_non_negative(self, "l1_coefficient", "l0_coefficient", "aux_coefficient", where="sae")
        if self.architecture in TOPK_FAMILY and self.k > self.n_latents:
            raise ConfigError(
                f"sae.k={self.k} is larger than sae.n_latents={self.n_latents}: "
                "a TopK SAE cannot keep more latents than it has; lower k or raise n_latents"
            )
        if self.k_aux is not None and not 0 < self.k_aux <= self.n_latents:
            raise ConfigError(f"sae.k_aux={self.k_aux} must be in 1..n_latents={self.n_latents}")
        if not 0.0 < self.threshold_decay < 1.0:
            raise ConfigError(f"sae.threshold_decay={self.threshold_decay} must be in (0, 1)")
        if self.architecture == "matryoshka_batchtopk":
            self.group_bounds  # noqa: B018  (validates the groups and weights)
        if self.n_sources < 1 or self.d_in % self.n_sources:
            raise ConfigError(
                f"sae.n_sources={self.n_sources} must be ≥ 1 and divide sae.d_in={self.d_in} "
                "(d_in is the sources' summed width)"
            )
        if self.n_sources > 1 and self.architecture != "crosscoder":
            raise ConfigError(f"sae.n_sources={self.n_sources} needs sae.architecture: crosscoder")

    @property
    def group_bounds(self) -> tuple[int, ...]:
        """matryoshka_batchtopk: each prefix's end, increasing, the last n_latents."""
        sizes, n = self.matryoshka_groups, self.n_latents
        if not sizes or min(sizes) <= 0:
            raise ConfigError(f"sae.matryoshka_groups={list(sizes)} must be positive sizes")
        if all(float(s).is_integer() and s >= 1 for s in sizes) and sum(sizes) == n:
            counts = [int(s) for s in sizes]
        elif abs(sum(sizes) - 1.0) < 1e-6:
            ends = [round(n * f) for f in itertools.accumulate(sizes)]
            counts = [b - a for a, b in zip([0, *ends[:-1]], ends)]
        else:
            raise ConfigError(
                f"sae.matryoshka_groups={list(sizes)} sums to {sum(sizes)}: give fractions "
                f"summing to 1 or latent counts summing to sae.n_latents={n}"
            )
        if min(counts) < 1:
            raise ConfigError(
                f"sae.matryoshka_groups={list(sizes)} leaves an empty group at "
                f"n_latents={n}; use larger fractions or fewer groups"
            )
        weights = self.matryoshka_weights
        if weights is not None and (len(weights) != len(counts) or min(weights) < 0):
            raise ConfigError(
                f"sae.matryoshka_weights={list(weights)} needs one weight ≥ 0 per group "
                f"({len(counts)} groups)"
            )
        return tuple(itertools.accumulate(counts))

    @property
    def effective_k_aux(self) -> int:
        """k_aux, defaulting to d_in // 2 and capped at n_latents."""
        k_aux = self.k_aux if self.k_aux is not None else max(1, self.d_in // 2)
        return min(k_aux, self.n_latents)


@dataclass(frozen=True)
class TrainConfig:
    """How to train: budgets are in tokens, not steps."""

    total_tokens: int = 10_000_000
    """Training budget in tokens (activation rows)."""
    batch_size: int = 4096
    """Tokens per optimizer step (summed over workers in distributed runs)."""
    lr: Optional[float] = None
    """Adam learning rate; None means 4e-4 / sqrt(n_latents / 2^14): the 1/sqrt(n) scaling of
    Gao et al. 2024 (sparsify's rule) at twice sparsify's constant, which trained lower held-out
    FVU at every size and budget measured (BENCHMARKS.md, "Held-out quality"); below SAELens's
    fixed 3e-4 from 29,128 latents up."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    warmup_tokens: int = 0
    """Linear learning-rate warm-up from 0 over this many tokens."""
    decay_fraction: float = 0.2
    """Linear learning-rate decay to 0 over the last fraction of the budget (0 disables)."""
    sparsity_warmup_tokens: int = 0
    """Linear warm-up of the L1/L0 coefficient from 0 over this many tokens."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    dead_tokens: int = 10_000_000
    """A latent is dead after this many tokens without firing (OpenAI, sparsify: 10M)."""
    log_every_tokens: int = 1_000_000
    """Print and record training metrics every this many tokens."""
    init_tokens: int = 16_384
    """Tokens of data used to initialise b_dec and the input scale."""
    seed: int = 0
    """Seed for parameter initialisation (and data order where the data source takes one)."""
    autocast: Literal["auto", "bfloat16", "off"] = "auto"
    """Mixed precision of the training forward (torch.autocast): matmuls in bfloat16, parameters,
    optimizer state and the losses in float32. auto: bfloat16 on CUDA, off on CPU (where
    bfloat16 matmuls are no faster on most machines); bfloat16: on any device; off: float32."""

    def __post_init__(self) -> None:
        check_choices(self, where="train")
        check_positive(
            self, "total_tokens", "batch_size", "log_every_tokens", "init_tokens", where="train"
        )
        check_non_negative(
            self,
            "warmup_tokens",
            "sparsity_warmup_tokens",
            "grad_clip",
            "dead_tokens",
            where="train",
        )
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0 (or omitted for the default)")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"train.decay_fraction={self.decay_fraction} must be in [0, 1]")
        if self.total_tokens < self.batch_size:
            raise ConfigError(
                f"train.total_tokens={self.total_tokens} is smaller than one batch "
                f"(train.batch_size={self.batch_size}); raise the budget or lower the batch size"
            )

    def autocast_dtype(self, device_type: str) -> Optional[str]:
        """The autocast dtype's name on a device of `device_type` ("cpu", "cuda"), or None."""
        if self.autocast == "off" or (self.autocast == "auto" and device_type != "cuda"):
            return None
        return "bfloat16"

    def effective_lr(self, n_latents: int) -> float:
        """The learning rate, defaulting to 4e-4 / sqrt(n_latents / 2^14) (see `lr`)."""
        return self.lr if self.lr is not None else 4e-4 / math.sqrt(n_latents / 2**14)


@dataclass(frozen=True)
class ToyDataConfig:
    """Synthetic activations with known ground-truth features (see raysae.synthetic)."""

    n_features: int = 512
    """Number of true feature directions (more than d_in: superposition)."""
    active_per_token: float = 5.0
    """Expected number of active features per token."""
    frequency_decay: float = 0.0
    """Zipf-like exponent of feature frequencies (0: all features equally frequent)."""
    magnitude_mean: float = 1.0
    """Mean magnitude of an active feature."""
    magnitude_std: float = 0.25
    """Std of the magnitude of an active feature (magnitudes are clipped at 0)."""
    n_correlated_groups: int = 0
    """Groups of features that tend to fire together."""
    correlated_group_size: int = 4
    """Features per correlated group."""
    correlation: float = 0.8
    """Probability that the rest of a group fires when its first member fires."""
    n_one_hot_sets: int = 0
    """Sets of mutually exclusive features, exactly one of which fires per token (composition)."""
    one_hot_set_size: int = 8
    """Features per one-hot set."""
    n_hierarchies: int = 0
    """Parent features, each with children that fire only when it fires (a planted hierarchy:
    what Matryoshka SAEs recover and plain ones absorb)."""
    children_per_parent: int = 4
    """Children of each parent."""
    child_probability: float = 0.3
    """Probability that each child fires when its parent fires (children never fire alone)."""
    noise_std: float = 0.0
    """Std of isotropic Gaussian noise added to each token."""
    seed: int = 0
    """Seed of the feature directions and of the token stream."""

    def __post_init__(self) -> None:
        check_positive(
            self,
            "n_features",
            "active_per_token",
            "correlated_group_size",
            "one_hot_set_size",
            where="data.toy",
        )
        check_non_negative(
            self,
            "frequency_decay",
            "magnitude_std",
            "noise_std",
            "n_correlated_groups",
            "n_one_hot_sets",
            "n_hierarchies",
            "children_per_parent",
            where="data.toy",
        )
        for name in ("correlation", "child_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"toy.{name}={getattr(self, name)} must be in [0, 1]")
        grouped = (
            self.n_correlated_groups * self.correlated_group_size
            + self.n_one_hot_sets * self.one_hot_set_size
            + self.n_hierarchies * (1 + self.children_per_parent)
        )
        if grouped > self.n_features:
            raise ConfigError(
                f"toy: correlated groups, one-hot sets and hierarchies use {grouped} features "
                f"but n_features={self.n_features}; raise n_features or use fewer groups"
            )


@dataclass(frozen=True)
class DataConfig:
    """Where training activations come from: exactly one of `toy` or `uri`."""

    uri: Optional[Location] = None
    """A raysae dataset: a local directory or s3://bucket/prefix holding Parquet parts + manifest.json."""
    toy: Optional[ToyDataConfig] = None
    """Synthetic data with ground truth, generated on the fly."""
    sources: tuple[Location, ...] = ()
    """Datasets of the same tokens read together, row by row (a crosscoder's sources: layers
    of one `raysae harvest`, or two models sharing a tokenizer); each row is their activations
    concatenated in this order, their doc_id / pos checked to agree (raysae.data.paired)."""
    eval_parts: int = 1
    """data.uri: the dataset's last eval_parts Parquet parts are held out for the final evaluation."""
    eval_tokens: int = 65_536
    """Held-out tokens evaluated at the end of a run (at most)."""
    shuffle_buffer_tokens: int = 0
    """Ray Data local shuffle buffer per worker, in rows (0: parts are read in shuffled order only)."""
    read_cpus: float = 1.0
    """CPUs each Ray Data read task reserves (fractions let reads share a small machine with
    fractional-CPU workers; reads that cannot get their CPUs stall training)."""
    deterministic_order: bool = False
    """Ray Data keeps the (seeded) part order when streaming: runs with the same seed see the
    same batches, at some cost in ingest throughput (Ray's preserve_order)."""

    def __post_init__(self) -> None:
        if (self.uri is not None) + (self.toy is not None) + bool(self.sources) != 1:
            raise ConfigError(
                "data: give exactly one of data.uri (a dataset), data.sources (datasets read "
                "together) or data.toy (synthetic)"
            )
        if self.sources and len(self.sources) < 2:
            raise ConfigError("data.sources needs at least 2 datasets (one: use data.uri)")
        check_non_negative(self, "eval_parts", "shuffle_buffer_tokens", where="data")
        check_positive(self, "eval_tokens", "read_cpus", where="data")

    @property
    def dataset(self) -> Optional[str]:
        """What `raysae.data.open_data` opens: data.uri, or data.sources joined by " + "
        (None for toy data); also the key that runs reading the same data share."""
        return " + ".join(self.sources) if self.sources else self.uri


@dataclass(frozen=True)
class ScalingConfig:
    """How a run uses the Ray cluster (ignored by the single-process trainer)."""

    num_workers: int = 1
    """Ray Train workers (one process each, DDP). With min_workers set, the most workers."""
    min_workers: Optional[int] = None
    """Elastic training: start with at least this many workers and grow to num_workers as the
    cluster allows; a resize restarts the workers from the latest checkpoint."""
    resize_check_s: float = 60.0
    """Elastic training: how often (seconds) a healthy worker group checks whether the cluster
    now has room for more workers (Ray Train's elastic_resize_monitor_interval_s)."""
    use_gpu: Optional[bool] = None
    """One GPU per worker; None means yes when the cluster has GPUs."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker (fractions allowed)."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources each worker needs, e.g. {"trainer_slot": 1} to pin workers to nodes."""
    max_failures: int = 3
    """Worker-group failures survived (each restarts from the latest checkpoint)."""
    checkpoint_every_tokens: int = 5_000_000
    """Write a checkpoint every this many tokens (and at the end)."""
    num_checkpoints_to_keep: int = 2
    """Older checkpoints are deleted from storage."""

    def __post_init__(self) -> None:
        check_positive(
            self,
            "num_workers",
            "cpus_per_worker",
            "checkpoint_every_tokens",
            "num_checkpoints_to_keep",
            "resize_check_s",
            where="scaling",
        )
        check_non_negative(self, "max_failures", where="scaling")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ConfigError(
                f"scaling.min_workers={self.min_workers} must be in "
                f"1..scaling.num_workers={self.num_workers}"
            )


@dataclass(frozen=True)
class TensorBoardConfig:
    """TensorBoard event files (written with tensorboardX), one folder per SAE."""

    logdir: Optional[str] = None
    """A local directory for the event files (`tensorboard --logdir` it); None: the command's
    output folder's tensorboard/ (a local output; an s3:// output needs a logdir here)."""


@dataclass(frozen=True)
class MLflowConfig:
    """MLflow runs, one per SAE, with its config as parameters."""

    tracking_uri: Optional[str] = None
    """An MLflow tracking server (http://host:5000) or any store MLflow takes (sqlite:///…,
    databricks, a local directory: MLflow's file store); None: a local store in the output
    folder's mlruns/ (an SQLite database, mlflow.db, the local store MLflow recommends; an
    s3:// output needs a tracking_uri here). No password in it: MLflow reads one from
    MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN."""

    def __post_init__(self) -> None:
        from urllib.parse import urlsplit

        # The URI is written down (sweep_spec.json, Tune's trial configs, the runs' params).
        if self.tracking_uri and urlsplit(self.tracking_uri).password is not None:
            raise ConfigError(
                "tracking.mlflow.tracking_uri holds a password: remove it from the URI and set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
                "in the environment instead"
            )


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases runs, one per SAE, with its config as the run's config."""

    project: str = "raysae"
    """The W&B project."""
    entity: Optional[str] = None
    """The W&B team or user; None: the logged-in user's default."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """online: stream to W&B; offline: write the runs locally (`wandb sync` uploads them
    later); disabled: W&B's no-op mode."""
    dir: Optional[str] = None
    """A local directory W&B writes its files under (its wandb/ folder); None: W&B's own
    choice (WANDB_DIR, else the working directory)."""

    def __post_init__(self) -> None:
        check_choices(self, where="tracking.wandb")


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment trackers that follow training: one tracker run per SAE (a packed sweep
    trial makes one per member), its config as parameters and every logged metric as a
    series over tokens. A tracker that cannot be reached is warned about, not fatal."""

    trackers: tuple[Tracker, ...] = ()
    """Which trackers to log to: any of tensorboard, mlflow, wandb (each needs its library:
    pip install raysae[tensorboard], raysae[mlflow], raysae[wandb])."""
    experiment: Optional[str] = None
    """The MLflow experiment the runs go into (made if missing) and their W&B group; None: the
    sweep's name, or raysae-train for raysae train."""
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    """TensorBoard's settings."""
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    """MLflow's settings."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases's settings."""

    def __post_init__(self) -> None:
        check_choices(self, where="tracking")
        twice = sorted({t for t in self.trackers if self.trackers.count(t) > 1})
        if twice:
            raise ConfigError(f"tracking.trackers lists {', '.join(twice)} more than once")


@dataclass(frozen=True)
class RunConfig:
    """One training run: the file `raysae train CONFIG.yaml` reads."""

    sae: SAEConfig
    """The sparse autoencoder."""
    data: DataConfig
    """The activations."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Workers, GPUs, failures and checkpoints on the Ray cluster."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment trackers (TensorBoard, MLflow, W&B) following the run; not part of the run's
    identity (its name), so adding a tracker to a run that is resumed continues it."""


def load_run_config(
    path: str, overrides: Optional[dict] = None, what: str = "override"
) -> RunConfig:
    """Read a run YAML file into a RunConfig; `overrides` maps dotted keys to values (`what`
    names them in errors, e.g. "--set")."""
    data = read_yaml(path)
    if data is None:
        raise ConfigError(f"config file {path} is empty")
    for dotted, value in (overrides or {}).items():
        set_dotted(RunConfig, data, dotted, value, what=what)
    return from_dict(RunConfig, data, "")
