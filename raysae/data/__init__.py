"""The data plane: activation datasets, the contract between harvest, readers and training.

A dataset is a prefix (local directory or `s3://bucket/prefix`) holding Parquet parts and a
`manifest.json` written last. The manifest's presence is the commit: parts without a
manifest are an unfinished or failed write, and readers refuse them.

Layout::

    <prefix>/part-00000-<write_id>.parquet   one file per ~64 MiB of activations
    <prefix>/part-00001-<write_id>.parquet
    <prefix>/manifest.json                   written last; lists the parts

Part names carry a random `write_id` (as Spark's `part-00000-<uuid>` do) so that a new
write into a prefix never touches the files of the dataset already committed there.

Columns, one row per token:

    act       fixed_size_binary(d_in · itemsize)  the activation vector's raw bytes
    token_id  int32                               vocabulary id of the token
    doc_id    int64                               source document
    pos       int32                               token index within its document

Modules (lowest first)::

    storage.py   local directories and s3:// behind one pyarrow filesystem interface
    format.py    the part's columns and the act codec (bytes ⇄ tensors), DatasetError
    manifest.py  ActStats, Part, Manifest; reading manifest.json
    writer.py    DatasetWriter, write_dataset, commit_dataset (parts first, manifest last)
    dataset.py   Dataset: a committed dataset opened and validated once; the pyarrow reader
    stream.py    the same Dataset as a Ray Data stream for Ray Train workers (imports Ray)

Everything but `stream` is importable from here: `from raysae import data`.
"""

from raysae.data.dataset import (
    Dataset,
    iter_batches,
    open_dataset,
    read_part,
    verify_part,
)
from raysae.data.format import (
    COLUMNS,
    DTYPE_KEY,
    PART_BYTES,
    STORAGE_DTYPES,
    BadDataError,
    DatasetError,
    Rebatcher,
    check_act_type,
    check_finite,
    collate,
    decode_act,
    default_rows_per_part,
    encode_act,
    row_bytes,
    shard_schema,
    shard_table,
    stored_dtype,
)
from raysae.data.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ActStats,
    Manifest,
    Part,
    read_manifest,
)
from raysae.data.paired import MisalignedError, PairedDataset, open_paired
from raysae.data.writer import (
    DatasetWriter,
    commit_dataset,
    new_write_id,
    part_name,
    prepare_prefix,
    write_dataset,
    write_part,
)

__all__ = [
    "COLUMNS",
    "DTYPE_KEY",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PART_BYTES",
    "STORAGE_DTYPES",
    "ActStats",
    "Dataset",
    "BadDataError",
    "DatasetError",
    "DatasetWriter",
    "Manifest",
    "Part",
    "Rebatcher",
    "check_act_type",
    "check_finite",
    "collate",
    "commit_dataset",
    "decode_act",
    "default_rows_per_part",
    "encode_act",
    "iter_batches",
    "new_write_id",
    "open_dataset",
    "part_name",
    "prepare_prefix",
    "read_manifest",
    "read_part",
    "row_bytes",
    "shard_schema",
    "shard_table",
    "stored_dtype",
    "verify_part",
    "MisalignedError",
    "PairedDataset",
    "open_data",
    "open_paired",
    "write_dataset",
    "write_part",
]


def open_data(location: str) -> Dataset:
    """`open_dataset(location)`, or `open_paired` of the datasets that a `DataConfig.dataset`
    joins with " + " (data.sources)."""
    if " + " in location:
        return open_paired(location.split(" + "))
    return open_dataset(location)
