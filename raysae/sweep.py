"""`raysae sweep SPEC.yaml`: a sweep spec → Ray Tune trials → a results table and Pareto frontier.

Each Tune trial is one *pack* of SAEs (`pack: 1` by default): a function trainable that builds
and fits a Ray Train TorchTrainer (raysae.train.build_trainer) named after the trial id, so a
restored trial resumes its own Train checkpoints. Layout under OUTPUT/NAME/:

    <Tune's experiment state and trial folders>     what `--resume` (Tuner.restore) reads
    trials/trial-<id>/[m<i>/]{sae/, metrics.json}   each SAE's final checkpoint and metrics
    trials/trial-<id>/checkpoint_*/                 Ray Train checkpoints of the trial
    results.parquet, results.csv                    one row per SAE
    pareto.csv, pareto.png                          the frontier (L0 vs FVU) per architecture
    tensorboard/trial-<id>/[m<i>/], mlruns/          with trackers (raysae.tracking): one run
                                                    per SAE, unless the spec puts them elsewhere
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Callable

import pandas as pd

from raysae import interrupt, pages, report, views
from raysae.config import TOPK_FAMILY, RunConfig
from raysae.data import BadDataError, Dataset, storage
from raysae.loop import STOPS_RUN, member_key
from raysae.settings import ConfigError, from_dict, to_dict
from raysae.step import BadBatchError
from raysae.sweep_spec import SweepSpec, expand, packs, with_absolute_paths
from raysae.synthetic import write_toy_dataset
from raysae.tracking import resolve
from raysae.train import (
    OutputExistsError,
    build_trainer,
    finish_run,
    member_dirs,
    open_for_ray,
)

DATA_STOPS = (BadDataError, BadBatchError)
"""The run-stopping errors (raysae.loop.STOPS_RUN) that are bound to the dataset, so a retry of
the trial on the same dataset fails again at once (`record_stop`). A full disk is not: once
space is freed, Tune's retry (or --resume) resumes from the last checkpoint."""

SPEC_FILE = "sweep_spec.json"
"""Written into OUTPUT/NAME once the pre-flight checks pass: marks the folder as a sweep's and
records what ran."""
STOPPED_FILE = "stopped.json"
"""Written into a trial's folder when bad data stopped it (`record_stop`), so that Tune's
retry of the trial fails at once with the same message instead of training again."""
TUNE_STATE = "tuner.pkl"
"""What Tune writes into OUTPUT/NAME when it sets the sweep up (tune.Tuner), before any trial;
`--resume` (Tuner.restore) reads it."""


class SweepFailedError(RuntimeError):
    """Every trial of a sweep failed; the message has each trial's error."""


def sweep_trial(config: dict, datasets: dict[str, Dataset]) -> None:
    """Tune function trainable: train one pack of SAEs with Ray Train, report to Tune.

    `datasets` (data.uri → the Dataset run_sweep opened) reaches every trial through Tune's
    object store (tune.with_parameters): no trial opens a dataset again."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    runs = [from_dict(RunConfig, r) for r in config["packs"][config["pack"]]]
    name = f"trial-{ray.tune.get_context().get_trial_id()}"
    done = _finished_metrics(storage.join(config["trials_dir"], name), len(runs))
    if done:  # finished before an interruption Tune had not yet recorded: keep, do not re-run
        ray.tune.report(final_report(done))
        return
    dataset = datasets[runs[0].data.dataset]
    trial_dir = storage.join(config["trials_dir"], name)
    raise_if_stopped(trial_dir, dataset)
    trainer = build_trainer(
        runs, config["trials_dir"], name, dataset=dataset, callbacks=[TuneReportCallback()]
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise result.error
    try:
        finals = finish_run(result, runs, trial_dir, time.perf_counter() - t0, dataset)
    except STOPS_RUN as e:
        record_stop(trial_dir, dataset, e)
        raise
    ray.tune.report(final_report(finals))


def final_report(finals: list[dict]) -> dict:
    """A trial's last result to Tune, from its members' final metrics: the best member's
    held-out metrics unprefixed (what ASHA and the results read) and every member's as
    "m<i>/eval/<metric>" (what the trackers log, raysae.tracking_ray)."""
    best = min(finals, key=lambda r: r["eval"]["fvu"])
    members = {
        f"{member_key(i)}/eval/{k}": v for i, r in enumerate(finals) for k, v in r["eval"].items()
    }
    return {**best["eval"], **members, "tokens": best["tokens"], "done_eval": True}


def _fingerprint(dataset: Dataset) -> str:
    """What identifies a dataset's contents: its manifest (re-harvesting writes a new one)."""
    return hashlib.sha256(dataset.manifest.to_json().encode()).hexdigest()


def record_stop(trial_dir: str, dataset: Dataset, error: BaseException) -> None:
    """Remember in the trial's folder that bad data stopped it (`DATA_STOPS`; other errors are
    not recorded), best effort. Tune retries a failed trial (max_failures) and the retry,
    resumed from a checkpoint, could read the parts in another order and miss the bad one."""
    if not isinstance(error, DATA_STOPS):
        return
    body = {"error": str(error), "kind": type(error).__name__, "dataset": _fingerprint(dataset)}
    try:
        storage.write_bytes(storage.join(trial_dir, STOPPED_FILE), json.dumps(body).encode())
    except OSError:
        pass


def raise_if_stopped(trial_dir: str, dataset: Dataset) -> None:
    """Fail the trial again, without training, if bad data stopped it on this same dataset."""
    path = storage.join(trial_dir, STOPPED_FILE)
    if not storage.exists(path):
        return
    body = json.loads(storage.read_bytes(path))
    if body.get("dataset") != _fingerprint(dataset):
        return  # the dataset was re-harvested since: train on it
    kinds = {kind.__name__: kind for kind in DATA_STOPS}
    raise kinds.get(body.get("kind"), BadDataError)(body["error"])


def _finished_metrics(trial_dir: str, n: int) -> list[dict]:
    """Every member's metrics.json if all exist, else []."""
    paths = [storage.join(d, "metrics.json") for d in member_dirs(trial_dir, n)]
    if not all(storage.exists(p) for p in paths):
        return []
    return [json.loads(storage.read_bytes(p)) for p in paths]


def run_sweep(
    spec: SweepSpec,
    resume: bool = False,
    log: Callable[[str], None] = print,
    address: str | None = None,
) -> pd.DataFrame:
    """Run (or with `resume`, continue) the sweep; write and return the results table.

    Ray is started (or the cluster at `address` joined) only once the pre-flight checks pass,
    unless the dataset has to be harvested first."""
    import ray
    from ray import tune

    spec = with_absolute_paths(spec)
    sweep_dir = storage.join(spec.output, spec.name)
    points = expand(spec)
    groups = packs(points, spec.pack)
    # The trackers' libraries and places are checked first: a missing one writes nothing.
    tracking = resolve(spec.tracking, sweep_dir, spec.name)
    datasets = preflight(spec, points, sweep_dir, resume, log, address)
    if not ray.is_initialized():
        ray.init(address=address)
        interrupt.reclaim()  # SIGTERM stops the sweep cleanly, not through Ray's bare exit

    keep_credentials_out_of_trials()
    fs, root = storage.filesystem_and_path(spec.output)
    experiment = f"{root}/{spec.name}"
    # The trial process only drives its TorchTrainer; Tune refuses an empty request, so a sliver.
    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, datasets=datasets), {"cpu": 0.01}
    )
    if resume:
        log(f"resuming sweep {sweep_dir}")
        tuner = tune.Tuner.restore(
            experiment,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=fs,
        )
    else:
        log(f"sweep {spec.name}: {len(points)} SAE(s) in {len(groups)} trial(s) → {sweep_dir}")
        tuner = tune.Tuner(
            trainable,
            param_space={
                "packs": [[to_dict(c) for c in g] for g in groups],
                "pack": tune.grid_search(list(range(len(groups)))),
                "trials_dir": storage.join(sweep_dir, "trials"),
            },
            tune_config=tune.TuneConfig(
                max_concurrent_trials=spec.max_concurrent_trials, scheduler=_scheduler(spec, points)
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=root,
                storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                callbacks=_tracking_callbacks(tracking, spec.name),
                verbose=1,
            ),
        )
    t0 = time.perf_counter()
    # Ctrl-C / SIGTERM: Tune ends the trials and saves its state; no results are written.
    with interrupt.tune_stops():
        grid = tuner.fit()
    errors = {_trial_id(r): _last_line(r.error) for r in grid if r.error}
    if len(errors) == len(grid):
        raise SweepFailedError(
            f"every trial of sweep {spec.name} failed ({sweep_dir}):\n"
            + "\n".join(f"  trial {trial}: {error}" for trial, error in errors.items())
        )
    table = report.with_frontiers(collect(grid, sweep_dir))
    report.write_results(table, sweep_dir)
    pages.write_sweep_page(sweep_dir, table)  # OUT/NAME/index.html; `raysae pages` refreshes it
    log(f"sweep finished in {time.perf_counter() - t0:.0f} s")
    log(report.summary(table, sweep_dir))
    return table


TUNE_COPIED_CREDENTIALS = frozenset(
    {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}
)
"""The credentials Ray Tune copies from the driver's environment into each trial's runtime_env."""


def keep_credentials_out_of_trials() -> None:
    """Stop Ray Tune from copying the driver's AWS keys into every trial actor's runtime_env
    (`env_vars`, from ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE): Ray writes a
    runtime_env into the nodes' logs (runtime_env_agent.log) and keeps it in the cluster's state,
    so the keys were written down (tests/test_submit.py found them). A trial reads S3 with the
    credentials of the node it runs on: its instance profile (cluster.yaml), or the environment
    the node was started with, which for the local Ray that raysae starts is this process's.
    Ray has no setting for this; its list is edited instead."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = class_cache.ENV_VARS_TO_PROPAGATE - TUNE_COPIED_CREDENTIALS


def _tracking_callbacks(tracking, name: str) -> list:
    """The Tune callback following every SAE in the chosen trackers (none without trackers)."""
    if not tracking.trackers:
        return []
    from raysae.tracking_ray import SweepTracking

    return [SweepTracking(tracking, name)]


def has_started(spec: SweepSpec) -> bool:
    """Whether the sweep's Tune state exists, so that `--resume` can go on from it."""
    sweep_dir = storage.join(with_absolute_paths(spec).output, spec.name)
    return storage.exists(storage.join(sweep_dir, TUNE_STATE))


def preflight(
    spec: SweepSpec,
    points: list[RunConfig],
    sweep_dir: str,
    resume: bool,
    log: Callable[[str], None] = print,
    address: str | None = None,
) -> dict[str, Dataset]:
    """Check everything the sweep needs, then mark the output: data.uri → its opened Dataset.

    Nothing is written to the output before the last step, so a sweep that fails here leaves
    it as it was (and a rerun is not mistaken for an interrupted sweep). In order: the output's
    state and writability; the dataset, made first if the spec says how (that writes to the
    data location only); each dataset opened once and checked against every point."""
    _check_output(sweep_dir, resume, log)
    storage.check_writable(sweep_dir)
    ensure_dataset(spec, log, address)
    uris = sorted({cfg.data.dataset for cfg in points}, key=str)
    datasets = {uri: open_for_ray([p for p in points if p.data.dataset == uri]) for uri in uris}
    if not resume:
        marker = storage.join(sweep_dir, SPEC_FILE)
        storage.write_bytes(marker, json.dumps(to_dict(spec), indent=1, default=str).encode())
    return datasets


def _check_output(sweep_dir: str, resume: bool, log: Callable[[str], None]) -> None:
    """Refuse to mix with an earlier sweep's results, or to resume a sweep that never started."""
    storage.check_reachable(sweep_dir)  # a dead endpoint fails now, not after the retry budget
    started = storage.exists(storage.join(sweep_dir, SPEC_FILE))
    tune_state = storage.exists(storage.join(sweep_dir, TUNE_STATE))
    if resume:
        if not started:
            raise ConfigError(
                f"--resume: {sweep_dir} holds no sweep to resume; start it without --resume"
            )
        if not tune_state:
            raise ConfigError(
                f"--resume: the sweep in {sweep_dir} never started (it has {SPEC_FILE} but no "
                f"Tune state, {TUNE_STATE}); start it without --resume"
            )
        return
    if storage.exists(storage.join(sweep_dir, "results.csv")):
        raise OutputExistsError(
            f"{sweep_dir} already holds a finished sweep (results.csv); "
            "change `name` or `output` in the spec"
        )
    if started and tune_state:
        raise OutputExistsError(
            f"{sweep_dir} holds an interrupted sweep; continue it with "
            "--resume, or change `name` or `output` in the spec"
        )
    if started:  # marked by an older raysae, then failed before Tune began: nothing to keep
        log(f"{sweep_dir}: a sweep marked there never started; starting it")


def ensure_dataset(
    spec: SweepSpec, log: Callable[[str], None] = print, address: str | None = None
) -> None:
    """Make the base dataset when it does not exist yet and the spec says how (harvest or toy;
    a harvest runs on the Ray cluster at `address`, a new local one by default)."""
    from raysae import data

    uri = spec.base.data.uri
    if uri is None or storage.exists(storage.join(uri, data.MANIFEST_NAME)):
        return
    if spec.toy_dataset is not None:
        toy = spec.toy_dataset
        log(f"{uri} has no dataset yet: writing {toy.n_tokens:,} toy tokens")
        write_toy_dataset(uri, toy.features, spec.base.sae.d_in, toy.n_tokens, toy.rows_per_part)
        return
    if spec.harvest is None:  # the points may read other datasets: open_for_ray checks them
        return
    import ray

    from raysae.harvest import harvest

    if not ray.is_initialized():
        ray.init(address=address)
        interrupt.reclaim()  # SIGTERM stops the harvest cleanly, not through Ray's bare exit

    # SweepSpec checked that base.data.uri is one of the harvest's layer outputs.
    log(
        f"{uri} has no dataset yet: harvesting {spec.harvest.n_tokens:,} tokens from {spec.harvest.model}"
    )
    harvest(spec.harvest)


def _scheduler(spec: SweepSpec, points: list[RunConfig]):
    if spec.scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = spec.scheduler
    # max_t one past the budget: ASHA stops a trial that reaches max_t, which would cut off the
    # held-out evaluation that follows the last training report.
    return ASHAScheduler(
        time_attr="tokens",
        metric=s.metric,
        mode=s.mode,
        grace_period=s.grace_tokens,
        reduction_factor=s.reduction_factor,
        max_t=max(p.train.total_tokens for p in points) + 1,
    )


def collect(grid, sweep_dir: str) -> pd.DataFrame:
    """One row per SAE from a Tune ResultGrid and the members' metrics.json files."""
    rows = []
    for result in grid:
        config, trial_id = result.config, _trial_id(result)
        if config is None:  # failed before its first report: Tune kept no config for it
            rows.append({"trial_id": trial_id, "member": 0, "status": "error"})
            continue
        trial_dir = storage.join(config["trials_dir"], f"trial-{trial_id}")
        runs = [from_dict(RunConfig, r) for r in config["packs"][config["pack"]]]
        for i, (cfg, member_dir) in enumerate(zip(runs, member_dirs(trial_dir, len(runs)))):
            rows.append(_row(cfg, trial_id, i, member_dir, result))
    return pd.DataFrame(rows)


def _trial_id(result) -> str:
    """The Tune trial id of a result (Tune sets it in every trial's last result)."""
    return (result.metrics or {}).get("trial_id") or result.path.rstrip("/").split("/")[-1]


def _last_line(error: BaseException) -> str:
    """The last line of an error's message: a Ray task error's is the original exception."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


ARCHITECTURE_FIELDS = {
    "k": (*TOPK_FAMILY, "crosscoder"),
    "l1_coefficient": ("relu", "gated", "crosscoder"),
    "l0_coefficient": ("jumprelu",),
}
"""The results columns that only some architectures use (raysae.config.SAEConfig's docstrings
say which); blank in the other rows, where the value is an unused default."""


def _row(cfg: RunConfig, trial_id: str, member: int, member_dir: str, result) -> dict:
    row = {
        "trial_id": trial_id,
        "member": member,
        "architecture": cfg.sae.architecture,
        "d_in": cfg.sae.d_in,
        "n_latents": cfg.sae.n_latents,
        **{
            name: getattr(cfg.sae, name) if cfg.sae.architecture in used_by else None
            for name, used_by in ARCHITECTURE_FIELDS.items()
        },
        "lr": cfg.train.effective_lr(cfg.sae.n_latents),
        "seed": cfg.train.seed,
        "total_tokens": cfg.train.total_tokens,
    }
    metrics_path = storage.join(member_dir, "metrics.json")
    if storage.exists(metrics_path):
        final = json.loads(storage.read_bytes(metrics_path))
        row.update(
            status="finished",
            tokens=final["tokens"],
            wall_s=final["wall_s"],
            rows_read=final.get("rows_read"),
            checkpoint=storage.join(member_dir, "sae"),
            **{k: final["eval"].get(k) for k in report.COLUMNS if k in final["eval"]},
            **views.result_columns(final["eval"]),
        )
        if "feature_recovery" in final:
            row["feature_recovery"] = final["feature_recovery"]["fraction_recovered"]
        return row
    # Stopped early (ASHA) or failed: its last training report.
    last = result.metrics or {}
    prefix = f"m{member}/"
    row.update(
        status="error" if result.error else "early_stopped",
        tokens=last.get("tokens"),
        rows_read=last.get("rows_read"),
        checkpoint=last.get("checkpoint_path"),
        **{
            k: last.get(prefix + k)
            for k in ("l0", "fvu", "explained_variance", "mse", "dead_fraction", "dense_fraction")
        },
    )
    return row
