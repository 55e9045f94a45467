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

from raysae.config import SAEConfig, from_dict, to_dict
from raysae.saes import SparseAutoencoder, build_sae

FORMAT_VERSION = 1
WEIGHTS = "sae.safetensors"
CONFIG = "config.json"


def save_sae(model: SparseAutoencoder, directory: str | os.PathLike,
             metadata: Optional[dict] = None) -> Path:
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
        raise ValueError(f"{weights_path}: tensors do not match architecture "
                         f"{model.cfg.architecture!r} (missing {missing}, unexpected {unexpected})")
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
        raise ValueError(f"{path}: checkpoint format_version {version!r} is not supported "
                         f"(this raysae reads version {FORMAT_VERSION})")
    return config


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)
