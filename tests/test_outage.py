"""Storage faults: the S3 store going away for a while is waited out (request retries) or
resumed from (Ray Train restarts); past the retry budget the error says the store is
unreachable, never that the data is corrupt.

The outage is a TCP proxy in front of the session's moto server (tests/tcp_proxy.py), cut and
restored by the test: the server itself keeps running, as a real store would.
"""

from __future__ import annotations

import pickle
import re
import threading
import time

import pytest
import yaml
from tcp_proxy import TcpProxy

from raysae import data
from raysae.__main__ import main
from raysae.config import ToyDataConfig
from raysae.data import storage
from raysae.synthetic import ToyData

D_IN = 16


@pytest.fixture
def proxy(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """A proxy in front of the moto server; this process's S3 requests go through it."""
    host, port = s3_endpoint.removeprefix("http://").split(":")
    with TcpProxy((host, int(port))) as proxy:
        proxy.endpoint = f"http://127.0.0.1:{proxy.port}"
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        yield proxy


def _small_dataset(uri: str) -> data.Dataset:
    x, _ = ToyData(ToyDataConfig(n_features=32, active_per_token=2, seed=1), D_IN).sample(3000)
    data.write_dataset(uri, x, dtype="float32", rows_per_part=1000, model="toy")
    return data.open_dataset(uri)


def _read_all(dataset: data.Dataset) -> list:
    return [table for part in dataset.parts for table in dataset.read_part(part, columns=("act",))]


@pytest.mark.timeout(60)
def test_outage_past_the_retry_budget_is_reported_as_unreachable(
    proxy, s3_prefix: str, tmp_path, monkeypatch, capsys
) -> None:
    uri = storage.join(s3_prefix, "acts")
    dataset = _small_dataset(uri)
    assert dataset.endpoint == proxy.endpoint  # the value carries the store it was opened from
    monkeypatch.setenv(storage.MAX_ATTEMPTS_ENV, "4")  # ~0.35 s of retries
    proxy.cut()

    def unreachable(uri: str):
        return pytest.raises(
            storage.StoreUnreachableError,
            match=rf"{re.escape(uri)}\S*: the S3 endpoint {re.escape(proxy.endpoint)} is "
            r"unreachable .*4 attempts.*not a credentials or data problem",
        )

    start = time.monotonic()
    # Reading rows of a part opened before the cut: this said "truncated or corrupt … re-harvest".
    with unreachable(storage.join(uri, dataset.parts[0].name)):
        _read_all(dataset)
    with unreachable(storage.join(uri, "manifest.json")):
        data.open_dataset(uri)
    with unreachable(storage.join(s3_prefix, "out", ".raysae-probe")):
        storage.check_writable(storage.join(s3_prefix, "out"))
    assert time.monotonic() - start < 15

    # The command: one message naming the endpoint, exit 2, no traceback.
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sae": {"architecture": "topk", "d_in": D_IN, "n_latents": 32, "k": 2},
                "train": {"total_tokens": 2000, "batch_size": 500, "init_tokens": 500},
                "data": {"uri": uri},
            }
        )
    )
    capsys.readouterr()
    assert main(["train", str(config), "--local", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raysae train: error: cannot read ") and err.count("\n") == 1, err
    assert f"the S3 endpoint {proxy.endpoint} is unreachable" in err
    assert "not a credentials or data problem" in err
    assert "corrupt" not in err and "re-harvest" not in err and "Traceback" not in err

    proxy.restore()
    assert len(_read_all(dataset)) == len(dataset.parts)  # the same value reads again


@pytest.mark.timeout(60)
def test_a_short_outage_is_waited_out_by_the_request_retries(proxy, s3_prefix: str) -> None:
    dataset = _small_dataset(storage.join(s3_prefix, "acts"))
    expected = _read_all(dataset)
    proxy.cut()
    threading.Timer(1.5, proxy.restore).start()
    start = time.monotonic()
    assert _read_all(dataset) == expected  # the default budget (~100 s) outlasts the outage
    assert time.monotonic() - start > 1.4  # it did wait for the store


def test_s3_filesystem_keeps_its_retries_when_pickled(s3_endpoint: str, monkeypatch) -> None:
    """pyarrow drops retry_strategy when pickling; the copies Ray sends to its workers
    (storage_filesystem, checkpoints) are this process's cached filesystem instead."""
    monkeypatch.setenv(storage.MAX_ATTEMPTS_ENV, "5")
    filesystem = storage.locate("s3://raysae-test/x").filesystem
    copy = pickle.loads(pickle.dumps(filesystem))
    assert copy is filesystem
    monkeypatch.setenv(storage.MAX_ATTEMPTS_ENV, "6")  # a process with another budget
    other = pickle.loads(pickle.dumps(filesystem))
    assert other is storage.locate("s3://raysae-test/x").filesystem and other is not filesystem


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_bad_retry_budget_is_named(value: str, monkeypatch) -> None:
    monkeypatch.setenv(storage.MAX_ATTEMPTS_ENV, value)
    with pytest.raises(storage.StorageError, match=f"RAYSAE_S3_MAX_ATTEMPTS='{value}'"):
        storage.locate("s3://raysae-test/x")
