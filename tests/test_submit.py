"""Rehearsal of the cluster flow on this machine: a Ray head and a worker node started with the
`ray start` CLI (as `ray up` does) with token authentication on, activations harvested into the
local S3 server, a sweep with ASHA submitted as a Ray Job by `raysae submit`, results and
checkpoints written to S3, one SAE evaluated; then every file written is searched for the
secrets the nodes had in their environment (issue 17). Plus the token's sources and refusals."""

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pandas as pd
import pytest
import requests
import yaml
from test_secrets import count_places, fake_secrets, find_secrets

from raysae import submit
from raysae.__main__ import main
from raysae.data import storage

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


# ---------------------------------------------------------------- where the token comes from


def _no_token_anywhere(monkeypatch, home: Path) -> None:
    monkeypatch.delenv(submit.TOKEN_ENV, raising=False)
    monkeypatch.delenv(submit.TOKEN_PATH_ENV, raising=False)
    monkeypatch.setenv("HOME", str(home))  # ~/.ray/auth_token of this machine is not looked at


def test_token_sources_in_rays_order(tmp_path, monkeypatch):
    from ray._raylet import AuthenticationTokenLoader

    _no_token_anywhere(monkeypatch, tmp_path)
    assert submit.find_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("  from-default \nsecond line\n")
    (tmp_path / "path").write_text("from-path\n")
    (tmp_path / "given").write_text("from-file")
    ray_loader = AuthenticationTokenLoader.instance()
    try:
        for setting, expected, source in [
            ({}, "from-default", "~/.ray/auth_token"),
            ({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "path")}, "from-path", "RAY_AUTH_TOKEN_PATH="),
            ({"RAY_AUTH_TOKEN": "from-env"}, "from-env", "RAY_AUTH_TOKEN"),
        ]:
            for key, value in setting.items():
                monkeypatch.setenv(key, value)
            token = submit.find_token()
            assert (token.value, token.source[: len(source)]) == (expected, source)
            ray_loader.reset_cache()  # Ray's own loader picks the same one
            assert ray_loader.get_raw_token(ignore_auth_mode=True) == expected
            # --token-file comes first; the value stays out of the token's repr.
            given = submit.find_token(str(tmp_path / "given"))
            assert given.value == "from-file" and "from-file" not in repr(given)
    finally:
        ray_loader.reset_cache()


def test_a_missing_token_file_is_named(tmp_path, monkeypatch, capsys):
    _no_token_anywhere(monkeypatch, tmp_path)
    missing = tmp_path / "nope"
    args = ["submit", "--address", "http://127.0.0.1:1", "--status", "raysae_x"]
    assert main([*args, "--token-file", str(missing)]) == 2
    assert f"--token-file {missing}: no such file, or it is empty" in capsys.readouterr().err
    monkeypatch.setenv(submit.TOKEN_PATH_ENV, str(missing))
    assert main(args) == 2
    assert f"RAY_AUTH_TOKEN_PATH={missing}: no such file" in capsys.readouterr().err


def test_a_cluster_without_authentication_is_warned_about(ray_cluster, capsys):
    """The session's Ray runs with RAY_AUTH_MODE=disabled (tests/conftest.py)."""
    url = ray_cluster.head_node.webui_url
    address = url if url.startswith("http") else f"http://{url}"
    assert submit.authentication_mode(address) == "disabled"
    submit.warn_if_open(address)
    err = capsys.readouterr().err
    assert f"warning: the Ray cluster at {address} has token authentication off" in err
    assert "RAY_AUTH_MODE=token" in err


# ---------------------------------------------------------------- the authenticated cluster


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """A two-node Ray cluster started with the CLI, as `ray up` starts one, with token
    authentication on: a head with the dashboard and no training resource, and a worker node
    that joins it and alone offers the `trainer` resource, so Train workers can only run there.

    The token is made as cluster.yaml's head makes it (`ray get-auth-token --generate`, here
    with HOME in a temp dir); the head reads it from its file (RAY_AUTH_TOKEN_PATH), the worker
    from its environment (RAY_AUTH_TOKEN). Both nodes also hold distinctive fake AWS
    credentials and tracker keys in their environment (moto takes any), for the secrets search.

    Each node gets its own --temp-dir, as separate machines have separate disks: nodes sharing a
    session directory share the runtime-env cache, and the worker's agent then unpacked the job's
    working dir again over the one the driver was running in."""
    port, dashboard = _free_port(), _free_port()
    token_home = Path(tempfile.mkdtemp(prefix="rk"))
    made = subprocess.run(
        [RAY, "get-auth-token", "--generate"],
        env={**os.environ, "HOME": str(token_home), "RAY_USAGE_STATS_ENABLED": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    token_file = token_home / ".ray" / "auth_token"
    token = token_file.read_text().strip()
    assert made.stdout == token and len(token) == 64  # what cluster.yaml sends to /dev/null
    fakes = fake_secrets()
    # The job runs `python`: on this machine that must be the test's interpreter, as on a
    # cluster it is the image's.
    env = {
        **os.environ,
        **fakes,
        "RAY_AUTH_MODE": "token",
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
            env={**env, "RAY_AUTH_TOKEN_PATH": str(token_file)},
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        address = f"http://127.0.0.1:{dashboard}"
        headers = {"Authorization": f"Bearer {token}"}
        _wait_for_dashboard(address, headers)
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
                env={**env, "RAY_AUTH_TOKEN": token},
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        _wait_for_nodes(address, headers, 2)
        yield types.SimpleNamespace(
            address=address,
            token=token,
            token_file=str(token_file),
            headers=headers,
            secrets={**fakes, "RAY_AUTH_TOKEN": token},
            session_dirs=[Path(head_tmp), Path(worker_tmp)],
        )
    finally:
        # SIGKILL the nodes' process groups (each `ray start` and everything it spawned): a
        # graceful stop took ~35 s and nothing of these nodes' state is kept.
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGKILL)
        for node in nodes:
            node.wait(timeout=60)
        for folder in (head_tmp, worker_tmp, token_home):
            shutil.rmtree(folder, ignore_errors=True)


def _state(address: str, headers: dict):
    """Ray's state API client, carrying the token (this process runs with RAY_AUTH_MODE=disabled,
    so Ray's own helpers would send none)."""
    from ray.util.state.api import StateApiClient

    return StateApiClient(address, headers={**headers, "Content-Type": "application/json"})


def _list(address: str, headers: dict, resource: str, filters: list) -> list:
    from ray.util.state.common import ListApiOptions, StateResource

    return _state(address, headers).list(
        StateResource(resource),
        options=ListApiOptions(filters=filters, limit=1000),
        raise_on_missing_output=False,
    )


def _wait_for_nodes(address: str, headers: dict, count: int, timeout: float = 180) -> None:
    from ray.util.state.exception import RayStateApiException

    deadline = time.time() + timeout
    alive = 0
    while alive < count:
        try:
            alive = len(_list(address, headers, "nodes", [("state", "=", "ALIVE")]))
        except RayStateApiException:  # a loaded machine's dashboard can miss a request
            if time.time() > deadline:
                raise
        if alive < count and time.time() > deadline:
            raise TimeoutError(f"{count} Ray nodes not alive after {timeout} s")
        time.sleep(1)


def _wait_for_dashboard(address: str, headers: dict, timeout: float = 120) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout
    while True:
        try:
            JobSubmissionClient(address, headers=headers).list_jobs()
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)


def _project(root: Path, output: str, model_dir: str) -> Path:
    """A project directory as a user has it: raysae's source and a spec that harvests the tiny
    model's layer 1 into S3, then sweeps two SAEs on it with ASHA. It is uploaded."""
    project = root / "project"
    shutil.copytree(
        Path(__file__).parents[1] / "raysae",
        project / "raysae",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    acts = storage.join(output, "acts")
    spec = {
        "name": "rehearsal",
        "output": output,
        "harvest": {
            "model": model_dir,
            "layers": [1],
            "output": acts,
            "n_tokens": 4 * 4096,
            "context_length": 32,
            "tokens_per_part": 4096,
            "batch_size": 32,
            "cpus_per_actor": 0.5,
        },
        "base": {
            "sae": {"d_in": 32, "n_latents": 64, "k": 4},
            "train": {
                "total_tokens": 12_000,
                "batch_size": 1000,
                "lr": 3e-3,
                "log_every_tokens": 3000,
                "init_tokens": 2000,
            },
            "data": {"uri": storage.join(acts, "layer_1"), "eval_parts": 1, "read_cpus": 0.25},
            "scaling": {
                "num_workers": 1,
                "cpus_per_worker": 0.4,
                "resources_per_worker": {"trainer": 1},
                "checkpoint_every_tokens": 6000,
            },
        },
        # ASHA lets the first trial at each rung go on, and may stop the other if it is worse.
        "architectures": {"topk": {"sae.k": [4]}, "relu": {"sae.l1_coefficient": [50.0]}},
        "scheduler": {"type": "asha", "metric": "fvu", "grace_tokens": 3000},
        "max_concurrent_trials": 2,  # both at once: the worker node has room for two
    }
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    return project


def test_requests_without_the_token_are_refused(
    cluster, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    # Ray's job API itself: no token → 401, a wrong one → 403, the token → 200.
    jobs = f"{cluster.address}/api/jobs/"
    assert requests.get(jobs, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer " + "0" * 64}
    assert requests.get(jobs, headers=wrong, timeout=30).status_code == 403
    assert requests.get(jobs, headers=cluster.headers, timeout=30).status_code == 200

    # raysae submit: one message saying what was sent and how to get the token, exit 2.
    project = _project(tmp_path, "s3://raysae-test/refused", tiny_model_dir)
    monkeypatch.chdir(project)
    _no_token_anywhere(monkeypatch, tmp_path)
    submit_args = ["submit", "spec.yaml", "--address", cluster.address]
    assert main(submit_args) == 2
    err = capsys.readouterr().err
    assert "refused the request (HTTP 401): no token was sent" in err
    assert "ray rsync-down cluster.yaml /home/ray/.ray/auth_token" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    wrong_token = "f" * 64
    monkeypatch.setenv("RAY_AUTH_TOKEN", wrong_token)
    assert main(submit_args) == 2
    err = capsys.readouterr().err
    assert "(HTTP 403): the token from RAY_AUTH_TOKEN is not this cluster's" in err
    assert wrong_token not in err
    assert main(["submit", "--address", cluster.address, "--status", "raysae_none"]) == 2
    assert "(HTTP 403)" in capsys.readouterr().err
    assert not requests.get(jobs, headers=cluster.headers, timeout=30).json()  # nothing ran


def test_sweep_submitted_as_a_job_writes_results_to_s3_and_no_secret(
    cluster, tiny_model_dir, s3_endpoint, s3_prefix, tmp_path, monkeypatch, capsys
):
    project = _project(tmp_path, s3_prefix, tiny_model_dir)
    monkeypatch.chdir(project)
    _no_token_anywhere(monkeypatch, tmp_path)
    address = cluster.address
    submitted = main(
        ["submit", "spec.yaml", "--address", address, "--token-file", cluster.token_file]
    )
    out, err = capsys.readouterr()
    assert submitted == 0, err
    assert "warning" not in err  # the head checks tokens
    job_id = out.split()[1]
    t0 = time.perf_counter()

    # Status and logs read the token where Ray does (here RAY_AUTH_TOKEN).
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    deadline = time.time() + 480
    status = "PENDING"
    while status in ("PENDING", "RUNNING") and time.time() < deadline:
        time.sleep(3)
        assert main(["submit", "--address", address, "--status", job_id]) == 0
        status = capsys.readouterr().out.strip()
    assert main(["submit", "--address", address, "--logs", job_id]) == 0
    logs = capsys.readouterr().out
    errors = [
        line
        for line in logs.splitlines()
        if "Error" in line or "error:" in line or 'File "' in line
    ]
    assert status == "SUCCEEDED", f"{status}:\n" + "\n".join(errors[-30:])
    print(f"job: harvest and sweep in {time.perf_counter() - t0:.0f} s")
    assert "harvesting" in logs and "Pareto frontier" in logs

    # Training ran on the worker node, the only one offering `trainer`; the head trained nothing.
    head = {n.node_id for n in _list(address, cluster.headers, "nodes", []) if n.is_head_node}
    train_nodes = {
        a.node_id
        for a in _list(address, cluster.headers, "actors", [("class_name", "=", "RayTrainWorker")])
    }
    assert train_nodes and not train_nodes & head, (train_nodes, head)

    sweep = storage.join(s3_prefix, "rehearsal")
    files = storage.list_files(sweep)
    assert {"results.csv", "results.parquet", "pareto.png", "pareto.csv"} <= set(files)
    table = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(sweep, "results.csv"))))
    assert len(table) == 2
    finished = table[table.status == "finished"]  # the first trial runs to the end
    assert len(finished) >= 1
    for path in finished["checkpoint"]:
        assert storage.exists(storage.join(path, "sae.safetensors")), path
    print(table[["architecture", "status", "tokens", "fvu"]])

    # Evaluate one SAE here, with the same secrets in this process's environment.
    for name, value in cluster.secrets.items():
        monkeypatch.setenv(name, value)
    checkpoint = finished["checkpoint"].iloc[0]
    local = tmp_path / "eval" / "sae"
    local.mkdir(parents=True)
    for name in storage.list_files(checkpoint):
        (local / name).write_bytes(storage.read_bytes(storage.join(checkpoint, name)))
    data = storage.join(s3_prefix, "acts", "layer_1")
    report = tmp_path / "eval" / "report.json"
    evaluated = main(
        ["eval", str(local), "--data", data, "--eval-parts", "1", "--out", str(report)]
        + ["--tokens", "4096", "--kmeans-tokens", "2048"]
    )
    assert evaluated == 0 and report.exists()
    print(f"eval done {time.perf_counter() - t0:.0f} s after submit")

    # No secret in anything written: outputs and data in S3, both nodes' Ray session folders
    # (logs, the unpacked working dir, Tune's and Train's local state), this test's folder, the
    # job's metadata. First, one planted value in each kind of place must be found.
    roots = [*cluster.session_dirs, tmp_path]
    planted_log = (cluster.session_dirs[0] / "session_latest" / "logs").resolve() / "planted.log"
    planted_log.write_text(f"key={cluster.secrets['AWS_SECRET_ACCESS_KEY']}\n")
    planted_object = storage.join(s3_prefix, "planted.txt")
    storage.write_bytes(planted_object, cluster.secrets["RAY_AUTH_TOKEN"].encode())
    metadata = requests.get(f"{address}/api/jobs/", headers=cluster.headers, timeout=30).text
    assert job_id in metadata
    hits = find_secrets(
        cluster.secrets,
        roots,
        s3_prefixes=[s3_prefix],
        s3_endpoint=s3_endpoint,
        blobs={"Ray Job metadata": metadata},
    )
    searched = count_places(roots, [s3_prefix], s3_endpoint)
    print(
        f"searched {searched} for {len(cluster.secrets)} secrets: {len(hits)} hits; "
        f"done {time.perf_counter() - t0:.0f} s after submit"
    )
    planted = [(str(planted_log), "AWS_SECRET_ACCESS_KEY"), (planted_object, "RAY_AUTH_TOKEN")]
    assert set(planted) <= set(hits), hits  # the search reaches each kind of place
    assert [hit for hit in hits if hit not in planted] == []  # and nothing else holds a secret
