"""raysae.tracking without Ray: one tracker run per SAE of a pack, step = tokens, the config as
parameters; `raysae train --local` followed in TensorBoard and MLflow; W&B offline; a tracker
that cannot be reached is a warning; a missing library fails before anything is written."""

import json
import socket
import time
import warnings

import pytest
import torch
import yaml
from trackers import mlflow_runs, tensorboard_hparams, tensorboard_runs, wandb_runs

from raysae import tracking
from raysae.__main__ import main
from raysae.config import RunConfig, ToyDataConfig, TrackingConfig
from raysae.loop import Member, train_pack
from raysae.saes import build_sae
from raysae.settings import ConfigError, from_dict
from raysae.synthetic import ToyData
from raysae.train import run_name

TINY = {
    "sae": {"architecture": "topk", "d_in": 16, "n_latents": 64, "k": 4},
    "train": {"total_tokens": 20_000, "batch_size": 500, "log_every_tokens": 10_000},
    "data": {"toy": {"n_features": 32, "active_per_token": 3}},
}


def _config(path, **tracking) -> str:
    path.write_text(yaml.safe_dump({**TINY, "tracking": tracking}))
    return str(path)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: nothing listens


def test_local_run_is_followed_in_tensorboard_and_mlflow(tmp_path):
    out = tmp_path / "out"
    config = _config(tmp_path / "run.yaml", trackers=["tensorboard", "mlflow"])
    assert main(["train", config, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    history, held_out = metrics["history"], metrics["eval"]
    name = run_name(from_dict(RunConfig, metrics["config"]))
    steps = [r["tokens"] for r in history]
    assert steps == [10_000, 20_000]

    (tb,) = tensorboard_runs(out / "tensorboard").items()
    assert tb[0] == name
    series = tb[1]
    for key in ("fvu", "l0", "dead_fraction", "loss/reconstruction", "lr", "tokens_per_s"):
        assert [s for s, _ in series[f"train/{key}"]] == steps, key
        assert series[f"train/{key}"][-1][1] == pytest.approx(history[-1][key], rel=1e-6), key
    assert series["eval/fvu"] == [(20_000, pytest.approx(held_out["fvu"], rel=1e-6))]
    hparams = tensorboard_hparams(out / "tensorboard", name)
    assert hparams["sae.architecture"] == "topk" and hparams["sae.k"] == 4

    runs = mlflow_runs(tracking.mlflow_store(str(out)), "raysae-train")
    assert list(runs) == [name]
    run = runs[name]
    assert run["status"] == "FINISHED"
    params = run["params"]
    assert params["sae.architecture"] == "topk" and params["sae.k"] == "4"
    lr = from_dict(RunConfig, metrics["config"]).train.effective_lr(64)
    assert float(params["train.lr"]) == pytest.approx(lr)  # the default rate, as trained with
    assert [s for s, _ in run["metrics"]["train/fvu"]] == steps
    assert run["metrics"]["train/fvu"][-1][1] == pytest.approx(history[-1]["fvu"])
    assert run["metrics"]["eval/fvu"] == [(20_000, pytest.approx(held_out["fvu"]))]
    assert run["tags"]["raysae.output"] == str(out)


def test_a_pack_gets_one_run_per_member_on_every_tracker(tmp_path, monkeypatch):
    """Two SAEs trained on the same batches (raysae.loop.train_pack, as a sweep trial does):
    each its own run, its own config as parameters, its own series; W&B offline."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    cfgs = [
        from_dict(RunConfig, {**TINY, "sae": {**TINY["sae"], "k": k}, "train": {**TINY["train"]}})
        for k in (2, 8)
    ]
    settings = from_dict(
        TrackingConfig,
        {"trackers": ["tensorboard", "mlflow", "wandb"], "wandb": {"mode": "offline"}},
        "tracking",
    )
    resolved = tracking.resolve(settings, str(tmp_path / "out"), "pack")
    session = tracking.Session(resolved)
    outputs = [str(tmp_path / "out" / f"m{i}") for i in range(2)]
    runs = tracking.member_runs(cfgs, ["trial-x/m0", "trial-x/m1"], outputs, {"sweep": "pack"})
    torch.manual_seed(0)
    members = [Member.of(build_sae(c.sae), c.train, torch.zeros(16)) for c in cfgs]
    batches = ToyData(ToyDataConfig(n_features=32, active_per_token=3), 16).batches(500)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tracking.TrackerWarning)  # every tracker works
        records = train_pack(
            members, batches, report=lambda r, _: session.log_record(runs, r), log=None
        )
        session.log_eval(runs, [{"fvu": 0.25}, {"fvu": 0.125}], 20_000)
        session.close(runs)
    steps = [r["tokens"] for r in records]
    assert steps == [10_000, 20_000]

    tb = tensorboard_runs(tmp_path / "out" / "tensorboard")
    ml = mlflow_runs(tracking.mlflow_store(str(tmp_path / "out")), "pack")
    wb = wandb_runs(tmp_path / "wandb-dir")
    assert sorted(tb) == sorted(ml) == sorted(wb) == ["trial-x/m0", "trial-x/m1"]
    for i, k in enumerate((2, 8)):
        name, fvu = f"trial-x/m{i}", records[-1][f"m{i}/fvu"]
        assert tb[name]["train/fvu"][-1] == (20_000, pytest.approx(fvu, rel=1e-6))
        assert [s for s, _ in tb[name]["train/l0"]] == steps
        assert ml[name]["params"]["sae.k"] == str(k) and ml[name]["tags"]["member"] == str(i)
        assert ml[name]["metrics"]["train/fvu"][-1] == (20_000, pytest.approx(fvu))
        assert ml[name]["metrics"]["eval/fvu"] == [(20_000, (0.25, 0.125)[i])]
        assert wb[name]["config"]["sae"]["k"] == k and wb[name]["group"] == "pack"
        trained = [h for h in wb[name]["history"] if "train/fvu" in h]
        assert [h["tokens"] for h in trained] == steps  # the x-axis of every series
        assert trained[-1]["train/fvu"] == pytest.approx(fvu)
        assert [h["eval/fvu"] for h in wb[name]["history"] if "eval/fvu" in h] == [(0.25, 0.125)[i]]
    assert wb["trial-x/m0"]["id"] != wb["trial-x/m1"]["id"]
    assert len(set(records[-1][f"m{i}/fvu"] for i in range(2))) == 2  # two different SAEs


def test_an_unreachable_tracker_is_a_warning_and_training_goes_on(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    out = tmp_path / "out"
    config = _config(
        tmp_path / "run.yaml", trackers=["mlflow", "tensorboard"], mlflow={"tracking_uri": uri}
    )
    t0 = time.perf_counter()
    with pytest.warns(tracking.TrackerWarning, match=rf"mlflow tracker \({uri}\).*goes on") as w:
        assert main(["train", config, "--out", str(out)]) == 0
    assert time.perf_counter() - t0 < 60  # not MLflow's default retry budget (minutes)
    assert len([x for x in w if issubclass(x.category, tracking.TrackerWarning)]) == 1
    assert json.loads((out / "metrics.json").read_text())["tokens"] == 20_000
    (series,) = tensorboard_runs(out / "tensorboard").values()  # the other tracker still works
    assert [s for s, _ in series["train/fvu"]] == [10_000, 20_000]


def test_a_missing_tracker_library_fails_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(tracking.MODULES, "mlflow", "raysae_test_no_such_module")
    out = tmp_path / "out"
    config = _config(tmp_path / "run.yaml", trackers=["tensorboard", "mlflow"])
    assert main(["train", config, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tracking.trackers: mlflow needs" in err and "pip install raysae[mlflow]" in err
    assert not out.exists()


def test_places_are_made_concrete_and_an_s3_output_needs_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chosen = TrackingConfig(trackers=("tensorboard", "mlflow"))
    local = tracking.resolve(chosen, "out", "exp")
    assert local.tensorboard.logdir == str(tmp_path / "out" / "tensorboard")
    assert local.mlflow.tracking_uri == f"sqlite:///{tmp_path}/out/mlruns/mlflow.db"
    assert local.experiment == "exp"
    for given, made in [
        ("http://mlflow:5000", "http://mlflow:5000"),
        ("databricks", "databricks"),
        ("runs", str(tmp_path / "runs")),
        ("file:runs", str(tmp_path / "runs")),
        ("sqlite:///db/m.db", f"sqlite:///{tmp_path}/db/m.db"),
    ]:
        cfg = from_dict(TrackingConfig, {"trackers": ["mlflow"], "mlflow": {"tracking_uri": given}})
        assert tracking.resolve(cfg, "out", "exp").mlflow.tracking_uri == made
    with pytest.raises(ConfigError, match=r"tracking.tensorboard.logdir: the output s3://b/x"):
        tracking.resolve(chosen, "s3://b/x", "exp")
    with pytest.raises(ConfigError, match=r"tracking.mlflow.tracking_uri: the output s3://b/x"):
        tracking.resolve(TrackingConfig(trackers=("mlflow",)), "s3://b/x", "exp")
    assert tracking.resolve(TrackingConfig(), "s3://b/x", "exp") == TrackingConfig()


def test_wandb_online_without_a_login_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    settings = TrackingConfig(trackers=("wandb", "tensorboard"))
    session = tracking.Session(tracking.resolve(settings, str(tmp_path / "out"), "x"))
    cfg = from_dict(RunConfig, TINY)
    runs = tracking.member_runs([cfg], ["run"], [str(tmp_path / "out")])
    with pytest.warns(tracking.TrackerWarning, match=r"wandb tracker \(project raysae, online\)"):
        session.log_record(runs, {"tokens": 500, "m0/fvu": 0.5})
    assert session.active == ["tensorboard"]
    session.close(runs)
    assert tensorboard_runs(tmp_path / "out" / "tensorboard")["run"]["train/fvu"] == [(500, 0.5)]
