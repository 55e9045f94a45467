"""The manifest: what a dataset holds, written last so that its presence commits the dataset.

Statistics
----------
The manifest keeps float64 *sums* (count, per-dimension sum, sum of squared norms) rather than
means, so statistics of parts, workers or datasets merge by addition; `ActStats` derives
the per-dimension mean and mean squared norm used for input scaling and b_dec initialisation.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from raysae.data import storage
from raysae.data.format import STORAGE_DTYPES, DatasetError, row_bytes

FORMAT_VERSION = 1
"""Version of this layout; readers refuse manifests from a newer one."""

MANIFEST_NAME = "manifest.json"
"""File whose presence commits a dataset."""

_PART_PATTERN = re.compile(r"^part-\d{5,}(-[0-9a-f]+)?\.parquet$")
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, eq=False)
class ActStats:
    """Float64 sums over activation rows; merging two is adding their sums.

    mean = sum / count (d_in,); mean_squared_norm = squared_norm_sum / count.
    """

    count: int
    """Rows summed."""
    sum: np.ndarray = field(repr=False)
    """Per-dimension sum of activations, float64 (d_in,)."""
    squared_norm_sum: float
    """Sum over rows of ‖x‖², float64."""

    def __eq__(self, other: object) -> bool:
        """Exact equality of the sums (the dataclass default cannot compare numpy arrays)."""
        if not isinstance(other, ActStats):
            return NotImplemented
        same_scalars = (self.count, self.squared_norm_sum) == (other.count, other.squared_norm_sum)
        return same_scalars and np.array_equal(self.sum, other.sum)

    @classmethod
    def empty(cls, d_in: int) -> ActStats:
        """Statistics of no rows."""
        return cls(0, np.zeros(d_in, dtype=np.float64), 0.0)

    @classmethod
    def of(cls, acts: torch.Tensor, chunk_rows: int = 8192) -> ActStats:
        """Statistics of `acts` (N, d_in), summed in float64 chunk by chunk to bound memory."""
        total = torch.zeros(acts.shape[1], dtype=torch.float64)
        squared = 0.0
        for chunk in acts.split(chunk_rows):
            chunk = chunk.to(device="cpu", dtype=torch.float64)
            total += chunk.sum(0)
            squared += float(chunk.pow(2).sum())
        return cls(int(acts.shape[0]), total.numpy(), squared)

    def merge(self, other: ActStats) -> ActStats:
        """Statistics of the union of both row sets."""
        if self.sum.shape != other.sum.shape:
            raise ValueError(
                f"cannot merge statistics of d_in={self.sum.size} and d_in={other.sum.size}"
            )
        return ActStats(
            self.count + other.count,
            self.sum + other.sum,
            self.squared_norm_sum + other.squared_norm_sum,
        )

    @property
    def mean(self) -> np.ndarray:
        """Per-dimension mean, float64 (d_in,)."""
        return self.sum / max(self.count, 1)

    @property
    def mean_squared_norm(self) -> float:
        """Mean of ‖x‖² over rows."""
        return self.squared_norm_sum / max(self.count, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; Python's float repr round-trips float64 exactly."""
        return {
            "count": self.count,
            "sum": self.sum.tolist(),
            "squared_norm_sum": self.squared_norm_sum,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActStats:
        """Inverse of `to_dict`; unknown or missing keys are an error."""
        _check_keys("stats", data, {"count", "sum", "squared_norm_sum"})
        return cls(
            int(data["count"]),
            np.asarray(data["sum"], dtype=np.float64),
            float(data["squared_norm_sum"]),
        )


@dataclass(frozen=True)
class Part:
    """One Parquet file of a dataset."""

    name: str
    """File name inside the dataset prefix."""
    rows: int
    """Rows (tokens) in the file."""
    bytes: int
    """File size in bytes; a mismatch means a truncated or replaced file."""
    sha256: str | None = None
    """SHA-256 of the file's bytes (hex, as `sha256sum` prints it), computed by the writer from
    the bytes it uploaded. Checked by `raysae verify` (and `open_dataset(verify=True)`), which
    read whole parts; every other read checks `crc32`. None in manifests written before raysae
    recorded hashes (the key is absent): verify then checks the size, footer, page checksums
    (where the part has them) and values, but cannot detect a changed byte that Parquet does not
    checksum (page headers, footer) nor a part replaced by another valid file of the same size
    and row count."""
    crc32: int | None = None
    """CRC-32 of the file's bytes (the zlib/gzip polynomial: `zlib.crc32` gives the same value),
    computed by the writer from the bytes it uploaded and checked by every read, which reads the
    whole part (`raysae.data.dataset`). It covers every byte, page headers and footer included;
    unlike SHA-256 it can be computed, hardware-accelerated, as the bytes arrive: 1-2 ms per
    64 MiB part (BENCHMARKS.md). None in manifests written before raysae recorded it (the
    key is absent): reads of those parts check their Parquet page checksums instead (where they
    have them), which leaves page headers and the footer unchecked and cost 22-33 %."""

    def __post_init__(self) -> None:
        _check_type("manifest part name", self.name, str)
        for what, value in (("rows", self.rows), ("bytes", self.bytes)):
            _check_type(f"manifest part {self.name} {what}", value, int)
            if value < 0:
                raise DatasetError(f"manifest part {self.name} {what}={value}: must be >= 0")
        if self.sha256 is not None and not (
            isinstance(self.sha256, str) and _SHA256_PATTERN.match(self.sha256)
        ):
            raise DatasetError(
                f"manifest part {self.name} sha256={self.sha256!r}: expected 64 hex digits"
            )
        if self.crc32 is not None:
            _check_type(f"manifest part {self.name} crc32", self.crc32, int)
            if not 0 <= self.crc32 < 2**32:
                raise DatasetError(
                    f"manifest part {self.name} crc32={self.crc32}: expected 0 <= crc32 < 2**32"
                )


@dataclass(frozen=True)
class Manifest:
    """What a dataset holds; validated on construction, serialised as `manifest.json`."""

    model: str
    """Model the activations came from (hub id or local path), or a label for toy data."""
    revision: str | None
    """Model revision (hub commit or tag); None for local files."""
    hook: str
    """Where in the model: TransformerLens-style name, e.g. `blocks.3.hook_resid_post`."""
    layer: int | None
    """Block index the activations follow, or None for data not taken from a model."""
    d_in: int
    """Width of each activation vector."""
    dtype: str
    """Stored dtype: float16, bfloat16 or float32."""
    n_tokens: int
    """Total rows; equals the sum of `parts[*].rows`."""
    parts: tuple[Part, ...]
    """The Parquet files, in write order."""
    stats: ActStats
    """Float64 running sums over all rows."""
    harvest: dict[str, Any]
    """Settings that produced the data (free-form, JSON-serialisable; never credentials)."""
    format_version: int = FORMAT_VERSION
    """Layout version (see FORMAT_VERSION)."""

    def __post_init__(self) -> None:
        for name, types in _MANIFEST_TYPES.items():
            _check_type(f"manifest {name}", getattr(self, name), types)
        if self.format_version != FORMAT_VERSION:
            raise DatasetError(
                f"manifest format_version={self.format_version}, this raysae reads {FORMAT_VERSION}: "
                "upgrade raysae or re-harvest"
            )
        if self.dtype not in STORAGE_DTYPES:
            raise DatasetError(
                f"manifest dtype={self.dtype!r}: expected one of {sorted(STORAGE_DTYPES)}"
            )
        if self.d_in <= 0:
            raise DatasetError(f"manifest d_in={self.d_in}: must be positive")
        names = [part.name for part in self.parts]
        bad = [name for name in names if not _PART_PATTERN.match(name)]
        if bad or len(set(names)) != len(names):
            raise DatasetError(f"manifest part names invalid or repeated: {bad or names}")
        listed = sum(part.rows for part in self.parts)
        if listed != self.n_tokens or self.stats.count != self.n_tokens:
            raise DatasetError(
                f"manifest row counts disagree: n_tokens={self.n_tokens}, parts sum to {listed}, "
                f"stats count {self.stats.count}; the manifest is corrupt — re-harvest"
            )
        if self.stats.sum.shape != (self.d_in,):
            raise DatasetError(
                f"manifest stats.sum has {self.stats.sum.size} values, d_in={self.d_in}"
            )

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored activation vector."""
        return row_bytes(self.d_in, self.dtype)

    def to_json(self) -> str:
        """The manifest as JSON text."""
        data = asdict(self)
        data["parts"] = [asdict(part) for part in self.parts]
        data["stats"] = self.stats.to_dict()
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and validate manifest JSON; unknown or missing keys are an error."""
        data = json.loads(text)
        _check_keys("manifest", data, {f.name for f in fields(cls)})
        parts = []
        if not isinstance(data["parts"], list):
            raise DatasetError(f"manifest parts must be a list, got {type(data['parts']).__name__}")
        for part in data["parts"]:
            _check_keys(
                "manifest part", part, {"name", "rows", "bytes"}, optional={"sha256", "crc32"}
            )
            parts.append(Part(**part))
        return cls(**{**data, "parts": tuple(parts), "stats": ActStats.from_dict(data["stats"])})


_MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "model": str,
    "revision": (str, type(None)),
    "hook": str,
    "layer": (int, type(None)),
    "d_in": int,
    "dtype": str,
    "n_tokens": int,
    "parts": tuple,
    "harvest": dict,
    "format_version": int,
}
"""The JSON types of the manifest's scalar fields (`stats` is checked by ActStats.from_dict)."""


def _check_type(what: str, value: Any, types: type | tuple[type, ...]) -> None:
    """Raise DatasetError unless `value` is of `types` (a bool is no int here: JSON tells them
    apart, and `true` for a row count is a corrupt manifest, not 1)."""
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise DatasetError(f"{what} is {value!r}, expected {expected}")


def _check_keys(
    what: str, data: Any, expected: set[str], *, optional: frozenset[str] | set[str] = frozenset()
) -> None:
    """Raise DatasetError unless `data` is a dict with the `expected` keys, and perhaps some of
    the `optional` ones, and no others."""
    if not isinstance(data, dict):
        raise DatasetError(f"{what} must be a JSON object, got {type(data).__name__}")
    unknown, missing = set(data) - expected - set(optional), expected - set(data)
    if unknown or missing:
        raise DatasetError(
            f"{what}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}"
        )


def read_manifest(uri: str) -> Manifest:
    """The manifest of the dataset at `uri`, parsed and validated (parts are not checked)."""
    path = storage.join(uri, MANIFEST_NAME)
    try:
        content = storage.read_bytes(path)
    except FileNotFoundError:
        raise DatasetError(
            f"no {MANIFEST_NAME} at {uri}: not a raysae dataset, or its harvest did not finish"
        ) from None
    try:
        return Manifest.from_json(content.decode())
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err}); the manifest is corrupt") from err
    except (ValueError, TypeError) as err:  # JSON syntax, field types, DatasetError
        raise DatasetError(f"{path}: {err}") from err
