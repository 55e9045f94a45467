"""Checkpoints are complete or invisible: which folder a restart resumes from, whatever fault
left the run directory as it is (no Ray here: the folders are written as rank 0 writes them)."""

import errno
import subprocess

import pytest
import torch

from raysae.checkpoint import (
    SEAL,
    load_training_checkpoint,
    newest_complete,
    no_space,
    save_training_checkpoint,
    seal,
)
from raysae.config import SAEConfig, TrainConfig
from raysae.data import storage
from raysae.saes import build_sae
from raysae.step import TrainState, make_optimizer, train_step


def _trained(steps: int):
    """A small SAE, its Adam and counters after `steps` steps (so Adam has state to save)."""
    torch.manual_seed(0)
    model = build_sae(SAEConfig(d_in=8, n_latents=32, k=2))
    cfg = TrainConfig(total_tokens=10**6, batch_size=16)
    optimizer, state = make_optimizer(model, cfg), TrainState.fresh(32)
    for _ in range(steps):
        train_step(model, optimizer, torch.randn(16, 8), state, cfg)
    return model, optimizer, state


def _write(folder, steps: int) -> int:
    """A sealed checkpoint folder as raysae.worker writes it; returns its tokens."""
    model, optimizer, state = _trained(steps)
    save_training_checkpoint(folder / "m0", model, optimizer, state, {"epoch": 0})
    (folder / "history.json").write_text("[]")
    seal(folder, state.tokens)
    return state.tokens


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    for name, steps in (("a", 1), ("b", 2), ("c", 3)):
        _write(run / f"checkpoint_2026-01-01_00-00-0{steps}.{name}", steps)
    newest = run / "checkpoint_2026-01-01_00-00-03.c"
    fs, path = storage.filesystem_and_path(str(run))
    assert newest_complete(fs, path) == (str(newest), 48)

    # A full disk's leftovers: a newer folder of 0-byte files, without a seal (Ray uploads
    # files in no set order) or with one; and the newest complete folder with a short file.
    for name in ("checkpoint_2026-01-01_00-00-09.x", "checkpoint_2026-01-01_00-00-08.y"):
        (run / name / "m0").mkdir(parents=True)
        (run / name / "m0" / "sae.safetensors").write_bytes(b"")
    (run / "checkpoint_2026-01-01_00-00-08.y" / SEAL).write_text("")
    optimizer_file = newest / "m0" / "optimizer.safetensors"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:-10])
    lines = []
    second = run / "checkpoint_2026-01-01_00-00-02.b"
    assert newest_complete(fs, path, lines.append) == (str(second), 32)
    assert any("00-08.y: unreadable checkpoint.json" in line for line in lines), lines
    assert any(
        "00-03.c is incomplete (m0/optimizer.safetensors missing or short)" in line
        for line in lines
    ), lines

    # What it picked restores exactly what was saved.
    model, optimizer, state = _trained(2)
    fresh = build_sae(SAEConfig(d_in=8, n_latents=32, k=2))
    fresh_optimizer = make_optimizer(fresh, TrainConfig(total_tokens=10**6, batch_size=16))
    tokens, step, since, _ = load_training_checkpoint(second / "m0", fresh, fresh_optimizer)
    assert (tokens, step) == (state.tokens, state.step) == (32, 2)
    assert torch.equal(since, state.tokens_since_fired)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


def test_no_checkpoint_or_only_unsealed_ones(tmp_path):
    fs, path = storage.filesystem_and_path(str(tmp_path / "never-ran"))
    assert newest_complete(fs, path) is None
    (tmp_path / "never-ran" / "checkpoint_x" / "m0").mkdir(parents=True)  # old raysae: no seal
    assert newest_complete(fs, path) is None  # so Ray's registered choice stands


def test_newest_complete_on_s3(tmp_path, s3_prefix):
    """The same choice from an S3 listing (one recursive list, one small read per candidate)."""
    for name, steps in (("checkpoint_1", 1), ("checkpoint_2", 2)):
        _write(tmp_path / name, steps)
        storage.upload_dir(tmp_path / name, storage.join(s3_prefix, "run", name))
    storage.delete(storage.join(s3_prefix, "run", "checkpoint_2", "m0", "train_state.json"))
    fs, path = storage.filesystem_and_path(storage.join(s3_prefix, "run"))
    assert newest_complete(fs, path, lambda line: None) == (f"{path}/checkpoint_1", 16)


def test_a_full_disk_is_recognised(tmp_path):
    """A real ENOSPC (a 64 KiB tmpfs; mounting needs root), as safetensors reports it: a
    SafetensorError, no OSError."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill ({mounted.stderr.decode().strip()}): needs root")
    try:
        model, optimizer, state = _trained(1)
        model = build_sae(SAEConfig(d_in=64, n_latents=1024, k=2))  # 512 KiB of weights
        with pytest.raises(Exception) as err:
            save_training_checkpoint(small / "m0", model, optimizer, state, {})
        assert no_space(err.value), repr(err.value)
        try:
            raise RuntimeError("wrapped") from err.value
        except RuntimeError as wrapped:
            assert no_space(wrapped)
        assert no_space(OSError(errno.ENOSPC, "disk full"))
        assert not no_space(OSError(errno.EACCES, "Permission denied"))
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_local_train_on_bad_rows_exits_2_naming_part_and_row(tmp_path, capsys):
    """`raysae train --local` (one process, no Ray) meets a NaN row: exit 2, one message."""
    import dataclasses

    import numpy as np
    import yaml

    from raysae import data
    from raysae.__main__ import main

    uri = str(tmp_path / "acts")
    manifest = data.write_dataset(uri, torch.randn(400, 8), dtype="float32", rows_per_part=100)
    bad = torch.randn(100, 8)
    bad[64, 0] = float("nan")
    parts = list(manifest.parts)
    table = data.shard_table(bad, *[np.zeros(100)] * 3, dtype="float32")
    part = parts[2] = data.write_part(uri, parts[2].name, table)
    storage.write_bytes(
        storage.join(uri, data.MANIFEST_NAME),
        dataclasses.replace(manifest, parts=tuple(parts)).to_json().encode(),
    )
    config = tmp_path / "run.yaml"
    run = {
        "sae": {"d_in": 8, "n_latents": 32, "k": 2},
        "train": {"total_tokens": 2000, "batch_size": 50, "init_tokens": 50},
        "data": {"uri": uri, "eval_parts": 1},
    }
    config.write_text(yaml.safe_dump(run))
    code = main(["train", str(config), "--local", "--out", str(tmp_path / "out")])
    message = capsys.readouterr().err
    assert code == 2, message
    assert f"part {part.name} row 64: activation holds NaN" in message, message
    assert "Traceback" not in message and not (tmp_path / "out" / "metrics.json").exists()
