"""One storage layer for every path a job reads or writes: a local path, or an object-store URI (`s3://bucket/key`,
`gs://bucket/key`), through `pyarrow.fs` (the file systems Ray Data and Ray Train use themselves).

A location is a string throughout the project: what the user wrote, a local path or a URI. `resolve` turns it into
(file system, path inside it) for pyarrow; the helpers below read, write, list and delete through that.

S3 takes the usual AWS environment: credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (or a profile,
or the instance's role), the endpoint from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (MinIO, a local test
server), the region from `AWS_REGION` or `AWS_DEFAULT_REGION`. Every process reads them itself, so Ray workers on
other nodes need the same environment (a node's role, or `runtime_env={"env_vars": ...}`).

Object stores have no rename. `write_bytes` therefore writes a local file to a temporary name and renames it, but
puts an object in one request: an object appears whole or not at all, so a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from pipelines.core.errors import ConfigError

SCHEMES = ("s3", "gs")
CONNECT_TIMEOUT_S = 5.0  # an endpoint that does not answer fails in seconds, not after minutes of retries
REQUEST_TIMEOUT_S = 60.0
S3_ATTEMPTS = 3


class StorageError(ConfigError):
    """A location that cannot be used: an unknown scheme, a bucket that does not exist, a server that does not
    answer, credentials refused. The message names the key and the URI."""


def _prefix(key: str) -> str:
    """Messages start with the config key or flag the location came from, where the caller gives one."""
    return f"{key}: " if key else ""


def scheme(location: str) -> str:
    """ "s3", "gs", or "" for a local path (which may not hold "://")."""
    head, sep, _ = str(location).partition("://")
    return head.lower() if sep else ""


def is_uri(location: str) -> bool:
    return bool(scheme(location))


NAME_MAX = 128  # characters of a name that becomes one path component or object key


def check_name(value, key: str, also: str = "") -> str:
    """A user-given name that becomes one path component or object key (a run, sweep, experiment or registered
    model name, an alias, a run id): the name itself, or ConfigError naming the key, the value and the allowed form.
    One component means no separator, not `.` or `..`, no control character, and at most `NAME_MAX` characters;
    `also` adds characters that the name's owner refuses (MLflow's registry refuses ':')."""
    bad = "/\\" + also
    ok = (
        isinstance(value, str)
        and 0 < len(value) <= NAME_MAX
        and value not in (".", "..")
        and value.strip() == value
        and not any(c in bad or ord(c) < 32 or ord(c) == 127 for c in value)
    )
    if not ok:
        shown = " ".join(repr(c) for c in bad)
        raise ConfigError(
            f"{key}: {value!r} is not allowed; a name must be one path component: 1 to {NAME_MAX} "
            f"characters, no {shown}, no control characters, no leading or trailing space, and not "
            "'.' or '..'"
        )
    return value


def check_location(location: str, key: str) -> str:
    """The location itself, or StorageError naming the key when its scheme is not one this layer knows, or when it
    looks like a URI written with one slash (`s3:/bucket`), which would otherwise become a local folder `s3:`."""
    head, colon, rest = str(location).partition(":")
    if colon and head.lower() in SCHEMES and not rest.startswith("//"):
        raise StorageError(
            f"{_prefix(key)}{location!r} is not a URI: an object-store URI is written "
            f"{head.lower()}://bucket/path (two slashes); a local folder may not start with '{head}:'"
        )
    s = scheme(location)
    if s and s not in SCHEMES:
        raise StorageError(
            f"{_prefix(key)}{location!r} has the scheme {s}://, which is not supported; use a local "
            f"path or one of {', '.join(x + '://' for x in SCHEMES)}"
        )
    if s and not str(location).split("://", 1)[1].split("/", 1)[0]:
        raise StorageError(f"{_prefix(key)}{location!r} names no bucket ({s}://BUCKET/PREFIX)")
    return str(location)


def _s3() -> pafs.S3FileSystem:
    env = os.environ
    return _s3_for(
        env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
        env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
        _request_timeout(),
    )


def _request_timeout() -> float:
    raw = os.environ.get("FLOWRAY_S3_REQUEST_TIMEOUT_S") or str(REQUEST_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= 3600:
        raise ConfigError(f"FLOWRAY_S3_REQUEST_TIMEOUT_S={raw!r}: expected seconds in (0, 3600]")
    return seconds


@functools.lru_cache(maxsize=8)
def _s3_for(endpoint: str | None, region: str | None, request_timeout: float) -> pafs.S3FileSystem:
    """One client per endpoint, region and timeout in a process (a client holds connections; readers call this per
    file). `FLOWRAY_S3_REQUEST_TIMEOUT_S` shortens the wait for a server that accepts connections but does not
    answer (a paused one), which is otherwise S3_ATTEMPTS times REQUEST_TIMEOUT_S per call."""
    kwargs = {"endpoint_override": endpoint} if endpoint else {}
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(
        connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=request_timeout,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
        **kwargs,
    )


@functools.lru_cache(maxsize=1)
def _gcs() -> pafs.GcsFileSystem:
    """GCS with bounded retries: without credentials or network, pyarrow's client otherwise retries with no end."""
    from datetime import timedelta

    return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=REQUEST_TIMEOUT_S / 4))


def resolve(location: str, key: str = "") -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it): `bucket/key` for an object store, an absolute path for a local one."""
    s = scheme(check_location(location, key))
    if s == "s3":
        return _s3(), str(location).split("://", 1)[1].rstrip("/")
    if s == "gs":
        return _gcs(), str(location).split("://", 1)[1].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    """`location/part/...` for a URI or a local path (a local result is a plain path string)."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *(str(p).strip("/") for p in parts)])
    return str(Path(location, *parts))


def location_of(root: str, path: str) -> str:
    """A location for `path` inside the file system of `root` (as Ray Train reports paths): a URI of the root's
    scheme for an object store, the path itself for a local one."""
    s = scheme(root)
    return f"{s}://{path.lstrip('/')}" if s else path


def name(location: str) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def _info(location: str, key: str) -> pafs.FileInfo:
    fs, path = resolve(location, key)
    try:
        return fs.get_file_info(path)
    except OSError as err:
        raise StorageError(f"{_prefix(key)}{location}: {describe(err)}") from None


def is_file(location: str, key: str = "") -> bool:
    return _info(location, key).type == pafs.FileType.File


def exists(location: str, key: str = "") -> bool:
    return _info(location, key).type != pafs.FileType.NotFound


def read_bytes(location: str, key: str = "") -> bytes:
    fs, path = resolve(location, key)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise StorageError(f"{_prefix(key)}{location}: {describe(err)}") from None


def read_text(location: str, key: str = "") -> str:
    return read_bytes(location, key).decode()


def write_bytes(location: str, data: bytes, key: str = "") -> None:
    """Write a whole file: never visible half-written (a local temporary name then a rename; one object PUT)."""
    fs, path = resolve(location, key)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(path).with_name(f".{Path(path).name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            return
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as err:
        raise StorageError(f"{_prefix(key)}cannot write {location}: {describe(err)}") from None


def write_text(location: str, text: str, key: str = "") -> None:
    write_bytes(location, text.encode(), key)


def list_files(location: str, prefix: str = "", suffix: str = "", key: str = "") -> list[str]:
    """The files directly inside a folder or prefix whose names start with `prefix` and end with `suffix`, as
    sorted locations (none when the folder does not exist)."""
    fs, path = resolve(location, key)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except OSError as err:
        raise StorageError(f"{_prefix(key)}cannot list {location}: {describe(err)}") from None
    return sorted(
        join(location, i.base_name)
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.startswith(prefix) and i.base_name.endswith(suffix)
    )


def write_parquet(table, location: str, key: str = "") -> None:
    """A whole parquet file that never carries its final name half-written: a local temporary file renamed into
    place, or one object (a multipart upload completes only when the writer closes)."""
    import pyarrow.parquet as pq

    fs, path = resolve(location, key)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = Path(path).with_name(f".{Path(path).name}.{uuid.uuid4().hex[:8]}.tmp")
            pq.write_table(table, tmp)
            tmp.replace(path)
        else:
            pq.write_table(table, path, filesystem=fs)
    except OSError as err:
        raise StorageError(f"{_prefix(key)}cannot write {location}: {describe(err)}") from None


def file_stamp(location: str) -> tuple:
    """What changes when a file is rewritten: (mtime ns, size) of a local file; nothing for an object (objects are
    written whole and not rewritten in place here, and a HEAD request per read would cost a round trip)."""
    if is_uri(location):
        return ()
    st = os.stat(location)
    return st.st_mtime_ns, st.st_size


def parquet_file(location: str, key: str = ""):
    """A `pyarrow.parquet.ParquetFile` on a local path or an object (read lazily, row group by row group)."""
    import pyarrow.parquet as pq

    fs, path = resolve(location, key)
    return pq.ParquetFile(path, filesystem=None if isinstance(fs, pafs.LocalFileSystem) else fs)


def parquet_metadata(location: str, key: str = ""):
    """A parquet file's footer (one ranged read of an object)."""
    import pyarrow.parquet as pq

    fs, path = resolve(location, key)
    return pq.read_metadata(path, filesystem=None if isinstance(fs, pafs.LocalFileSystem) else fs)


def parquet_footer(location: str, unreadable):
    """`parquet_metadata`, with a footer that cannot be read (a truncated or corrupt file) raised as
    `unreadable(reason)`, an error of the caller's naming the file and what to do; storage errors pass as they are."""
    try:
        return parquet_metadata(location)
    except StorageError:
        raise
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a bad footer
        raise unreadable(str(err).splitlines()[0][:160]) from None


def read_table(location: str, columns: list[str] | None = None, key: str = ""):
    import pyarrow.parquet as pq

    fs, path = resolve(location, key)
    return pq.read_table(path, columns=columns, filesystem=None if isinstance(fs, pafs.LocalFileSystem) else fs)


def ray_paths(locations: list[str]) -> tuple[list[str], pafs.FileSystem | None]:
    """Locations for `ray.data.read_parquet(paths, filesystem=fs)`: local paths as they are, object URIs as paths
    inside this layer's file system (its endpoint and timeouts, on every node that reads)."""
    if not any(is_uri(x) for x in locations):
        return list(locations), None
    resolved = [resolve(x) for x in locations]
    if len({scheme(x) for x in locations}) != 1:
        raise StorageError(f"one stage reads from one store; got {sorted({scheme(x) or 'local' for x in locations})}")
    return [p for _, p in resolved], resolved[0][0]


def parquet_writer(location: str, schema, key: str = ""):
    """A `pyarrow.parquet.ParquetWriter` to a local path or an object (uploaded in parts as row groups are
    written; the object exists only once the writer is closed)."""
    import pyarrow.parquet as pq

    fs, path = resolve(location, key)
    return pq.ParquetWriter(path, schema, filesystem=None if isinstance(fs, pafs.LocalFileSystem) else fs)


def delete(location: str, key: str = "") -> None:
    """Delete a file or object if it exists."""
    fs, path = resolve(location, key)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise StorageError(f"{_prefix(key)}cannot delete {location}: {describe(err)}") from None


def delete_dir(location: str, key: str = "") -> None:
    """Delete a folder or prefix and everything under it, if it exists (best effort: a failure is not raised,
    since this only tidies after another error)."""
    fs, path = resolve(location, key)
    try:
        fs.delete_dir(path)
    except OSError:
        pass


@contextlib.contextmanager
def local_copy(location: str):
    """A local folder holding what `location` holds: the folder itself, or a temporary download of an object-store
    prefix (removed on exit), for consumers that take only local paths (an MLflow artifact upload)."""
    if not is_uri(location):
        yield location
        return
    fs, path = resolve(location)
    with tempfile.TemporaryDirectory(prefix="flowray-") as tmp:
        local = os.path.join(tmp, name(location))
        os.mkdir(local)
        pafs.copy_files(path, local, source_filesystem=fs)
        yield local


def check_writable(location: str, key: str) -> str:
    """Prove the location writable before any Ray work: a local folder is created and a probe file written in it;
    under a URI a probe object is written and deleted, so that an unknown scheme, a missing bucket, a server that
    does not answer or refused credentials fail here, named. Returns the location (a local one absolute)."""
    location = check_location(location, key)
    if not is_uri(location):
        p = Path(location).expanduser()
        if p.exists() and not p.is_dir():
            raise StorageError(f"{_prefix(key)}{p} is a file; a directory is needed")
        try:
            p.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=p, prefix=".write-probe-"):
                pass
        except OSError as err:
            raise StorageError(f"{_prefix(key)}cannot write to {p} ({err.strerror or err})") from None
        return str(p.resolve())
    from pipelines.core.runtime import interruptible

    # a bounded wait (the clients' timeouts), in a thread of its own so that SIGINT / SIGTERM end the job at once
    return interruptible(_probe, location, key)


def _probe(location: str, key: str) -> str:
    probe = join(location, f".flowray-probe-{uuid.uuid4().hex[:12]}")
    fs, path = resolve(probe, key)
    try:
        with fs.open_output_stream(path) as f:
            f.write(b"")
        fs.delete_file(path)
    except OSError as err:
        raise StorageError(f"{_prefix(key)}{location} is not writable: {describe(err)}") from None
    return location


def ray_storage(root: str, key: str) -> dict:
    """The storage arguments of a Ray Train or Tune `RunConfig` for `root`: a local folder by path; an object store
    by its pyarrow file system and the path in it (the endpoint, region and timeouts above, which Ray then uses on
    every worker)."""
    if not is_uri(root):
        return {"storage_path": root}
    fs, path = resolve(root, key)
    return {"storage_path": path, "storage_filesystem": fs}


OUTAGE_MARKERS = (
    "NETWORK_CONNECTION",
    "curlCode",
    "Could not connect to server",
    "Connection refused",
    "Retry policy exhausted",
    "UNAVAILABLE",
)


def outage_in(err: BaseException) -> OSError | None:
    """The object-store error (an OSError saying the server could not be reached) inside a failure, looked for in
    its causes and in what Ray Train wraps (a controller's failure, each worker's), or None."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and any(m in str(e) for m in OUTAGE_MARKERS):
            return e
        todo += [
            c
            for c in (
                e.__cause__,
                e.__context__,
                getattr(e, "controller_failure", None),
                *getattr(e, "worker_failures", {}).values(),
            )
            if c is not None
        ]
    return None


def describe(err: OSError) -> str:
    """The useful part of an AWS SDK error, in words a user acts on."""
    text = str(err)
    known = [
        ("NO_SUCH_BUCKET", "the bucket does not exist"),
        ("NETWORK_CONNECTION", "the server does not answer (check AWS_ENDPOINT_URL and the network)"),
        (
            "ACCESS_DENIED",
            "access denied (check the credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
            "a profile, or the node's role)",
        ),
        ("INVALID_ACCESS_KEY_ID", "the access key is not known to the server (AWS_ACCESS_KEY_ID)"),
        ("SIGNATURE_DOES_NOT_MATCH", "the secret key does not match (AWS_SECRET_ACCESS_KEY)"),
        (
            "MISSING_AUTHENTICATION_TOKEN",
            "no credentials were found (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, or the node's role)",
        ),
        (
            "OAuth2 access token",
            "no Google credentials could be used, or Google's servers do not answer "
            "(GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`, or "
            "the node's service account; the client gave up after its retry limit)",
        ),
    ]
    words = next((w for code, w in known if code in text), text.splitlines()[0][:200])
    if "AWS Error" in text and not _aws_credentials_visible():
        words += (
            "; no AWS credentials were found (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            "~/.aws/credentials, a web identity token), so the request went unsigned unless the node has a "
            "role"
        )
    return words


def _aws_credentials_visible() -> bool:
    """Whether a credential source other than the instance's role is in sight (the role cannot be checked without
    a request to the metadata service)."""
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return True
    sources = (
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    )
    if any(env.get(k) for k in sources):
        return True
    files = [env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), env.get("AWS_CONFIG_FILE", "~/.aws/config")]
    return any(Path(f).expanduser().is_file() for f in files)
