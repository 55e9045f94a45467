"""raysae.data.storage: one code path for local directories and S3."""

from __future__ import annotations

import os
import socket
import time

import pytest

from raysae.data import storage


@pytest.fixture(params=["local", "s3"])
def prefix(request: pytest.FixtureRequest, tmp_path) -> str:
    """The same tests against a local directory and the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "prefix")
    return request.getfixturevalue("s3_prefix")


def test_write_read_list_delete(prefix: str) -> None:
    uri = storage.join(prefix, "a.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"first")
    storage.write_bytes(uri, b"second")  # replaces
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"second"
    assert storage.list_files(prefix) == {"a.bin": 6}
    storage.delete(uri)
    storage.delete(uri)  # deleting what is gone is fine
    assert storage.list_files(prefix) == {}


def test_upload_and_download_directories(prefix: str, tmp_path) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.json").write_text("{}")
    (source / "sub" / "b.bin").write_bytes(b"123")
    storage.upload_dir(source, storage.join(prefix, "tree"))
    assert storage.read_bytes(storage.join(prefix, "tree", "sub", "b.bin")) == b"123"
    storage.download_dir(storage.join(prefix, "tree"), tmp_path / "back")
    assert (tmp_path / "back" / "a.json").read_text() == "{}"
    assert (tmp_path / "back" / "sub" / "b.bin").read_bytes() == b"123"


def test_missing_file_raises_file_not_found(prefix: str) -> None:
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(prefix, "nope"))
    assert storage.list_files(storage.join(prefix, "no-such-dir")) == {}


def test_local_write_leaves_no_temporary_file(tmp_path) -> None:
    storage.write_bytes(str(tmp_path / "x"), b"data")
    assert os.listdir(tmp_path) == ["x"]


def test_file_uri_and_relative_paths_are_local(tmp_path) -> None:
    storage.write_bytes(f"file://{tmp_path}/y", b"1")
    fs, path = storage.filesystem_and_path(str(tmp_path / "y"))
    assert path == str(tmp_path / "y") and fs.type_name == "local"


def test_unsupported_scheme_is_named() -> None:
    with pytest.raises(storage.StorageError, match="gs://bucket/x"):
        storage.locate("gs://bucket/x")


def test_endpoint_comes_from_environment(s3_endpoint: str) -> None:
    location = storage.locate("s3://raysae-test/x")
    assert location.endpoint == s3_endpoint
    assert location.filesystem.type_name == "s3"


def test_explicit_endpoint_wins(s3_endpoint: str) -> None:
    assert (
        storage.locate("s3://b/x", endpoint="http://127.0.0.1:9").endpoint == "http://127.0.0.1:9"
    )


@pytest.mark.timeout(30)
def test_unreachable_endpoint_fails_within_its_retry_budget_naming_it(monkeypatch) -> None:
    monkeypatch.setenv(storage.MAX_ATTEMPTS_ENV, "5")  # ~0.75 s of retries (default ~100 s)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(storage.StoreUnreachableError, match=f"S3 endpoint {endpoint} is unreach"):
        storage.read_bytes("s3://raysae-test/x/manifest.json", endpoint=endpoint)
    assert 0.7 < time.monotonic() - start < 5  # it retried, then gave up


def test_bucketless_s3_uri_is_rejected() -> None:
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.locate("s3://")


def test_upload_puts_commit_markers_last(s3_prefix: str, s3_requests, tmp_path) -> None:
    """A reader takes a dataset as committed once manifest.json exists (an SAE folder once its
    config.json does), so upload_dir PUTs those after every other file. Both names sort before
    their neighbours here: an upload in name order (or any order) would not pass."""
    from raysae.checkpoint import CONFIG
    from raysae.data import MANIFEST_NAME

    assert set(storage.COMMIT_MARKERS) == {MANIFEST_NAME, CONFIG}
    source = tmp_path / "dataset"
    (source / "sae").mkdir(parents=True)
    for name in ["a.parquet", MANIFEST_NAME, "part-0.parquet", "part-1.parquet", "z.parquet"]:
        (source / name).write_bytes(name.encode())
    (source / "sae" / CONFIG).write_text("{}")
    (source / "sae" / "sae.safetensors").write_bytes(b"weights")
    start = len(s3_requests.requests)
    storage.upload_dir(source, storage.join(s3_prefix, "up"))

    key = s3_prefix.removeprefix("s3://") + "/up/"
    puts = [p.split(key, 1)[1] for m, p, _ in s3_requests.since(start) if m == "PUT" and key in p]
    assert sorted(puts) == sorted(
        str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()
    )
    assert set(puts[-2:]) == {MANIFEST_NAME, f"sae/{CONFIG}"}, puts
    assert storage.read_bytes(storage.join(s3_prefix, "up", "sae", CONFIG)) == b"{}"
