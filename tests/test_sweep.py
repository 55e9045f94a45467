"""Ray Tune sweeps on toy data: a 4-trial sweep interrupted and resumed; packing."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raysae import report
from raysae.settings import from_dict
from raysae.sweep import run_sweep
from raysae.sweep_spec import SweepSpec

pytestmark = [pytest.mark.ray, pytest.mark.timeout(480)]


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


def test_four_trial_sweep_interrupted_then_resumed(ray_cluster, tmp_path):
    import ray

    spec = spec_dict(
        tmp_path,
        "four",
        architectures={"topk": {"sae.k": [2, 4]}, "relu": {"sae.l1_coefficient": [0.5, 5.0]}},
        max_concurrent_trials=1,
    )
    path = write(tmp_path / "four.yaml", spec)
    command = [
        sys.executable,
        "-m",
        "raysae",
        "sweep",
        str(path),
        "--address",
        ray.get_runtime_context().gcs_address,
    ]
    first = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    trials = tmp_path / "sweeps" / "four" / "trials"
    deadline = time.time() + 300
    while not list(trials.glob("trial-*/metrics.json")):
        assert first.poll() is None and time.time() < deadline, "no trial finished"
        time.sleep(0.5)
    time.sleep(3)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    finished = {
        p: (_digest(p), p.stat().st_mtime_ns) for p in trials.glob("trial-*/sae/sae.safetensors")
    }
    assert finished and not (tmp_path / "sweeps" / "four" / "results.csv").exists()

    table = run_sweep(from_dict(SweepSpec, spec), resume=True)

    # Finished trials are untouched; the others completed.
    for p, (digest, mtime) in finished.items():
        assert (_digest(p), p.stat().st_mtime_ns) == (digest, mtime)
    assert len(table) == 4 and set(table["status"]) == {"finished"}
    assert sorted(table["architecture"]) == ["relu", "relu", "topk", "topk"]
    assert (table["tokens"] == 16_000).all()
    assert (
        table[table.architecture == "topk"]["l0"] <= table[table.architecture == "topk"]["k"]
    ).all()
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


def test_packed_trial_matches_separate_trials_and_reads_once(ray_cluster, tmp_path):
    arch = {"topk": {"sae.k": [2, 4]}}
    base = spec_dict(tmp_path, "x")["base"]
    base["data"]["deterministic_order"] = True
    separate = run_sweep(
        from_dict(SweepSpec, spec_dict(tmp_path, "separate", architectures=arch, base=base))
    )
    packed = run_sweep(
        from_dict(SweepSpec, spec_dict(tmp_path, "packed", architectures=arch, base=base, pack=2))
    )
    assert len(separate) == len(packed) == 2 and packed["trial_id"].nunique() == 1
    for k in (2, 4):
        a = separate[separate.k == k].iloc[0]
        b = packed[packed.k == k].iloc[0]
        assert b["fvu"] == pytest.approx(a["fvu"], rel=1e-4, abs=1e-6)
        assert b["l0"] == pytest.approx(a["l0"], rel=1e-4)
    # One read serves both packed SAEs: the packed trial read as many rows as one separate trial.
    assert packed["rows_read"].iloc[0] == separate["rows_read"].iloc[0] == 16_000


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
    from raysae.data.storage import StorageError
    from raysae.train import OutputExistsError

    spec = spec_dict(tmp_path, "done", architectures={"topk": {"sae.k": [2]}})
    earlier = tmp_path / "sweeps" / "done" / "results.csv"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("earlier results")
    with pytest.raises(OutputExistsError, match="already holds a finished sweep"):
        run_sweep(from_dict(SweepSpec, spec))
    assert earlier.read_text() == "earlier results"
    assert not (tmp_path / "acts").exists()  # failed before making data

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    spec = spec_dict(
        tmp_path, "s3", architectures={"topk": {"sae.k": [2]}}, output="s3://no-such-bucket/sweeps"
    )
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match="127.0.0.1:9"):
        run_sweep(from_dict(SweepSpec, spec))
    assert time.perf_counter() - t0 < 30
