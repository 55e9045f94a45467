"""Rehearsal of the cluster flow on this machine: a Ray head and a worker node started with the
`ray start` CLI (as `ray up` does), activations in the local S3 server, a sweep with ASHA
submitted as a Ray Job by `raysae submit`, results and checkpoints written to S3."""

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raysae.__main__ import main
from raysae.config import ToyDataConfig
from raysae.data import storage
from raysae.synthetic import write_toy_dataset

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_ports() -> list[str]:
    """Every listening port of a node, free: the session's test cluster holds Ray's defaults
    (a job agent that cannot bind 52365 leaves "No available agent to submit job")."""
    return [
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
    ]


@pytest.fixture(scope="module")
def cluster_address(s3_endpoint):
    """A two-node Ray cluster started with the CLI, as `ray up` starts one: a head with the
    dashboard and no training resource, and a worker node that joins it and alone offers the
    `trainer` resource, so Train workers can only run on the worker.

    Each node gets its own --temp-dir, as separate machines have separate disks: nodes sharing a
    session directory share the runtime-env cache, and the worker's agent then unpacked the job's
    working dir again over the one the driver was running in."""
    port, dashboard = _free_port(), _free_port()
    # The job runs `python`: on this machine that must be the test's interpreter, as on a
    # cluster it is the image's.
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    # Short paths: Ray's Unix sockets live under the temp dir (107-byte limit).
    head_tmp, worker_tmp = tempfile.mkdtemp(prefix="rh"), tempfile.mkdtemp(prefix="rw")
    nodes = [
        subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                "--num-cpus=1",
                f"--temp-dir={head_tmp}",
                f"--ray-client-server-port={_free_port()}",
                *_node_ports(),
            ],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_dashboard(address)
        nodes.append(
            subprocess.Popen(
                [
                    RAY,
                    "start",
                    f"--address=127.0.0.1:{port}",
                    "--block",
                    "--node-ip-address=127.0.0.1",
                    "--num-cpus=2",
                    '--resources={"trainer": 2}',
                    f"--temp-dir={worker_tmp}",
                    *_node_ports(),
                ],
                env=env,
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        _wait_for_nodes(address, 2)
        yield address
    finally:
        # SIGKILL the nodes' process groups (each `ray start` and everything it spawned): a
        # graceful stop took ~35 s and nothing of these nodes' state is kept.
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGKILL)
        for node in nodes:
            node.wait(timeout=60)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(worker_tmp, ignore_errors=True)


def _wait_for_nodes(address: str, count: int, timeout: float = 120) -> None:
    from ray.util.state import list_nodes

    deadline = time.time() + timeout
    while len(list_nodes(address=address, filters=[("state", "=", "ALIVE")])) < count:
        if time.time() > deadline:
            raise TimeoutError(f"{count} Ray nodes not alive after {timeout} s")
        time.sleep(1)


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


def test_sweep_submitted_as_a_job_writes_results_to_s3(
    cluster_address, s3_prefix, tmp_path, capsys
):
    data = storage.join(s3_prefix, "acts")
    write_toy_dataset(
        data,
        ToyDataConfig(n_features=48, active_per_token=2),
        d_in=16,
        n_tokens=4 * 4096,
        rows_per_part=4096,
    )
    # A project directory as a user has it: raysae's source and the spec. It is uploaded.
    project = tmp_path / "project"
    shutil.copytree(
        Path(__file__).parents[1] / "raysae",
        project / "raysae",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    spec = {
        "name": "rehearsal",
        "output": s3_prefix,
        "base": {
            "sae": {"d_in": 16, "n_latents": 64, "k": 4},
            "train": {
                "total_tokens": 12_000,
                "batch_size": 1000,
                "lr": 3e-3,
                "log_every_tokens": 3000,
                "init_tokens": 2000,
            },
            "data": {"uri": data, "eval_parts": 1, "read_cpus": 0.25},
            "scaling": {
                "num_workers": 1,
                "cpus_per_worker": 0.4,
                "resources_per_worker": {"trainer": 1},
                "checkpoint_every_tokens": 6000,
            },
        },
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
    errors = [
        line
        for line in logs.splitlines()
        if "Error" in line or "error:" in line or 'File "' in line
    ]
    assert status == "SUCCEEDED", "\n".join(errors[-30:])
    assert "Pareto frontier" in logs

    # Training ran on the worker node, the only one offering `trainer`; the head trained nothing.
    from ray.util.state import list_actors, list_nodes

    head = {n.node_id for n in list_nodes(address=cluster_address) if n.is_head_node}
    train_nodes = {
        a.node_id
        for a in list_actors(
            address=cluster_address, filters=[("class_name", "=", "RayTrainWorker")], limit=1000
        )
    }
    assert train_nodes and not train_nodes & head, (train_nodes, head)

    sweep = storage.join(s3_prefix, "rehearsal")
    files = storage.list_files(sweep)
    assert {"results.csv", "results.parquet", "pareto.png", "pareto.csv"} <= set(files)
    assert len(storage.read_bytes(storage.join(sweep, "results.csv")).decode().splitlines()) == 4
    table = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(sweep, "results.csv"))))
    assert (
        table.status == "finished"
    ).any()  # the first trial runs to the end; ASHA may stop others
    for path in table[table.status == "finished"]["checkpoint"]:
        assert storage.exists(storage.join(path, "sae.safetensors")), path
    print(table[["architecture", "status", "tokens", "fvu"]])
