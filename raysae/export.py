"""`raysae export`: an SAE, or a finished sweep's Pareto frontier, as folders other tools load.

    raysae export CHECKPOINT OUT [--format raysae|saelens] [--data DATASET] [--overwrite]
    raysae export --sweep OUT/NAME --frontier DEST [--overall] [--format ...] [--overwrite]

CHECKPOINT is a raysae SAE folder (OUT/sae of `raysae train`, trials/…/sae of a sweep, or a
member folder of a training checkpoint) or an SAELens one. `--format raysae` (the default for
one checkpoint) writes raysae's own format (`raysae.checkpoint.save_sae`), `--format saelens`
(the default for a frontier) SAELens's (`raysae.saelens`); either way the input scale is
folded in, and OUT holds the SAE's files directly, so `sae_lens.SAE.load_from_disk(OUT)` or
`raysae.checkpoint.load_sae(OUT)` reads it.

Decisions:

- What the SAE was trained on fills SAELens's metadata (model, hook, context size, dataset;
  `raysae.saelens.metadata_for`): the dataset given with `--data`, else data.uri of the run's
  config in the metrics.json next to the checkpoint (where `raysae train` and `raysae sweep`
  write it). An unreadable dataset (moved, deleted, an S3 endpoint that does not answer) is
  said once and its fields are left out, never guessed. An SAELens checkpoint keeps the
  metadata it has.
- OUT is written as a whole: into a temporary sibling folder, which then takes OUT's place,
  so a failed export leaves no half-written folder. A non-empty OUT is refused unless
  `--overwrite`, and even then only when it is an earlier export (an SAE folder of either
  format, or a frontier with its index), so a mistyped OUT never deletes other files; nor
  may OUT be the checkpoint or hold it.
- The frontier is the sweep's own: the `pareto` column (each architecture's frontier;
  `--overall`: `pareto_all`, over all architectures) that `raysae.report.with_frontiers`
  wrote into results.parquet (results.csv if that is all there is), recomputed by the same
  function only for a table without it. Each frontier SAE gets a folder
  `<architecture>-<trial>-m<member>` and a row in index.json and index.csv (folder,
  architecture, L0, FVU, trial, ...). A row's checkpoint is looked up where results.csv
  says and, for a sweep folder copied from elsewhere (`aws s3 sync`), at the same path
  under `--sweep`. An ASHA-stopped point on the frontier has no final SAE: its last
  training checkpoint (`<checkpoint>/m<member>`) is exported, and its row says
  `status: early_stopped` (its L0 and FVU are from training, not held out).
- SAELens has no loader for a local folder of several SAEs: `SAE.load_from_disk` reads one
  folder, `SAE.from_pretrained(repo_id, sae_id)` reads `<sae_id>/cfg.json` and
  `<sae_id>/sae_weights.safetensors` from a Hugging Face repo that is not in its registry.
  A frontier folder is laid out so, one SAE per sub-folder: load each with
  `load_from_disk(DEST/<folder>)`, or upload DEST as a repo and use `from_pretrained(repo,
  "<folder>")`.

Imports no Ray.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from raysae import saelens
from raysae.checkpoint import CONFIG, WEIGHTS, load_sae, read_checkpoint_config, save_sae
from raysae.saes import SparseAutoencoder
from raysae.settings import ConfigError

FORMATS = ("raysae", "saelens")
"""What `--format` writes: raysae's own folder, or SAELens's."""
INDEX_JSON, INDEX_CSV = "index.json", "index.csv"
"""A frontier export's index files (their presence marks DEST as one)."""
INDEX_COLUMNS = [
    "folder",
    "architecture",
    "saelens_architecture",
    "l0",
    "fvu",
    "trial_id",
    "member",
    "status",
    "d_in",
    "n_latents",
    "k",
    "l1_coefficient",
    "l0_coefficient",
    "lr",
    "pareto_all",
    "checkpoint",
]
"""Columns of index.csv (and keys of index.json's `saes` entries), in order."""


class ExportError(ValueError):
    """An export cannot be done as asked; the message says why and what to do."""


@dataclass
class Source:
    """An SAE to export, and what is known about it."""

    model: SparseAutoencoder
    """The SAE, as stored (its input scale not yet folded)."""
    saelens_cfg: Optional[dict]
    """The cfg.json of an SAELens checkpoint; None for a raysae one."""
    metadata: dict
    """A raysae checkpoint's config.json metadata (tokens, held-out eval); {} for SAELens."""


def read_source(checkpoint: str | os.PathLike) -> Source:
    """The SAE in `checkpoint`: a raysae folder (config.json) or an SAELens one (cfg.json)."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint}: no such folder")
    if not (path / CONFIG).exists() and saelens.is_saelens_dir(path):
        cfg, tensors = saelens.read_saelens_files(path)
        return Source(saelens.from_saelens(cfg, tensors, where=str(path)), cfg, {})
    model = load_sae(path)
    return Source(model, None, read_checkpoint_config(path).get("metadata") or {})


# ---------------------------------------------------------------- what it was trained on


def run_dataset(checkpoint: str | os.PathLike) -> tuple[Optional[str], str]:
    """(data.uri of the run that wrote `checkpoint`, where that came from) from the
    metrics.json next to it; (None, why) when there is none or the run used toy data."""
    path = Path(checkpoint).parent / "metrics.json"
    if not path.exists():
        return None, f"no {path} next to the checkpoint"
    try:
        data = json.loads(path.read_text())["config"]["data"]
    except (ValueError, KeyError, TypeError) as e:
        return None, f"{path} has no readable data config ({e})"
    if data.get("uri"):
        return str(data["uri"]), f"data.uri in {path}"
    return None, f"{path}: the SAE was trained on toy data (no model, no hook)"


def read_dataset_manifest(uri: str):
    """The manifest (raysae.data.Manifest) of the dataset at `uri`, or a DatasetError /
    OSError saying why it cannot be read."""
    from raysae.data import storage
    from raysae.data.manifest import read_manifest

    storage.check_reachable(uri)  # a dead endpoint fails in seconds, not after ~100 s
    return read_manifest(uri)


class _Datasets:
    """The manifests of the datasets SAEs were trained on, each read once, and the notes to
    print about those that could not be read."""

    def __init__(self, given: Optional[str], log: Callable[[str], None]):
        self.given, self.log = given, log
        self.manifests: dict[str, Any] = {}
        if given is not None:  # the user asked for it: unreadable is an error
            self.manifests[given] = read_dataset_manifest(given)

    def for_checkpoint(self, checkpoint: str | os.PathLike, model: SparseAutoencoder):
        """(dataset uri or None, its manifest or None) for an SAE at `checkpoint`."""
        if self.given is not None:
            uri = self.given
        else:
            uri, source = run_dataset(checkpoint)
            if uri is None:
                self.log(f"{checkpoint}: dataset unknown ({source}); pass --data DATASET")
                return None, None
            if uri not in self.manifests:
                try:
                    self.manifests[uri] = read_dataset_manifest(uri)
                except (OSError, ValueError) as e:
                    self.manifests[uri] = None
                    self.log(
                        f"dataset {uri} ({source}) cannot be read ({e}); its model, hook and "
                        "context fields are left out. Pass --data DATASET to give them"
                    )
        manifest = self.manifests[uri]
        if manifest is not None and manifest.d_in != model.cfg.d_in:
            raise ExportError(
                f"dataset {uri} has d_in={manifest.d_in} but the SAE at {checkpoint} has "
                f"d_in={model.cfg.d_in}: it was not trained on it; pass the dataset it was "
                "trained on with --data"
            )
        return uri, manifest


# ---------------------------------------------------------------- writing one SAE


def _saelens_metadata(source: Source, checkpoint, uri, manifest) -> dict:
    """cfg.json metadata for `source`: an SAELens source's own, else from the dataset."""
    if source.saelens_cfg is not None:
        meta = source.saelens_cfg.get("metadata")
        return dict(meta) if isinstance(meta, dict) else {}
    ours: dict[str, Any] = {
        "architecture": source.model.cfg.architecture,
        "checkpoint": str(Path(checkpoint).resolve()),
    }
    if uri is not None:
        ours["dataset"] = uri
    for key in ("tokens", "eval"):
        if key in source.metadata:
            ours[key] = source.metadata[key]
    return saelens.metadata_for(manifest, raysae=ours)


def _write(source: Source, checkpoint, folder: Path, fmt: str, uri, manifest) -> None:
    """Write `source` into `folder` in `fmt`, its input scale folded."""
    if fmt == "saelens":
        cfg, tensors = saelens.to_saelens(
            source.model, _saelens_metadata(source, checkpoint, uri, manifest)
        )
        if source.saelens_cfg is not None:  # SAELens-side settings raysae does not use
            cfg["reshape_activations"] = source.saelens_cfg.get("reshape_activations", "none")
        saelens.write_saelens_files(cfg, tensors, folder)
        return
    model = source.model
    model.fold_input_scale_()
    metadata = dict(source.metadata)
    if source.saelens_cfg is not None:
        metadata["saelens"] = source.saelens_cfg  # where it came from, kept whole
    elif uri is not None:
        metadata["dataset"] = uri
    save_sae(model, folder, metadata=metadata)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fmt: str = "raysae",
    data: Optional[str] = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the SAE at `checkpoint` to the folder `out` in `fmt` (see the module docstring)."""
    _check_format(fmt)
    out = Path(out)
    _check_out(out, [Path(checkpoint)], overwrite)
    source = read_source(checkpoint)
    if fmt == "saelens":
        saelens.saelens_architecture(source.model.cfg.architecture)  # before any writing
    uri, manifest = (None, None)
    if source.saelens_cfg is None:
        uri, manifest = _Datasets(data, log).for_checkpoint(checkpoint, source.model)
    elif data is not None:
        log(f"--data {data} ignored: {checkpoint} is an SAELens SAE and keeps its metadata")
    with _replacing(out) as tmp:
        _write(source, checkpoint, tmp, fmt, uri, manifest)
    log(f"wrote {source.model.cfg.architecture} SAE {checkpoint} as {fmt} to {out}")
    return out


# ---------------------------------------------------------------- a sweep's frontier


def read_results(sweep_dir: str | os.PathLike):
    """A sweep's results table (pandas), its frontier columns present."""
    import pandas as pd

    from raysae import report

    sweep_dir = Path(sweep_dir)
    parquet, csv = sweep_dir / "results.parquet", sweep_dir / "results.csv"
    if parquet.exists():
        table = pd.read_parquet(parquet)
    elif csv.exists():
        table = pd.read_csv(csv)
    else:
        raise FileNotFoundError(
            f"--sweep {sweep_dir}: no results.parquet or results.csv there; give the "
            "folder of a finished sweep (OUTPUT/NAME of its spec)"
        )
    if "pareto" not in table or "pareto_all" not in table:
        table = report.with_frontiers(table)
    return table


def frontier_rows(table, overall: bool = False) -> list[dict]:
    """The rows of `table` on its frontier (each architecture's, or `overall`), ordered by
    architecture then L0 as report.frontier_table orders them, as plain dicts."""
    column = "pareto_all" if overall else "pareto"
    on = table[table[column].astype(bool)].sort_values(["architecture", "l0"])
    return [{k: _plain(v) for k, v in row.items()} for row in on.to_dict("records")]


def _plain(value: Any) -> Any:
    """A JSON-ready scalar: numpy numbers as Python ones, NaN and pandas' NA as None."""
    if hasattr(value, "item"):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value


def locate_checkpoint(row: dict, sweep_dir: Path) -> Path:
    """The SAE folder of a results row: its `checkpoint` (the final SAE of a finished point,
    a training checkpoint's member folder otherwise), or the same path under `sweep_dir`
    for a sweep folder copied from where it ran."""
    where = row.get("checkpoint")
    label = f"trial {row.get('trial_id')} member {row.get('member')} ({row.get('status')})"
    if not where:
        raise ExportError(
            f"{label} is on the frontier but results.csv names no checkpoint for it "
            "(it stopped before its first checkpoint); re-run the sweep with --resume "
            "or export without it"
        )
    member = None if row.get("status") == "finished" else f"m{int(row.get('member') or 0)}"
    candidates = [Path(where)]
    text = str(where).replace("\\", "/")
    if "/trials/" in text:
        candidates.append(sweep_dir / text[text.index("/trials/") + 1 :])
    for candidate in candidates:
        folder = candidate / member if member else candidate
        if (folder / CONFIG).exists():
            return folder
    raise ExportError(
        f"{label}: no SAE at {where}{'/' + member if member else ''} nor under {sweep_dir}; "
        "copy the sweep's trials/ folder there (aws s3 sync OUT/NAME/ ... for an S3 sweep)"
    )


def folder_name(row: dict) -> str:
    """`<architecture>-<trial id>-m<member>`, with any character unsafe in a path as `_`."""
    name = f"{row['architecture']}-{row.get('trial_id')}-m{int(row.get('member') or 0)}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def export_frontier(
    sweep_dir: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    fmt: str = "saelens",
    data: Optional[str] = None,
    overall: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Write each SAE on the sweep's frontier to DEST/<folder>/ in `fmt`, and DEST/index.json
    and DEST/index.csv; returns the index rows."""
    _check_format(fmt)
    if str(sweep_dir).startswith("s3://"):
        raise ExportError(
            f"--sweep {sweep_dir}: copy the sweep folder here first (aws s3 sync "
            f"{sweep_dir}/ LOCAL/ --exclude '*checkpoint_*'), then export from LOCAL"
        )
    sweep_dir, dest = Path(sweep_dir), Path(dest)
    rows = frontier_rows(read_results(sweep_dir), overall)
    if not rows:
        raise ExportError(
            f"--sweep {sweep_dir}: no SAE is on the frontier (no finished point has an L0 "
            "and an FVU); nothing to export"
        )
    found = [(row, locate_checkpoint(row, sweep_dir)) for row in rows]
    _check_out(dest, [sweep_dir, *(folder for _, folder in found)], overwrite)
    datasets = _Datasets(data, log)
    index = []
    with _replacing(dest) as tmp:
        for row, checkpoint in found:
            source = read_source(checkpoint)
            architecture = source.model.cfg.architecture
            if fmt == "saelens":
                saelens.saelens_architecture(architecture)
            uri, manifest = datasets.for_checkpoint(checkpoint, source.model)
            name = folder_name(row)
            _write(source, checkpoint, tmp / name, fmt, uri, manifest)
            entry = {**{c: row.get(c) for c in INDEX_COLUMNS}, "folder": name}
            entry.update(
                architecture=architecture,
                saelens_architecture=saelens.TO_SAELENS.get(architecture),
                checkpoint=str(checkpoint),
            )
            index.append(entry)
            log(f"  {name}: L0 {_fmt(entry['l0'])}  FVU {_fmt(entry['fvu'])}")
        body = {
            "sweep": str(sweep_dir.resolve()),
            "frontier": "all architectures" if overall else "each architecture",
            "format": fmt,
            "saes": index,
        }
        (tmp / INDEX_JSON).write_text(json.dumps(body, indent=2))
        _write_csv(tmp / INDEX_CSV, index)
    log(f"wrote the {len(index)} frontier SAE(s) of {sweep_dir} as {fmt} to {dest}")
    return index


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=INDEX_COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4g}"


# ---------------------------------------------------------------- the output folder


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def _is_export(path: Path) -> bool:
    """Whether the folder `path` is what an export writes: an SAE of either format, or a
    frontier (its index files)."""
    names = {p.name for p in path.iterdir()}
    return (
        {CONFIG, WEIGHTS} <= names
        or {saelens.CFG, saelens.WEIGHTS} <= names
        or (INDEX_JSON in names)
    )


def _check_out(out: Path, sources: list[Path], overwrite: bool) -> None:
    """Refuse an output that is not empty (unless `overwrite` and it is an earlier export),
    that is a file, or that is or holds one of the `sources`."""
    resolved = out.resolve()
    for source in sources:
        source = source.resolve()
        if source == resolved or resolved in source.parents:
            raise ExportError(
                f"{out} is or holds {source}, which is being exported; choose another output"
            )
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; choose a folder to export into")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(
                f"{out} is not empty; choose a new or empty folder, or pass --overwrite to "
                "replace an earlier export there"
            )
        if not _is_export(out):
            raise ExportError(
                f"{out} is not empty and is not an earlier export (no SAE or frontier "
                "index in it), so --overwrite does not replace it; choose a new folder"
            )


class _replacing:
    """`with _replacing(out) as tmp:` — write into `tmp`, a new folder beside `out`; on
    success it takes `out`'s place (an earlier `out` is removed), on failure it is removed."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp's 0o700 → a folder like mkdir's
        old = None
        if self.out.exists():
            old = self.out.with_name(self.tmp.name + ".old")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- command line


def export_command(
    checkpoint: Optional[str],
    out: Optional[str],
    *,
    sweep: Optional[str] = None,
    frontier: Optional[str] = None,
    fmt: Optional[str] = None,
    data: Optional[str] = None,
    overall: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> None:
    """`raysae export`: one checkpoint, or with `sweep` and `frontier` a sweep's frontier."""
    if sweep is not None or frontier is not None:
        if sweep is None or frontier is None:
            raise ConfigError(
                "--sweep and --frontier go together: --sweep OUT/NAME --frontier DEST"
            )
        if checkpoint is not None or out is not None:
            raise ConfigError(
                "give either CHECKPOINT OUT or --sweep OUT/NAME --frontier DEST, not both"
            )
        export_frontier(
            sweep,
            frontier,
            fmt=fmt or "saelens",
            data=data,
            overall=overall,
            overwrite=overwrite,
            log=log,
        )
        return
    if overall:
        raise ConfigError("--overall picks a sweep's frontier: use it with --sweep and --frontier")
    if checkpoint is None or out is None:
        raise ConfigError(
            "give the checkpoint and the output folder (raysae export CHECKPOINT OUT), or "
            "--sweep OUT/NAME --frontier DEST"
        )
    export_checkpoint(checkpoint, out, fmt=fmt or "raysae", data=data, overwrite=overwrite, log=log)
