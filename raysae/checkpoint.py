"""SAE checkpoints: a directory with `sae.safetensors` (tensors) and `config.json` (everything else).

No pickle anywhere: safetensors holds only raw tensors and JSON holds only plain values, so loading a
checkpoint someone else wrote cannot execute code. `load_sae(save_sae(m))` reproduces `m` exactly.

    config.json = {"format_version": 1, "sae": {SAEConfig fields}, "input_scale": s,
                   "folded": bool, "metadata": {...free-form: run, tokens, metrics...}}
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Optional

import torch
from isal import isal_zlib
from safetensors.torch import load_file, save_file

from raysae.config import SAEConfig
from raysae.data import storage
from raysae.data.dataset import READ_CHUNK
from raysae.saes import SparseAutoencoder, build_sae
from raysae.settings import from_dict, to_dict

FORMAT_VERSION = 1
WEIGHTS = "sae.safetensors"
CONFIG = "config.json"


def save_sae(
    model: SparseAutoencoder, directory: str | os.PathLike, metadata: Optional[dict] = None
) -> Path:
    """Write `model` to `directory` (created if needed). Files are written then renamed into place."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {
        "format_version": FORMAT_VERSION,
        "sae": to_dict(model.cfg),
        "input_scale": float(model.input_scale),
        "metadata": metadata or {},
    }
    _atomic_write(directory / WEIGHTS, lambda p: save_file(tensors, p))
    _atomic_write(directory / CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    return directory


def load_sae(directory: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read a checkpoint written by `save_sae`, or an SAELens SAE (raysae.saelens)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG, directory / WEIGHTS
    if not config_path.exists() and (directory / "cfg.json").exists():  # SAELens's cfg.json
        from raysae.saelens import load_saelens

        return load_saelens(directory, device)
    for p in (config_path, weights_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: {directory} is not a raysae SAE checkpoint")
    config = read_checkpoint_config(directory)
    model = build_sae(from_dict(SAEConfig, config["sae"], "sae"))
    state = load_file(str(weights_path), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights_path}: tensors do not match architecture "
            f"{model.cfg.architecture!r} (missing {missing}, unexpected {unexpected})"
        )
    return model.to(device)


def read_checkpoint_config(directory: str | os.PathLike) -> dict:
    """The parsed config.json of a checkpoint, version-checked."""
    path = Path(directory) / CONFIG
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from None
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format_version {version!r} is not supported "
            f"(this raysae reads version {FORMAT_VERSION})"
        )
    return config


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Training checkpoints: the SAE plus everything needed to continue exactly where training was.
#
#     sae.safetensors + config.json   the SAE, unfolded (training continues in scaled units)
#     optimizer.safetensors           Adam's per-parameter tensors, keyed "<param index>.<name>"
#     train_state.safetensors         tokens_since_fired (dead-latent counters)
#     train_state.json                counters, the data position, Adam's hyperparameters

OPTIMIZER = "optimizer.safetensors"
TRAIN_TENSORS = "train_state.safetensors"
TRAIN_JSON = "train_state.json"


def save_training_checkpoint(
    directory: str | os.PathLike,
    model: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    state,
    progress: dict,
) -> Path:
    """Write model, optimizer and TrainState (`raysae.step.TrainState`) plus `progress`
    (a JSON-safe dict: where in the data stream the run is)."""
    directory = save_sae(model, directory)
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, param_state in opt["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    _atomic_write(directory / OPTIMIZER, lambda p: save_file(tensors, p))
    _atomic_write(
        directory / TRAIN_TENSORS,
        lambda p: save_file({"tokens_since_fired": state.tokens_since_fired.contiguous().cpu()}, p),
    )
    meta = {
        "tokens": state.tokens,
        "step": state.step,
        "progress": progress,
        "param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
    }
    _atomic_write(directory / TRAIN_JSON, lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
    return directory


def load_training_checkpoint(
    directory: str | os.PathLike, model: SparseAutoencoder, optimizer: torch.optim.Optimizer
) -> tuple[int, int, torch.Tensor, dict]:
    """Restore model and optimizer in place; returns (tokens, step, tokens_since_fired, progress)."""
    directory = Path(directory)
    saved = load_sae(directory)
    model.load_state_dict(saved.state_dict())
    meta = json.loads((directory / TRAIN_JSON).read_text())
    state: dict[int, dict] = {}
    for key, value in load_file(str(directory / OPTIMIZER)).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = meta["param_groups"]
    for group in groups:  # JSON turned tuples into lists
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    since = load_file(str(directory / TRAIN_TENSORS))["tokens_since_fired"]
    return meta["tokens"], meta["step"], since, meta["progress"]


# ---------------------------------------------------------------------------------------------
# Complete or invisible: the seal of a training checkpoint, and the newest complete one of a run.
#
# Ray Train uploads a checkpoint folder file by file (in no set order) and registers it with its
# controller only when the worker's report is next polled: a worker killed in between leaves a
# complete folder that Ray's `get_checkpoint()` does not know (it restarts from the one before),
# and a failed upload (a full disk) leaves a folder of missing or short files. So rank 0 writes
# SEAL last, listing every file with its size and CRC-32; a folder is complete when the listing
# agrees with its seal and every file's bytes with their CRC-32 (which catches what sizes do
# not: bit rot, or pages a power loss never wrote), and a restart takes the newest complete one
# (`newest_complete`), whatever Ray chose. Seals written before CRCs were recorded are checked
# by size only.

SEAL = "checkpoint.json"
SEAL_VERSION = 1


class SpaceError(OSError):
    """A disk is full; the message names it, the space needed, and how to go on."""


class CheckpointSpaceError(SpaceError):
    """The disk holding a checkpoint is full (raised in the workers: it stops the run)."""


class ResultsSpaceError(SpaceError):
    """The disk the final SAE and metrics.json go to is full (raised by the driver)."""


def seal(directory: str | os.PathLike, tokens: int) -> int:
    """Write SEAL into a finished checkpoint folder; returns the folder's bytes. Reads every
    file once more for its CRC-32 (just written, so from the page cache; ISA-L's CRC runs at
    tens of GB/s, a small cost beside writing the files)."""
    directory = Path(directory)
    files, crcs = {}, {}
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            name = p.relative_to(directory).as_posix()
            with open(p, "rb", buffering=0) as f:
                crcs[name], files[name] = _crc32(f)
    body = {"format_version": SEAL_VERSION, "tokens": tokens, "files": files, "crc32": crcs}
    _atomic_write(directory / SEAL, lambda p: Path(p).write_text(json.dumps(body, indent=1)))
    return sum(files.values()) + (directory / SEAL).stat().st_size


def _crc32(stream) -> tuple[int, int]:
    """(CRC-32, bytes) of the rest of `stream` (a file or a pyarrow input stream), read in
    cache-sized chunks and hashed with ISA-L's CRC-32, as dataset parts are."""
    crc = size = 0
    while chunk := stream.read(READ_CHUNK):
        crc = isal_zlib.crc32(chunk, crc)
        size += len(chunk)
    return crc, size


def sae_bytes(model: SparseAutoencoder) -> int:
    """About what `save_sae` writes for this model: its tensors and a little JSON."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) + 64 * 1024


def training_checkpoint_bytes(model: SparseAutoencoder, optimizer: torch.optim.Optimizer) -> int:
    """About what `save_training_checkpoint` writes for this model: its tensors and Adam's."""
    adam = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    adam_bytes = sum(t.numel() * t.element_size() for t in adam)
    return sae_bytes(model) + adam_bytes + 8 * model.cfg.n_latents


def no_space(error: BaseException) -> bool:
    """Whether `error` or one in its chain of causes is ENOSPC: by errno, or by the OS's text,
    as pyarrow's OSErrors carry no errno and safetensors raises its own SafetensorError."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def newest_complete(fs, run_path: str, log=print) -> Optional[tuple[str, int]]:
    """(fs path, tokens) of the newest sealed, complete `checkpoint_*` folder under `run_path`
    on pyarrow filesystem `fs`, or None if there is none; logs each newer folder it skips.

    Complete: every file its seal lists is there with that size and (seals with CRCs) that
    CRC-32. The CRCs are checked newest first until one folder passes, so a restart reads the
    checkpoint it resumes from once more (and each corrupt newer one); a store that cannot be
    reached raises (storage.is_unreachable) rather than passing for corruption."""
    import pyarrow.fs as pafs

    selector = pafs.FileSelector(run_path, recursive=True, allow_not_found=True)
    listed: dict[str, dict[str, int]] = {}
    for info in fs.get_file_info(selector):
        relative = info.path[len(run_path) :].strip("/").split("/", 1)
        if len(relative) == 2 and relative[0].startswith("checkpoint_") and info.is_file:
            listed.setdefault(relative[0], {})[relative[1]] = info.size
    sealed, skipped = [], 0
    for name in sorted(listed, reverse=True):
        files = listed[name]
        if SEAL not in files:
            continue  # being uploaded, a failed upload, or written by a raysae without seals
        try:
            with fs.open_input_stream(f"{run_path}/{name}/{SEAL}") as f:
                body = json.loads(f.read())
            wrong = [f for f, size in body["files"].items() if files.get(f) != size]
            crcs = {f: int(crc) for f, crc in body.get("crc32", {}).items()}
            tokens = int(body["tokens"])
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            if storage.is_unreachable(e):
                raise
            log(f"checkpoint {run_path}/{name}: unreadable {SEAL} ({e}); skipped")
            skipped += 1
            continue
        if wrong:
            log(
                f"checkpoint {run_path}/{name} is incomplete ({wrong[0]} missing or short); skipped"
            )
            skipped += 1
            continue
        sealed.append((tokens, name, crcs))
    for tokens, name, crcs in sorted(sealed, key=lambda c: c[:2], reverse=True):
        bad = _first_corrupt(fs, f"{run_path}/{name}", crcs)
        if bad is None:
            return f"{run_path}/{name}", tokens
        log(f"checkpoint {run_path}/{name} is corrupt ({bad}); skipped")
        skipped += 1
    if skipped:
        log(f"no complete checkpoint left under {run_path}")
    return None


REMOTE_READ = 16 * 2**20
"""Bytes per request when a checkpoint's files are read back from S3 for their CRC-32s."""


def _first_corrupt(fs, folder: str, crcs: dict[str, int]) -> Optional[str]:
    """What is wrong with the first file of `folder` (on pyarrow filesystem `fs`) whose bytes do
    not match their CRC-32 in `crcs`, or None if all of them do."""
    import pyarrow.fs as pafs

    # Remote: read through a buffer of REMOTE_READ bytes, as each read of an S3 file is a GET.
    buffer = None if isinstance(fs, pafs.LocalFileSystem) else REMOTE_READ
    for name, expected in sorted(crcs.items()):
        try:
            with fs.open_input_stream(
                f"{folder}/{name}", compression=None, buffer_size=buffer
            ) as f:
                crc, _ = _crc32(f)
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            if storage.is_unreachable(e):
                raise
            return f"{name} cannot be read: {e}"
        if crc != expected:
            return f"{name} does not match its CRC-32 in {SEAL}"
    return None


def fsync_tree(directory: str | os.PathLike) -> None:
    """Flush every file under the local folder `directory` to its disk, then every folder
    (deepest first: their entries name the files), then the folder's own entry in its parent."""
    directory = os.path.abspath(directory)
    for root, _, names in os.walk(directory, topdown=False):
        for name in names:
            _fsync(os.path.join(root, name))
        _fsync(root)
    _fsync(os.path.dirname(directory))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)  # a folder too opens read-only on Linux, and fsyncs
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
