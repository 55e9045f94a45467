"""SAE checkpoints: a directory with `sae.safetensors` (tensors) and `config.json` (everything else).

No pickle anywhere: safetensors holds only raw tensors and JSON holds only plain values, so loading a
checkpoint someone else wrote cannot execute code. `load_sae(save_sae(m))` reproduces `m` exactly.

    config.json = {"format_version": 1, "sae": {SAEConfig fields}, "input_scale": s,
                   "folded": bool, "metadata": {...free-form: run, tokens, metrics...}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from raysae.config import SAEConfig
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
    """Read a checkpoint written by `save_sae`."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG, directory / WEIGHTS
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
