"""raysae.tracking on Ray: a Tune callback for sweeps, a Ray Train callback for `raysae train`.

Both only route records to a raysae.tracking.Session, which writes one tracker run per SAE
(see there why Ray's own TBX / MLflow / W&B callbacks, one run per trial, do not fit):

    SweepTracking (ray.tune.logger.LoggerCallback, on the sweep's driver)
        a trial starts        → its pack's member runs open (or continue, after --resume)
        each training result  → every member's "train/..." series at its tokens
        the trial's last one  → every member's held-out "eval/..." (sweep_trial reports them)
        the trial ends        → the runs close (failed, if the trial failed)

    TrainTracking (ray.train.UserCallback, on Ray Train's controller, which Ray places on the
    driver's node) for `raysae train` on Ray: each report → the run's "train/..." series; the
    runs close at the last record; the driver then adds the held-out evaluation (`finish`).
"""

from __future__ import annotations

from typing import Optional

# Imported by raysae.train and raysae.sweep only when a run has trackers: Ray's import is slow.
from ray.train import UserCallback
from ray.tune.logger import LoggerCallback

from raysae.config import RunConfig, TrackingConfig
from raysae.loop import member_key, member_view
from raysae.settings import from_dict
from raysae.tracking import MemberRun, Session, member_runs

EVAL = "eval/"
"""sweep_trial's last report holds member i's held-out metrics as "m<i>/eval/<metric>"."""


def trial_runs(config: dict, trial_id: str, sweep: str) -> list[MemberRun]:
    """The member runs of the trial with Tune config `config` (raysae.sweep's param space)."""
    from raysae.data import storage
    from raysae.train import member_dirs

    runs = [from_dict(RunConfig, r) for r in config["packs"][config["pack"]]]
    trial = f"trial-{trial_id}"
    outputs = member_dirs(storage.join(config["trials_dir"], trial), len(runs))
    names = [trial] if len(runs) == 1 else [f"{trial}/{member_key(i)}" for i in range(len(runs))]
    return member_runs(runs, names, outputs, {"sweep": sweep, "trial_id": trial_id})


class SweepTracking(LoggerCallback):
    """One tracker run per SAE of every trial of a sweep."""

    def __init__(self, tracking: TrackingConfig, sweep: str) -> None:
        """`tracking` as raysae.tracking.resolve made it; `sweep` the sweep's name (a tag)."""
        self.session = Session(tracking)
        self.sweep = sweep
        self._runs: dict[str, list[MemberRun]] = {}

    def __getstate__(self) -> dict:  # Tune pickles its callbacks into the experiment state
        return {"session": self.session, "sweep": self.sweep, "_runs": {}}

    def setup(self, *args, **kwargs) -> None:
        self.session.start()  # an unreachable tracker is warned about before any trial

    def _members(self, trial) -> list[MemberRun]:
        if trial.trial_id not in self._runs:
            self._runs[trial.trial_id] = trial_runs(trial.config, trial.trial_id, self.sweep)
        return self._runs[trial.trial_id]

    def log_trial_start(self, trial) -> None:
        self.session.open(self._members(trial))

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        runs = self._members(trial)
        if result.get("done_eval"):  # sweep_trial's last report: each member's held-out eval
            views = [member_view(result, i, keep_unprefixed=False) for i in range(len(runs))]
            evals = [{k[len(EVAL) :]: x for k, x in v.items() if k.startswith(EVAL)} for v in views]
            self.session.log_eval(runs, evals, result["tokens"])
        elif "tokens" in result:
            self.session.log_record(runs, result)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        self.session.close(self._members(trial), failed=failed)

    def on_experiment_end(self, trials, **info) -> None:
        self.session.close_all(failed=True)  # trials still open did not finish (interrupted)


class TrainTracking(UserCallback):
    """The tracker run of a `raysae train` run on Ray Train: its training records as they are
    reported (rank 0's, as Tune's TuneReportCallback takes them)."""

    def __init__(
        self, tracking: TrackingConfig, runs: list[MemberRun], total_tokens: int, workers: int
    ):
        self.session = Session(tracking)
        self.runs = runs
        # The loop's last record is at total_tokens, less at most workers - 1 (raysae.train).
        self.last = total_tokens - workers + 1

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        record = metrics[0]
        self.session.log_record(self.runs, record)
        if record["tokens"] >= self.last:  # this process ends with the run: close now
            self.session.close(self.runs)


def finish(
    tracking: TrackingConfig,
    runs: list[MemberRun],
    evals: Optional[list[dict]] = None,
    tokens: int = 0,
    failed: bool = False,
) -> None:
    """On the driver, after a Ray Train run: add each member's held-out evaluation `evals` to
    its run (continued: TrainTracking closed it) and close it, as failed if `failed`."""
    session = Session(tracking)
    session.open(runs)
    if evals is not None:
        session.log_eval(runs, evals, tokens)
    session.close(runs, failed=failed)
