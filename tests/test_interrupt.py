"""Ctrl-C and SIGTERM: `raysae train` stops cleanly, exits 130 / 143 and prints the command that
goes on (the sweep's drill is in test_sweep.py)."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml
from processes import Output, wait_for_idle_cpus

from raysae import interrupt, loop
from raysae.__main__ import main

LOCAL = {
    "sae": {"architecture": "topk", "d_in": 16, "n_latents": 64, "k": 4},
    "train": {"total_tokens": 10**9, "batch_size": 500, "log_every_tokens": 1000},
    "data": {"toy": {"n_features": 32, "active_per_token": 3}},
}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_local_train_stops_and_says_it_cannot_resume(tmp_path, capsys, monkeypatch, signum):
    """The signal arrives in the middle of training (at its first progress line); the run
    stops there with 128 + signal, writes nothing, and says a --local run starts over."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(LOCAL))
    format_record = loop.format_record

    def signal_at_first_line(record, total):
        os.kill(os.getpid(), signum)
        return format_record(record, total)

    monkeypatch.setattr(loop, "format_record", signal_at_first_line)
    argv = ["train", str(config), "--out", str(tmp_path / "out")]
    handlers = [signal.getsignal(s) for s in interrupt.SIGNALS]
    assert main(argv) == 128 + signum
    err = capsys.readouterr().err
    assert f"interrupted ({signal.Signals(signum).name})" in err
    assert "keeps no checkpoints, so it cannot resume" in err
    assert err.strip().endswith(shlex.join(["raysae", *argv]))
    assert not (tmp_path / "out" / "metrics.json").exists()
    # The handlers are put back.
    assert [signal.getsignal(s) for s in interrupt.SIGNALS] == handlers


def test_local_train_subprocess_ctrl_c(tmp_path):
    """Ctrl-C in a terminal (SIGINT to the process group) of `python -m raysae train --local`."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(LOCAL))
    command = [sys.executable, "-m", "raysae", "train", str(config), "--out", str(tmp_path / "o")]
    run = subprocess.Popen(
        command,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert run.stdout.readline().startswith("training topk SAE")
    assert run.stdout.readline().startswith("tokens")  # in the training loop
    os.killpg(run.pid, signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "Traceback" not in out + err
    assert err.strip().endswith(shlex.join(command)) and "cannot resume" in err


def test_a_second_signal_stops_at_once_while_ray_winds_down():
    """The first signal asks Ray to stop (here a stand-in for Tune's SIGUSR1 handler); a second
    one raises Interrupted straight away."""
    asked = []
    with interrupt.handle_signals(), interrupt._stopping_with(asked.append):
        os.kill(os.getpid(), signal.SIGTERM)
        assert asked == [signal.SIGTERM] and interrupt.received() == signal.SIGTERM
        with pytest.raises(interrupt.Interrupted) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
    assert stopped.value.exit_code == 143  # named after the first signal


def _write_ray_config(path, uri):
    cfg = {
        "sae": {"architecture": "topk", "d_in": 32, "n_latents": 256, "k": 4},
        "train": {
            # Long after the first checkpoint, so that the signal lands mid-run even at the
            # ~50k tokens/s this trains at on 2 cores.
            "total_tokens": 300_000,
            "batch_size": 1000,
            "lr": 3e-3,
            "dead_tokens": 30_000,
            "log_every_tokens": 50_000,
            "init_tokens": 4000,
        },
        "data": {"uri": uri, "eval_parts": 2, "read_cpus": 0.25},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "checkpoint_every_tokens": 50_000},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ray_train_ctrl_c_stops_workers_and_the_printed_command_resumes(
    ray_cluster, tmp_path_factory, tmp_path
):
    """Ctrl-C to `raysae train` on Ray once a checkpoint exists: Ray Train aborts the workers
    (the cluster's CPUs come back), exit 130, no traceback, and the printed command resumes to
    the exact budget; the rate after the resume counts only the tokens trained since it."""
    import ray

    from raysae import data
    from raysae.config import ToyDataConfig
    from raysae.synthetic import ToyData

    uri = str(tmp_path_factory.mktemp("toy") / "acts")
    x, _ = ToyData(ToyDataConfig(n_features=128, active_per_token=3, seed=3), 32).sample(6 * 8192)
    data.write_dataset(uri, x, dtype="float32", rows_per_part=8192, model="toy")
    config = _write_ray_config(tmp_path / "run.yaml", uri)
    out = tmp_path / "out"
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "raysae", "train", str(config), "--out", str(out)]
    command += ["--name", "r", "--address", address]
    first = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = Output(first)
    deadline = time.time() + 240
    # Ray Train has registered a checkpoint once it writes its checkpoint manager's snapshot.
    while not (out / "r" / "checkpoint_manager_snapshot.json").exists():
        assert first.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    stop = output.mark()
    os.killpg(first.pid, signal.SIGINT)
    assert output.wait(timeout=120) == 130, output.since()[-3000:]
    # Ray's own log lines before the signal are not ours to judge (on a loaded machine they may
    # carry Ray's "safe to ignore" warnings, tracebacks included); from the stop on, none.
    assert "Traceback" not in output.since(stop), output.since(stop)[-3000:]
    resume = output.since(stop).split("Resume with:\n", 1)[1].splitlines()[0].strip()
    assert shlex.split(resume) == command
    assert not (out / "r" / "metrics.json").exists()
    wait_for_idle_cpus()  # the aborted run's Train worker gave its CPU back

    # The printed command, run in this process (its interpreter is this one): a fresh process
    # would only add its start-up to the test.
    assert main(shlex.split(resume)[3:]) == 0
    metrics = json.loads((out / "r" / "metrics.json").read_text())
    # A restart of its own (a worker health check failing on a loaded machine) is allowed.
    assert metrics["tokens"] == 300_000 and metrics["restarts"] >= 1
    history = metrics["history"]
    resumed = next(i for i, r in enumerate(history) if r["restarts"] > 0)
    trained_since = history[resumed]["tokens"] - history[resumed - 1]["tokens"]
    rate_times_elapsed = history[resumed]["tokens_per_s"] * history[resumed]["elapsed_s"]
    assert rate_times_elapsed == pytest.approx(trained_since)
