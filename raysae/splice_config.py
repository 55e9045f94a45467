"""Settings of the splice evaluation (raysae.splice), and where `raysae eval` takes them from.

Kept apart from raysae.splice, which runs the model, so that building `raysae eval`'s options
(from SpliceConfig's fields) imports neither torch nor Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from raysae.settings import ConfigError, check_non_negative, check_positive
from raysae.text import TextWindows


@dataclass(frozen=True)
class SpliceConfig(TextWindows):
    """Settings of one splice evaluation; the TextWindows settings (keyword-only) are harvest's.
    `raysae eval` takes the model, the layer and the TextWindows settings it is not given from
    the manifest of the dataset it evaluates on, --data (see resolve_config)."""

    model: str
    """Causal LM: hub id, local directory, .gguf file or pkg://PACKAGE/FILE (default: the model
    --data was harvested from)."""
    layer: int
    """Block whose output (the residual stream after block L) the SAE replaces, 0-based
    (default: the layer of --data)."""
    n_tokens: int
    """Tokens to evaluate, counted as harvest counts them (its windows for this n_tokens);
    `raysae eval` runs the splice evaluation only when this is given."""
    revision: str | None = None
    """Model revision for hub models."""
    batch_size: int = 8
    """Windows per forward pass."""
    mean_ablation: bool = True
    """Also run the mean-ablated model (one more forward per batch, plus one up to block L)."""

    def __post_init__(self) -> None:
        self._check_windows("splice")  # context_length, model_dtype
        check_non_negative(self, "layer", where="splice")
        check_positive(self, "n_tokens", "batch_size", where="splice")


# ---------------------------------------------------------------- settings from a dataset

FROM_HARVEST = tuple(f.name for f in dataclasses.fields(TextWindows))
"""Settings taken from a harvested dataset's manifest when not given: the same text, windows
and excluded tokens as the activations the SAE was trained on."""

CORPUS_SETTINGS = ("corpus", "corpus_config", "corpus_split", "text_column")
"""These travel together: a corpus given explicitly takes none of them from the manifest."""


def resolve_config(data_spec: str | None, **given: Any) -> tuple[SpliceConfig, list[str]]:
    """The SpliceConfig for `raysae eval --data DATA_SPEC`, and lines saying where values came from.

    `given`: SpliceConfig fields from the command line, None where not given. When DATA_SPEC is
    a harvested dataset (not `toy:…`), its manifest supplies the model, revision and layer,
    and the FROM_HARVEST settings.
    """
    given = {k: v for k, v in given.items() if v is not None}
    defaults: dict[str, Any] = {}
    manifest = _harvest_manifest(data_spec)
    if manifest is not None:
        if given.get("model", manifest.model) == manifest.model:
            defaults.update(model=manifest.model, revision=manifest.revision)
        defaults["layer"] = manifest.layer
        skip = CORPUS_SETTINGS if "corpus" in given else ()
        defaults.update(
            {
                k: manifest.harvest[k]
                for k in FROM_HARVEST
                if k in manifest.harvest and k not in skip
            }
        )
    missing = [k for k in ("model", "layer") if k not in given and k not in defaults]
    if missing:
        where = (
            f"--data {data_spec} is not a dataset harvested from a model"
            if data_spec
            else "no dataset was given"
        )
        raise ConfigError(
            f"the splice evaluation needs {' and '.join('--' + k for k in missing)}: "
            f"{where}; pass the model and layer the SAE was trained on"
        )
    cfg = SpliceConfig(**{**defaults, **given})
    notes = [
        f"splice: {k} {getattr(cfg, k)} from the manifest of {data_spec}"
        for k in ("model", "layer")
        if k not in given
    ]
    if manifest is not None and cfg.layer != manifest.layer:
        notes.append(
            f"splice: note: {data_spec} was harvested at layer {manifest.layer}, "
            f"the SAE is spliced in at layer {cfg.layer}"
        )
    return cfg, notes


def _harvest_manifest(data_spec: str | None) -> Any:
    """The manifest of a dataset taken from a model (harvested), or None (toy data, none)."""
    if not data_spec or data_spec.startswith("toy:"):
        return None
    from raysae.data import read_manifest

    manifest = read_manifest(data_spec)
    return manifest if manifest.layer is not None else None
