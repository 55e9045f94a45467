"""Rehearsal of the cluster flow on this machine: a Ray head started with the `ray start` CLI
(as `ray up` does), activations in the local S3 server, a sweep with ASHA submitted as a Ray
Job by `raysae submit`, results and checkpoints written to S3."""

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raysae import storage
from raysae.__main__ import main
from raysae.config import ToyDataConfig
from raysae.synthetic import write_toy_dataset

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster_address(s3_endpoint, tmp_path_factory):
    """`ray start --head` on 127.0.0.1 with the dashboard on, as on a cluster's head."""
    port, dashboard = _free_port(), _free_port()
    # The job runs `python`: on this machine that must be the test's interpreter, as on a
    # cluster it is the image's.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--num-cpus=2",
         # Every other listening port free too: the session's test cluster holds the defaults
         # (a job agent that cannot bind 52365 leaves "No available agent to submit job").
         f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # A second node joining on this same machine shares the head's session directory, and its
    # runtime-env agent then deletes the job's working dir under the job (seen: the driver's
    # cwd vanished). Multi-node runs are covered by tests/test_train_ray.py with
    # ray.cluster_utils.Cluster; this rehearsal uses the CLI head alone.
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_dashboard(address)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def _wait_for_dashboard(address: str, timeout: float = 120) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)


def test_sweep_submitted_as_a_job_writes_results_to_s3(cluster_address, s3_prefix, tmp_path, capsys):
    data = storage.join(s3_prefix, "acts")
    write_toy_dataset(data, ToyDataConfig(n_features=48, active_per_token=2), d_in=16,
                      n_tokens=4 * 4096, rows_per_part=4096)
    # A project directory as a user has it: raysae's source and the spec. It is uploaded.
    project = tmp_path / "project"
    shutil.copytree(Path(__file__).parents[1] / "raysae", project / "raysae",
                    ignore=shutil.ignore_patterns("__pycache__"))
    spec = {
        "name": "rehearsal", "output": s3_prefix,
        "base": {"sae": {"d_in": 16, "n_latents": 64, "k": 4},
                 "train": {"total_tokens": 12_000, "batch_size": 1000, "lr": 3e-3,
                           "log_every_tokens": 3000, "init_tokens": 2000},
                 "data": {"uri": data, "eval_parts": 1, "read_cpus": 0.25},
                 "scaling": {"num_workers": 1, "cpus_per_worker": 0.4,
                             "checkpoint_every_tokens": 6000}},
        # Good settings first: ASHA stops later trials that do worse at a rung.
        "architectures": {"topk": {"sae.k": [4]}, "relu": {"sae.l1_coefficient": [1.0, 50.0]}},
        "scheduler": {"type": "asha", "metric": "fvu", "grace_tokens": 3000},
        "max_concurrent_trials": 1,
    }
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))

    cwd = os.getcwd()
    os.chdir(project)
    try:
        assert main(["submit", "spec.yaml", "--address", cluster_address]) == 0
    finally:
        os.chdir(cwd)
    job_id = capsys.readouterr().out.split()[1]

    deadline = time.time() + 420
    status = "PENDING"
    while status in ("PENDING", "RUNNING") and time.time() < deadline:
        time.sleep(3)
        assert main(["submit", "--address", cluster_address, "--status", job_id]) == 0
        status = capsys.readouterr().out.strip()
    assert main(["submit", "--address", cluster_address, "--logs", job_id]) == 0
    logs = capsys.readouterr().out
    errors = [line for line in logs.splitlines()
              if "Error" in line or "error:" in line or 'File "' in line]
    assert status == "SUCCEEDED", "\n".join(errors[-30:])
    assert "Pareto frontier" in logs

    sweep = storage.join(s3_prefix, "rehearsal")
    files = storage.list_files(sweep)
    assert {"results.csv", "results.parquet", "pareto.png", "pareto.csv"} <= set(files)
    assert len(storage.read_bytes(storage.join(sweep, "results.csv")).decode().splitlines()) == 4
    table = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(sweep, "results.csv"))))
    assert (table.status == "finished").any()  # the first trial runs to the end; ASHA may stop others
    for path in table[table.status == "finished"]["checkpoint"]:
        assert storage.exists(storage.join(path, "sae.safetensors")), path
    print(table[["architecture", "status", "tokens", "fvu"]])
