"""`raysae train`: one SAE, on a Ray cluster (Ray Train, DDP) or in this process.

    driver (train_distributed)                      each worker (raysae.worker)
    ─────────────────────────                       ──────────────────────────────────
    open the dataset once; check it and the         restore the latest checkpoint, or init
      config before any worker starts               DDP model, Adam, counters
    initial input scale + b_dec from a sample       raysae.loop.train_pack over its
    TorchTrainer(datasets={"train": stream})   ──▶    streaming_split shard: every N tokens
                                                      merge metrics, report (+ checkpoint)
                                                    evaluate its share of the held-out parts
    write the final SAE and metrics.json

`--local` (and toy data) runs the same loop, raysae.loop, in this process (raysae.loop.fit).

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
With trackers (`tracking:`, raysae.tracking), by default also OUT/tensorboard/NAME/ and the
MLflow store OUT/mlruns/ (a --local run: OUT/tensorboard/<run name>/, OUT/mlruns/).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import torch

from raysae import data, interrupt
from raysae.checkpoint import CONFIG, ResultsSpaceError, load_sae, no_space, sae_bytes, save_sae
from raysae.config import RunConfig
from raysae.data import Dataset, storage
from raysae.evaluate import data_mean, evaluate
from raysae.loop import StepInfo, error_behind, fit, member_key, member_view, take_init_sample
from raysae.metrics import scalars
from raysae.saes import build_sae, initial_values
from raysae.settings import ConfigError, to_dict, with_absolute_paths
from raysae.step import check_batch
from raysae.synthetic import (
    HELD_OUT_STREAM,
    ToyData,
    feature_recovery,
    recovery_line,
    toy_directions,
)
from raysae.tracking import Session, member_runs, reachable, resolve
from raysae.views import summary_lines

TRACKING_EXPERIMENT = "raysae-train"
"""The trackers' experiment (MLflow's; the W&B group) of `raysae train` runs, unless set."""


class OutputExistsError(FileExistsError):
    """The output directory already holds results."""


def run_name(cfg: RunConfig) -> str:
    """A deterministic run name: the same config resumes the same run. The trackers are not
    part of it: adding one to a run that is resumed continues that run."""
    identity = {k: v for k, v in to_dict(cfg).items() if k != "tracking"}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.sae.architecture}-{cfg.sae.n_latents}-{digest}"


# ---------------------------------------------------------------------------------------------
# Data sources


def training_data(cfg: RunConfig, dataset: Dataset) -> tuple[Dataset, Dataset]:
    """(training, held-out) parts of `dataset` (the command opened it), checked against cfg."""
    if dataset.d_in != cfg.sae.d_in:
        raise ConfigError(
            f"dataset {cfg.data.dataset} has d_in={dataset.d_in} but sae.d_in="
            f"{cfg.sae.d_in}; set sae.d_in: {dataset.d_in}"
        )
    check_sources(cfg, dataset)
    n_eval = cfg.data.eval_parts
    if n_eval and len(dataset.parts) <= n_eval:
        raise ConfigError(
            f"dataset {cfg.data.dataset} has {len(dataset.parts)} part(s); data.eval_parts="
            f"{n_eval} would leave none to train on — lower data.eval_parts "
            "(0 evaluates on training data) or harvest more parts"
        )
    return dataset.split(n_eval)


def check_sources(cfg: RunConfig, dataset: Dataset) -> None:
    """A crosscoder splits its input into sae.n_sources equal slices: paired data must be that
    many sources of that width each (a plain SAE may read paired data as one wide input)."""
    sources = getattr(dataset, "sources", ())
    if cfg.sae.architecture != "crosscoder" or not sources:
        return
    widths = [s.d_in for s in sources]
    if len(widths) != cfg.sae.n_sources or len(set(widths)) != 1:
        raise ConfigError(
            f"data.sources {[s.uri for s in sources]} have widths {widths}, but a crosscoder "
            f"with sae.n_sources={cfg.sae.n_sources} reads that many sources of "
            f"{cfg.sae.d_in // cfg.sae.n_sources} each; set sae.n_sources: {len(widths)} "
            "(sources of one width: the same model's layers, or models of the same d_model)"
        )


def open_for_ray(runs: list[RunConfig]) -> Dataset:
    """Open the dataset the runs (a pack, or a sweep's points) train on, once, and check it
    against every one of them: bad input fails here, before any worker starts."""
    uris = {cfg.data.dataset for cfg in runs}
    if None in uris:
        raise ConfigError(
            "distributed training reads a dataset (data.uri or data.sources); for toy data write "
            "it as shards first (raysae.data.write_dataset) or use --local"
        )
    if len(uris) > 1:
        raise ConfigError(
            f"the runs read different datasets ({', '.join(sorted(uris))}); "
            "train them in separate commands"
        )
    dataset = data.open_data(uris.pop())
    for cfg in runs:
        training_data(cfg, dataset)
    return dataset


def endless_batches(dataset: Dataset, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless single-process stream over `dataset`'s parts, a new part order each epoch."""
    epoch = 0
    while True:
        yielded = False
        for batch in dataset.batches(batch_size, seed=seed + epoch, drop_last=True):
            yielded = True
            yield batch
        if not yielded:
            raise ValueError(f"dataset {dataset.uri} has fewer rows than one batch ({batch_size})")
        epoch += 1


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
    dataset = data.open_data(cfg.data.dataset)
    train, held = training_data(cfg, dataset)
    return (
        endless_batches(train, batch_size, cfg.train.seed),
        lambda: held.batches(8192),
        held.n_tokens,
        toy_directions(dataset.manifest),
    )


# ---------------------------------------------------------------------------------------------
# Results (shared by both paths)


def check_output(out: str, overwrite: bool) -> None:
    """Refuse to write over an earlier run's results unless told to, or to an output that
    cannot be written (checked without writing anything there)."""
    storage.check_reachable(out)  # a dead endpoint fails now, not after the retry budget
    if storage.exists(storage.join(out, "metrics.json")) and not overwrite:
        raise OutputExistsError(
            f"{out} already holds a finished run (metrics.json); "
            "choose another --out or --name, or pass --overwrite"
        )
    storage.check_writable(out)


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
    *,
    resumable: bool,
) -> dict:
    """Fold the input scale; write OUT/sae and OUT/metrics.json (with the held-out `metrics`).
    `resumable`: the run has checkpoints, so re-running it after a full disk resumes."""
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
    write_results(model, result, out, resumable)
    log(summary(result))
    return result


def write_results(model, result: dict, out: str, resumable: bool) -> None:
    """Write the SAE to OUT/sae (config.json last: with it the folder is complete) and then
    `result` to OUT/metrics.json (with it the run is finished). An earlier run's metrics.json
    and config.json (--overwrite) go first, so that no failure leaves a folder that looks
    complete over files of two runs. A full disk raises ResultsSpaceError, naming it and the
    space needed, once the partial SAE is removed."""
    body = json.dumps(result, indent=2).encode()
    sae_dir, metrics_path = storage.join(out, "sae"), storage.join(out, "metrics.json")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "sae"
        try:
            save_sae(
                model, local, metadata={"tokens": result["tokens"], "eval": scalars(result["eval"])}
            )
        except Exception as e:
            if not no_space(e):
                raise
            needed = sae_bytes(model) + len(body)
            raise _results_space_error(tempfile.gettempdir(), needed, resumable) from None
        try:
            storage.delete(metrics_path)
            storage.delete(storage.join(sae_dir, CONFIG))
            storage.upload_dir(local, sae_dir)
            storage.write_bytes(metrics_path, body)
        except Exception as e:
            if not no_space(e):
                raise
            # The space is needed, and an SAE without its metrics.json is no finished run. If
            # it cannot be removed, what is left has no config.json: load_sae refuses it.
            fs, path = storage.filesystem_and_path(sae_dir)
            with contextlib.suppress(OSError):
                fs.delete_dir(path)
            needed = sum(p.stat().st_size for p in local.iterdir()) + len(body)
            raise _results_space_error(out, needed, resumable) from None


def _results_space_error(where: str, needed: int, resumable: bool) -> ResultsSpaceError:
    """The error for final results that did not fit on `where`: the space they need, and that
    re-running the command resumes (from the final checkpoint) or, for --local, trains again."""
    again = (
        "it resumes from the last checkpoint"
        if resumable
        else "--local keeps no checkpoints, so it trains again from the start"
    )
    return ResultsSpaceError(
        f"no space left on {where}: the SAE and its metrics.json need about "
        f"{needed / 2**20:,.1f} MiB; free that much there and re-run the same command ({again})"
    )


def member_dirs(out: str, n: int) -> list[str]:
    """Where each of a pack's n SAEs writes its results: OUT itself for one, OUT/m<i> for more
    (the same m<i> names as its folders in the training checkpoints and its metric prefixes)."""
    return [out] if n == 1 else [storage.join(out, member_key(i)) for i in range(n)]


def summary(result: dict) -> str:
    """A few lines for the console at the end of a run."""
    e = result["eval"]
    lines = [
        f"done: {result['tokens']:,} tokens in {result['wall_s']:.1f} s",
        f"held-out: fvu {e['fvu']:.4f} (explained variance {e['explained_variance']:.4f}) "
        f"l0 {e['l0']:.2f} dead {e['dead_fraction']:.3f} dense {e['dense_fraction']:.3f}",
    ]
    lines += summary_lines(e)
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


# ---------------------------------------------------------------------------------------------
# Single process


def run_single_process(
    cfg: RunConfig, out: str, overwrite: bool = False, log: Callable[[str], None] = print
) -> dict:
    """Train one SAE in this process; write OUT/sae and OUT/metrics.json; return the metrics.

    With trackers (cfg.tracking), the run is a new tracker run named run_name(cfg) each time
    (a run in one process starts from scratch), in OUT/tensorboard and OUT/mlruns by default."""
    tracking = resolve(cfg.tracking, out, TRACKING_EXPERIMENT)
    check_output(out, overwrite)
    batches, held_out, n_eval, directions = training_and_eval_streams(cfg, cfg.train.batch_size)
    torch.manual_seed(cfg.train.seed)
    model = build_sae(cfg.sae)
    log(
        f"training {cfg.sae.architecture} SAE d_in={cfg.sae.d_in} n_latents={cfg.sae.n_latents} "
        f"for {cfg.train.total_tokens:,} tokens in one process"
    )
    session = Session(tracking, fresh=True)
    runs = member_runs([cfg], [run_name(cfg)], [storage.absolute(out)])
    session.start()
    try:
        t0 = time.perf_counter()
        history = fit(
            model, batches, cfg.train, log=log, report=lambda r, _: session.log_record(runs, r)
        )
        wall = time.perf_counter() - t0
        # FVU_B is measured about the held-out data's own mean (a first pass over it).
        # With a crosscoder's FVU per source, a Matryoshka SAE's per prefix (one encoding).
        reference = data_mean(held_out(), n_eval, cfg.sae.d_in)
        metrics = evaluate(model, held_out(), n_eval, reference_mean=reference, views=True)
        result = finish(
            model, cfg, out, history, wall, metrics, directions, log=log, resumable=False
        )
        session.log_eval(runs, [metrics], result["tokens"])
        session.close(runs)
        return result
    finally:
        session.close_all(failed=True)  # only runs an error left open


# ---------------------------------------------------------------------------------------------
# Ray Train: the driver


def build_trainer(
    runs: list[RunConfig],
    out: str,
    name: str,
    *,
    dataset: Dataset,
    callbacks: tuple = (),
    on_step: Optional[Callable[[StepInfo], None]] = None,
):
    """A TorchTrainer for a pack of runs (one for `raysae train`) on `dataset` (the command
    opened it; nothing here or in the workers opens it again), writing to OUT/NAME.

    Checks the dataset against every run first, so bad input fails before any worker starts.
    `on_step` is a test's hook into every worker's loop (see raysae.faults).
    """
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from raysae.data import stream
    from raysae.worker import train_loop_per_worker

    lead = runs[0]
    splits = [training_data(cfg, dataset) for cfg in runs]
    train_data, held_out = splits[0]  # packed runs share their data (sweep_spec checks)
    use_gpu = lead.scaling.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    s = lead.scaling
    num_workers = (s.min_workers, s.num_workers) if s.min_workers else s.num_workers
    fs, storage_path = storage.filesystem_and_path(out)
    loop_config = {
        "runs": [to_dict(cfg) for cfg in runs],
        "init": _initial_values(runs, train_data),
        "held_out": held_out,
        "run_dir": storage.join(out, name),
        # FVU_B's per-token denominators are taken about the dataset mean.
        "reference_mean": dataset.manifest.stats.mean.tolist(),
        "on_step": on_step,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            elastic_resize_monitor_interval_s=s.resize_check_s,
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
        dataset_config=ray.train.DataConfig(
            execution_options=ExecutionOptions(preserve_order=lead.data.deterministic_order)
        ),
        # A function, so that a restart builds a fresh stream (a new file order) from the same
        # Dataset value: a restart re-opens nothing.
        datasets={
            "train": lambda: stream.build_dataset(
                train_data, seed=lead.train.seed, read_cpus=lead.data.read_cpus
            )
        },
    )


def train_distributed(
    cfg: RunConfig,
    out: str,
    name: Optional[str] = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    on_step: Optional[Callable[[StepInfo], None]] = None,
    address: Optional[str] = None,
) -> dict:
    """Train one SAE with Ray Train on the connected Ray cluster, else the one at `address`
    (a new local one by default), joined once the output and dataset are checked.

    Resumes the run OUT/NAME if it has checkpoints; returns the final metrics (also written to
    OUT/NAME/metrics.json). With trackers, the run's tracker run is NAME (continued on resume):
    Ray Train's controller logs the records as they come (raysae.tracking_ray.TrainTracking),
    this process the held-out evaluation at the end.
    """
    import ray

    cfg, out = with_absolute_paths(cfg), storage.absolute(out)
    name = name or run_name(cfg)
    run_dir = storage.join(out, name)
    tracking = resolve(cfg.tracking, out, TRACKING_EXPERIMENT)
    check_output(run_dir, overwrite)
    dataset = open_for_ray([cfg])
    if not ray.is_initialized():
        ray.init(address=address)
        interrupt.reclaim()  # SIGTERM stops the run cleanly, not through Ray's bare exit
    tracking = reachable(tracking)
    runs = member_runs([cfg], [name], [run_dir])
    callbacks = []
    if tracking.trackers:
        from raysae.tracking_ray import TrainTracking

        s = cfg.scaling
        callbacks.append(TrainTracking(tracking, runs, cfg.train.total_tokens, s.num_workers))
    trainer = build_trainer([cfg], out, name, dataset=dataset, on_step=on_step, callbacks=callbacks)
    log(
        f"training {cfg.sae.architecture} SAE d_in={cfg.sae.d_in} n_latents={cfg.sae.n_latents} "
        f"on {cfg.data.dataset} with {cfg.scaling.num_workers} worker(s); run {run_dir}"
    )
    t0 = time.perf_counter()
    with interrupt.ray_train_stops():  # Ctrl-C / SIGTERM: Ray Train aborts its workers
        result = trainer.fit()
    try:
        if result.error:
            raise storage_error_behind(result.error) or result.error
        final = finish_run(result, [cfg], run_dir, time.perf_counter() - t0, dataset, log)[0]
    except Exception:
        _finish_tracking(tracking, runs, failed=True)
        raise
    _finish_tracking(tracking, runs, [final["eval"]], final["tokens"])
    return final


def _finish_tracking(tracking, runs, evals=None, tokens=0, failed=False) -> None:
    """The driver's part of a Ray Train run's trackers: the held-out evaluation, the end."""
    if tracking.trackers:
        from raysae.tracking_ray import finish

        finish(tracking, runs, evals, tokens, failed)


def storage_error_behind(error: BaseException) -> Optional[storage.StorageError]:
    """The StorageError a worker or one of its read tasks raised, if that is what failed a Ray
    Train run: its message is the one to show (e.g. the store unreachable past the retry
    budget, after the restarts `max_failures` allows), not Ray's traceback text."""
    return error_behind(error, (storage.StorageError,))


def finish_run(
    result,
    runs: list[RunConfig],
    out: str,
    wall: float,
    dataset: Dataset,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Write each member's final SAE and metrics from a finished Ray Train result.

    One member: OUT/sae and OUT/metrics.json; a pack: OUT/m<i>/sae and OUT/m<i>/metrics.json.
    """
    final = result.return_value  # rank 0's return of train_loop_per_worker
    if "stopped" in final:  # bad data or a full disk: the workers stopped, and so does the run
        raise final["stopped"]
    progress = final["progress"]
    directions = toy_directions(dataset.manifest)
    results = []
    for i, (cfg, member_out) in enumerate(zip(runs, member_dirs(out, len(runs)))):
        held_out = member_view(final["eval"], i, keep_unprefixed=False)
        history = [member_view(r, i) for r in final["history"]]
        with result.checkpoint.as_directory() as ckpt_dir:
            model = load_sae(Path(ckpt_dir) / member_key(i))
        extra = {k: progress[k] for k in ("replayed_tokens", "restarts", "nodes", "rows_read")}
        extra.update(run_dir=member_out, checkpoint=result.checkpoint.path)
        results.append(
            finish(
                model,
                cfg,
                member_out,
                history,
                wall,
                held_out,
                directions,
                extra,
                log,
                resumable=True,
            )
        )
    return results


def _initial_values(runs: list[RunConfig], train_data: Dataset) -> list[dict]:
    """Each run's input scale and b_dec from a sample of the training parts, as the
    single-process path takes them; runs that would draw the same sample share one read."""
    samples: dict[tuple, torch.Tensor] = {}
    init = []
    for cfg in runs:
        t = cfg.train
        key = (t.batch_size, t.seed, t.init_tokens)
        if key not in samples:
            batches = endless_batches(train_data, t.batch_size, t.seed)
            samples[key] = take_init_sample(batches, t.init_tokens)[0]
            check_batch(samples[key], cfg.sae.d_in, f"{cfg.data.dataset}: initialisation sample")
        scale, b_dec = initial_values(samples[key], cfg.sae)
        init.append({"input_scale": scale, "b_dec": b_dec.float().tolist()})
    return init
