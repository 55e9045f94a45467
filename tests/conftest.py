"""Shared fixtures. Ray and the S3 server are started once per session (conftest_data.py):
Ray takes ~10 s to start on 2 cores."""

import os

import pytest
import torch

from conftest_data import ray_cluster, s3_endpoint, s3_prefix, smollm2_gguf, tiny_model_dir  # noqa: F401

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def seeded():
    torch.manual_seed(0)
