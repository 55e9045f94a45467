"""`raysae train`: one SAE, on a Ray cluster (Ray Train, DDP) or in this process.

    driver (train_distributed)                      each worker (train_loop_per_worker)
    ─────────────────────────                       ──────────────────────────────────
    validate config + dataset (before any worker)   restore the latest checkpoint, or init
    initial input scale + b_dec from a sample       DDP model, Adam, counters
    TorchTrainer(datasets={"train": stream})   ──▶  for batch in its streaming_split shard:
                                                        train_step (the single-process step)
                                                        every N tokens: all-reduce metrics,
                                                        report (+ checkpoint from rank 0)
    evaluate the final checkpoint on held-out
    parts; write final SAE, metrics.json

Resume semantics (worker failure, elastic resize, or re-running the same command): training
continues from the latest checkpoint with the exact model, optimizer, token and step counters
and dead-latent counters. The data position is restored at *epoch* granularity: Ray Data's
streaming split cannot seek, so the interrupted epoch is read again from its start (a new file
order); the tokens of it already trained on are counted as `replayed_tokens` and reported. The
budget counts trained tokens, so `tokens` at the end equals total_tokens exactly (less at most
num_workers − 1 tokens when the budget is not a multiple of the worker count).

Output, under OUT/NAME/ (a local directory or s3://bucket/prefix):
    checkpoint_*/         Ray Train's checkpoints (training state; see raysae.checkpoint)
    sae/                  the final SAE, input scale folded in (safetensors + config.json)
    metrics.json          config, training log, held-out evaluation (+ toy feature recovery)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from raysae import storage
from raysae.checkpoint import load_sae, load_training_checkpoint, save_sae, save_training_checkpoint
from raysae.config import ConfigError, RunConfig, from_dict, to_dict
from raysae.evaluate import evaluate
from raysae.metrics import ReconstructionStats, SparsityStats
from raysae.saes import build_sae
from raysae.synthetic import ToyData, feature_recovery
from raysae.trainer import (TrainState, check_batch, fit, format_record, make_optimizer,
                            take_init_sample, train_step)

FAULT_ENV = "RAYSAE_FAULT_AT_TOKENS"
"""Testing aid: a worker exits abruptly once at this many tokens (marker file in the run dir)."""


class OutputExistsError(FileExistsError):
    """The output directory already holds results."""


def run_name(cfg: RunConfig) -> str:
    """A deterministic run name: the same config resumes the same run."""
    digest = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.sae.architecture}-{cfg.sae.n_latents}-{digest}"


# ---------------------------------------------------------------------------------------------
# Data sources


def dataset_split(cfg: RunConfig):
    """(manifest, training part names, held-out part names) of cfg.data.uri, validated."""
    from raysae import shards

    manifest = shards.open_dataset(cfg.data.uri)
    if manifest.d_in != cfg.sae.d_in:
        raise ConfigError(f"dataset {cfg.data.uri} has d_in={manifest.d_in} but sae.d_in="
                          f"{cfg.sae.d_in}; set sae.d_in: {manifest.d_in}")
    names = [p.name for p in manifest.parts]
    n_eval = cfg.data.eval_parts
    if n_eval and len(names) <= n_eval:
        raise ConfigError(f"dataset {cfg.data.uri} has {len(names)} part(s); data.eval_parts="
                          f"{n_eval} would leave none to train on — lower data.eval_parts "
                          "(0 evaluates on training data) or harvest more parts")
    train_parts = names[: len(names) - n_eval] if n_eval else names
    eval_parts = names[len(names) - n_eval:] if n_eval else names
    return manifest, train_parts, eval_parts


def uri_batches(uri: str, batch_size: int, parts: list[str], seed: int) -> Iterator[torch.Tensor]:
    """Endless single-process stream over `parts` of a dataset, a new part order each epoch."""
    from raysae import shards

    epoch = 0
    while True:
        yielded = False
        for batch in shards.iter_batches(uri, batch_size, parts=parts, seed=seed + epoch,
                                         drop_last=True):
            yielded = True
            yield batch
        if not yielded:
            raise ValueError(f"dataset {uri} has fewer rows than one batch ({batch_size})")
        epoch += 1


def held_out_batches(cfg: RunConfig, eval_parts: list[str], batch_size: int = 8192):
    """(batches, n_tokens) of the held-out parts, read once in manifest order."""
    from raysae import shards

    manifest = shards.read_manifest(cfg.data.uri)
    rows = {p.name: p.rows for p in manifest.parts}
    return (shards.iter_batches(cfg.data.uri, batch_size, parts=eval_parts),
            sum(rows[name] for name in eval_parts))


def training_and_eval_streams(cfg: RunConfig, batch_size: int):
    """(training stream, held-out stream, held-out tokens, feature directions or None).

    Toy data: held out is another token stream over the same features (data.eval_tokens of it).
    A dataset: held out is every row of its last data.eval_parts parts.
    """
    if cfg.data.toy is not None:
        toy = ToyData(cfg.data.toy, cfg.sae.d_in)
        held_out = ToyData(cfg.data.toy, cfg.sae.d_in, stream=1)
        return (toy.batches(batch_size), held_out.batches(batch_size), cfg.data.eval_tokens,
                toy.directions)
    _, train_parts, eval_parts = dataset_split(cfg)
    held_out, n_eval = held_out_batches(cfg, eval_parts)
    return (uri_batches(cfg.data.uri, batch_size, train_parts, cfg.train.seed), held_out, n_eval,
            None)


# ---------------------------------------------------------------------------------------------
# Results (shared by both paths)


def check_output(out: str, overwrite: bool) -> None:
    """Refuse to write over an earlier run's results unless told to."""
    if storage.exists(storage.join(out, "metrics.json")) and not overwrite:
        raise OutputExistsError(f"{out} already holds a finished run (metrics.json); "
                                "choose another --out or --name, or pass --overwrite")


def finish(model, cfg: RunConfig, out: str, history: list[dict], wall: float, metrics: dict,
           directions=None, extra: Optional[dict] = None,
           log: Callable[[str], None] = print) -> dict:
    """Fold the input scale; write OUT/sae and OUT/metrics.json (with the held-out `metrics`)."""
    result = {"config": to_dict(cfg), "wall_s": wall,
              "tokens": history[-1]["tokens"] if history else 0, "eval": metrics,
              **(extra or {}), "history": history}
    if directions is not None:
        recovery = feature_recovery(directions, model.W_dec)
        result["feature_recovery"] = {k: v for k, v in recovery.items() if k != "max_cos"}
    model.fold_input_scale_()
    with tempfile.TemporaryDirectory() as tmp:
        save_sae(model, Path(tmp) / "sae", metadata={"tokens": result["tokens"],
                                                     "eval": _scalars(metrics)})
        storage.upload_dir(Path(tmp) / "sae", storage.join(out, "sae"))
    storage.write_bytes(storage.join(out, "metrics.json"), json.dumps(result, indent=2).encode())
    log(summary(result))
    return result


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}


def summary(result: dict) -> str:
    """A few lines for the console at the end of a run."""
    e = result["eval"]
    lines = [f"done: {result['tokens']:,} tokens in {result['wall_s']:.1f} s",
             f"held-out: fvu {e['fvu']:.4f} (explained variance {e['explained_variance']:.4f}) "
             f"l0 {e['l0']:.2f} dead {e['dead_fraction']:.3f} dense {e['dense_fraction']:.3f}"]
    if "replayed_tokens" in result:
        lines.append(f"restarts: {result['restarts']}, tokens re-read after restarts: "
                     f"{result['replayed_tokens']:,}")
    rec = result.get("feature_recovery")
    if rec:
        lines.append(f"toy features recovered (max cos ≥ {rec['threshold']}): "
                     f"{rec['fraction_recovered']:.1%}, mean max cos {rec['mean_max_cos']:.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Single process


def run_single_process(cfg: RunConfig, out: str, overwrite: bool = False,
                       log: Callable[[str], None] = print) -> dict:
    """Train one SAE in this process; write OUT/sae and OUT/metrics.json; return the metrics."""
    check_output(out, overwrite)
    batches, held_out, n_eval, directions = training_and_eval_streams(cfg, cfg.train.batch_size)
    torch.manual_seed(cfg.train.seed)
    model = build_sae(cfg.sae)
    log(f"training {cfg.sae.architecture} SAE d_in={cfg.sae.d_in} n_latents={cfg.sae.n_latents} "
        f"for {cfg.train.total_tokens:,} tokens in one process")
    t0 = time.perf_counter()
    history = fit(model, batches, cfg.train, log=log)
    wall = time.perf_counter() - t0
    metrics = evaluate(model, held_out, n_eval)
    return finish(model, cfg, out, history, wall, metrics, directions, log=log)


# ---------------------------------------------------------------------------------------------
# Ray Train: the per-worker loop. Ray-specific lines are marked  # [ray]


def train_loop_per_worker(config: dict) -> None:
    import ray.train  # [ray]
    import ray.train.torch  # [ray]

    cfg: RunConfig = from_dict(RunConfig, config["run"])
    ctx = ray.train.get_context()  # [ray]
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # [ray]
    d_in, n_latents, total = cfg.sae.d_in, cfg.sae.n_latents, cfg.train.total_tokens
    per_worker = max(1, cfg.train.batch_size // world)

    # Model, optimizer and counters: from the latest checkpoint, else fresh from the driver's init.
    torch.manual_seed(cfg.train.seed)
    model = build_sae(cfg.sae)
    model.input_scale.fill_(config["input_scale"])
    with torch.no_grad():
        model.b_dec.copy_(torch.tensor(config["b_dec"]))
    model.to(device)
    optimizer = make_optimizer(model, cfg.train)
    state = TrainState.fresh(n_latents)
    progress = {"epoch": 0, "epoch_tokens": 0, "replayed_tokens": 0, "restarts": 0}
    checkpoint = ray.train.get_checkpoint()  # [ray]
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state.tokens, state.step, state.tokens_since_fired, progress = \
                load_training_checkpoint(ckpt_dir, model, optimizer)
        # The stream cannot seek: the interrupted epoch is read again from its start.
        progress["replayed_tokens"] += progress["epoch_tokens"]
        progress["epoch_tokens"] = 0
        progress["restarts"] += 1
    ddp_model = ray.train.torch.prepare_model(model)  # [ray] DDP when world > 1
    sync_fired = _all_reduce_max if world > 1 else (lambda fired: fired)
    progress["nodes"] = _count_nodes(world)

    shard = ray.train.get_dataset_shard("train")  # [ray]
    recon, sparsity = ReconstructionStats(d_in), SparsityStats(n_latents, cfg.train.dead_tokens)
    every = cfg.train.log_every_tokens
    next_report = (state.tokens // every + 1) * every
    ckpt_every = cfg.scaling.checkpoint_every_tokens
    next_ckpt = (state.tokens // ckpt_every + 1) * ckpt_every
    t0, fault_at = time.perf_counter(), config.get("fault_at_tokens")
    while total - state.tokens >= world:
        n_batches = 0
        for batch in _shard_batches(shard, per_worker, d_in, cfg):
            # Global batch for this step; the last one is cut so the budget is met exactly.
            global_n = min(per_worker * world, (total - state.tokens) // world * world)
            if global_n == 0:
                break
            batch = batch[: global_n // world].to(device)
            check_batch(batch, d_in, f"worker {rank}: batch at token {state.tokens}")
            out = train_step(ddp_model, optimizer, batch, state, cfg.train, global_n, sync_fired)
            recon.update(batch, out.x_hat)
            sparsity.update(out.latents)
            progress["epoch_tokens"] += global_n
            n_batches += 1
            _maybe_inject_fault(fault_at, state.tokens, rank, config.get("fault_marker"))

            done = total - state.tokens < world
            if state.tokens >= next_report or state.tokens >= next_ckpt or done:
                metrics = _global_metrics(recon, sparsity, state, cfg, world, device)
                metrics.update(tokens_per_s=state.tokens / max(time.perf_counter() - t0, 1e-9),
                               elapsed_s=time.perf_counter() - t0, **progress)
                write_ckpt = state.tokens >= next_ckpt or done
                _report(metrics, model, optimizer, state, progress, rank, write_ckpt)
                if rank == 0:
                    print(format_record(metrics, total), flush=True)
                recon.reset(), sparsity.reset()
                next_report = (state.tokens // every + 1) * every
                if write_ckpt:
                    next_ckpt = (state.tokens // ckpt_every + 1) * ckpt_every
            if done:
                break
        if n_batches == 0 and total - state.tokens >= world:
            raise ValueError(f"worker {rank}: its share of the dataset holds less than one batch "
                             f"of {per_worker} rows; use a smaller train.batch_size or more data")
        progress["epoch"] += 1
        progress["epoch_tokens"] = 0

    # Held-out evaluation: each rank reads its own held-out parts; the sums are merged.
    recon, sparsity = _evaluate_parts(model, cfg, config["eval_parts"][rank::world], device)
    recon, sparsity = _merge_across_workers(recon, sparsity, cfg, world, device)
    held_out = {**recon.compute(), **_scalars(sparsity.compute())}
    ray.train.report({"tokens": state.tokens, "step": state.step, **progress,  # [ray]
                      **{f"eval/{k}": v for k, v in held_out.items()}}, checkpoint=None)


@torch.no_grad()
def _evaluate_parts(model, cfg: RunConfig, parts: list[str], device):
    """Accumulators of `model` (inference mode) over every row of `parts`."""
    from raysae import shards

    recon = ReconstructionStats(cfg.sae.d_in)
    sparsity = SparsityStats(cfg.sae.n_latents, dead_window=2**62)
    model.eval()
    if parts:
        for batch in shards.iter_batches(cfg.data.uri, 8192, parts=parts):
            out = model(batch.to(device))
            recon.update(batch, out.x_hat)
            sparsity.update(out.latents)
    model.train()
    return recon, sparsity


def _shard_batches(shard, per_worker: int, d_in: int, cfg: RunConfig):
    from raysae import stream

    return stream.iter_torch_batches(
        shard, batch_size=per_worker, dtype=torch.float32, d_in=d_in, device="cpu",
        local_shuffle_buffer_size=cfg.data.shuffle_buffer_tokens or None)


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


def _merge_across_workers(recon: ReconstructionStats, sparsity: SparsityStats, cfg: RunConfig,
                          world: int, device) -> tuple[ReconstructionStats, SparsityStats]:
    """Combine every worker's accumulators: the result is as if one process had seen all batches.

    Reconstruction: each worker's (count, mean, M2, sums) is gathered and merged in rank order.
    Sparsity: counts add; a latent is dead for the window if no worker saw it fire.
    """
    if world == 1:
        return recon, sparsity
    import torch.distributed as dist

    local = recon.state_tensor().to(device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    merged = ReconstructionStats(cfg.sae.d_in)
    for t in gathered:
        merged.merge(ReconstructionStats.from_state_tensor(t.cpu(), cfg.sae.d_in))
    counts = torch.cat([torch.tensor([sparsity.n, sparsity.sum_l0, sparsity.sum_l1],
                                     dtype=torch.float64),
                        sparsity.fire_counts.to(torch.float64)]).to(device)
    dist.all_reduce(counts)
    counts = counts.cpu()
    total = SparsityStats(cfg.sae.n_latents, sparsity.dead_window)
    total.n, total.sum_l0, total.sum_l1 = int(counts[0]), float(counts[1]), float(counts[2])
    total.fire_counts = counts[3:].round().to(torch.int64)
    total.tokens_since_fired = torch.where(total.fire_counts > 0, 0, total.n)
    return merged, total


def _global_metrics(recon: ReconstructionStats, sparsity: SparsityStats, state: TrainState,
                    cfg: RunConfig, world: int, device) -> dict:
    """Metrics of every worker's batches since the last report."""
    recon, sparsity = _merge_across_workers(recon, sparsity, cfg, world, device)
    sparse = _scalars(sparsity.compute())
    # Dead latents over the configured window, from the run-long counters (exact per step).
    sparse["dead_fraction"] = float((state.tokens_since_fired >= cfg.train.dead_tokens)
                                    .double().mean())
    sparse["dead_fraction_window"] = sparse["dead_fraction"]
    return {"tokens": state.tokens, "step": state.step, **recon.compute(), **sparse}


def _report(metrics: dict, model, optimizer, state: TrainState, progress: dict, rank: int,
            write_checkpoint: bool) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train  # [ray]

    if write_checkpoint and rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_training_checkpoint(tmp, model, optimizer, state, dict(progress))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))  # [ray]
    else:
        ray.train.report(metrics, checkpoint=None)  # [ray]


def _maybe_inject_fault(fault_at: Optional[int], tokens: int, rank: int,
                        marker: Optional[str]) -> None:
    """Testing aid (RAYSAE_FAULT_AT_TOKENS): the last rank dies once, abruptly, past `fault_at`."""
    if fault_at is None or tokens < fault_at or marker is None or os.path.exists(marker):
        return
    import ray.train  # [ray]

    if rank == ray.train.get_context().get_world_size() - 1:
        Path(marker).write_text(str(tokens))
        os._exit(1)


# ---------------------------------------------------------------------------------------------
# Ray Train: the driver


def train_distributed(cfg: RunConfig, out: str, name: Optional[str] = None,
                      overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train one SAE with Ray Train on the connected (or a new local) Ray cluster.

    Validates everything before any worker starts; resumes the run OUT/NAME if it has
    checkpoints; returns the final metrics (also written to OUT/NAME/metrics.json).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysae import stream

    if cfg.data.uri is None:
        raise ConfigError("distributed training reads a dataset (data.uri); for toy data write "
                          "it as shards first (raysae.shards.write_dataset) or use --local")
    name = name or run_name(cfg)
    run_dir = storage.join(out, name)
    check_output(run_dir, overwrite)
    manifest, train_parts, eval_parts = dataset_split(cfg)
    init = _initial_values(cfg, train_parts)
    if not ray.is_initialized():
        ray.init()
    use_gpu = cfg.scaling.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    workers = cfg.scaling.num_workers
    num_workers = (cfg.scaling.min_workers, workers) if cfg.scaling.min_workers else workers
    fs, storage_path = storage.filesystem_and_path(out)
    fault = os.environ.get(FAULT_ENV)
    loop_config = {"run": to_dict(cfg), **init, "eval_parts": eval_parts,
                   "fault_at_tokens": int(fault) if fault else None,
                   "fault_marker": _fault_marker(out, name) if fault else None}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                  **cfg.scaling.resources_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.scaling.num_checkpoints_to_keep)),
        # A function, so a restart builds a fresh stream (a new file order).
        datasets={"train": lambda: stream.build_dataset(
            cfg.data.uri, parts=train_parts, seed=cfg.train.seed)},
    )
    log(f"training {cfg.sae.architecture} SAE d_in={cfg.sae.d_in} n_latents={cfg.sae.n_latents} "
        f"on {cfg.data.uri} ({manifest.n_tokens:,} tokens) with {num_workers} worker(s), "
        f"gpu={use_gpu}; run {run_dir}")
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error:
        raise result.error
    final = result.metrics
    held_out = {k[len("eval/"):]: v for k, v in final.items() if k.startswith("eval/")}
    history = [_plain(h) for h in (result.metrics_dataframe.to_dict("records")
                                   if result.metrics_dataframe is not None else [])
               if not any(str(k).startswith("eval/") for k in h)]
    with result.checkpoint.as_directory() as ckpt_dir:
        model = load_sae(ckpt_dir)
    extra = {"replayed_tokens": final["replayed_tokens"], "restarts": final["restarts"],
             "nodes": final["nodes"], "run_dir": run_dir, "checkpoint": result.checkpoint.path}
    return finish(model, cfg, run_dir, history, wall, held_out, None, extra, log)


def _initial_values(cfg: RunConfig, train_parts: list[str]) -> dict:
    """Input scale and b_dec from a sample of the training parts, as the single-process path."""
    sample, _ = take_init_sample(uri_batches(cfg.data.uri, cfg.train.batch_size, train_parts,
                                             cfg.train.seed), cfg.train.init_tokens)
    check_batch(sample, cfg.sae.d_in, f"{cfg.data.uri}: initialisation sample")
    model = build_sae(cfg.sae)
    model.init_from_sample_(sample)
    return {"input_scale": float(model.input_scale), "b_dec": model.b_dec.detach().tolist()}


def _fault_marker(out: str, name: str) -> str:
    path = Path(tempfile.gettempdir()) / f"raysae-fault-{hashlib.sha1((out + name).encode()).hexdigest()[:12]}"
    return str(path)


def _plain(record: dict) -> dict:
    """JSON-safe copy of a metrics record (numpy scalars → Python)."""
    out = {}
    for k, v in record.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
    return out
