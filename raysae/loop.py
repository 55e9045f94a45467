"""The training loop: a pack of SAEs trained on one stream of batches, in one process
(`raysae train --local`, `fit`) or as one DDP worker of a Ray Train run (raysae.worker
adapts it: context, data shard, checkpoints, `ray.train.report`).

    for batch in batches:                          # endless; the token budget ends the loop
        cut the last batch so the budget is met exactly
        every SAE of the pack: train_step (raysae.step), then its metrics
        every log_every_tokens, every checkpoint_every_tokens and at the end:
            merge the metrics across workers, record them, report (+ checkpoint)

A *pack* is N SAEs trained on the same batches, each with its own optimizer, counters and
metrics: reading and decoding activations is the cost at scale, so N SAEs per read is the
saving (`pack: N` in a sweep; one SAE for `raysae train`).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from raysae.checkpoint import CheckpointSpaceError, load_training_checkpoint
from raysae.config import RunConfig, TrainConfig
from raysae.data.format import BadDataError
from raysae.metrics import ReconstructionStats, SparsityStats, latent_norms, scalars
from raysae.saes import SparseAutoencoder, build_sae
from raysae.step import BadBatchError, TrainState, check_batch, make_optimizer, train_step
from raysae.views import ViewStats, decoder_norm_split

STOPS_RUN = (BadDataError, BadBatchError, CheckpointSpaceError)
"""Errors that stop a run on every worker at once and are never retried: bad data, a full disk.
Retrying is for infrastructure faults (a worker, a node, the store for a while); these would
fail again (raysae.worker returns them to the driver rather than raising them to Ray)."""


def error_behind(error: Optional[BaseException], types: tuple) -> Optional[BaseException]:
    """The first error of one of `types` behind `error` (itself included): Ray wraps the errors
    of tasks and workers (RayTaskError and its `cause`, WorkerGroupError's `worker_failures`,
    UserExceptionWithTraceback's `_base_exc`, which has no public accessor) and chains them
    (`__cause__`, `__context__`). A RayTaskError is also an instance of its cause's class; the
    cause itself, the original error, is the one returned."""
    seen, pending = set(), [error]
    while pending:
        err = pending.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, types) and not hasattr(err, "cause"):
            return err
        pending += [
            *getattr(err, "worker_failures", {}).values(),
            getattr(err, "_base_exc", None),
            getattr(err, "cause", None),
            err.__cause__,
            err.__context__,
        ]
    return None


def stop_cause(error: BaseException) -> Optional[BaseException]:
    """The error behind `error` that stops the run (STOPS_RUN), if any: Ray Data re-raises a
    read task's error in the worker wrapped in its own (RayTaskError, UserCodeException)."""
    return error_behind(error, STOPS_RUN)


# ---------------------------------------------------------------------------------------------
# Where the loop runs


@dataclass(frozen=True)
class World:
    """This process among the loop's workers; size 1 is one process and no torch.distributed."""

    rank: int = 0
    """This worker's index."""
    size: int = 1
    """Number of workers, each training on its own share of every global batch."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the models and batches live."""

    def sync_fired(self, fired: Tensor) -> Tensor:
        """Per-latent "fired in this step" flags of every worker, OR-ed (an all-reduce MAX)."""
        if self.size == 1:
            return fired
        import torch.distributed as dist

        flags = fired.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags.bool()

    def merge(
        self, recon: ReconstructionStats, sparsity: SparsityStats
    ) -> tuple[ReconstructionStats, SparsityStats]:
        """Every worker's accumulators combined as if one process had seen all their batches:
        each state is all-gathered and merged (the variance and the last-fired positions do not
        add, so a SUM all-reduce would be wrong)."""
        if self.size == 1:
            return recon, sparsity
        merged_recon = ReconstructionStats(recon.d_in, recon.reference_mean)
        for t in self._all_gather(recon.state_tensor()):
            merged_recon.merge(
                ReconstructionStats.from_state_tensor(t, recon.d_in, recon.reference_mean)
            )
        merged_sparsity = SparsityStats(sparsity.n_latents, sparsity.dead_window)
        for t in self._all_gather(sparsity.state_tensor()):
            merged_sparsity.merge(
                SparsityStats.from_state_tensor(t, sparsity.n_latents, sparsity.dead_window)
            )
        return merged_recon, merged_sparsity

    def merge_recon(self, recon: ReconstructionStats) -> ReconstructionStats:
        """`merge` for reconstruction stats alone (raysae.views)."""
        if self.size == 1:
            return recon
        merged = ReconstructionStats(recon.d_in, recon.reference_mean)
        for t in self._all_gather(recon.state_tensor()):
            merged.merge(ReconstructionStats.from_state_tensor(t, recon.d_in, recon.reference_mean))
        return merged

    def first_error(self, error: Optional[BaseException]) -> Optional[BaseException]:
        """The error of the lowest rank that has one (None if none has), on every rank: one
        all-reduce of a flag, and an all-gather of the errors only when there is one. A rank
        that stopped alone would leave the others waiting in the next step's all-reduce."""
        if self.size == 1:
            return error
        import torch.distributed as dist

        flag = torch.tensor([error is not None], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return None
        errors = [None] * self.size
        dist.all_gather_object(errors, error)
        return next(e for e in errors if e is not None)

    def _all_gather(self, t: Tensor) -> list[Tensor]:
        import torch.distributed as dist

        t = t.to(self.device)
        gathered = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(gathered, t)
        return [g.cpu() for g in gathered]


# ---------------------------------------------------------------------------------------------
# The pack


@dataclass
class Member:
    """One SAE of the pack and everything that trains it."""

    model: SparseAutoencoder
    """The SAE (unwrapped)."""
    train: TrainConfig
    """Its optimisation settings (packed SAEs share the budget and batch size)."""
    optimizer: torch.optim.Optimizer
    """Its Adam."""
    state: TrainState
    """Its token, step and dead-latent counters."""
    recon: ReconstructionStats
    """Reconstruction metrics since the last record."""
    sparsity: SparsityStats
    """Sparsity metrics since the last record."""
    ddp: nn.Module = None  # type: ignore[assignment]
    """What the step calls: the model, or its DDP wrapper in a multi-worker run."""
    losses: dict = field(default_factory=dict)
    """The last step's loss terms."""

    def __post_init__(self) -> None:
        if self.ddp is None:
            self.ddp = self.model

    @classmethod
    def of(cls, model: SparseAutoencoder, train: TrainConfig, reference_mean: Tensor) -> Member:
        """A fresh member for `model` (already on its device); FVU_B is about reference_mean."""
        return cls(
            model,
            train,
            make_optimizer(model, train),
            TrainState.fresh(model.cfg.n_latents),
            ReconstructionStats(model.cfg.d_in, reference_mean),
            SparsityStats(model.cfg.n_latents, train.dead_tokens),
        )


def new_progress() -> dict:
    """Where the run is in its data stream (checkpointed with the models)."""
    return {"epoch": 0, "epoch_tokens": 0, "replayed_tokens": 0, "restarts": 0, "rows_read": 0}


def build_pack(
    runs: list[RunConfig],
    init: list[dict],
    reference_mean: Tensor,
    device: torch.device,
    checkpoint_dir: Optional[str] = None,
    wrap: Callable[[nn.Module], nn.Module] = lambda model: model,
) -> tuple[list[Member], dict]:
    """The pack's members and the data progress: from the training checkpoint in
    `checkpoint_dir` when given, else fresh with `init`'s input scales and b_dec. `wrap`
    makes each model's DDP wrapper (Ray's prepare_model)."""
    members, progress = [], new_progress()
    for i, (cfg, start) in enumerate(zip(runs, init)):
        torch.manual_seed(cfg.train.seed)
        model = build_sae(cfg.sae)
        model.input_scale.fill_(start["input_scale"])
        with torch.no_grad():
            model.b_dec.copy_(torch.tensor(start["b_dec"]))
        member = Member.of(model.to(device), cfg.train, reference_mean)
        if checkpoint_dir is not None:
            s = member.state
            s.tokens, s.step, s.tokens_since_fired, progress = load_training_checkpoint(
                Path(checkpoint_dir) / member_key(i), model, member.optimizer
            )
        member.ddp = wrap(model)
        members.append(member)
    if checkpoint_dir is not None:
        # The stream cannot seek: the interrupted epoch is read again from its start.
        progress["replayed_tokens"] += progress["epoch_tokens"]
        progress["epoch_tokens"] = 0
        progress["restarts"] += 1
    return members, progress


# ---------------------------------------------------------------------------------------------
# The loop


class StepInfo(NamedTuple):
    """What an `on_step` hook sees after each step (raysae.faults uses it in tests)."""

    tokens: int
    """Tokens trained so far, all workers."""
    rank: int
    """This worker's rank."""
    world_size: int
    """Number of workers."""
    checkpoint_tokens: Optional[int]
    """Tokens at the newest checkpoint (written or resumed from); None if there is none."""
    checkpoint_time: Optional[float]
    """`time.perf_counter()` when that checkpoint was written (or the loop resumed from it)."""


Report = Callable[[dict, bool], None]
"""Called with each record, and whether a checkpoint is due with it."""


def train_pack(
    members: list[Member],
    batches: Iterable[Tensor],
    *,
    world: World = World(),
    checkpoint_every: Optional[int] = None,
    progress: Optional[dict] = None,
    history: Optional[list[dict]] = None,
    report: Optional[Report] = None,
    log: Optional[Callable[[str], None]] = print,
    on_step: Optional[Callable[[StepInfo], None]] = None,
) -> list[dict]:
    """Train the pack on `batches` (this worker's share of each global batch) until the
    budget; appends a record (see `pack_metrics`) to `history` and returns it every
    `log_every_tokens`, every `checkpoint_every` tokens and at the end, where a checkpoint
    is due with the report when `checkpoint_every` is set."""
    total, d_in = members[0].train.total_tokens, members[0].model.cfg.d_in
    progress = new_progress() if progress is None else progress
    history = [] if history is None else history
    tokens = members[0].state.tokens
    cadence = _Cadence(members[0].train.log_every_tokens, checkpoint_every, tokens)
    dtype = members[0].model.W_enc.dtype
    prefix = f"worker {world.rank}: " if world.size > 1 else ""
    for m in members:
        m.model.train()
    stream = iter(batches)
    while total - tokens >= world.size:
        # This worker's share of the next global batch (the last is cut so the budget is met
        # exactly), or the error that stops the run, agreed by every worker before the step.
        where = f"{prefix}batch at token {tokens}"
        batch, global_n, error = _take(stream, world, total - tokens, dtype, d_in, where)
        error = world.first_error(error)
        if error is not None:
            raise error
        if batch is None:
            break
        _step_members(members, batch, global_n, world)
        tokens = members[0].state.tokens
        progress["epoch_tokens"] += global_n
        progress["rows_read"] += batch.shape[0] * world.size
        if on_step is not None:
            on_step(StepInfo(tokens, world.rank, world.size, *cadence.checkpoint))

        done = total - tokens < world.size
        if cadence.due(tokens, done):
            clock = cadence.times(tokens)
            record = {**pack_metrics(members, world), **clock, **progress}
            history.append(record)
            checkpoint = cadence.checkpoint_due(tokens, done)
            if report is not None:
                _report(report, record, checkpoint, world)
            if log is not None:
                log(format_record(record, total))
            cadence.reported(tokens, checkpoint)
        if done:
            break
    if tokens < total and log is not None:
        log(f"data ran out after {tokens:,} of {total:,} tokens")
    return history


def _step_members(members: list[Member], batch: Tensor, global_n: int, world: World) -> list:
    """One optimizer step of every member on `batch`, and its training metrics; the members'
    SAEOutputs."""
    start = members[0].state.tokens + world.rank * batch.shape[0]  # this worker's rows
    outs = []
    for m in members:
        out = train_step(m.ddp, m.optimizer, batch, m.state, m.train, global_n, world.sync_fired)
        m.recon.update(batch, out.x_hat)
        m.sparsity.update(out.codes, start=start, latent_norms=latent_norms(m.model))
        m.losses = out.losses
        outs.append(out)
    return outs


class _Cadence:
    """When the loop records (every `log_every` tokens), checkpoints (every `checkpoint_every`
    tokens, if set) and the rate since the last record; `tokens` is where the loop starts."""

    def __init__(self, log_every: int, checkpoint_every: Optional[int], tokens: int) -> None:
        self.log_every, self.checkpoint_every = log_every, checkpoint_every
        self.t0 = self.last_t = self.now = time.perf_counter()
        self.last_tokens = tokens
        self.next_report = _next(tokens, log_every)
        self.next_ckpt = _next(tokens, checkpoint_every) if checkpoint_every else math.inf
        # The newest checkpoint's (tokens, time): a resumed loop starts at one.
        self.checkpoint = (tokens, self.t0) if tokens else (None, None)

    def due(self, tokens: int, done: bool) -> bool:
        return tokens >= self.next_report or tokens >= self.next_ckpt or done

    def checkpoint_due(self, tokens: int, done: bool) -> bool:
        return self.checkpoint_every is not None and (tokens >= self.next_ckpt or done)

    def times(self, tokens: int) -> dict:
        """The record's clock fields: tokens, the rate since the last record, the elapsed time."""
        self.now = time.perf_counter()
        rate = (tokens - self.last_tokens) / max(self.now - self.last_t, 1e-9)
        return {"tokens": tokens, "tokens_per_s": rate, "elapsed_s": self.now - self.t0}

    def reported(self, tokens: int, checkpointed: bool) -> None:
        self.next_report, self.last_t, self.last_tokens = (
            _next(tokens, self.log_every),
            self.now,
            tokens,
        )
        if checkpointed:
            self.next_ckpt = _next(tokens, self.checkpoint_every)
            self.checkpoint = (tokens, time.perf_counter())


def _take(stream: Iterator[Tensor], world: World, left: int, dtype: torch.dtype, d_in: int, where):
    """(this worker's batch, the global batch's tokens, None), (None, 0, None) at the end of the
    stream, or (None, 0, the error) if the batch cannot be trained on (STOPS_RUN)."""
    try:
        batch = next(stream, None)
        if batch is None:
            return None, 0, None
        global_n = min(batch.shape[0] * world.size, left // world.size * world.size)
        batch = batch[: global_n // world.size].to(world.device, dtype)
        check_batch(batch, d_in, where)
        return batch, global_n, None
    except Exception as e:
        stop = stop_cause(e)
        if stop is None:
            raise
        return None, 0, stop


def _report(report: Report, record: dict, checkpoint: bool, world: World) -> None:
    """`report`, with a checkpoint if due; a full disk on rank 0 stops every worker."""
    error = None
    try:
        report(record, checkpoint)
    except STOPS_RUN as e:
        error = e
    error = world.first_error(error)
    if error is not None:
        raise error


def _next(tokens: int, every: int) -> int:
    return (tokens // every + 1) * every


def pack_metrics(members: list[Member], world: World) -> dict:
    """Training metrics of every member since the last record, merged across workers; resets
    the interval (dead latents are still judged over the whole dead_tokens window).

    Keys: "m<i>/<metric>" per member; unprefixed, the member with the lowest FVU (for one SAE,
    simply its metrics): what schedulers and progress lines read.
    """
    per_member = []
    for m in members:
        recon, sparsity = world.merge(m.recon, m.sparsity)
        metrics = {
            "step": m.state.step,
            "lr": m.optimizer.param_groups[0]["lr"],
            **{f"loss/{k}": float(v.detach()) for k, v in m.losses.items()},
            **recon.compute(),
            **scalars(sparsity.compute()),
        }
        # Dead over the configured window, from the run-long counters (exact, and resumed).
        metrics["dead_fraction"] = float(
            (m.state.tokens_since_fired >= m.train.dead_tokens).double().mean()
        )
        per_member.append(metrics)
        m.recon.reset()
        m.sparsity.reset_counts()
    return best_and_members(per_member)


def member_key(i: int) -> str:
    """Member i of a pack: its folder in training checkpoints and results, its metrics' prefix."""
    return f"m{i}"


def best_and_members(per_member: list[dict]) -> dict:
    """The member with the lowest FVU unprefixed, and every member's under "m<i>/"."""
    best = min(per_member, key=lambda d: d["fvu"] if d["fvu"] == d["fvu"] else float("inf"))
    merged = dict(best)
    for i, metrics in enumerate(per_member):
        merged.update({f"{member_key(i)}/{k}": v for k, v in metrics.items()})
    return merged


def member_view(record: dict, i: int, keep_unprefixed: bool = True) -> dict:
    """Member i's metrics from a pack record: its "m<i>/" keys with the prefix stripped (plus
    the shared, slash-free keys such as tokens, when keep_unprefixed)."""
    prefix = f"{member_key(i)}/"
    view = {k: v for k, v in record.items() if "/" not in k} if keep_unprefixed else {}
    view.update({k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix)})
    return view


def format_record(r: dict, total_tokens: int) -> str:
    """One console line for a metrics record."""
    return (
        f"tokens {r['tokens']:>12,}/{total_tokens:,} | fvu {r['fvu']:.4f} | l0 {r['l0']:7.2f} "
        f"| dead {r['dead_fraction']:.3f} | loss {r.get('loss/reconstruction', 0):.4g} "
        f"| {r['tokens_per_s']:,.0f} tok/s"
    )


# ---------------------------------------------------------------------------------------------
# Held-out evaluation of a pack


@torch.no_grad()
def evaluate_pack(members: list[Member], batches: Callable[[], Iterable[Tensor]], world: World):
    """Every member's metrics on this worker's held-out `batches` (a fresh stream per member),
    merged across workers. Held out, "dead" means it never fired on any held-out token."""
    per_member = []
    for m in members:
        m.recon.reset()
        m.sparsity = SparsityStats(m.model.cfg.n_latents)
        position = world.rank << 40  # disjoint stream positions per rank: the merge is exact
        views = ViewStats(m.model)
        with m.model.evaluating():
            for batch in batches():
                out = m.model(batch.to(world.device))
                m.recon.update(batch, out.x_hat)
                views.update(batch.to(world.device), out)
                m.sparsity.update(out.codes, start=position, latent_norms=latent_norms(m.model))
                position += batch.shape[0]
        recon, sparsity = world.merge(m.recon, m.sparsity)
        metrics = {**recon.compute(), **scalars(sparsity.compute())}
        metrics["dead_fraction"] = float((sparsity.fire_counts == 0).double().mean())
        metrics.update(views.compute(world.merge_recon))
        split = decoder_norm_split(m.model, fired=sparsity.fire_counts > 0)
        metrics.update({f"decoder_norms/{k}": v for k, v in split.items()})
        per_member.append(metrics)
    return best_and_members(per_member)


# ---------------------------------------------------------------------------------------------
# One SAE in one process


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
    log: Optional[Callable[[str], None]] = print,
    report: Optional[Report] = None,
) -> list[dict]:
    """Train one SAE in this process on `batches` until cfg.total_tokens, initialised from the
    first cfg.init_tokens rows; returns the logged records (see `pack_metrics`; FVU_B is
    about the initialisation sample's mean). `report` sees each record as it is made (a pack
    record of one member: "m0/..." keys), as train_pack's does."""
    torch.manual_seed(cfg.seed)
    stream = iter(batches)
    sample, consumed = take_init_sample(stream, cfg.init_tokens)
    check_batch(sample, model.cfg.d_in, "initialisation sample")
    model.init_from_sample_(sample)
    member = Member.of(model, cfg, reference_mean=sample.double().mean(0))
    history = train_pack([member], itertools.chain(consumed, stream), log=log, report=report)
    return [member_view(record, 0) for record in history]
