"""The Ray Train worker: `train_loop_per_worker` adapts raysae.loop to Ray Train.

Every worker restores the pack from Ray's latest checkpoint (or starts it from the driver's
initial values), trains it on its shard of the stream with `raysae.loop.train_pack`, reports
every record to Ray (a barrier; rank 0 attaches the checkpoint), then evaluates its share of the
held-out parts. Ray-specific lines are marked  # [ray].

Resume semantics: see raysae/train.py's module docstring.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from raysae.checkpoint import (
    SEAL,
    CheckpointSpaceError,
    fsync_tree,
    newest_complete,
    no_space,
    save_training_checkpoint,
    seal,
    training_checkpoint_bytes,
)
from raysae.config import RunConfig
from raysae.data import storage
from raysae.loop import STOPS_RUN, World, build_pack, evaluate_pack, member_key, train_pack
from raysae.settings import from_dict


def train_loop_per_worker(config: dict) -> dict:
    """Train the pack; returns (on every rank) the held-out metrics, the report history since
    the run began, and the data-position counters, or {"stopped": error} if bad data or a full
    disk stopped it (STOPS_RUN). Ray hands rank 0's return to the driver.

    `config`: runs (RunConfig dicts), init (their input scales and b_dec), reference_mean,
    held_out (a raysae.data.Dataset), run_dir (where Ray writes this run's checkpoints),
    on_step (a test's hook, or None).
    """
    import ray.train  # [ray]
    import ray.train.torch  # [ray]

    runs = [from_dict(RunConfig, r) for r in config["runs"]]
    lead = runs[0]  # packed runs share data, budget, batch size and scaling (sweep_spec checks)
    ctx = ray.train.get_context()  # [ray]
    world = World(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    log = (lambda line: print(line, flush=True)) if world.rank == 0 else (lambda line: None)

    members, progress, history, unregistered = _restore(config, runs, world, log)
    progress["nodes"] = _count_nodes(world)
    keep = lead.scaling.num_checkpoints_to_keep
    report = _reporter(
        members, progress, history, config["run_dir"], world, (unregistered, keep), log
    )
    shard = ray.train.get_dataset_shard("train")  # [ray]
    per_worker = max(1, lead.train.batch_size // world.size)
    try:
        train_pack(
            members,
            _epochs(shard, per_worker, lead, progress, world.rank),
            world=world,
            checkpoint_every=lead.scaling.checkpoint_every_tokens,
            progress=progress,
            history=history,
            report=report,
            log=log if world.rank == 0 else None,
            on_step=config.get("on_step"),
        )
    except STOPS_RUN as e:
        # Every rank stops here with the same error (train_pack agrees on it). Returned, not
        # raised: Ray Train 2.60 retries every worker error alike (its DefaultFailurePolicy
        # takes any error from the worker group as retryable, up to max_failures, and offers no
        # way to mark one as final), and a retry of bad data or of a full disk fails again, or
        # worse, reads the parts in another order and misses the bad one.
        return {"stopped": e}
    # Held-out evaluation: each rank reads its own held-out parts; the sums are merged.
    held_out = config["held_out"].shard(world.rank, world.size)
    metrics = evaluate_pack(members, lambda: held_out.batches(8192), world)
    return {"eval": metrics, "progress": progress, "history": history}


def _restore(config: dict, runs: list[RunConfig], world: World, log: Callable[[str], None]):
    """(members, progress, history, unregistered): the pack restored from the newest complete
    checkpoint (see `_restore_point`) or started from the driver's initial values, and, on rank
    0, the path of the checkpoint resumed from if Ray never registered it (else None)."""
    import ray.train  # [ray]
    import ray.train.torch  # [ray]

    registered = ray.train.get_checkpoint()  # [ray]
    checkpoint = _restore_point(registered, config["run_dir"], world, log)
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
    resumed_unregistered = (
        world.rank == 0 and checkpoint is not None and checkpoint is not registered
    )
    return members, progress, history, checkpoint.path if resumed_unregistered else None


def _reporter(members, progress, history, run_dir, world, retention, log):
    """The loop's `report`: every rank reports (a barrier); rank 0 attaches the checkpoint
    (`_report_checkpoint`). `retention`: (a resumed checkpoint Ray never registered, or None;
    num_checkpoints_to_keep). That checkpoint is outside Ray's retention: it is deleted once
    num_checkpoints_to_keep newer ones were reported, when Ray would have deleted it."""
    import ray.train  # [ray]

    unregistered, keep = retention
    newer = {"count": 0, "path": unregistered}

    def report(record: dict, write_checkpoint: bool) -> None:
        if not (write_checkpoint and world.rank == 0):
            ray.train.report(record, checkpoint=None)  # [ray]
            return
        _report_checkpoint(record, members, progress, history, run_dir)
        newer["count"] += 1
        if newer["path"] is not None and newer["count"] >= keep:
            _delete_quietly(run_dir, newer["path"], log)
            newer["path"] = None

    return report


def _report_checkpoint(record: dict, members, progress: dict, history: list, run_dir: str) -> None:
    """Rank 0's report: the record with a checkpoint, a folder per member and the history (so a
    restarted run keeps its whole log), sealed last, then flushed to a local disk; a full disk
    raises CheckpointSpaceError."""
    import ray.train  # [ray]

    # Named here (as Ray would: checkpoint_<time>) so that a failed upload can be removed.
    name = datetime.datetime.now().strftime("checkpoint_%Y-%m-%d_%H-%M-%S.%f")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i, m in enumerate(members):
                save_training_checkpoint(
                    Path(tmp) / member_key(i), m.model, m.optimizer, m.state, dict(progress)
                )
            (Path(tmp) / "history.json").write_text(json.dumps(history))
            seal(tmp, members[0].state.tokens)  # last: the folder is complete
            checkpoint = ray.train.Checkpoint.from_directory(tmp)  # [ray]
            ray.train.report(record, checkpoint=checkpoint, checkpoint_dir_name=name)  # [ray]
        # Ray's copy (pyarrow's copy_files) leaves the files in the page cache and returns: a
        # power loss or a kernel crash soon after could leave a sealed folder whose pages never
        # reached the disk (right sizes, wrong bytes; the CRC-32s in its seal would catch it on
        # restart, at the cost of resuming from an older one). An S3 PUT is durable once it
        # returns. No folder: Ray skipped the report (its barrier was reset by a failed worker).
        if not storage.is_s3(run_dir):
            copied = os.path.join(storage.locate(run_dir).path, name)
            if os.path.isdir(copied):
                fsync_tree(copied)
    except Exception as e:
        if not no_space(e):
            raise
        raise _space_error(run_dir, name, members) from None


def _restore_point(registered, run_dir: str, world: World, log: Callable[[str], None]):
    """The checkpoint to resume from: the newest complete one in `run_dir`, which is Ray's
    registered latest unless a worker died before Ray registered a newer one, or Ray's latest
    is incomplete or corrupt (see raysae.checkpoint.SEAL). Rank 0 chooses (checking the CRC-32s
    of what it picks) and every rank restores its choice: DDP replicas must start equal. Ray's
    choice stands for checkpoints without seals; with none left, the run starts afresh."""
    import ray.train  # [ray]

    fs, run_path = storage.filesystem_and_path(run_dir)
    choice = None
    if world.rank == 0:
        found = newest_complete(fs, run_path, log)
        if found is not None:
            choice = found[0]
            if registered is None or registered.path.rstrip("/") != choice:
                log(
                    f"resuming from {choice} ({found[1]:,} tokens), the newest complete "
                    f"checkpoint; Ray's latest registered one is {registered and registered.path}"
                )
        elif registered is not None and not _sealed(registered):
            choice = registered.path  # written by a raysae without seals
        elif registered is not None:
            log(
                f"Ray's latest registered checkpoint {registered.path} is not complete and no "
                "other is: training starts from the beginning"
            )
    if world.size > 1:
        import torch.distributed as dist

        chosen = [choice]
        dist.broadcast_object_list(chosen, src=0)
        choice = chosen[0]
    if choice is None:
        return None
    if registered is not None and registered.path.rstrip("/") == choice.rstrip("/"):
        return registered
    return ray.train.Checkpoint(path=choice, filesystem=fs)  # [ray]


def _sealed(checkpoint) -> bool:
    """Whether a Ray checkpoint's folder holds a seal (then `newest_complete` judged it)."""
    import pyarrow.fs as pafs

    info = checkpoint.filesystem.get_file_info(f"{checkpoint.path.rstrip('/')}/{SEAL}")
    return info.type == pafs.FileType.File


def _space_error(run_dir: str, name: str, members) -> CheckpointSpaceError:
    """The error for a checkpoint that did not fit, after removing what it left behind: the
    full disk (the local temporary directory, or the output), and the space needed."""
    import pyarrow.fs as pafs

    needed = sum(training_checkpoint_bytes(m.model, m.optimizer) for m in members)
    partial = storage.join(run_dir, name)
    fs, path = storage.filesystem_and_path(partial)
    uploading = fs.get_file_info(path).type != pafs.FileType.NotFound  # else: writing it locally
    where = run_dir if uploading else tempfile.gettempdir()
    if uploading:  # unsealed, so never resumed from, but it takes space and looks like one
        _delete_quietly(run_dir, path, lambda line: None)
    return CheckpointSpaceError(
        f"no space left on {where}: the next checkpoint needs about {needed / 2**20:,.1f} MiB; "
        "free that much there (or lower scaling.num_checkpoints_to_keep) and re-run the same "
        "command to resume from the last complete checkpoint"
    )


def _delete_quietly(run_dir: str, path: str, log: Callable[[str], None]) -> None:
    """Delete the checkpoint folder `path` of `run_dir`'s filesystem; a failure only costs
    space, so it is logged, not raised."""
    fs, _ = storage.filesystem_and_path(run_dir)
    try:
        fs.delete_dir(path)
    except OSError as e:
        log(f"could not delete {path} ({e}); it is safe to delete by hand")


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
                f"worker {rank}: its share of {cfg.data.dataset} holds less than one "
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
