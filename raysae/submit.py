"""`raysae submit`: run a sweep on a remote Ray cluster as a Ray Job, and ask about it.

The current directory is uploaded as the job's working dir (raysae's source included, so the
cluster runs the code you have), minus local data, outputs and environments.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

UPLOAD_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "data",
    "out",
    "runs",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".hypothesis",
    "*.parquet",
    "*.safetensors",
]
"""Left out of the uploaded working dir."""


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConnectionError(
            f"cannot reach a Ray cluster's dashboard at {address} ({e}); "
            "check the address (http://HEAD:8265) and that the dashboard runs"
        ) from None


AGENT_WAIT_S = 60
"""How long to retry while a freshly started head's job agent is not up yet."""


def submit(spec: str, address: str, resume: bool = False, working_dir: str = ".") -> str:
    """Submit `raysae sweep SPEC` (validated locally first); returns the job id."""
    from raysae.sweep_spec import load_sweep_spec

    load_sweep_spec(spec)  # a bad spec fails here, not minutes later on the cluster
    try:
        relative = Path(spec).resolve().relative_to(Path(working_dir).resolve())
    except ValueError:
        raise ValueError(
            f"spec {spec} is outside the uploaded directory {Path(working_dir).resolve()}; "
            "run raysae submit from a directory that contains it"
        ) from None
    entrypoint = f"python -m raysae sweep {shlex.quote(str(relative))}"
    if resume:
        entrypoint += " --resume"
    client = _client(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint,
                runtime_env={"working_dir": working_dir, "excludes": UPLOAD_EXCLUDES},
            )
        except RuntimeError as e:  # a head that just started answers 500 until its agent is up
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def status(address: str, job_id: str) -> str:
    """The job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return str(_client(address).get_job_status(job_id).value)


def logs(address: str, job_id: str) -> str:
    """Everything the job has printed so far."""
    return _client(address).get_job_logs(job_id)
