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
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from raysae import storage
from raysae.checkpoint import load_sae, save_sae
from raysae.config import ConfigError, RunConfig, to_dict, with_absolute_paths
from raysae.evaluate import data_mean, evaluate
from raysae.saes import build_sae
from raysae.synthetic import (
    HELD_OUT_STREAM,
    ToyData,
    feature_recovery,
    recovery_line,
    toy_directions,
)
from raysae.trainer import check_batch, fit, take_init_sample

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
        raise ConfigError(
            f"dataset {cfg.data.uri} has d_in={manifest.d_in} but sae.d_in="
            f"{cfg.sae.d_in}; set sae.d_in: {manifest.d_in}"
        )
    names = [p.name for p in manifest.parts]
    n_eval = cfg.data.eval_parts
    if n_eval and len(names) <= n_eval:
        raise ConfigError(
            f"dataset {cfg.data.uri} has {len(names)} part(s); data.eval_parts="
            f"{n_eval} would leave none to train on — lower data.eval_parts "
            "(0 evaluates on training data) or harvest more parts"
        )
    train_parts = names[: len(names) - n_eval] if n_eval else names
    eval_parts = names[len(names) - n_eval :] if n_eval else names
    return manifest, train_parts, eval_parts


def uri_batches(uri: str, batch_size: int, parts: list[str], seed: int) -> Iterator[torch.Tensor]:
    """Endless single-process stream over `parts` of a dataset, a new part order each epoch."""
    from raysae import shards

    epoch = 0
    while True:
        yielded = False
        for batch in shards.iter_batches(
            uri, batch_size, parts=parts, seed=seed + epoch, drop_last=True
        ):
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
    return (
        shards.iter_batches(cfg.data.uri, batch_size, parts=eval_parts),
        sum(rows[name] for name in eval_parts),
    )


def training_and_eval_streams(cfg: RunConfig, batch_size: int):
    """(training stream, held-out stream factory, held-out tokens, feature directions or None).

    Toy data: held out is another token stream over the same features (data.eval_tokens of it).
    A dataset: held out is every row of its last data.eval_parts parts. The factory restarts the
    held-out stream, so it can be read twice (its mean first, for FVU_B).
    """
    if cfg.data.toy is not None:
        toy = ToyData(cfg.data.toy, cfg.sae.d_in)

        def held_out():
            return ToyData(cfg.data.toy, cfg.sae.d_in, stream=HELD_OUT_STREAM).batches(batch_size)

        return toy.batches(batch_size), held_out, cfg.data.eval_tokens, toy.directions
    manifest, train_parts, eval_parts = dataset_split(cfg)
    n_eval = held_out_batches(cfg, eval_parts)[1]
    return (
        uri_batches(cfg.data.uri, batch_size, train_parts, cfg.train.seed),
        lambda: held_out_batches(cfg, eval_parts)[0],
        n_eval,
        toy_directions(manifest),
    )


# ---------------------------------------------------------------------------------------------
# Results (shared by both paths)


def check_output(out: str, overwrite: bool) -> None:
    """Refuse to write over an earlier run's results unless told to."""
    if storage.exists(storage.join(out, "metrics.json")) and not overwrite:
        raise OutputExistsError(
            f"{out} already holds a finished run (metrics.json); "
            "choose another --out or --name, or pass --overwrite"
        )


def finish(
    model,
    cfg: RunConfig,
    out: str,
    history: list[dict],
    wall: float,
    metrics: dict,
    directions=None,
    extra: Optional[dict] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Fold the input scale; write OUT/sae and OUT/metrics.json (with the held-out `metrics`)."""
    result = {
        "config": to_dict(cfg),
        "wall_s": wall,
        "tokens": history[-1]["tokens"] if history else 0,
        "eval": metrics,
        **(extra or {}),
        "history": history,
    }
    if directions is not None:
        recovery = feature_recovery(directions, model.W_dec)
        result["feature_recovery"] = {k: v for k, v in recovery.items() if k != "max_cos"}
    model.fold_input_scale_()
    with tempfile.TemporaryDirectory() as tmp:
        save_sae(
            model,
            Path(tmp) / "sae",
            metadata={"tokens": result["tokens"], "eval": _scalars(metrics)},
        )
        storage.upload_dir(Path(tmp) / "sae", storage.join(out, "sae"))
    storage.write_bytes(storage.join(out, "metrics.json"), json.dumps(result, indent=2).encode())
    log(summary(result))
    return result


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}


def summary(result: dict) -> str:
    """A few lines for the console at the end of a run."""
    e = result["eval"]
    lines = [
        f"done: {result['tokens']:,} tokens in {result['wall_s']:.1f} s",
        f"held-out: fvu {e['fvu']:.4f} (explained variance {e['explained_variance']:.4f}) "
        f"l0 {e['l0']:.2f} dead {e['dead_fraction']:.3f} dense {e['dense_fraction']:.3f}",
    ]
    if "replayed_tokens" in result:
        lines.append(
            f"restarts: {result['restarts']}, tokens re-read after restarts: "
            f"{result['replayed_tokens']:,}"
        )
    rec = result.get("feature_recovery")
    if rec:
        lines.append(recovery_line(rec))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Single process


def run_single_process(
    cfg: RunConfig, out: str, overwrite: bool = False, log: Callable[[str], None] = print
) -> dict:
    """Train one SAE in this process; write OUT/sae and OUT/metrics.json; return the metrics."""
    check_output(out, overwrite)
    batches, held_out, n_eval, directions = training_and_eval_streams(cfg, cfg.train.batch_size)
    torch.manual_seed(cfg.train.seed)
    model = build_sae(cfg.sae)
    log(
        f"training {cfg.sae.architecture} SAE d_in={cfg.sae.d_in} n_latents={cfg.sae.n_latents} "
        f"for {cfg.train.total_tokens:,} tokens in one process"
    )
    t0 = time.perf_counter()
    history = fit(model, batches, cfg.train, log=log)
    wall = time.perf_counter() - t0
    # FVU_B is measured about the held-out data's own mean (a first pass over it).
    metrics = evaluate(
        model, held_out(), n_eval, reference_mean=data_mean(held_out(), n_eval, cfg.sae.d_in)
    )
    return finish(model, cfg, out, history, wall, metrics, directions, log=log)


# ---------------------------------------------------------------------------------------------
# Ray Train: the driver


def build_trainer(runs: list[RunConfig], out: str, name: str, callbacks: tuple = ()):
    """A TorchTrainer for a pack of runs (one for `raysae train`) writing to OUT/NAME.

    Validates the dataset against every run first, so bad input fails before any worker starts.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysae import stream
    from raysae.worker import train_loop_per_worker

    lead = runs[0]
    if lead.data.uri is None:
        raise ConfigError(
            "distributed training reads a dataset (data.uri); for toy data write "
            "it as shards first (raysae.shards.write_dataset) or use --local"
        )
    for cfg in runs:
        manifest, train_parts, eval_parts = dataset_split(cfg)
    use_gpu = lead.scaling.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    s = lead.scaling
    num_workers = (s.min_workers, s.num_workers) if s.min_workers else s.num_workers
    fs, storage_path = storage.filesystem_and_path(out)
    fault = os.environ.get(FAULT_ENV)
    loop_config = {
        "runs": [to_dict(cfg) for cfg in runs],
        "init": [_initial_values(cfg, train_parts) for cfg in runs],
        "eval_parts": eval_parts,
        # FVU_B's per-token denominators are taken about the dataset mean.
        "reference_mean": manifest.stats.mean.tolist(),
        "fault_at_tokens": int(fault) if fault else None,
        "fault_marker": _fault_marker() if fault else None,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker, **s.resources_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=s.num_checkpoints_to_keep),
            callbacks=list(callbacks),
        ),
        dataset_config=ray.train.DataConfig(execution_options=_execution_options(lead)),
        # A function, so that a restart builds a fresh stream (a new file order).
        datasets={
            "train": lambda: stream.build_dataset(
                lead.data.uri,
                parts=train_parts,
                seed=lead.train.seed,
                read_cpus=lead.data.read_cpus,
            )
        },
    )


def train_distributed(
    cfg: RunConfig,
    out: str,
    name: Optional[str] = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Train one SAE with Ray Train on the connected (or a new local) Ray cluster.

    Resumes the run OUT/NAME if it has checkpoints; returns the final metrics (also written to
    OUT/NAME/metrics.json).
    """
    import ray

    cfg, out = with_absolute_paths(cfg), storage.absolute(out)
    name = name or run_name(cfg)
    run_dir = storage.join(out, name)
    check_output(run_dir, overwrite)
    if not ray.is_initialized():
        ray.init()
    trainer = build_trainer([cfg], out, name)
    log(
        f"training {cfg.sae.architecture} SAE d_in={cfg.sae.d_in} n_latents={cfg.sae.n_latents} "
        f"on {cfg.data.uri} with {cfg.scaling.num_workers} worker(s); run {run_dir}"
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise result.error
    return finish_run(result, [cfg], run_dir, time.perf_counter() - t0, log)[0]


def finish_run(
    result, runs: list[RunConfig], out: str, wall: float, log: Callable[[str], None] = print
) -> list[dict]:
    """Write each member's final SAE and metrics from a finished Ray Train result.

    One member: OUT/sae and OUT/metrics.json; a pack: OUT/m<i>/sae and OUT/m<i>/metrics.json.
    """
    final = result.return_value  # rank 0's return of train_loop_per_worker
    progress = final["progress"]
    results = []
    for i, cfg in enumerate(runs):
        held_out = _member_view(final["eval"], f"m{i}/", keep_unprefixed=False)
        history = [_member_view(r, f"m{i}/") for r in final["history"]]
        with result.checkpoint.as_directory() as ckpt_dir:
            model = load_sae(Path(ckpt_dir) / f"m{i}")
        member_out = out if len(runs) == 1 else storage.join(out, f"m{i}")
        extra = {k: progress[k] for k in ("replayed_tokens", "restarts", "nodes", "rows_read")}
        extra.update(run_dir=member_out, checkpoint=result.checkpoint.path)
        directions = toy_directions(dataset_split(cfg)[0])
        results.append(
            finish(model, cfg, member_out, history, wall, held_out, directions, extra, log)
        )
    return results


def _execution_options(cfg: RunConfig):
    from ray.data import ExecutionOptions

    return ExecutionOptions(preserve_order=cfg.data.deterministic_order)


def _member_view(record: dict, prefix: str, keep_unprefixed: bool = True) -> dict:
    """One pack member's metrics: keys under `prefix` with it stripped (plus the shared,
    slash-free keys such as tokens, when keep_unprefixed)."""
    view = {k: v for k, v in record.items() if "/" not in k} if keep_unprefixed else {}
    view.update({k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix)})
    return view


def _initial_values(cfg: RunConfig, train_parts: list[str]) -> dict:
    """Input scale and b_dec from a sample of the training parts, as the single-process path."""
    sample, _ = take_init_sample(
        uri_batches(cfg.data.uri, cfg.train.batch_size, train_parts, cfg.train.seed),
        cfg.train.init_tokens,
    )
    check_batch(sample, cfg.sae.d_in, f"{cfg.data.uri}: initialisation sample")
    model = build_sae(cfg.sae)
    model.init_from_sample_(sample)
    return {"input_scale": float(model.input_scale), "b_dec": model.b_dec.detach().tolist()}


def _fault_marker() -> str:
    """A file new to this invocation: the injected fault fires once per `fit`, not once ever."""
    return str(Path(tempfile.gettempdir()) / f"raysae-fault-{uuid.uuid4().hex}")
