"""The Ray Train per-worker loop: every worker runs `train_loop_per_worker` on its data shard.

A worker trains a *pack* of SAEs (one for `raysae train`; `pack: N` in a sweep) on the same
batches, each with its own DDP wrapper, optimizer, counters and metrics: reading and decoding
activations is the cost at scale, so N SAEs per read is the saving. Ray-specific lines are
marked  # [ray].

Resume semantics: see raysae/train.py's module docstring.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from raysae.checkpoint import load_training_checkpoint, save_training_checkpoint
from raysae.config import RunConfig, from_dict
from raysae.metrics import ReconstructionStats, SparsityStats
from raysae.saes import SparseAutoencoder, build_sae
from raysae.trainer import TrainState, check_batch, format_record, make_optimizer, train_step

SUMMARY_KEYS = ("fvu", "explained_variance", "mse", "l0", "dead_fraction", "dense_fraction")


@dataclass
class Member:
    """One SAE of the pack and everything that trains it."""

    cfg: RunConfig
    model: SparseAutoencoder
    ddp: nn.Module
    optimizer: torch.optim.Optimizer
    state: TrainState
    recon: ReconstructionStats
    sparsity: SparsityStats


def train_loop_per_worker(config: dict) -> dict:
    """Train the pack; returns (on every rank) the held-out metrics, the report history since
    the run began, and the data-position counters. Ray hands rank 0's return to the driver."""
    import ray.train  # [ray]
    import ray.train.torch  # [ray]

    runs = [from_dict(RunConfig, r) for r in config["runs"]]
    lead = runs[0]  # packed runs share data, budget, batch size and scaling (sweep_spec checks)
    ctx = ray.train.get_context()  # [ray]
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # [ray]
    d_in, total = lead.sae.d_in, lead.train.total_tokens
    per_worker = max(1, lead.train.batch_size // world)

    # Models, optimizers and counters: from the latest checkpoint, else from the driver's init.
    checkpoint = ray.train.get_checkpoint()  # [ray]
    members, progress = _build_members(
        runs, config["init"], config["reference_mean"], device, checkpoint
    )
    history = _load_history(checkpoint)
    sync_fired = _all_reduce_max if world > 1 else (lambda fired: fired)
    progress["nodes"] = _count_nodes(world)
    fault_at, marker = config.get("fault_at_tokens"), config.get("fault_marker")

    shard = ray.train.get_dataset_shard("train")  # [ray]
    every, ckpt_every = lead.train.log_every_tokens, lead.scaling.checkpoint_every_tokens
    tokens = members[0].state.tokens
    next_report, next_ckpt = _next(tokens, every), _next(tokens, ckpt_every)
    t0 = last_ckpt_time = time.perf_counter()
    while total - tokens >= world:
        n_batches = 0
        for batch in _shard_batches(shard, per_worker, d_in, lead):
            # Global batch of this step; the last is cut so the token budget is met exactly.
            global_n = min(per_worker * world, (total - tokens) // world * world)
            batch = batch[: global_n // world].to(device)
            check_batch(batch, d_in, f"worker {rank}: batch at token {tokens}")
            start = tokens + rank * batch.shape[0]  # this worker's rows in the token stream
            for m in members:
                out = train_step(
                    m.ddp, m.optimizer, batch, m.state, m.cfg.train, global_n, sync_fired
                )
                m.recon.update(batch, out.x_hat)
                m.sparsity.update(out.latents, start=start)
            tokens = members[0].state.tokens
            progress["epoch_tokens"] += global_n
            progress["rows_read"] += batch.shape[0] * world
            n_batches += 1
            if checkpoint or progress["epoch"] or tokens > ckpt_every:  # a checkpoint exists
                _maybe_inject_fault(fault_at, tokens, rank, world, marker, last_ckpt_time)

            done = total - tokens < world
            if tokens >= next_report or tokens >= next_ckpt or done:
                metrics = _pack_metrics(members, world, device, _training_metrics)
                elapsed = time.perf_counter() - t0
                metrics.update(
                    tokens=tokens,
                    tokens_per_s=tokens / max(elapsed, 1e-9),
                    elapsed_s=elapsed,
                    **progress,
                )
                write_ckpt = tokens >= next_ckpt or done
                history.append(metrics)
                _report(metrics, members, progress, history, rank, write_ckpt)
                if rank == 0:
                    print(format_record(metrics, total), flush=True)
                next_report = _next(tokens, every)
                if write_ckpt:
                    next_ckpt = _next(tokens, ckpt_every)
                    last_ckpt_time = time.perf_counter()
            if done:
                break
        if n_batches == 0:
            raise ValueError(
                f"worker {rank}: its share of {lead.data.uri} holds less than one "
                f"batch of {per_worker} rows; lower train.batch_size or add data"
            )
        progress["epoch"] += 1
        progress["epoch_tokens"] = 0

    # Held-out evaluation: each rank reads its own held-out parts; the sums are merged.
    for m in members:
        _evaluate_parts(m, config["eval_parts"][rank::world], device, rank_offset=rank << 40)
    held_out = _pack_metrics(members, world, device, _eval_metrics)
    return {"eval": held_out, "progress": progress, "history": history}


def _next(tokens: int, every: int) -> int:
    return (tokens // every + 1) * every


def _build_members(
    runs: list[RunConfig], init: list[dict], reference_mean: list[float], device, checkpoint
):
    """The pack's members, restored from `checkpoint` (a Ray Checkpoint) when there is one."""
    import ray.train.torch  # [ray]

    members = []
    progress = {"epoch": 0, "epoch_tokens": 0, "replayed_tokens": 0, "restarts": 0, "rows_read": 0}
    for i, (cfg, start) in enumerate(zip(runs, init)):
        torch.manual_seed(cfg.train.seed)
        model = build_sae(cfg.sae)
        model.input_scale.fill_(start["input_scale"])
        with torch.no_grad():
            model.b_dec.copy_(torch.tensor(start["b_dec"]))
        model.to(device)
        optimizer = make_optimizer(model, cfg.train)
        state = TrainState.fresh(cfg.sae.n_latents)
        if checkpoint:
            with checkpoint.as_directory() as ckpt_dir:
                state.tokens, state.step, state.tokens_since_fired, progress = (
                    load_training_checkpoint(Path(ckpt_dir) / f"m{i}", model, optimizer)
                )
        ddp = ray.train.torch.prepare_model(model)  # [ray] DDP when world > 1
        members.append(
            Member(
                cfg,
                model,
                ddp,
                optimizer,
                state,
                ReconstructionStats(cfg.sae.d_in, torch.tensor(reference_mean)),
                SparsityStats(cfg.sae.n_latents, cfg.train.dead_tokens),
            )
        )
    if checkpoint:
        # The stream cannot seek: the interrupted epoch is read again from its start.
        progress["replayed_tokens"] += progress["epoch_tokens"]
        progress["epoch_tokens"] = 0
        progress["restarts"] += 1
    return members, progress


def _shard_batches(shard, per_worker: int, d_in: int, cfg: RunConfig):
    from raysae import stream

    return stream.iter_torch_batches(
        shard,
        batch_size=per_worker,
        dtype=torch.float32,
        d_in=d_in,
        device="cpu",
        local_shuffle_buffer_size=cfg.data.shuffle_buffer_tokens or None,
    )


@torch.no_grad()
def _evaluate_parts(m: Member, parts: list[str], device, rank_offset: int) -> None:
    """Fill m's accumulators (reset first) with the model's inference on every row of `parts`."""
    from raysae import shards

    m.recon.reset()
    m.sparsity = SparsityStats(m.cfg.sae.n_latents)
    m.model.eval()
    position = rank_offset  # disjoint stream positions per rank, so the merge is exact
    for batch in shards.iter_batches(m.cfg.data.uri, 8192, parts=parts) if parts else []:
        out = m.model(batch.to(device))
        m.recon.update(batch, out.x_hat)
        m.sparsity.update(out.latents, start=position)
        position += batch.shape[0]
    m.model.train()


def _all_reduce_max(fired: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    flags = fired.to(torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.bool()


def _count_nodes(world: int) -> int:
    """Distinct Ray nodes the worker group spans."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return 1
    import torch.distributed as dist

    nodes = [None] * world
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def merge_across_workers(
    recon: ReconstructionStats, sparsity: SparsityStats, world: int, device
) -> tuple[ReconstructionStats, SparsityStats]:
    """Combine every worker's accumulators as if one process had seen all their batches:
    each worker's state is all-gathered and the states are merged (the variance and the
    last-fired positions do not add, so a SUM all-reduce would be wrong)."""
    if world == 1:
        return recon, sparsity
    merged_recon = ReconstructionStats(recon.d_in, recon.reference_mean)
    for t in _all_gather(recon.state_tensor(), device):
        merged_recon.merge(
            ReconstructionStats.from_state_tensor(t, recon.d_in, recon.reference_mean)
        )
    merged_sparsity = SparsityStats(sparsity.n_latents, sparsity.dead_window)
    for t in _all_gather(sparsity.state_tensor(), device):
        merged_sparsity.merge(
            SparsityStats.from_state_tensor(t, sparsity.n_latents, sparsity.dead_window)
        )
    return merged_recon, merged_sparsity


def _all_gather(t: torch.Tensor, device) -> list[torch.Tensor]:
    import torch.distributed as dist

    t = t.to(device)
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return [g.cpu() for g in gathered]


def _training_metrics(m: Member, recon: ReconstructionStats, sparsity: SparsityStats) -> dict:
    metrics = {"step": m.state.step, **recon.compute(), **_scalars(sparsity.compute())}
    # Dead latents over the configured window, from the run-long counters (exact per step).
    metrics["dead_fraction"] = float(
        (m.state.tokens_since_fired >= m.cfg.train.dead_tokens).double().mean()
    )
    return metrics


def _eval_metrics(m: Member, recon: ReconstructionStats, sparsity: SparsityStats) -> dict:
    metrics = {**recon.compute(), **_scalars(sparsity.compute())}
    # Held out, "dead" means it never fired on any held-out token.
    metrics["dead_fraction"] = float((sparsity.fire_counts == 0).double().mean())
    return metrics


def _pack_metrics(members: list[Member], world: int, device, compute) -> dict:
    """Metrics of every member since the last report, merged across workers, then reset.

    Keys: "m<i>/<metric>" per member; unprefixed, the member with the lowest FVU (for one SAE,
    simply its metrics) — what schedulers and progress lines read.
    """
    per_member = []
    for m in members:
        recon, sparsity = merge_across_workers(m.recon, m.sparsity, world, device)
        per_member.append(compute(m, recon, sparsity))
        m.recon.reset(), m.sparsity.reset_counts()
    best = min(per_member, key=lambda d: d["fvu"] if d["fvu"] == d["fvu"] else float("inf"))
    metrics = dict(best)
    for i, d in enumerate(per_member):
        metrics.update({f"m{i}/{k}": v for k, v in d.items()})
    return metrics


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}


def _load_history(checkpoint) -> list[dict]:
    if not checkpoint:
        return []
    with checkpoint.as_directory() as ckpt_dir:
        return json.loads((Path(ckpt_dir) / "history.json").read_text())


def _report(
    metrics: dict,
    members: list[Member],
    progress: dict,
    history: list[dict],
    rank: int,
    write_checkpoint: bool,
) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint: a folder per member
    and the report history, so a restarted run keeps its whole log."""
    import ray.train  # [ray]

    if write_checkpoint and rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            for i, m in enumerate(members):
                save_training_checkpoint(
                    Path(tmp) / f"m{i}", m.model, m.optimizer, m.state, dict(progress)
                )
            (Path(tmp) / "history.json").write_text(json.dumps(history))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))  # [ray]
    else:
        ray.train.report(metrics, checkpoint=None)  # [ray]


FAULT_AFTER_CHECKPOINT_S = 5.0
"""The injected fault waits this long after a checkpoint report: Ray registers a checkpoint
asynchronously, and a crash right after `report` can lose it (the run then restarts from the
one before, which is correct but not what the fault test means to exercise)."""


def _maybe_inject_fault(
    fault_at: Optional[int],
    tokens: int,
    rank: int,
    world: int,
    marker: Optional[str],
    last_checkpoint_time: float,
) -> None:
    """Testing aid (RAYSAE_FAULT_AT_TOKENS): the last rank dies once, abruptly, past `fault_at`."""
    if fault_at is None or tokens < fault_at or marker is None or os.path.exists(marker):
        return
    time.sleep(max(0.0, FAULT_AFTER_CHECKPOINT_S - (time.perf_counter() - last_checkpoint_time)))
    if rank == world - 1:
        Path(marker).write_text(str(tokens))
        os._exit(1)
