"""No secret is written down (issue 17): the search that proves it, and its own checks.

`find_secrets` looks for secret values in everything a run wrote: local trees (Ray's session
folders, outputs), objects under S3 prefixes, and named blobs (a Ray Job's metadata). It looks
inside what would hide a value from a byte search: gzip files, zip members, and Parquet's
compressed column chunks. tests/test_submit.py runs it over the cluster drill (harvest → sweep →
eval with distinctive fake credentials and a Ray token); the tests here show that it finds a
value wherever one can be, so that its "nothing found" there means something.
"""

from __future__ import annotations

import gzip
import io
import secrets
import string
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def fake_secrets() -> dict[str, str]:
    """Fresh values shaped like the real ones and found nowhere by chance: AWS keys (the
    access key id in AWS's AKIA… form), tracker API keys. Variable name → value."""
    upper = string.ascii_uppercase + "234567"
    mixed = string.ascii_letters + string.digits + "/+"

    def pick(alphabet: str, n: int) -> str:
        return "".join(secrets.choice(alphabet) for _ in range(n))

    return {
        "AWS_ACCESS_KEY_ID": "AKIA" + pick(upper, 16),
        "AWS_SECRET_ACCESS_KEY": pick(mixed, 40),
        "AWS_SESSION_TOKEN": pick(mixed, 64),
        "WANDB_API_KEY": secrets.token_hex(20),
        "MLFLOW_TRACKING_TOKEN": "mlf-" + secrets.token_urlsafe(24),
    }


def _contents(name: str, data: bytes) -> Iterable[tuple[str, bytes]]:
    """(where, bytes) of a file and of what it packs: gzip, zip members, Parquet values."""
    yield name, data
    try:
        if data[:2] == b"\x1f\x8b":
            yield f"{name} (gunzipped)", gzip.decompress(data)
        elif data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for member in archive.namelist():
                    yield from _contents(f"{name}!{member}", archive.read(member))
        elif data[:4] == b"PAR1":
            table = pq.read_table(io.BytesIO(data))
            metadata = table.schema.metadata or {}
            yield f"{name} (values)", repr(table.to_pylist()).encode() + repr(metadata).encode()
    except (OSError, EOFError, zipfile.BadZipFile, pa.ArrowException):
        pass  # not what its first bytes said: the raw bytes were searched


def _s3_objects(prefix: str, endpoint: str) -> Iterable[tuple[str, bytes]]:
    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=endpoint)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            yield f"s3://{bucket}/{obj['Key']}", body


def find_secrets(
    values: Mapping[str, str],
    roots: Iterable[Path] = (),
    s3_prefixes: Iterable[str] = (),
    s3_endpoint: str | None = None,
    blobs: Mapping[str, bytes | str] | None = None,
) -> list[tuple[str, str]]:
    """Sorted (where, secret name) for every place holding a secret's value: each file under
    `roots`, each object under `s3_prefixes`, each of `blobs`."""
    places: list[tuple[str, bytes]] = []
    for path in _files(roots):
        try:
            places.append((str(path), path.read_bytes()))
        except FileNotFoundError:  # a live Ray session rotates and removes files
            pass
    for prefix in s3_prefixes:
        places.extend(_s3_objects(prefix, s3_endpoint))
    for name, blob in (blobs or {}).items():
        places.append((name, blob.encode() if isinstance(blob, str) else blob))
    needles = {name: value.encode() for name, value in values.items()}
    hits = set()
    for name, data in places:
        for where, content in _contents(name, data):
            hits.update((where, secret) for secret, v in needles.items() if v in content)
    return sorted(hits)


def _files(roots: Iterable[Path]) -> list[Path]:
    """Every regular file under `roots`, once, by its real path (Ray's session_latest is a
    link to its session folder)."""
    found = {
        path.resolve()
        for root in roots
        for path in Path(root).rglob("*")
        if path.is_file() and not path.is_symlink()
    }
    return sorted(found)


def count_places(roots: Iterable[Path], s3_prefixes: Iterable[str], s3_endpoint: str) -> str:
    """How much find_secrets searches: 'N local files and M S3 objects'."""
    objects = sum(1 for prefix in s3_prefixes for _ in _s3_objects(prefix, s3_endpoint))
    return f"{len(_files(roots))} local files and {objects} S3 objects"


# ---------------------------------------------------------------- the search finds what is there


def _parquet(value: str) -> bytes:
    sink = io.BytesIO()
    rows = [f"row {i}: {value}" for i in range(100)]  # deflate codes the value's bytes
    pq.write_table(
        pa.table({"note": rows}),
        sink,
        compression="gzip",
        use_dictionary=False,
        write_statistics=False,
    )
    return sink.getvalue()


def test_fake_secrets_are_fresh_and_distinct():
    a, b = fake_secrets(), fake_secrets()
    assert set(a) == set(b) and not set(a.values()) & set(b.values())
    assert a["AWS_ACCESS_KEY_ID"].startswith("AKIA") and len(a["AWS_ACCESS_KEY_ID"]) == 20


def test_finds_a_value_in_files_archives_parquet_and_blobs(tmp_path):
    values = fake_secrets()
    key, secret, wandb = (
        values[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY")
    )
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "raylet.out").write_text(f"env: AWS_ACCESS_KEY_ID={key}\n")
    (tmp_path / "clean.txt").write_text("nothing here " + key[:-1])  # a prefix is no hit
    (tmp_path / "a.gz").write_bytes(gzip.compress(f"x{secret}x".encode() * 50))
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("pkg/settings.py", f"KEY = {wandb!r}\n" * 50)
    (tmp_path / "wd.zip").write_bytes(packed.getvalue())
    (tmp_path / "part-0.parquet").write_bytes(_parquet(secret))
    assert secret.encode() not in _parquet(secret)  # compressed: a byte search alone misses it
    hits = find_secrets(values, [tmp_path], blobs={"job info": f'{{"token": "{wandb}"}}'})
    assert hits == sorted(
        [
            (str(tmp_path / "logs" / "raylet.out"), "AWS_ACCESS_KEY_ID"),
            (f"{tmp_path / 'a.gz'} (gunzipped)", "AWS_SECRET_ACCESS_KEY"),
            (f"{tmp_path / 'wd.zip'}!pkg/settings.py", "WANDB_API_KEY"),
            (f"{tmp_path / 'part-0.parquet'} (values)", "AWS_SECRET_ACCESS_KEY"),
            ("job info", "WANDB_API_KEY"),
        ]
    )


def test_finds_a_value_in_s3_objects(s3_endpoint, s3_prefix):
    values = fake_secrets()
    bucket, _, key = s3_prefix.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.put_object(Bucket=bucket, Key=f"{key}/clean.json", Body=b"{}")
    client.put_object(
        Bucket=bucket, Key=f"{key}/sub/part.parquet", Body=_parquet(values["AWS_SESSION_TOKEN"])
    )
    hits = find_secrets(values, s3_prefixes=[s3_prefix], s3_endpoint=s3_endpoint)
    assert hits == [(f"{s3_prefix}/sub/part.parquet (values)", "AWS_SESSION_TOKEN")]


# ---------------------------------------------------------------- leaks closed in raysae


def test_tune_copies_no_aws_keys_into_trials(monkeypatch):
    """Ray Tune puts the driver's AWS keys in each trial actor's runtime_env, which Ray logs;
    raysae's sweep takes them off Tune's list (raysae.sweep.keep_credentials_out_of_trials)."""
    from ray.tune.execution import class_cache

    from raysae.sweep import TUNE_COPIED_CREDENTIALS, keep_credentials_out_of_trials

    values = fake_secrets()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, values[name])
    # Ray's own list: an earlier sweep in this process has already taken the keys off it.
    restored = class_cache.ENV_VARS_TO_PROPAGATE | TUNE_COPIED_CREDENTIALS
    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", restored)

    def trial_env() -> dict:
        trainable = type("Trainable", (), {})  # a new class: Tune caches one actor class per class
        actor = class_cache._ActorClassCache().get(trainable)
        return actor._default_options["runtime_env"]["env_vars"]

    assert trial_env()["AWS_SECRET_ACCESS_KEY"] == values["AWS_SECRET_ACCESS_KEY"]  # Ray's way
    keep_credentials_out_of_trials()
    env = trial_env()
    assert not set(env) & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    assert env["PL_DISABLE_FORK"] == "1"  # the rest of Tune's list is kept


def test_a_password_in_the_mlflow_uri_is_refused_without_echoing_it():
    from raysae.config import MLflowConfig
    from raysae.settings import ConfigError

    password = fake_secrets()["MLFLOW_TRACKING_TOKEN"]
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD") as refused:
        MLflowConfig(tracking_uri=f"https://me:{password}@mlflow.example.com")
    assert password not in str(refused.value)
    assert MLflowConfig(tracking_uri="https://me@mlflow.example.com").tracking_uri  # no password
