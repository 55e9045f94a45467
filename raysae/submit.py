"""`raysae submit`: run a sweep on a remote Ray cluster as a Ray Job, and ask about it.

The current directory is uploaded as the job's working dir (raysae's source included, so the
cluster runs the code you have), minus local data, outputs, environments and secrets.

Every request carries the cluster's Ray authentication token when one is found (`find_token`:
--token-file, then where Ray itself looks). A refused request ends with `AuthRefusedError`,
whose message says how to get the token; a cluster with authentication off gets a warning on
submit. Nothing is put in the job's environment (no `env_vars`): the cluster's own credentials
(instance profiles, its token) are what the job uses, so no secret of this machine travels.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from raysae.settings import ConfigError

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
    # Secrets a project folder may hold: they would be unpacked on every node of the cluster.
    ".env",
    ".env.*",
    "auth_token",
    "*.pem",
    "*.key",
    ".aws",
    ".netrc",
]
"""Left out of the uploaded working dir."""

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"

HOW_TO_GET_THE_TOKEN = (
    "the cluster's token is in ~/.ray/auth_token on its head: for a cluster.yaml cluster copy it "
    "with `ray rsync-down cluster.yaml /home/ray/.ray/auth_token ~/.ray/raysae-cluster-token` "
    "(elsewhere `ray get-auth-token` on the head prints it), then pass "
    "--token-file ~/.ray/raysae-cluster-token or set RAY_AUTH_TOKEN_PATH to that file "
    "(docs/cluster.md, 'Who can run code on the cluster')"
)


@dataclass(frozen=True)
class Token:
    """A Ray authentication token and where it was found; its repr leaves the value out."""

    value: str = field(repr=False)
    source: str
    """What the user set: '--token-file PATH', 'RAY_AUTH_TOKEN', 'RAY_AUTH_TOKEN_PATH=PATH', or
    the default file."""

    def headers(self) -> dict[str, str]:
        """What Ray's dashboard checks (ray._private.authentication: a bearer token)."""
        return {"Authorization": f"Bearer {self.value}"}


def _read_token(path: str, what: str) -> Optional[str]:
    """The token in `path` as Ray reads one (its first line, whitespace trimmed); None if the
    file is missing or empty. `what` names the setting in errors."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            token = f.readline().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: cannot read the token file ({e})") from None
    return token or None


def find_token(token_file: Optional[str] = None) -> Optional[Token]:
    """The token to send: `token_file` if given, else the first of RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token, the order Ray's own AuthenticationTokenLoader
    (src/ray/rpc/authentication/authentication_token_loader.cc) uses; None if none has one.

    Read here rather than through Ray's loader: that is a private, process-wide cache that also
    serves this process's own Ray connection (a test session's, say), and it cannot take an
    explicit file. tests/test_submit.py checks that both pick the same token."""
    if token_file is not None:
        token = _read_token(token_file, f"--token-file {token_file}")
        if token is None:
            raise ConfigError(f"--token-file {token_file}: no such file, or it is empty")
        return Token(token, f"--token-file {token_file}")
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return Token(token, TOKEN_ENV)
    path = os.environ.get(TOKEN_PATH_ENV, "")
    if path:
        token = _read_token(path, f"{TOKEN_PATH_ENV}={path}")
        if token is None:  # Ray refuses this too, rather than falling back to the default
            raise ConfigError(
                f"{TOKEN_PATH_ENV}={path}: no such file, or it is empty; point it at the "
                "cluster's token file, or unset it"
            )
        return Token(token, f"{TOKEN_PATH_ENV}={path}")
    token = _read_token(DEFAULT_TOKEN_FILE, DEFAULT_TOKEN_FILE)
    return Token(token, DEFAULT_TOKEN_FILE) if token else None


class AuthRefusedError(ConfigError):
    """The cluster refused the request: no token, or not its token (HTTP 401 / 403)."""


@contextmanager
def _refusals(address: str, token: Optional[Token]) -> Iterator[None]:
    """Turn Ray's AuthenticationError (a 401 or 403 from the dashboard) into one message that
    says what was sent and how to get the right token."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        code = "401" if "Authentication required" in str(e) else "403"
        sent = (
            f"the token from {token.source} is not this cluster's"
            if token
            else f"no token was sent (none in --token-file, {TOKEN_ENV}, {TOKEN_PATH_ENV} "
            f"or {DEFAULT_TOKEN_FILE})"
        )
        raise AuthRefusedError(
            f"the Ray cluster at {address} refused the request (HTTP {code}): {sent}; "
            + HOW_TO_GET_THE_TOKEN
        ) from None


@dataclass
class Cluster:
    """A Ray cluster's job API: the client, and the token its requests carry."""

    address: str
    token: Optional[Token]
    client: object

    def call(self, method: str, *args, **kwargs):
        with _refusals(self.address, self.token):
            return getattr(self.client, method)(*args, **kwargs)


def connect(address: str, token_file: Optional[str] = None) -> Cluster:
    """The job API of the cluster whose dashboard is at `address`, with the token sent."""
    from ray.job_submission import JobSubmissionClient

    token = find_token(token_file)
    with _refusals(address, token):
        try:
            client = JobSubmissionClient(address, headers=token.headers() if token else None)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConnectionError(
                f"cannot reach a Ray cluster's dashboard at {address} ({e}); "
                "check the address (http://HEAD:8265) and that the dashboard runs"
            ) from None
    return Cluster(address, token, client)


def authentication_mode(address: str) -> str:
    """What the dashboard says of itself: 'token', 'disabled', or 'unknown' (no answer). Its
    /api/authentication_mode needs no token."""
    import requests

    try:
        answer = requests.get(f"{address.rstrip('/')}/api/authentication_mode", timeout=10)
        answer.raise_for_status()
        return str(answer.json().get("authentication_mode", "unknown"))
    except (requests.RequestException, ValueError):
        return "unknown"


def warn_if_open(address: str) -> None:
    """Warn (stderr) when the cluster runs its job API without token authentication."""
    mode = authentication_mode(address)
    if mode == "token":
        return
    state = (
        "has token authentication off"
        if mode == "disabled"
        else "did not say whether it checks tokens"
    )
    print(
        f"raysae submit: warning: the Ray cluster at {address} {state}: anyone who can "
        "reach its dashboard port can run code on every node. Start each node with "
        "RAY_AUTH_MODE=token (cluster.yaml does; docs/cluster.md)",
        file=sys.stderr,
    )


AGENT_WAIT_S = 60
"""How long to retry while a freshly started head's job agent is not up yet."""


def submit(
    spec: str,
    address: str,
    resume: bool = False,
    working_dir: str = ".",
    token_file: Optional[str] = None,
) -> str:
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
    cluster = connect(address, token_file)
    warn_if_open(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            # No env_vars: the job runs with the cluster's environment, never this machine's.
            return cluster.call(
                "submit_job",
                entrypoint=entrypoint,
                runtime_env={"working_dir": working_dir, "excludes": UPLOAD_EXCLUDES},
            )
        except RuntimeError as e:  # a head that just started answers 500 until its agent is up
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def status(address: str, job_id: str, token_file: Optional[str] = None) -> str:
    """The job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return str(connect(address, token_file).call("get_job_status", job_id).value)


def logs(address: str, job_id: str, token_file: Optional[str] = None) -> str:
    """Everything the job has printed so far."""
    return connect(address, token_file).call("get_job_logs", job_id)
