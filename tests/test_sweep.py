"""Ray Tune sweeps on toy data: a 4-trial sweep interrupted and resumed; packing, followed in
TensorBoard and MLflow."""

import hashlib
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from processes import Output, wait_for_idle_cpus
from trackers import mlflow_runs, tensorboard_runs

from raysae import report
from raysae.__main__ import main
from raysae.config import ToyDataConfig
from raysae.data.storage import StorageError
from raysae.settings import ConfigError, from_dict
from raysae.sweep import SPEC_FILE, TUNE_STATE, preflight, run_sweep
from raysae.sweep_spec import SweepSpec, expand, parse_sweep_spec
from raysae.synthetic import write_toy_dataset
from raysae.tracking import mlflow_store

pytestmark = pytest.mark.timeout(480)


def spec_dict(tmp: Path, name: str, **overrides) -> dict:
    spec = {
        "name": name,
        "output": str(tmp / "sweeps"),
        "base": {
            "sae": {"d_in": 16, "n_latents": 64, "k": 4},
            "train": {
                "total_tokens": 16_000,
                "batch_size": 1000,
                "lr": 3e-3,
                "log_every_tokens": 8000,
                "init_tokens": 2000,
                "dead_tokens": 8000,
            },
            # Small read tasks: two trials' workers and the reads share the 2-CPU test cluster.
            "data": {"uri": str(tmp / "acts"), "eval_parts": 1, "read_cpus": 0.25},
            # Two concurrent trials reserve 2 × 0.41 CPU, leaving one CPU for Ray Data's
            # file-listing task, which always asks for a whole CPU.
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.4, "checkpoint_every_tokens": 8000},
        },
        "toy_dataset": {
            "n_tokens": 4 * 8192,
            "rows_per_part": 8192,
            "features": {"n_features": 48, "active_per_token": 2},
        },
        "max_concurrent_trials": 2,
    }
    spec.update(overrides)
    return spec


def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_architecture_columns_match_what_each_architecture_uses():
    """results.csv leaves k blank for ReLU rows and l1_coefficient for TopK rows: the columns
    follow the loss terms each SAE actually has."""
    from raysae.config import SAEConfig
    from raysae.saes import build_sae
    from raysae.sweep import ARCHITECTURE_FIELDS

    term = {"l1_coefficient": "l1", "l0_coefficient": "l0", "k": "auxk"}
    for architecture in ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"):
        sae = build_sae(SAEConfig(d_in=4, n_latents=16, k=2, architecture=architecture))
        for name, used_by in ARCHITECTURE_FIELDS.items():
            assert (architecture in used_by) == (term[name] in sae.loss_coefficients()), (
                architecture,
                name,
            )


@pytest.mark.ray
def test_four_trial_sweep_interrupted_then_resumed(ray_cluster, tmp_path):
    """SIGTERM once a trial has finished: Tune ends the trials and saves its state, the command
    exits 143 naming `--resume`, writes no results, and that command completes the sweep."""
    import ray

    spec = spec_dict(
        tmp_path,
        "four",
        architectures={"topk": {"sae.k": [2, 4]}, "relu": {"sae.l1_coefficient": [0.5, 5.0]}},
    )
    path = write(tmp_path / "four.yaml", spec)
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "raysae", "sweep", str(path), "--address", address]
    first = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = Output(first)
    trials = tmp_path / "sweeps" / "four" / "trials"
    deadline = time.time() + 300
    while not list(trials.glob("trial-*/metrics.json")):
        assert first.poll() is None and time.time() < deadline, "no trial finished"
        time.sleep(0.5)
    time.sleep(3)
    stop = output.mark()
    first.send_signal(signal.SIGTERM)
    assert output.wait(timeout=120) == 143, output.since()[-3000:]
    assert "Traceback" not in output.ours_since(stop), output.ours_since(stop)[-3000:]
    resume = output.since(stop).split("Resume with:\n", 1)[1].splitlines()[0].strip()
    assert shlex.split(resume) == [*command, "--resume"]
    finished = {
        p: (_digest(p), p.stat().st_mtime_ns) for p in trials.glob("trial-*/sae/sae.safetensors")
    }
    assert finished and not (tmp_path / "sweeps" / "four" / "results.csv").exists()
    wait_for_idle_cpus()  # the stopped trial's Train workers ended

    # The printed command, run in this process (its interpreter is this one): a fresh process
    # would only add its start-up to the test.
    assert shlex.split(resume)[:3] == [sys.executable, "-m", "raysae"]
    assert main(shlex.split(resume)[3:]) == 0
    table = pd.read_parquet(tmp_path / "sweeps" / "four" / "results.parquet")

    # Finished trials are untouched; the others completed.
    for p, (digest, mtime) in finished.items():
        assert (_digest(p), p.stat().st_mtime_ns) == (digest, mtime)
    assert len(table) == 4 and set(table["status"]) == {"finished"}
    assert sorted(table["architecture"]) == ["relu", "relu", "topk", "topk"]
    assert (table["tokens"] == 16_000).all()
    topk, relu = table[table.architecture == "topk"], table[table.architecture == "relu"]
    assert (topk["l0"] <= topk["k"]).all()
    # Architecture-specific settings are blank where they do not apply.
    assert topk["l1_coefficient"].isna().all() and relu["k"].isna().all()
    assert sorted(relu["l1_coefficient"]) == [0.5, 5.0] and sorted(topk["k"]) == [2, 4]
    for col in (
        "fvu",
        "fvu_b",
        "dead_fraction",
        "dense_fraction",
        "wall_s",
        "checkpoint",
        "feature_recovery",
    ):
        assert table[col].notna().all(), col
    # The frontier columns agree with the frontier function on the same rows.
    for _, group in table.groupby("architecture"):
        assert group["pareto"].tolist() == report.pareto_mask(group["l0"], group["fvu"])
    out = tmp_path / "sweeps" / "four"
    saved = pd.read_csv(out / "results.csv")
    assert len(saved) == 4 and (out / "pareto.png").exists() and (out / "results.parquet").exists()


@pytest.mark.ray
def write_paired_toy(tmp_path: Path) -> list[str]:
    """Two 8-wide toy sources of the same 4 × 8192 tokens (PairedToyData: features in A only,
    B only and both), as two datasets with the same doc_id / pos: a crosscoder's data."""
    import numpy as np

    from raysae.data import write_dataset
    from raysae.synthetic import PairedToyData

    x, _ = PairedToyData(ToyDataConfig(n_features=48, active_per_token=2), d_source=8).sample(
        4 * 8192
    )
    doc, pos = np.arange(len(x)) // 64, np.arange(len(x)) % 64
    uris = [str(tmp_path / "acts_a"), str(tmp_path / "acts_b")]
    for uri, half in zip(uris, x.chunk(2, dim=1)):
        write_dataset(uri, half, dtype="float32", rows_per_part=8192, doc_id=doc, pos=pos)
    return uris


def test_packed_trial_matches_separate_trials_and_reads_once(ray_cluster, tmp_path):
    """Also: the sweep reads paired sources (data.sources) and trains Matryoshka and crosscoder
    points beside TopK ones, their per-prefix / per-source metrics in the results."""
    base = spec_dict(tmp_path, "x")["base"]
    base["data"] = {**base["data"], "uri": None, "sources": write_paired_toy(tmp_path)}
    base["data"]["deterministic_order"] = True
    base["sae"]["d_in"] = 16
    arch = {"topk": {"sae.k": [2, 4]}}
    no_toy = {"toy_dataset": None}
    separate = run_sweep(
        from_dict(
            SweepSpec, spec_dict(tmp_path, "separate", architectures=arch, base=base, **no_toy)
        )
    )
    # The packed sweep is also followed in TensorBoard and MLflow (read back below).
    tracking = {"trackers": ["tensorboard", "mlflow"]}
    more = {
        **arch,
        "matryoshka_batchtopk": {"sae.matryoshka_groups": [[0.25, 0.75]]},
        "crosscoder": {"sae.n_sources": [2]},
    }
    packed = run_sweep(
        parse_sweep_spec(
            spec_dict(
                tmp_path,
                "packed",
                architectures=more,
                base=base,
                pack=4,
                tracking=tracking,
                **no_toy,
            )
        )
    )
    assert len(separate) == 2 and len(packed) == 4 and packed["trial_id"].nunique() == 1
    assert set(packed["status"]) == {"finished"}
    for k in (2, 4):
        a = separate[separate.k == k].iloc[0]
        b = packed[(packed.architecture == "topk") & (packed.k == k)].iloc[0]
        assert b["fvu"] == pytest.approx(a["fvu"], rel=1e-4, abs=1e-6)
        assert b["l0"] == pytest.approx(a["l0"], rel=1e-4)
    # One read serves all packed SAEs: the packed trial read as many rows as one separate trial.
    assert set(packed["rows_read"]) == {separate["rows_read"].iloc[0]} == {16_000}
    # The new members' own metrics (after 16 steps: present and in range): the first prefix's
    # FVU, each source's FVU and the decoder-norm split.
    m = packed[packed.architecture == "matryoshka_batchtopk"].iloc[0]
    assert 0 < m["prefix_0/fvu"] < 1.0 and 0 < m["fvu"] < 1.0
    c = packed[packed.architecture == "crosscoder"].iloc[0]
    assert 0 < c["source_0/fvu"] < 1 and 0 < c["source_1/fvu"] < 1
    assert 0 < c["decoder_norms/shared"] < 1
    split = json.loads((Path(c["checkpoint"]).parent / "metrics.json").read_text())["eval"]
    assert sum(split["decoder_norms/source_1_share_histogram"]) == split["decoder_norms/latents"]

    # One tracker run per SAE of the packed trial, not one per trial: its own config as
    # parameters, its own series over tokens, the last held-out FVU its results row's.
    sweep_dir = tmp_path / "sweeps" / "packed"
    trials = {t: f"trial-{t}" for t in packed["trial_id"]}
    tb = tensorboard_runs(sweep_dir / "tensorboard")
    ml = mlflow_runs(mlflow_store(str(sweep_dir)), "packed")
    runs = sorted(f"{trials[r.trial_id]}/m{r.member}" for r in packed.itertuples())
    assert sorted(tb) == sorted(ml) == runs
    for _, row in packed[packed.architecture == "topk"].iterrows():
        name = f"{trials[row['trial_id']]}/m{row['member']}"
        metrics = json.loads((Path(row["checkpoint"]).parent / "metrics.json").read_text())
        history, steps = metrics["history"], [8_000, 16_000]
        assert [r["tokens"] for r in history] == steps
        params, series = ml[name]["params"], ml[name]["metrics"]
        assert ml[name]["status"] == "FINISHED" and ml[name]["tags"]["trial_id"] in name
        assert params["sae.architecture"] == "topk" and params["sae.k"] == str(int(row["k"]))
        assert float(params["train.lr"]) == row["lr"] == 3e-3
        for key in ("fvu", "l0", "dead_fraction", "loss/reconstruction", "tokens_per_s"):
            assert [s for s, _ in series[f"train/{key}"]] == steps, key
            assert [s for s, _ in tb[name][f"train/{key}"]] == steps, key
        last = history[-1]["fvu"]
        assert series["train/fvu"][-1] == (16_000, pytest.approx(last))
        assert tb[name]["train/fvu"][-1] == (16_000, pytest.approx(last, rel=1e-6))
        assert series["eval/fvu"] == [(16_000, pytest.approx(row["fvu"]))]
        assert tb[name]["eval/fvu"] == [(16_000, pytest.approx(row["fvu"], rel=1e-6))]


def test_bad_specs_fail_before_anything_runs(tmp_path):
    from raysae.settings import ConfigError
    from raysae.sweep_spec import load_sweep_spec

    spec = spec_dict(tmp_path, "bad", architectures={"topk": {"sae.k": [100]}})
    with pytest.raises(ConfigError, match="sae.k=100 is larger than sae.n_latents=64"):
        load_sweep_spec(str(write(tmp_path / "bad.yaml", spec)))
    spec = spec_dict(tmp_path, "bad", bogus=1)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'bogus'"):
        load_sweep_spec(str(write(tmp_path / "bad.yaml", spec)))
    spec = spec_dict(tmp_path, "bad")
    with pytest.raises(ConfigError, match="space is empty"):
        load_sweep_spec(str(write(tmp_path / "bad.yaml", spec)))


def test_sweep_output_errors_keep_earlier_results(tmp_path, monkeypatch):
    from raysae.train import OutputExistsError

    spec = spec_dict(tmp_path, "done", architectures={"topk": {"sae.k": [2]}})
    earlier = tmp_path / "sweeps" / "done" / "results.csv"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("earlier results")
    with pytest.raises(OutputExistsError, match="already holds a finished sweep"):
        run_sweep(from_dict(SweepSpec, spec))
    assert earlier.read_text() == "earlier results"
    assert not (tmp_path / "acts").exists()  # failed before making data

    # Nothing listens there: the pre-flight's first request says so at once, not after the
    # default ~100 s of retries every request has once the store has answered.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.delenv("RAYSAE_S3_MAX_ATTEMPTS", raising=False)
    spec = spec_dict(
        tmp_path, "s3", architectures={"topk": {"sae.k": [2]}}, output="s3://no-such-bucket/sweeps"
    )
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match="127.0.0.1:9 is unreachable"):
        run_sweep(from_dict(SweepSpec, spec))
    assert time.perf_counter() - t0 < 15


# ---------------------------------------------------------------- pre-flight: nothing written


def _no_toy(spec: dict) -> dict:
    del spec["toy_dataset"]
    return spec


def _other_d_in(spec: dict) -> dict:
    write_toy_dataset(spec["base"]["data"]["uri"], ToyDataConfig(n_features=8), 8, 4096, 1024)
    return _no_toy(spec)


PREFLIGHT_FAILURES = {
    "no dataset, nothing to make it": (_no_toy, "no manifest.json at"),
    "dataset d_in differs": (_other_d_in, "has d_in=8 but sae.d_in=16"),
    "toy parts all held out": (
        lambda spec: {**spec, "toy_dataset": {**spec["toy_dataset"], "rows_per_part": 10**6}},
        "would hold out all of them",
    ),
    "output under a file": (
        lambda spec: {**spec, "output": spec["output"] + "/file/sweeps"},
        "is a file, not a folder",
    ),
}


@pytest.mark.parametrize("case", sorted(PREFLIGHT_FAILURES))
def test_a_failed_preflight_writes_nothing_to_the_output(tmp_path, capsys, case):
    make, message = PREFLIGHT_FAILURES[case]
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "file").write_text("")
    spec = make(spec_dict(tmp_path, "pre", architectures={"topk": {"sae.k": [2]}}))
    assert main(["sweep", str(write(tmp_path / "pre.yaml", spec))]) == 2
    err = capsys.readouterr().err
    assert message in err and "raysae sweep: error: " in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "sweeps").iterdir()) == ["file"]


def test_a_sweep_that_never_started_is_started_not_resumed(tmp_path):
    spec = parse_sweep_spec(spec_dict(tmp_path, "never", architectures={"topk": {"sae.k": [2]}}))
    sweep_dir = tmp_path / "sweeps" / "never"
    with pytest.raises(ConfigError, match="holds no sweep to resume; start it without --resume"):
        preflight(spec, expand(spec), str(sweep_dir), resume=True)
    assert not sweep_dir.exists()
    sweep_dir.mkdir(parents=True)
    (sweep_dir / SPEC_FILE).write_text("{}")  # an older raysae's marker, and no Tune state
    with pytest.raises(ConfigError, match="never started .* start it without --resume"):
        preflight(spec, expand(spec), str(sweep_dir), resume=True)
    logged = []
    datasets = preflight(spec, expand(spec), str(sweep_dir), resume=False, log=logged.append)
    assert list(datasets) == [spec.base.data.uri] and "never started; starting it" in logged[0]
    assert (sweep_dir / SPEC_FILE).read_text() != "{}"  # marked anew
    (sweep_dir / TUNE_STATE).write_bytes(b"")
    with pytest.raises(OSError, match="interrupted sweep; continue it with --resume"):
        preflight(spec, expand(spec), str(sweep_dir), resume=False)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_sweep_whose_every_trial_fails_says_why_in_one_message(ray_cluster, tmp_path, capsys):
    import ray

    spec = spec_dict(tmp_path, "fails", architectures={"topk": {"sae.k": [2, 4]}}, max_failures=0)
    # Two parts, one held out: 512 training rows, fewer than one batch of 1000.
    spec["toy_dataset"] = {**spec["toy_dataset"], "n_tokens": 1024, "rows_per_part": 512}
    path = write(tmp_path / "fails.yaml", spec)
    address = ray.get_runtime_context().gcs_address
    assert main(["sweep", str(path), "--address", address]) == 1
    err = capsys.readouterr().err
    assert err.startswith("raysae sweep: error: every trial of sweep fails failed")
    assert err.count("fewer rows than one batch (1000)") == 2 and "Traceback" not in err


def test_a_trial_stopped_by_bad_data_fails_again_on_retry_without_training(tmp_path):
    """Tune retries a failed trial; bad data must fail it again with the same message (a
    resumed retry could read the parts in another order and miss the bad one), unless the
    dataset was re-harvested since."""
    import torch

    from raysae import data
    from raysae.checkpoint import CheckpointSpaceError
    from raysae.sweep import raise_if_stopped, record_stop

    uri, trial = str(tmp_path / "acts"), str(tmp_path / "trials" / "trial-1")
    data.write_dataset(uri, torch.randn(100, 4), rows_per_part=50)
    dataset = data.open_dataset(uri)
    raise_if_stopped(trial, dataset)  # nothing recorded: train
    record_stop(trial, dataset, data.BadDataError("acts: part p1 row 3: activation holds NaN"))
    with pytest.raises(data.BadDataError, match="^acts: part p1 row 3: activation holds NaN$"):
        raise_if_stopped(trial, dataset)
    data.write_dataset(uri, torch.randn(100, 4), rows_per_part=50, overwrite=True)
    raise_if_stopped(trial, data.open_dataset(uri))  # re-harvested: train again

    # A full disk stopped it: once space is freed, the retry resumes (nothing recorded).
    other = str(tmp_path / "trials" / "trial-2")
    record_stop(other, dataset, CheckpointSpaceError("no space left on /out: ..."))
    raise_if_stopped(other, dataset)
