"""Checkpoints are complete or invisible: which folder a restart resumes from, whatever fault
left the run directory as it is (no Ray here: the folders are written as rank 0 writes them);
and the final results on a full disk."""

import errno
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from raysae.checkpoint import (
    CONFIG,
    SEAL,
    WEIGHTS,
    ResultsSpaceError,
    load_sae,
    load_training_checkpoint,
    newest_complete,
    no_space,
    save_sae,
    save_training_checkpoint,
    seal,
)
from raysae.config import RunConfig, SAEConfig, TrainConfig
from raysae.data import storage
from raysae.saes import build_sae
from raysae.settings import from_dict
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
    """The same choice from an S3 listing (one recursive list, one small read per candidate,
    and the files of the ones checked, read back for their CRC-32s)."""
    for name, steps in (("checkpoint_1", 1), ("checkpoint_2", 2), ("checkpoint_3", 3)):
        _write(tmp_path / name, steps)
        if name == "checkpoint_3":
            _flip_a_byte(tmp_path / name / "m0" / "optimizer.safetensors")
        storage.upload_dir(tmp_path / name, storage.join(s3_prefix, "run", name))
    storage.delete(storage.join(s3_prefix, "run", "checkpoint_2", "m0", "train_state.json"))
    fs, path = storage.filesystem_and_path(storage.join(s3_prefix, "run"))
    lines = []
    assert newest_complete(fs, path, lines.append) == (f"{path}/checkpoint_1", 16)
    assert any("checkpoint_3 is corrupt (m0/optimizer.safetensors" in line for line in lines)


def test_a_full_disk_is_recognised(small_disk):
    """A real ENOSPC (a 64 KiB tmpfs; mounting needs root), as safetensors reports it: a
    SafetensorError, no OSError."""
    small = small_disk("64k")
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


def _flip_a_byte(path) -> None:
    """Bit rot: one byte of `path` changed, its size the same."""
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))


def test_a_corrupt_checkpoint_is_skipped_for_the_one_before(tmp_path):
    """A sealed folder of the right sizes whose bytes changed fails its CRC-32s: the restart
    takes the one before, and says which it skipped and why."""
    run = tmp_path / "run"
    older, newer = run / "checkpoint_1", run / "checkpoint_2"
    _write(older, 1)
    _write(newer, 2)
    assert set(json.loads((newer / SEAL).read_text())["crc32"]) == {
        "history.json",
        "m0/config.json",
        "m0/optimizer.safetensors",
        "m0/sae.safetensors",
        "m0/train_state.json",
        "m0/train_state.safetensors",
    }
    fs, path = storage.filesystem_and_path(str(run))
    assert newest_complete(fs, path) == (str(newer), 32)

    _flip_a_byte(newer / "m0" / WEIGHTS)
    lines = []
    assert newest_complete(fs, path, lines.append) == (str(older), 16)
    assert lines == [
        f"checkpoint {newer} is corrupt (m0/{WEIGHTS} does not match its CRC-32 in {SEAL}); skipped"
    ]

    _flip_a_byte(older / "m0" / "train_state.json")  # none left: a fresh start, said so
    lines = []
    assert newest_complete(fs, path, lines.append) is None
    assert f"checkpoint {older} is corrupt (m0/train_state.json" in lines[1], lines
    assert lines[-1] == f"no complete checkpoint left under {run}", lines


def test_a_seal_without_crcs_is_still_checked_by_size(tmp_path):
    """A seal written before CRC-32s were recorded: the folder is complete when the sizes
    agree, and not when a file is short."""
    folder = tmp_path / "run" / "checkpoint_1"
    _write(folder, 1)
    body = json.loads((folder / SEAL).read_text())
    del body["crc32"]
    (folder / SEAL).write_text(json.dumps(body))
    _flip_a_byte(folder / "m0" / WEIGHTS)  # not caught without CRCs: the sizes agree
    fs, path = storage.filesystem_and_path(str(tmp_path / "run"))
    assert newest_complete(fs, path) == (str(folder), 16)
    weights = folder / "m0" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1])
    assert newest_complete(fs, path, lambda line: None) is None


def test_a_local_checkpoint_is_flushed_to_disk(tmp_path, monkeypatch):
    """Once Ray's report has copied rank 0's checkpoint into a local run folder, every file
    and folder of it is fsync-ed (Ray's copy is not), and the checkpoint folder's entry too."""
    import ray.train

    from raysae import worker

    run_dir = tmp_path / "run"
    copied = []

    def report(record, checkpoint, checkpoint_dir_name):  # what Ray does, less the bookkeeping
        destination = run_dir / checkpoint_dir_name
        storage.upload_dir(checkpoint.path, str(destination))
        copied.append(destination)

    flushed = []
    real_fsync = os.fsync

    def fsync(fd):
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(os, "fsync", fsync)
    model, optimizer, state = _trained(1)
    member = SimpleNamespace(model=model, optimizer=optimizer, state=state)
    worker._report_checkpoint({"tokens": 16}, [member], {"epoch": 0}, [], str(run_dir))
    (folder,) = copied
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    assert len(files) == 7 and str(folder / SEAL) in files  # m0's 5, the history, the seal
    assert sorted(f for f in flushed if os.path.isfile(f)) == files
    assert {str(folder / "m0"), str(folder), str(run_dir)} <= set(flushed)
    fs, path = storage.filesystem_and_path(str(run_dir))
    assert newest_complete(fs, path) == (str(folder), 16)


def _final_config(d_in: int, n_latents: int) -> RunConfig:
    sae = {"d_in": d_in, "n_latents": n_latents, "k": 2}
    return from_dict(RunConfig, {"sae": sae, "data": {"uri": "/unused"}})


def test_final_sae_on_a_full_disk_names_it_and_the_space(small_disk):
    """The final SAE (2 MiB) on a 1 MiB filesystem that holds an earlier run's SAE (as with
    --overwrite): the error names the folder and the space, and nothing there looks like a
    complete SAE, neither the new one's partial files nor the earlier one's config.json."""
    from raysae.train import finish

    out = small_disk("1m")
    earlier = build_sae(SAEConfig(d_in=8, n_latents=32, k=2))
    save_sae(earlier, out / "sae")
    (out / "metrics.json").write_text("{}")
    model = build_sae(SAEConfig(d_in=64, n_latents=4096, k=2))  # 2 MiB of weights
    cfg, history = _final_config(64, 4096), [{"tokens": 1000}]
    with pytest.raises(ResultsSpaceError) as err:
        finish(model, cfg, str(out), history, 1.0, {"fvu": 0.5}, resumable=True)
    message = str(err.value)
    assert re.fullmatch(
        f"no space left on {out}: the SAE and its metrics.json need about 2\\.0 MiB; free that "
        "much there and re-run the same command \\(it resumes from the last checkpoint\\)",
        message,
    ), message
    assert not (out / "sae").exists() and not (out / "metrics.json").exists()
    assert not list(out.iterdir()), list(out.iterdir())


def test_final_sae_on_a_full_temporary_folder_names_that(tmp_path, small_disk, monkeypatch):
    """The SAE is written to a local temporary folder before it is copied to the output: when
    that one is full, the message names it, not the output (and estimates the SAE's size)."""
    import tempfile

    from raysae.train import finish

    monkeypatch.setattr(tempfile, "tempdir", str(small_disk("1m")))
    out = tmp_path / "out"
    model = build_sae(SAEConfig(d_in=64, n_latents=4096, k=2))
    with pytest.raises(
        ResultsSpaceError, match=f"no space left on {tempfile.tempdir}: .* 2\\.[01] MiB"
    ):
        finish(model, _final_config(64, 4096), str(out), [], 1.0, {}, resumable=True)
    assert not list(Path(tempfile.tempdir).iterdir()) and not out.exists()


def test_final_metrics_on_a_full_disk_leave_no_sae_behind(small_disk):
    """The SAE fits but metrics.json does not: neither is left (an SAE without its metrics is
    not a finished run), nor a temporary file."""
    from raysae.train import finish

    out = small_disk("1m")
    model = build_sae(SAEConfig(d_in=8, n_latents=32, k=2))
    extra = {"note": "x" * 2**21}  # a 2 MiB metrics.json
    with pytest.raises(ResultsSpaceError, match=f"no space left on {out}: .* about 2\\.0 MiB"):
        finish(model, _final_config(8, 32), str(out), [], 1.0, {}, extra=extra, resumable=True)
    assert not list(out.iterdir()), list(out.iterdir())


def test_local_train_on_a_full_disk_says_it_trains_again(tmp_path, small_disk, capsys):
    """`raysae train --local` whose SAE does not fit its output: exit 2, the space needed, and
    that the run must train again (it keeps no checkpoints); no SAE left that would load."""
    import yaml

    from raysae import data
    from raysae.__main__ import main

    uri = str(tmp_path / "acts")
    data.write_dataset(uri, torch.randn(400, 64), dtype="float32", rows_per_part=100)
    run = {
        "sae": {"d_in": 64, "n_latents": 4096, "k": 2},
        "train": {"total_tokens": 200, "batch_size": 50, "init_tokens": 50},
        "data": {"uri": uri, "eval_parts": 1},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run))
    out = small_disk("1m")
    code = main(["train", str(config), "--local", "--out", str(out)])
    message = capsys.readouterr().err
    assert code == 2, message
    assert re.search(
        f"no space left on {out}: the SAE and its metrics.json need about 2\\.[0-9] MiB; .*"
        "--local keeps no checkpoints, so it trains again from the start",
        message,
    ), message
    assert "Traceback" not in message and "Errno" not in message, message
    assert not (out / "sae" / CONFIG).exists() and not (out / "metrics.json").exists()
    with pytest.raises(FileNotFoundError):
        load_sae(out / "sae")


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
