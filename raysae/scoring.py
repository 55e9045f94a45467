"""One pass over the rows `raysae eval` scores, in this process or on Ray Data actors.

A pass folds chunks of rows into a state that merges exactly, so it can be split across any
number of workers and the merged result is the one-process result up to float64 summation
order. Two folds:

    MomentsFold   the rows' mean (the reference mean of FVU_B), before scoring
    Scorer        the SAE and its baselines: per model a ReconstructionStats and SparsityStats,
                  and the SAE's *observers* — a crosscoder's or Matryoshka SAE's views
                  (raysae.views), metrics by token position (raysae.positions), the latent
                  browser's top-N tables (raysae.latents). Each chunk is encoded once and shown
                  to every observer.

Every row has a global number (its place among the scored rows); SparsityStats places a chunk
at its rows' numbers and the latent browser keys its tables by them, which is what makes the
shares of a split pass merge into the whole.

Where it runs (`run`):

    local   the rows in order, in this process (evaluate.py feeds it the checked batches)
    ray     one Ray Data read task per part of the dataset, each part's rows numbered from the
            part's offset (raysae.data.stream, `row_numbers`); `map_batches` on an actor pool
            that holds the models once per actor; each call folds one part into a fresh state
            and returns it, and the driver merges the states as they stream in. Only the parts
            that hold the first `n_tokens` rows are read.

The states cross from the actors to the driver as pickles inside Ray's object store (Ray's own
transport: objects this run made, never files someone else wrote).
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Protocol

import numpy as np
import torch
from torch import Tensor

from raysae.metrics import Moments, ReconstructionStats, SparsityStats, latent_norms
from raysae.saes import SparseAutoencoder

LATENT_ELEMENTS = 2**24
"""At most this many latent values (rows × n_latents) at once in a pass: 64 MiB of float32, so
a pass over n_latents = 131072 holds 128 rows at a time, not a (4096, n) slab."""

RAY_ROWS = 2**20
"""`--scoring auto` runs the passes on Ray Data from this many scored rows (a dataset's)."""

WHERE = ("auto", "local", "ray")
"""Where `raysae eval`'s passes over the scored rows run (`--scoring`)."""


class Observer(Protocol):
    """Something the SAE's output on every chunk of scored rows is shown to; mergeable."""

    def observe(
        self, model: SparseAutoencoder, columns: dict[str, Tensor], x: Tensor, out, rows: Tensor
    ) -> None:
        """columns: the chunk's other columns (token_id, doc_id, pos: (B,)); x: its
        activations (B, d_in) on the SAE's device; out: the SAE's SAEOutput; rows: (B,) int64
        global row numbers, consecutive."""

    def merge(self, other: Any) -> Any:
        """Fold `other` (disjoint rows of the same pass) into self; returns self."""


class Fold(Protocol):
    """A pass's work: a fresh state, and how a chunk of rows updates it (state.merge(other))."""

    def fresh(self) -> Any: ...

    def update(self, state: Any, columns: dict[str, Tensor], rows: Tensor) -> None: ...


class MomentsFold:
    """The rows' count and mean (Moments)."""

    def __init__(self, d_in: int):
        self.d_in = d_in

    def fresh(self) -> Moments:
        return Moments(self.d_in)

    def update(self, state: Moments, columns: dict[str, Tensor], rows: Tensor) -> None:
        state.update(columns["act"])


@dataclass
class PassStats:
    """What a Scorer's pass accumulates; `merge` folds in another share of the rows."""

    recon: dict[str, ReconstructionStats]
    sparsity: dict[str, SparsityStats]
    observers: dict[str, Observer] = field(default_factory=dict)
    n_rows: int = 0

    def merge(self, other: PassStats) -> PassStats:
        for name, stats in other.recon.items():
            self.recon[name].merge(stats)
            self.sparsity[name].merge(other.sparsity[name])
        for name, observer in other.observers.items():
            self.observers[name].merge(observer)
        self.n_rows += other.n_rows
        return self


class Scorer:
    """SAEs and baselines over chunks of rows: a Fold of PassStats.

    observers: makes the observers of the SAE named "sae" for a fresh state (called once per
    state, so each worker's share has its own). SAEs must be in inference mode
    (`model.evaluating()`); baselines move to the rows' device themselves."""

    def __init__(
        self,
        models: dict[str, Any],
        d_in: int,
        reference_mean: Optional[Tensor],
        dead_window: int,
        observers: Callable[[], dict[str, Observer]] = dict,
    ):
        if observers is not dict and not isinstance(models.get("sae"), SparseAutoencoder):
            raise ValueError("observers watch the SAE: give it under the name 'sae'")
        self.models, self.d_in, self.make_observers = models, d_in, observers
        self.reference_mean, self.dead_window = reference_mean, dead_window
        self.norms = {name: latent_norms(m) for name, m in models.items()}
        widest = max([len(n) for n in self.norms.values()] + [1])
        self.chunk = max(1, LATENT_ELEMENTS // widest)

    @property
    def device(self) -> torch.device:
        sae = next((m for m in self.models.values() if isinstance(m, SparseAutoencoder)), None)
        return torch.device("cpu") if sae is None else sae.W_dec.device

    def fresh(self) -> PassStats:
        return PassStats(
            {name: ReconstructionStats(self.d_in, self.reference_mean) for name in self.models},
            {name: SparsityStats(len(self.norms[name]), self.dead_window) for name in self.models},
            self.make_observers(),
        )

    @torch.no_grad()
    def update(self, state: PassStats, columns: dict[str, Tensor], rows: Tensor) -> None:
        """columns: "act" (B, d_in) and the observers' columns (B,); rows: (B,) their numbers."""
        acts, device = columns["act"], self.device
        for lo in range(0, len(acts), self.chunk):
            hi = min(lo + self.chunk, len(acts))
            numbers = rows[lo:hi]
            first = int(numbers[0])
            if int(numbers[-1]) - first != hi - lo - 1:
                raise ValueError(
                    f"rows {first}..{int(numbers[-1])} of one chunk are not consecutive"
                )
            x = acts[lo:hi].to(device)
            for name, model in self.models.items():
                if isinstance(model, SparseAutoencoder):
                    out = model(x.to(model.W_enc.dtype))
                    # The TopK family's sparse latents: no (B, n) tensor for the counts.
                    x_hat, latents = out.x_hat, out.codes
                else:
                    x_hat, latents = model(x)
                state.recon[name].update(x, x_hat)
                state.sparsity[name].update(latents, first, latent_norms=self.norms[name])
                if name == "sae" and state.observers:
                    part = {k: v[lo:hi] for k, v in columns.items() if k != "act"}
                    for observer in state.observers.values():
                        observer.observe(model, part, x, out, numbers)
        state.n_rows += len(acts)


# ---------------------------------------------------------------- where a pass runs


@dataclass(frozen=True)
class RayPass:
    """How `run_on_ray` spreads a pass: actors, and what each reserves."""

    actors: Optional[int] = None
    """Actors (model replicas); None: the cluster's GPUs if it has any, else its CPUs ÷
    cpus_per_actor, at most one per part read."""
    cpus_per_actor: float = 1.0
    """CPUs each actor reserves; torch uses that many threads (at least one)."""


def run_local(
    fold: Fold,
    batches: Iterable[dict[str, Tensor]],
    n_tokens: int,
    progress: Optional[Callable[[str], None]] = None,
    what: str = "pass",
) -> tuple[Any, int]:
    """Fold the first n_tokens rows of column batches (each with "act") in this process; rows
    are numbered from 0. Returns (state, rows seen)."""
    state, seen = fold.fresh(), 0
    start = last = time.monotonic()
    for batch in batches:
        b = min(len(batch["act"]), n_tokens - seen)
        fold.update(state, {k: v[:b] for k, v in batch.items()}, torch.arange(seen, seen + b))
        seen += b
        if progress and time.monotonic() - last >= 10:
            last = time.monotonic()
            rate = seen / max(last - start, 1e-9)
            progress(f"{what}: {seen:,}/{n_tokens:,} rows, {rate:,.0f} rows/s")
        if seen >= n_tokens:
            break
    return state, seen


def parts_for(dataset: Any, n_tokens: int) -> list[str]:
    """Names of the dataset's first parts that hold its first n_tokens rows."""
    names, rows = [], 0
    for part in dataset.parts:
        if rows >= n_tokens:
            break
        names.append(part.name)
        rows += part.rows
    return names


def run_on_ray(
    fold: Fold,
    dataset: Any,
    n_tokens: int,
    columns: tuple[str, ...],
    how: RayPass = RayPass(),
    progress: Optional[Callable[[str], None]] = None,
    what: str = "pass",
) -> tuple[Any, int]:
    """Fold the first n_tokens rows of `dataset` (a raysae.data.Dataset) on Ray Data actors,
    one part per call; the states are merged in the driver as they arrive. Connects to Ray
    (RAY_ADDRESS, else a local instance) if this process has not. Returns (state, rows)."""
    import ray
    import ray.data

    from raysae.data.stream import build_dataset

    if not ray.is_initialized():
        ray.init()
    names = parts_for(dataset, n_tokens)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    actors = how.actors or (gpus or max(1, int(resources.get("CPU", 1) // how.cpus_per_actor)))
    actors = max(1, min(actors, len(names)))
    ds = build_dataset(dataset, shuffle_files=False, columns=columns, parts=names, row_numbers=True)
    states = ds.map_batches(
        _FoldParts,
        fn_constructor_kwargs={"fold": [ray.put(fold)], "n_tokens": n_tokens, "gpu": gpus > 0},
        batch_size=None,  # one call per part: its rows are consecutive
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=how.cpus_per_actor,
        num_gpus=1 if gpus else 0,
    )
    state, seen, start, last = fold.fresh(), 0, time.monotonic(), time.monotonic()
    for batch in states.iter_batches(batch_size=None, batch_format="pyarrow"):
        for blob, rows in zip(batch.column("state").to_pylist(), batch.column("rows").to_pylist()):
            state.merge(pickle.loads(blob))
            seen += rows
        if progress and (time.monotonic() - last >= 10 or seen >= n_tokens):
            last = time.monotonic()
            rate = seen / max(last - start, 1e-9)
            progress(
                f"{what} on {actors} Ray actor(s): {seen:,}/{n_tokens:,} rows, {rate:,.0f} rows/s"
            )
    return state, seen


class _FoldParts:
    """The Ray Data UDF of `run_on_ray`: the fold (models included) once per actor; each call
    folds one part's rows (those numbered below n_tokens) into a fresh state."""

    def __init__(self, fold: list, n_tokens: int, gpu: bool):
        import ray

        self.fold = ray.get(fold[0])
        self.n_tokens = n_tokens
        threads = max(
            1, int(math.floor(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        )
        torch.set_num_threads(threads)
        if gpu and isinstance(self.fold, Scorer):
            for model in self.fold.models.values():
                if isinstance(model, SparseAutoencoder):
                    model.to("cuda")
        self.d_in = getattr(self.fold, "d_in")

    def __call__(self, table):
        import pyarrow as pa

        from raysae.data.format import collate

        rows = torch.from_numpy(table.column("row").to_numpy().astype(np.int64))
        keep = int((rows < self.n_tokens).sum())
        names = [c for c in table.column_names if c != "row"]
        columns = collate(
            table.slice(0, keep), d_in=self.d_in, out_dtype=torch.float32, columns=names
        )
        if not isinstance(columns, dict):
            columns = {"act": columns}
        state = self.fold.fresh()
        if keep:
            self.fold.update(state, columns, rows[:keep])
        return pa.table(
            {
                "state": [pickle.dumps(_to_cpu(state) if torch.cuda.is_available() else state)],
                "rows": [keep],
            }
        )


def _to_cpu(obj: Any) -> Any:
    """`obj` with every tensor inside it (attributes, dicts, lists) on the CPU: a GPU actor's
    state is unpickled by a driver that may have no GPU."""
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        for key, value in vars(obj).items():
            setattr(obj, key, _to_cpu(value))
    return obj


def choose(where: str, n_rows: int, has_dataset: bool) -> str:
    """ "local" or "ray" for `--scoring where` and the rows to score; ray needs a dataset."""
    if where not in WHERE:
        raise ValueError(f"--scoring {where!r}: choose one of {', '.join(WHERE)}")
    if where == "auto":
        return "ray" if has_dataset and n_rows >= RAY_ROWS else "local"
    return where
