"""Experiment trackers: every SAE of a run or a sweep followed in TensorBoard, MLflow or W&B.

    tracking:                          # in a sweep spec (top level) or a raysae train config
      trackers: [tensorboard, mlflow]  # any of tensorboard, mlflow, wandb
      mlflow: {tracking_uri: http://mlflow.internal:5000}   # default: OUTPUT/mlruns/mlflow.db
      wandb: {project: saes, mode: offline}

One tracker run per SAE, not per Tune trial: a packed trial trains N SAEs on the same batches,
and its records carry each member's metrics under "m<i>/" (raysae.loop.pack_metrics), so each
member gets a run of its own, its RunConfig as the run's parameters (flattened, "sae.k",
"train.lr", with the learning rate actually used), and its metrics as series whose step is
tokens trained: "train/<metric>" every train.log_every_tokens (loss terms, FVU, L0, dead
fraction, tokens/s, ...) and "eval/<metric>" once, the held-out evaluation at the end.

Ray ships Tune callbacks for all three (TBXLoggerCallback, MLflowLoggerCallback,
WandbLoggerCallback), but each makes one run per *trial*, with the trial's config (here: every
pack of the sweep) as parameters and Tune's iteration counter as the step; none can split a
trial's result into several runs. So this module drives each library's own client
(tensorboardX's SummaryWriter, mlflow's MlflowClient, wandb's Run) for the runs of its members,
and raysae.tracking_ray hooks it into Tune (a LoggerCallback, the base of Ray's own) and into
Ray Train (a UserCallback). `raysae train --local` calls it from the training loop's report.

A run is named after where its SAE's results go (a sweep's trials/trial-<id>/m<i>, a run's
OUT/NAME), and opening it again continues it (the same TensorBoard folder, the MLflow run
tagged with the raysae.run_id made from it, the W&B run of that id): a resumed sweep or a
restarted run goes on with the same tracker runs. A `--local` run starts from scratch each
time, and so does its tracker run.

Trackers never stop training: one that cannot be reached, or fails later, is reported with a
TrackerWarning and left out for the rest of the command. A tracker whose library is missing is
a ConfigError in the pre-flight (`check_installed`), before anything is written.

No tracker library is imported here until a run opens (`raysae --help` stays fast).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional
from unittest import mock
from urllib.parse import urlsplit

from raysae.config import RunConfig, TrackingConfig
from raysae.data import storage
from raysae.loop import member_view
from raysae.metrics import scalars
from raysae.settings import ConfigError, to_dict

MODULES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}
"""Tracker → the library module its runs are written with (raysae's extra of the same name
installs it)."""
SHARED_METRICS = ("tokens_per_s", "elapsed_s", "epoch", "replayed_tokens", "restarts", "rows_read")
"""A pack record's unprefixed keys that belong to every member (the rate and the data stream's
position); the other unprefixed keys are the best member's, or Tune's own."""
FIRST_CONTACT_TIMEOUT_S = 5
"""How long the first request to an MLflow server may take: an unreachable one is warned about
within seconds, not after MLflow's default retry budget (minutes)."""


class TrackerWarning(UserWarning):
    """A tracker could not be reached or failed; training goes on without it."""


def check_installed(tracking: TrackingConfig, where: str = "tracking") -> None:
    """A ConfigError naming the extra to install when a chosen tracker's library is missing."""
    for name in tracking.trackers:
        if importlib.util.find_spec(MODULES[name]) is None:
            raise ConfigError(
                f"{where}.trackers: {name} needs the {MODULES[name]} package, which is not "
                f"installed: pip install raysae[{name}]"
            )


def check_places(tracking: TrackingConfig, output: str, where: str = "tracking") -> None:
    """A ConfigError unless every chosen tracker has a place to write: an s3:// output has no
    local default for TensorBoard's event files or MLflow's store, so the setting is asked for;
    TensorBoard's and W&B's folders are local. Checked when a sweep spec is loaded (before it
    is submitted to a cluster, too) and again by `resolve`."""
    remote = storage.is_s3(output)
    tb, ml, wb = tracking.tensorboard, tracking.mlflow, tracking.wandb
    if "tensorboard" in tracking.trackers and tb.logdir is None and remote:
        raise ConfigError(
            f"{where}.tensorboard.logdir: the output {output} is not a local directory; give a "
            "local directory for the event files"
        )
    if "mlflow" in tracking.trackers and ml.tracking_uri is None and remote:
        raise ConfigError(
            f"{where}.mlflow.tracking_uri: the output {output} is not a local directory; give "
            "an MLflow tracking server (http://host:5000) or a local directory"
        )
    for key, value in (("tensorboard.logdir", tb.logdir), ("wandb.dir", wb.dir)):
        if value is not None and storage.is_s3(value):
            raise ConfigError(f"{where}.{key}={value}: give a local directory")


def resolve(tracking: TrackingConfig, output: str, experiment: str, where: str = "tracking"):
    """`tracking` with every place made concrete and absolute (the trackers run in Tune's and
    Ray Train's driver-side processes, which have other working directories): TensorBoard in
    OUTPUT/tensorboard and MLflow in OUTPUT/mlruns/mlflow.db unless given, the experiment
    (MLflow's, and the W&B group) `experiment` unless given. A missing library or a missing
    place (`check_installed`, `check_places`) is a ConfigError; nothing is written here."""
    if not tracking.trackers:
        return tracking
    check_installed(tracking, where)
    check_places(tracking, output, where)
    tb, ml, wb = tracking.tensorboard, tracking.mlflow, tracking.wandb
    local = storage.absolute(output)
    return dataclasses.replace(
        tracking,
        experiment=tracking.experiment or experiment,
        tensorboard=dataclasses.replace(
            tb, logdir=storage.absolute(tb.logdir or os.path.join(local, "tensorboard"))
        ),
        mlflow=dataclasses.replace(
            ml,
            tracking_uri=_mlflow_uri(ml.tracking_uri) if ml.tracking_uri else mlflow_store(local),
        ),
        wandb=dataclasses.replace(wb, dir=storage.absolute(wb.dir) if wb.dir else None),
    )


def reachable(tracking: TrackingConfig) -> TrackingConfig:
    """`tracking` (resolved) without the trackers that cannot be reached now, each warned
    about: a driver checks once, and the processes it hands the settings to do not retry."""
    session = Session(tracking)
    session.start()
    return dataclasses.replace(tracking, trackers=tuple(session.active))


def mlflow_store(output: str) -> str:
    """The default MLflow store of an output folder: OUTPUT/mlruns/mlflow.db. An SQLite
    database, not MLflow's file store (OUTPUT/mlruns as a plain directory tree): MLflow 3
    keeps that one in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE=true,
    recommending a database instead; `mlflow ui --backend-store-uri` opens either."""
    return "sqlite:///" + os.path.join(storage.absolute(output), "mlruns", "mlflow.db")


def _mlflow_uri(uri: str) -> str:
    """A local directory as an absolute path, a relative SQLite database made absolute; other
    URIs (http://, databricks, ...) as given."""
    scheme = urlsplit(uri).scheme
    if scheme == "file":
        return storage.absolute(urlsplit(uri).path)
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + storage.absolute(uri[len("sqlite:///") :])
    if scheme or uri in ("databricks", "databricks-uc"):
        return uri
    return storage.absolute(uri)


# ---------------------------------------------------------------------------------------------
# What is tracked


@dataclass(frozen=True)
class MemberRun:
    """The tracker run of one SAE."""

    name: str
    """Its display name, also its TensorBoard folder under the logdir: "trial-<id>/m<i>" in a
    sweep, the run's name for raysae train."""
    output: str
    """Where the SAE's results go: what identifies the run, so that opening it again
    continues it."""
    config: dict
    """Its RunConfig as plain data (to_dict), the run's parameters."""
    tags: dict
    """Extra tags (sweep, trial id, member)."""

    @property
    def run_id(self) -> str:
        """A stable id made from `output`: W&B's run id, MLflow's raysae.run_id tag."""
        digest = hashlib.sha256(self.output.encode()).hexdigest()[:16]
        return f"{re.sub(r'[^A-Za-z0-9_-]+', '-', self.name)[-40:].strip('-')}-{digest}"


def member_runs(
    runs: list[RunConfig], names: list[str], outputs: list[str], tags: Optional[dict] = None
) -> list[MemberRun]:
    """The tracker runs of a pack's members (one for raysae train), named `names`, for the
    results folders `outputs`."""
    return [
        MemberRun(name, output, params(cfg), {**(tags or {}), "member": str(i)})
        for i, (cfg, name, output) in enumerate(zip(runs, names, outputs))
    ]


def params(cfg: RunConfig) -> dict:
    """A member's parameters: its config without the trackers' settings, train.lr the rate it
    trains with (the default rate is computed from n_latents)."""
    config = {k: v for k, v in to_dict(cfg).items() if k != "tracking"}
    config["train"]["lr"] = cfg.train.effective_lr(cfg.sae.n_latents)
    return config


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"sae": {"k": 4}} → {"sae.k": 4}; lists and None become strings."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def training_metrics(record: dict, member: int) -> dict[str, float]:
    """Member `member`'s series from a pack record (raysae.loop.pack_metrics): its "m<i>/"
    metrics and the shared ones (SHARED_METRICS), as "train/<metric>"."""
    view = member_view(record, member, keep_unprefixed=False)
    view.update({k: record[k] for k in SHARED_METRICS if k in record})
    return _numbers("train/", view)


def eval_metrics(metrics: dict) -> dict[str, float]:
    """A held-out evaluation (a member's metrics.json "eval") as "eval/<metric>"."""
    return _numbers("eval/", metrics)


def _numbers(prefix: str, metrics: dict) -> dict[str, float]:
    """The finite numbers of `metrics` (raysae.metrics.scalars), as floats named prefix + key."""
    return {f"{prefix}{k}": float(v) for k, v in scalars(metrics).items() if math.isfinite(v)}


# ---------------------------------------------------------------------------------------------
# The session: the trackers' runs in this process


class Session:
    """The trackers of one command in this process: opens, logs to and closes member runs on
    every chosen tracker. Every call into a tracker library goes through `_guard`: a failure
    is a TrackerWarning, and that tracker is left out from then on.

    Picklable before its first `open` (Tune keeps its callbacks in the experiment state, Ray
    Train sends them to its controller); a pickled session starts again unopened."""

    def __init__(self, tracking: TrackingConfig, *, fresh: bool = False) -> None:
        """`tracking` as `resolve` made it. `fresh`: every run opened is a new one (a
        `--local` run starts from scratch), not one to continue."""
        self.tracking = tracking
        self.fresh = fresh
        self._backends: Optional[list] = None
        self._open: set[str] = set()

    def __getstate__(self) -> dict:
        return {"tracking": self.tracking, "fresh": self.fresh}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tracking"], fresh=state["fresh"])

    @property
    def active(self) -> list[str]:
        """The trackers still in use."""
        return [b.name for b in self._started()]

    def start(self) -> None:
        """Contact every tracker now (MLflow's server, its experiment), so that one that cannot
        be reached is warned about before training; `open` does it otherwise."""
        self._started()

    def open(self, runs: list[MemberRun]) -> None:
        """Open (or continue) each member's run; a run already open here is left as it is."""
        for run in runs:
            if run.output in self._open:
                continue
            for backend in self._started():
                self._guard(backend, f"opening run {run.name}", backend.open, run, self.fresh)
            self._open.add(run.output)

    def log_record(self, runs: list[MemberRun], record: dict) -> None:
        """A pack record: each member's training metrics at step record["tokens"]."""
        self.open(runs)
        for i, run in enumerate(runs):
            self._log(run, training_metrics(record, i), int(record["tokens"]))

    def log_eval(self, runs: list[MemberRun], evals: list[dict], tokens: int) -> None:
        """Each member's held-out evaluation at step `tokens`."""
        self.open(runs)
        for run, metrics in zip(runs, evals):
            self._log(run, eval_metrics(metrics), int(tokens))

    def close(self, runs: list[MemberRun], failed: bool = False) -> None:
        """End the members' runs (finished, or failed)."""
        for run in runs:
            if run.output not in self._open:
                continue
            self._open.discard(run.output)
            for backend in self._started():
                self._guard(backend, f"closing run {run.name}", backend.close, run, failed)

    def close_all(self, failed: bool = False) -> None:
        """End every run still open (the command is ending)."""
        for backend in self._started():
            for output in list(self._open):
                self._guard(backend, "closing a run", backend.close_output, output, failed)
        self._open.clear()

    def _log(self, run: MemberRun, metrics: dict[str, float], tokens: int) -> None:
        for backend in self._started():
            self._guard(backend, f"logging to run {run.name}", backend.log, run, metrics, tokens)

    def _started(self) -> list:
        if self._backends is None:
            self._backends = []
            for name in self.tracking.trackers:
                backend = BACKENDS[name](self.tracking)
                if self._guard(backend, "starting", backend.start, keep=False):
                    self._backends.append(backend)
        return list(self._backends)

    def _guard(self, backend, what: str, call: Callable, *args, keep: bool = True) -> bool:
        """Run a call into a tracker library; on failure warn, drop the tracker, say False."""
        try:
            call(*args)
            return True
        except Exception as e:  # a tracker's own error types vary: any failure is the tracker's
            warnings.warn(
                TrackerWarning(
                    f"{backend.name} tracker ({backend.where}): {what} failed: "
                    f"{_one_line(e)}; training goes on without {backend.name}"
                ),
                stacklevel=2,
            )
            if keep and self._backends is not None and backend in self._backends:
                self._backends.remove(backend)
            return False


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


# ---------------------------------------------------------------------------------------------
# The trackers, each through its library's own client


class _TensorBoard:
    """tensorboardX's SummaryWriter, one per member, in LOGDIR/<run name>; the config as
    HParams (as Ray's TBXLoggerCallback writes them) and as a text summary."""

    name = "tensorboard"

    def __init__(self, tracking: TrackingConfig) -> None:
        self.logdir = tracking.tensorboard.logdir
        self.where = self.logdir
        self.writers: dict[str, Any] = {}

    def start(self) -> None:
        os.makedirs(self.logdir, exist_ok=True)

    def open(self, run: MemberRun, fresh: bool) -> None:
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams

        folder = os.path.join(self.logdir, *run.name.split("/"))
        if fresh:  # a new run: a folder of its own next to earlier ones of the same name
            n, base = 1, folder
            while os.path.isdir(folder) and os.listdir(folder):
                n, folder = n + 1, f"{base}-{n + 1}"
        new = not (os.path.isdir(folder) and os.listdir(folder))
        writer = SummaryWriter(folder, flush_secs=10)
        if new:  # continuing a run: its config is in the folder already
            flat = flatten(run.config)
            experiment, start, _ = hparams(flat, {"eval/fvu": 0.0, "train/fvu": 0.0})
            writer.file_writer.add_summary(experiment)
            writer.file_writer.add_summary(start)
            writer.add_text(
                "config", "    " + json.dumps(run.config, indent=2).replace("\n", "\n    ")
            )
        self.writers[run.output] = writer

    def log(self, run: MemberRun, metrics: dict[str, float], tokens: int) -> None:
        writer = self.writers[run.output]
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=tokens)
        writer.flush()  # a record every log_every_tokens: cheap, and nothing waits in memory

    def close(self, run: MemberRun, failed: bool) -> None:
        self.close_output(run.output, failed)

    def close_output(self, output: str, failed: bool) -> None:
        from tensorboardX.summary import hparams

        writer = self.writers.pop(output, None)
        if writer is not None:
            if not failed:  # the HParams dashboard shows the run as done
                writer.file_writer.add_summary(hparams({}, {})[2])
            writer.close()


@contextlib.contextmanager
def _short_http_budget() -> Iterator[None]:
    """MLflow's REST client reads its retry budget from the environment at each request."""
    with mock.patch.dict(
        os.environ,
        {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(FIRST_CONTACT_TIMEOUT_S),
        },
    ):
        yield


class _MLflow:
    """mlflow's MlflowClient: one run per member in the experiment (made if missing), found
    again by its raysae.run_id tag; params through log_batch (100 at a time, MLflow's limit)."""

    name = "mlflow"
    TAG = "raysae.run_id"

    def __init__(self, tracking: TrackingConfig) -> None:
        self.uri = tracking.mlflow.tracking_uri
        self.experiment = tracking.experiment
        self.where = self.uri
        self.client = None
        self.experiment_id: Optional[str] = None
        self.run_ids: dict[str, str] = {}

    def start(self) -> None:
        from mlflow.tracking import MlflowClient

        artifacts = None
        if self.uri.startswith("sqlite:///"):  # SQLite makes the file, not its folder
            folder = os.path.dirname(self.uri[len("sqlite:///") :])
            os.makedirs(folder, exist_ok=True)
            artifacts = "file://" + os.path.join(folder, "artifacts")  # not the working dir's
        client = MlflowClient(tracking_uri=self.uri)
        with _short_http_budget():  # an unreachable server is a warning in seconds
            found = client.get_experiment_by_name(self.experiment)
            self.experiment_id = (
                found.experiment_id
                if found
                else client.create_experiment(self.experiment, artifact_location=artifacts)
            )
        self.client = client

    def open(self, run: MemberRun, fresh: bool) -> None:
        from mlflow.entities import Param

        client = self.client
        found = []
        if not fresh:
            found = client.search_runs(
                [self.experiment_id], f"tags.`{self.TAG}` = '{run.run_id}'", max_results=1
            )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            tags = {self.TAG: run.run_id, "raysae.output": run.output, **run.tags}
            run_id = client.create_run(self.experiment_id, tags=tags, run_name=run.name).info.run_id
            flat = [Param(k, str(v)) for k, v in flatten(run.config).items()]
            for i in range(0, len(flat), 100):
                client.log_batch(run_id, params=flat[i : i + 100])
        self.run_ids[run.output] = run_id

    def log(self, run: MemberRun, metrics: dict[str, float], tokens: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, tokens) for k, v in metrics.items()]
        self.client.log_batch(self.run_ids[run.output], metrics=batch)

    def close(self, run: MemberRun, failed: bool) -> None:
        self.close_output(run.output, failed)

    def close_output(self, output: str, failed: bool) -> None:
        run_id = self.run_ids.pop(output, None)
        if run_id is not None:
            self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


class _Wandb:
    """wandb's Run objects, several at once in this process (wandb.init's reinit="create_new";
    Ray's WandbLoggerCallback starts a logging actor per trial, a process per run), each
    with the member's config; "tokens" is the x-axis of every series (define_metric), so a
    restarted run that re-reports earlier tokens is still plotted where it belongs."""

    name = "wandb"

    def __init__(self, tracking: TrackingConfig) -> None:
        self.settings = tracking.wandb
        self.group = tracking.experiment
        self.where = f"project {self.settings.project}, {self.settings.mode}"
        self.runs: dict[str, Any] = {}

    def start(self) -> None:
        import wandb  # noqa: F401

    def open(self, run: MemberRun, fresh: bool) -> None:
        import wandb

        s = self.settings
        kwargs: dict[str, Any] = {} if fresh else {"id": run.run_id, "resume": "allow"}
        wb = wandb.init(
            project=s.project,
            entity=s.entity,
            mode=s.mode,
            dir=s.dir,
            group=self.group,
            name=run.name,
            config=run.config,
            reinit="create_new",
            # login_timeout: with no credentials, an interactive terminal gets W&B's login
            # prompt for that long (not forever), then W&B gives a run that logs nothing.
            settings=wandb.Settings(
                init_timeout=30, login_timeout=20, console="off", silent=True, disable_git=True
            ),
            **kwargs,
        )
        if wb.disabled and s.mode != "disabled":
            wb.finish()
            raise RuntimeError("W&B gave a disabled run: not logged in (wandb login)")
        wb.define_metric("tokens")
        wb.define_metric("*", step_metric="tokens")
        self.runs[run.output] = wb

    def log(self, run: MemberRun, metrics: dict[str, float], tokens: int) -> None:
        self.runs[run.output].log({**metrics, "tokens": tokens})

    def close(self, run: MemberRun, failed: bool) -> None:
        self.close_output(run.output, failed)

    def close_output(self, output: str, failed: bool) -> None:
        wb = self.runs.pop(output, None)
        if wb is not None:
            wb.finish(exit_code=1 if failed else 0)


BACKENDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}
