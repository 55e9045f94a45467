"""Ctrl-C and SIGTERM: `raysae train` stops cleanly, exits 130 / 143 and prints the command that
goes on, and a killed driver's run resumes (the sweep's drill is in test_sweep.py)."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from processes import Output, wait_for_idle_cpus

from raysae import interrupt, loop
from raysae.__main__ import main
from raysae.checkpoint import newest_complete
from raysae.data import storage

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


def _newest(run: Path):
    """(path, tokens) of the newest complete checkpoint under `run`, or None."""
    fs, path = storage.filesystem_and_path(str(run))
    return newest_complete(fs, path, log=lambda _: None)


def _resume_point(run: Path) -> tuple[int, int]:
    """(tokens, replayed tokens after resuming) of the newest complete checkpoint under `run`:
    a resume reads that checkpoint's epoch again from its start, so the tokens of it already
    trained on are added to the replayed ones."""
    found = _newest(run)
    assert found is not None
    state = json.loads((Path(found[0]) / "m0" / "train_state.json").read_text())
    progress = state["progress"]
    return found[1], progress["replayed_tokens"] + progress["epoch_tokens"]


def _wait_for_checkpoint(run: Path, process: subprocess.Popen, after: int = -1) -> None:
    """Until `process` has written a complete checkpoint newer than `after` tokens."""
    deadline = time.time() + 240
    while True:
        found = _newest(run)
        if found is not None and found[1] > after:
            return
        assert process.poll() is None and time.time() < deadline, "no new checkpoint appeared"
        time.sleep(0.2)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_ray_train_killed_then_ctrl_c_and_the_printed_command_resumes(
    ray_cluster, tmp_path_factory, tmp_path
):
    """One run, stopped twice on Ray. First its driver is killed (SIGKILL: nothing runs, no
    message) after a checkpoint: the same command resumes from the newest complete checkpoint,
    counting its epoch's trained tokens as replayed. Then Ctrl-C once that run has checkpointed
    again: Ray Train aborts the workers (the cluster's CPUs come back), exit 130, no traceback,
    and the printed command resumes to the exact budget; after each resume the rate counts only
    the tokens trained since it."""
    import ray

    from raysae import data
    from raysae.config import ToyDataConfig
    from raysae.synthetic import ToyData

    uri = str(tmp_path_factory.mktemp("toy") / "acts")
    x, _ = ToyData(ToyDataConfig(n_features=128, active_per_token=3, seed=3), 32).sample(6 * 8192)
    data.write_dataset(uri, x, dtype="float32", rows_per_part=8192, model="toy")
    config = _write_ray_config(tmp_path / "run.yaml", uri)
    out, run = tmp_path / "out", tmp_path / "out" / "r"
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "raysae", "train", str(config), "--out", str(out)]
    command += ["--name", "r", "--address", address]

    # 1. The driver killed outright, most likely before Ray registered its checkpoint.
    first = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_for_checkpoint(run, first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (run / "metrics.json").exists()
    killed_at, replayed_after_kill = _resume_point(run)

    # 2. The same command resumes; Ctrl-C once it has written a checkpoint of its own.
    second = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = Output(second)
    _wait_for_checkpoint(run, second, after=killed_at)
    stop = output.mark()
    os.killpg(second.pid, signal.SIGINT)
    assert output.wait(timeout=120) == 130, output.since()[-3000:]
    # Ray's own log lines before the signal are not ours to judge (on a loaded machine they may
    # carry Ray's "safe to ignore" warnings, tracebacks included); from the stop on, none.
    assert "Traceback" not in output.ours_since(stop), output.ours_since(stop)[-3000:]
    resume = output.since(stop).split("Resume with:\n", 1)[1].splitlines()[0].strip()
    assert shlex.split(resume) == command
    assert not (run / "metrics.json").exists()
    wait_for_idle_cpus()  # the aborted run's Train worker gave its CPU back

    # 3. The printed command, run in this process (its interpreter is this one): a fresh
    # process would only add its start-up to the test.
    assert main(shlex.split(resume)[3:]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    # Restarts of its own (a worker health check failing on a loaded machine) are allowed.
    assert metrics["tokens"] == 300_000 and metrics["restarts"] >= 2
    history = metrics["history"]
    after_kill = [r for r in history if r["restarts"] == 1]
    assert after_kill and all(r["replayed_tokens"] == replayed_after_kill for r in after_kill)
    resumes = [
        i for i in range(1, len(history)) if history[i]["restarts"] > history[i - 1]["restarts"]
    ]
    assert len(resumes) >= 2
    for i in resumes:
        trained_since = history[i]["tokens"] - history[i - 1]["tokens"]
        assert history[i]["tokens_per_s"] * history[i]["elapsed_s"] == pytest.approx(trained_since)
