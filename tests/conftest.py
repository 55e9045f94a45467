"""Shared fixtures and Hypothesis profiles. Keep Ray to one instance per session (it takes ~10 s
to start on 2 cores).

Hypothesis profiles (HYPOTHESIS_PROFILE=name picks one; otherwise `ci` when the CI variable is
set, as Hypothesis itself does, else `dev`):
  dev   quick local runs: few examples, failures replayed from the local example database
  ci    Hypothesis's own `ci` profile (derandomized, no database, no deadline, prints the
        reproduction blob) with fewer examples, so the whole suite stays within a few minutes
  deep  many examples and long stateful runs, for hunting bugs before a release
"""

import os

import pytest
import torch
from conftest_data import (  # noqa: F401
    ray_cluster,
    s3_endpoint,
    s3_prefix,
    s3_requests,
    small_disk,
    smollm2_gguf,
    tiny_model_dir,
)
from hypothesis import HealthCheck, settings

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

settings.register_profile("dev", max_examples=20, deadline=None)
settings.register_profile("ci", parent=settings.get_profile("ci"), max_examples=30)
settings.register_profile(
    "deep",
    max_examples=1000,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
in_ci = settings.get_current_profile_name() == "ci"  # Hypothesis loaded its own when CI is set
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if in_ci else "dev"))


@pytest.fixture
def seeded():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Toy-sized matmuls run fastest on one thread: with more, OpenMP's synchronisation costs
    more than the work, many times more on a loaded machine (measured here: 0.2 s against
    6 ms per step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
