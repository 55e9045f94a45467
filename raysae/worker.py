"""The Ray Train worker: `train_loop_per_worker` adapts raysae.loop to Ray Train.

Every worker restores the pack from Ray's latest checkpoint (or starts it from the driver's
initial values), trains it on its shard of the stream with `raysae.loop.train_pack`, reports
every record to Ray (a barrier; rank 0 attaches the checkpoint), then evaluates its share of the
held-out parts. Ray-specific lines are marked  # [ray].

Resume semantics: see raysae/train.py's module docstring.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from raysae.checkpoint import save_training_checkpoint
from raysae.config import RunConfig
from raysae.loop import World, build_pack, evaluate_pack, member_key, train_pack
from raysae.settings import from_dict


def train_loop_per_worker(config: dict) -> dict:
    """Train the pack; returns (on every rank) the held-out metrics, the report history since
    the run began, and the data-position counters. Ray hands rank 0's return to the driver.

    `config`: runs (RunConfig dicts), init (their input scales and b_dec), reference_mean,
    held_out (a raysae.data.Dataset), on_step (a test's hook, or None).
    """
    import ray.train  # [ray]
    import ray.train.torch  # [ray]

    runs = [from_dict(RunConfig, r) for r in config["runs"]]
    lead = runs[0]  # packed runs share data, budget, batch size and scaling (sweep_spec checks)
    ctx = ray.train.get_context()  # [ray]
    world = World(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())

    checkpoint = ray.train.get_checkpoint()  # [ray]
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as ckpt_dir:
        members, progress = build_pack(
            runs,
            config["init"],
            torch.tensor(config["reference_mean"]),
            world.device,
            ckpt_dir,
            wrap=ray.train.torch.prepare_model,  # [ray] DDP when world > 1
        )
        history = json.loads((Path(ckpt_dir) / "history.json").read_text()) if ckpt_dir else []
    progress["nodes"] = _count_nodes(world)

    def report(record: dict, write_checkpoint: bool) -> None:
        """Every rank reports (a barrier); rank 0 attaches the checkpoint: a folder per member
        and the history, so a restarted run keeps its whole log."""
        if not (write_checkpoint and world.rank == 0):
            ray.train.report(record, checkpoint=None)  # [ray]
            return
        with tempfile.TemporaryDirectory() as tmp:
            for i, m in enumerate(members):
                save_training_checkpoint(
                    Path(tmp) / member_key(i), m.model, m.optimizer, m.state, dict(progress)
                )
            (Path(tmp) / "history.json").write_text(json.dumps(history))
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp))  # [ray]

    shard = ray.train.get_dataset_shard("train")  # [ray]
    per_worker = max(1, lead.train.batch_size // world.size)
    train_pack(
        members,
        _epochs(shard, per_worker, lead, progress, world.rank),
        world=world,
        checkpoint_every=lead.scaling.checkpoint_every_tokens,
        progress=progress,
        history=history,
        report=report,
        log=(lambda line: print(line, flush=True)) if world.rank == 0 else None,
        on_step=config.get("on_step"),
    )
    # Held-out evaluation: each rank reads its own held-out parts; the sums are merged.
    held_out = config["held_out"].shard(world.rank, world.size)
    metrics = evaluate_pack(members, lambda: held_out.batches(8192), world)
    return {"eval": metrics, "progress": progress, "history": history}


def _epochs(shard, per_worker: int, cfg: RunConfig, progress: dict, rank: int) -> Iterator:
    """This worker's batches, epoch after epoch (each a new part order); counts the epochs."""
    from raysae.data import stream

    while True:
        n_batches = 0
        for batch in stream.iter_torch_batches(
            shard,
            batch_size=per_worker,
            dtype=torch.float32,
            d_in=cfg.sae.d_in,
            device="cpu",
            local_shuffle_buffer_size=cfg.data.shuffle_buffer_tokens or None,
        ):
            n_batches += 1
            yield batch
        if n_batches == 0:
            raise ValueError(
                f"worker {rank}: its share of {cfg.data.uri} holds less than one "
                f"batch of {per_worker} rows; lower train.batch_size or add data"
            )
        progress["epoch"] += 1
        progress["epoch_tokens"] = 0


def _count_nodes(world: World) -> int:
    """Distinct Ray nodes the worker group spans."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world.size == 1:
        return 1
    import torch.distributed as dist

    nodes = [None] * world.size
    dist.all_gather_object(nodes, node)
    return len(set(nodes))
