"""Storage URIs: one code path for local directories and `s3://bucket/prefix`.

Every read and write of a dataset goes through `filesystem_and_path`, which maps a URI
to a `pyarrow.fs.FileSystem` and a path inside it, so local and S3 datasets share all code.

S3 settings
-----------
- Endpoint: the `endpoint` argument, else `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`,
  else AWS itself. A value such as `http://127.0.0.1:9000` selects scheme and host.
- Credentials: never taken as arguments. pyarrow's S3 client resolves them from the standard
  AWS chain (environment, `~/.aws`, instance metadata) in every process that opens a file,
  so they are never pickled into Ray tasks, logged, or written into manifests.
- Retries: pyarrow's own (the AWS SDK's `DefaultRetryStrategy`, see `S3_MAX_ATTEMPTS`), so a
  store that is down for a while (a restart, a network blip) is waited out request by request;
  there are no hand-written retry loops here. The budget is per process:
  `RAYSAE_S3_MAX_ATTEMPTS` in its environment (for Ray workers, the environment the cluster
  was started with), else the default of about 100 s of retries. A command's pre-flight first
  checks that the endpoint answers at all, with a short budget (`check_reachable`), so a
  mistyped or dead endpoint fails in seconds.
- Unreachable is not corrupt: when the retries run out because the endpoint cannot be reached
  (refused, reset, timed out), the error is `StoreUnreachableError`, naming the endpoint and
  saying it is neither a credentials nor a data problem (`is_unreachable` tells them apart).
"""

from __future__ import annotations

import functools
import os
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import pyarrow.fs as pafs

S3_CONNECT_TIMEOUT_S = 2.0
"""Seconds to wait for a TCP connection to the S3 endpoint (the SDK default is 1 s)."""

S3_REQUEST_TIMEOUT_S = 15.0
"""Seconds with no bytes moving before a request fails (curl's low-speed limit on Linux, not a
cap on total transfer time, so large parts are unaffected)."""

S3_MAX_ATTEMPTS = 12
"""Attempts per S3 request before it fails; `RAYSAE_S3_MAX_ATTEMPTS` overrides it.

pyarrow's `AwsDefaultS3RetryStrategy` (the SDK's `DefaultRetryStrategy`) waits 25 ms · 2^n
before retry n, so N attempts span 25 ms · (2^N − 2) of waiting: 12 ≈ 100 s (an outage
shorter than that is waited out), 10 ≈ 25 s, 14 ≈ 7 min, measured against a closed port;
each attempt that times out (a silent endpoint) adds its timeout. Not the SDK's "standard"
strategy: its waits are random up to 20 s and it shares a retry quota between all requests of
a client (500 tokens, 5 per retry), which the requests of a busy process use up within an
outage, after which they all fail without retrying."""

MAX_ATTEMPTS_ENV = "RAYSAE_S3_MAX_ATTEMPTS"
"""Environment variable overriding `S3_MAX_ATTEMPTS` (a whole number ≥ 1)."""

PROBE_ATTEMPTS = 3
"""Attempts of the first request a process makes to an S3 endpoint (`check_reachable`): a
mistyped or dead endpoint fails a command's pre-flight in well under a second (a silent one in
about 3 × S3_CONNECT_TIMEOUT_S), not after the whole retry budget of every later request. Once
the endpoint has answered, outages are waited out with the full budget."""


class StorageError(OSError):
    """A storage operation failed; the message names the URI and, for S3, the endpoint."""


class StoreUnreachableError(StorageError):
    """The S3 endpoint could not be reached for a whole retry budget: an outage or a network
    problem, not bad credentials and not bad data."""


def s3_max_attempts() -> int:
    """Attempts per S3 request in this process: `RAYSAE_S3_MAX_ATTEMPTS`, else the default."""
    value = os.environ.get(MAX_ATTEMPTS_ENV, "").strip()
    if not value:
        return S3_MAX_ATTEMPTS
    if not value.isdigit() or int(value) < 1:
        raise StorageError(
            f"{MAX_ATTEMPTS_ENV}={value!r}: expected a whole number of attempts ≥ 1 "
            f"(default {S3_MAX_ATTEMPTS}, about 100 s of retries)"
        )
    return int(value)


def retry_seconds(max_attempts: int) -> float:
    """Seconds `max_attempts` attempts wait in backoff between them (see `S3_MAX_ATTEMPTS`)."""
    return 0.025 * (2**max_attempts - 2)


@dataclass(frozen=True)
class Location:
    """Where a URI lives: the filesystem, the path inside it, and a printable endpoint."""

    filesystem: pafs.FileSystem
    """The pyarrow filesystem serving the URI."""
    path: str
    """The path inside `filesystem` (`bucket/key` for S3, an absolute path locally)."""
    endpoint: str
    """`local` or the S3 endpoint URL, for error messages."""


def s3_endpoint(endpoint: str | None = None) -> str | None:
    """The S3 endpoint URL to use: the argument, else the AWS environment variables, else None."""
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def is_s3(uri: str) -> bool:
    """Whether `uri` names an object in S3 (`s3://bucket/key`)."""
    return uri.startswith("s3://")


def absolute(uri: str) -> str:
    """`uri` with a relative local path made absolute (Ray and Tune processes run in other
    working directories); s3:// and file:// URIs are returned unchanged."""
    if is_s3(uri) or "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def locate(uri: str, *, endpoint: str | None = None) -> Location:
    """Resolve `uri` (local path, `file://` URI or `s3://bucket/key`) to a `Location`."""
    if is_s3(uri):
        return _locate_s3(uri, s3_endpoint(endpoint))
    if uri.startswith("file://"):
        uri = urlsplit(uri).path
    if "://" in uri:
        raise StorageError(
            f"unsupported storage URI {uri!r}: use a local path, file://… or s3://bucket/prefix"
        )
    return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)), "local")


def _locate_s3(uri: str, endpoint: str | None, max_attempts: int | None = None) -> Location:
    """The S3 location of `uri`, its requests retried `max_attempts` times (default: as
    `s3_max_attempts` says); the region stays unset for AWS so no lookup call is made."""
    path = uri[len("s3://") :].strip("/")
    if not path:
        raise StorageError(f"S3 URI {uri!r} names no bucket: use s3://bucket/prefix")
    region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1") if endpoint else None
    filesystem = _s3_filesystem(endpoint, region, max_attempts or s3_max_attempts())
    return Location(filesystem, path, endpoint or "AWS S3 (default endpoint)")


def s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    """This process's S3 filesystem for `endpoint` and `region`, retrying as
    `s3_max_attempts` says."""
    return _s3_filesystem(endpoint, region, s3_max_attempts())


class _S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem, pickled as the endpoint and region it serves.

    pyarrow (≤ 26) drops `retry_strategy` when it pickles an S3FileSystem (apache/arrow#47348),
    so the copies Ray sends to other processes (`RunConfig.storage_filesystem`, and every
    checkpoint carries its filesystem) would fall back to pyarrow's default (3 attempts, under
    a second against a refused connection, measured), not ride out an outage. Unpickled, this is the receiving process's own `s3_filesystem` for the endpoint.
    """

    def __reduce__(self):
        return s3_filesystem, self._raysae_where


@functools.lru_cache(maxsize=16)
def _s3_filesystem(endpoint: str | None, region: str | None, max_attempts: int) -> _S3FileSystem:
    """One S3 filesystem per endpoint, region and retry budget in this process: building one
    sets up a new client (and its connection pool) each time, and a dataset of many parts is
    opened part by part. Credentials are resolved by the client itself, never held here."""
    options: dict = {
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "request_timeout": S3_REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsDefaultS3RetryStrategy(max_attempts=max_attempts),
    }
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["endpoint_override"] = parts.netloc
        options["scheme"] = parts.scheme
        # Local S3 servers (MinIO, moto) serve path-style URLs and need no real region.
        options["region"] = region
    filesystem = _S3FileSystem(**options)
    filesystem._raysae_where = (endpoint, region)
    return filesystem


_REACHED: set[str] = set()
"""S3 endpoints this process has had an answer from (see `check_reachable`)."""


def check_reachable(uri: str, *, endpoint: str | None = None) -> None:
    """Raise StoreUnreachableError at once if the S3 endpoint serving `uri` does not answer
    one request (retried `PROBE_ATTEMPTS` times); nothing for local URIs, or an endpoint that
    has answered this process before. Any answer counts (a missing key, access denied): those
    are for the command's own requests to report."""
    if not is_s3(uri):
        return
    probe = _locate_s3(uri, s3_endpoint(endpoint), PROBE_ATTEMPTS)
    if probe.endpoint in _REACHED:
        return
    try:
        probe.filesystem.get_file_info(probe.path)
    except OSError as err:
        if is_unreachable(err):
            raise _unreachable(probe.endpoint, "reach", uri, err, PROBE_ATTEMPTS) from err
    _REACHED.add(probe.endpoint)


def filesystem_and_path(uri: str, *, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path for `uri` (see `locate`)."""
    location = locate(uri, endpoint=endpoint)
    return location.filesystem, location.path


def join(uri: str, *names: str) -> str:
    """`uri` with `names` appended as path components (works for local paths and s3://)."""
    return "/".join([uri.rstrip("/"), *(name.strip("/") for name in names)])


_UNREACHABLE_MARKS = ("AWS Error NETWORK_CONNECTION", "curlCode: 28", "Timeout was reached")
"""How pyarrow's S3 client says it could not reach the endpoint: a refused, reset or timed-out
connection (the SDK's NETWORK_CONNECTION error; curl's code 28 is a timeout). pyarrow raises a
plain OSError whose message is the only place this is told (Ray Data matches the same text,
`DataContext.retried_io_errors`)."""


def is_unreachable(err: BaseException) -> bool:
    """Whether `err` is the S3 endpoint not being reached (after the client's retries), as
    opposed to the store answering: a missing key, access denied, or bytes that do not parse."""
    return isinstance(err, StoreUnreachableError) or (
        isinstance(err, OSError) and any(mark in str(err) for mark in _UNREACHABLE_MARKS)
    )


def raise_if_unreachable(
    err: BaseException, uri: str, *, endpoint: str | None = None, action: str = "read"
) -> None:
    """Raise StoreUnreachableError (from `err`) if `err` says the S3 endpoint serving `uri`
    (see `locate`) could not be reached; return otherwise. For readers that turn the other
    OSErrors of a read into data errors ("corrupt")."""
    if isinstance(err, StoreUnreachableError):
        raise err
    if is_s3(uri) and is_unreachable(err):
        where = s3_endpoint(endpoint) or "AWS S3 (default endpoint)"
        raise _unreachable(where, action, uri, err) from err


def _unreachable(
    endpoint: str, action: str, uri: str, err: BaseException, attempts: int | None = None
) -> StoreUnreachableError:
    """The one message for a store that could not be reached: where, how long it was retried
    (`attempts`, default this process's budget), what it is not, and what to do."""
    attempts = attempts or s3_max_attempts()
    seconds = retry_seconds(attempts)
    spent = f"~{seconds:.0f} s" if seconds >= 10 else f"~{seconds:.1f} s"
    detail = str(err).split("; Details:")[0]  # the SDK's curl details repeat the endpoint
    return StoreUnreachableError(
        f"cannot {action} {uri}: the S3 endpoint {endpoint} is unreachable (every one of "
        f"{attempts} attempts over {spent} failed to reach it: {detail}). "
        "The object store is down or cannot be reached from this machine; this is not a "
        "credentials or data problem. Check that the endpoint is up and reachable "
        f"(AWS_ENDPOINT_URL_S3; {MAX_ATTEMPTS_ENV} sets how long to retry), then run the same "
        "command again: a training run resumes from its latest checkpoint"
    )


def _fail(location: Location, action: str, uri: str, err: OSError) -> StorageError:
    """A StorageError naming what was attempted, where, and through which endpoint."""
    if location.endpoint != "local" and is_unreachable(err):
        return _unreachable(location.endpoint, action, uri, err)
    where = "" if location.endpoint == "local" else f" via S3 endpoint {location.endpoint}"
    return StorageError(f"cannot {action} {uri}{where}: {err}")


def exists(uri: str, *, endpoint: str | None = None) -> bool:
    """Whether a file exists at `uri`."""
    location = locate(uri, endpoint=endpoint)
    try:
        info = location.filesystem.get_file_info(location.path)
    except OSError as err:
        raise _fail(location, "check", uri, err) from err
    return info.type == pafs.FileType.File


def read_bytes(uri: str, *, endpoint: str | None = None) -> bytes:
    """The whole content of the file at `uri`; FileNotFoundError if there is none."""
    location = locate(uri, endpoint=endpoint)
    try:
        with location.filesystem.open_input_stream(location.path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise _fail(location, "read", uri, err) from err


def write_bytes(uri: str, data: bytes, *, endpoint: str | None = None) -> None:
    """Write `data` to `uri`, replacing any file there, so readers never see half of it.

    Locally the data goes to a temporary sibling that is then renamed over the target (rename
    is atomic on POSIX). An S3 PUT is atomic by itself: the object appears only when complete.
    """
    location = locate(uri, endpoint=endpoint)
    fs, path = location.filesystem, location.path
    try:
        if is_s3(uri):
            with fs.open_output_stream(path) as stream:
                stream.write(data)
            return
        fs.create_dir(os.path.dirname(path), recursive=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with fs.open_output_stream(temporary) as stream:
                stream.write(data)
            fs.move(temporary, path)
        finally:
            if fs.get_file_info(temporary).type == pafs.FileType.File:
                fs.delete_file(temporary)
    except OSError as err:
        raise _fail(location, "write", uri, err) from err


def list_files(uri: str, *, endpoint: str | None = None) -> dict[str, int]:
    """Names and byte sizes of the files directly under the prefix `uri` ({} if none)."""
    location = locate(uri, endpoint=endpoint)
    selector = pafs.FileSelector(location.path, allow_not_found=True, recursive=False)
    try:
        infos = location.filesystem.get_file_info(selector)
    except OSError as err:
        raise _fail(location, "list", uri, err) from err
    return {info.base_name: info.size for info in infos if info.type == pafs.FileType.File}


def delete(uri: str, *, endpoint: str | None = None) -> None:
    """Delete the file at `uri`; deleting a file that does not exist is not an error."""
    location = locate(uri, endpoint=endpoint)
    try:
        location.filesystem.delete_file(location.path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise _fail(location, "delete", uri, err) from err


def check_writable(uri: str, *, endpoint: str | None = None) -> None:
    """Raise StorageError unless files can be written under the prefix `uri`; leaves the storage
    as it was. Locally: the nearest existing folder on the way to `uri` is one this process may
    write in. On S3: a probe object is written under `uri` and deleted."""
    location = locate(uri, endpoint=endpoint)
    if is_s3(uri):
        check_reachable(uri, endpoint=endpoint)
        probe = join(uri, f".raysae-probe-{uuid.uuid4().hex[:8]}")
        write_bytes(probe, b"", endpoint=endpoint)
        delete(probe, endpoint=endpoint)
        return
    path = location.path
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise StorageError(f"cannot write {uri}: {path} is a file, not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise StorageError(f"cannot write {uri}: no permission to write in {path}")


COMMIT_MARKERS = ("manifest.json", "config.json")
"""Files whose presence says the folder around them is complete, so they are uploaded last: a
dataset's manifest (raysae.data.manifest.MANIFEST_NAME) and an SAE's config.json
(raysae.checkpoint.CONFIG, which save_sae also writes last)."""


def upload_dir(local_dir: str | os.PathLike, uri: str, *, endpoint: str | None = None) -> None:
    """Copy every file under `local_dir` to the prefix `uri`, keeping relative paths; the
    `COMMIT_MARKERS` last, once every other file is in place."""
    source, destination = locate(os.fspath(local_dir)), locate(uri, endpoint=endpoint)
    selector = pafs.FileSelector(source.path, recursive=True)
    files = [i.path for i in source.filesystem.get_file_info(selector) if i.is_file]
    # pyarrow's copy_files copies a tree in no set order, so here the files go one by one.
    for path in sorted(files, key=lambda p: (os.path.basename(p) in COMMIT_MARKERS, p)):
        relative = os.path.relpath(path, source.path).replace(os.sep, "/")
        target = f"{destination.path}/{relative}"
        _copy_tree(
            Location(source.filesystem, path, source.endpoint),
            Location(destination.filesystem, target, destination.endpoint),
            uri,
            folder=os.path.dirname(target),
        )


def download_dir(uri: str, local_dir: str | os.PathLike, *, endpoint: str | None = None) -> None:
    """Copy every file under the prefix `uri` into `local_dir`, keeping relative paths."""
    _copy_tree(locate(uri, endpoint=endpoint), locate(os.fspath(local_dir)), uri)


def _copy_tree(source: Location, destination: Location, uri: str, folder: str = "") -> None:
    """Copy a file or a tree between filesystems with pyarrow (parallel, streaming); a local
    destination's `folder` (default: the destination itself) is made first."""
    try:
        if destination.endpoint == "local":
            destination.filesystem.create_dir(folder or destination.path, recursive=True)
        pafs.copy_files(source.path, destination.path, source.filesystem, destination.filesystem)
    except OSError as err:
        remote = destination if destination.endpoint != "local" else source
        raise _fail(remote, "copy a directory to or from", uri, err) from err
