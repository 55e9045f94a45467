"""Shared test fixtures. The data-plane fixtures live in conftest_data.py."""

from conftest_data import ray_cluster, s3_endpoint, s3_prefix, smollm2_gguf, tiny_model_dir  # noqa: F401
