"""One interface over local folders and ``s3://`` object stores.

Every path is a URI string: a local path (``/data/x``, ``./runs``) or
``s3://bucket/key``. Writes are atomic on both backends: locally a temp file
in the same folder is renamed over the target; on S3 a PUT (or a completed
multipart upload) makes the object appear whole or not at all.

S3 settings come from the standard AWS places, resolved once by boto3's
credential chain in :func:`aws_session` (keys and ``AWS_SESSION_TOKEN``,
``AWS_PROFILE``, ``~/.aws/config`` and ``~/.aws/credentials``, SSO, assumed
roles, instance roles; the region from ``AWS_REGION``, ``AWS_DEFAULT_REGION``
or the profile), plus ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` for an
S3-compatible store, which is addressed path-style. Every S3 client
(:func:`s3_client`) and pyarrow filesystem (:func:`pyarrow_s3`) in arpipe is
built from that one session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import boto3
    import pyarrow.fs

#: the bookkeeping folder inside every stage folder and the storage root (locks, ledgers, unit
#: records, pending lineage, failure notes): never part of a stage's outputs
CONTROL_DIR = ".arpipe"


def control_uri(base: str, *parts: str) -> str:
    """``<base>/.arpipe/<parts...>``: where bookkeeping about ``base`` lives."""
    return join(base, CONTROL_DIR, *parts)


def user_cache(*parts: str) -> Path:
    """arpipe's folder in the user's cache (``$XDG_CACHE_HOME/arpipe``, else ``~/.cache/arpipe``), joined with parts."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "arpipe", *parts)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', for local paths and s3:// alike."""
    out = base.rstrip("/") if base not in ("/", "") else base
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}" if out else part
    return out


def normalize(uri: str, base_dir: str | os.PathLike | None = None) -> str:
    """Absolute form of a storage URI; relative local paths resolve against base_dir."""
    if is_s3(uri):
        return uri.rstrip("/")
    path = Path(os.path.expanduser(uri))
    if not path.is_absolute():
        path = Path(base_dir or os.getcwd()) / path
    return str(path.resolve())


@dataclass(frozen=True)
class Entry:
    """A file below a prefix: its path relative to the prefix and its size in bytes."""

    relpath: str
    size: int


class Storage(ABC):
    """Backend for one URI scheme. Get one with :func:`storage_for`."""

    @abstractmethod
    def exists(self, uri: str) -> bool: ...

    @abstractmethod
    def size(self, uri: str) -> int | None:
        """Size in bytes, or None when the object does not exist."""

    @abstractmethod
    def read_bytes(self, uri: str) -> bytes: ...

    @abstractmethod
    def read_range(self, uri: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` (fewer only at the end of the object)."""

    @abstractmethod
    def open_read(self, uri: str) -> BinaryIO:
        """A readable binary stream; close it when done."""

    @abstractmethod
    def write_bytes(self, uri: str, data: bytes, *, durable: bool = True) -> None:
        """Atomically create or replace ``uri`` with ``data``.

        ``durable=False`` skips the fsync: still atomic (never half-written), but a power cut may
        lose it. For bookkeeping that can be rebuilt (ledger, latest pointer), not for commits.
        """

    @abstractmethod
    def put_file(self, local_path: str | os.PathLike, uri: str) -> None:
        """Atomically upload/copy a local file to ``uri``."""

    @abstractmethod
    def get_file(self, uri: str, local_path: str | os.PathLike) -> None:
        """Download/copy ``uri`` to a local file (atomically)."""

    @abstractmethod
    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """Create ``uri`` only if it does not exist; True when this call created it."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[Entry]:
        """Every file below ``prefix`` (recursive), relative paths with '/'."""

    def list_dir(self, prefix: str) -> tuple[list[Entry], list[str]]:
        """(the files directly below ``prefix``, the names of the folders there): one level, in name order."""
        files, folders = [], set()
        for entry in self.list(prefix):
            head, sep, _ = entry.relpath.partition("/")
            if sep:
                folders.add(head)
            else:
                files.append(entry)
        return sorted(files, key=lambda e: e.relpath), sorted(folders)

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Remove one file; no error when it is already gone."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove everything below ``prefix``."""

    def local_path(self, uri: str) -> Path | None:
        """The local filesystem path of ``uri``, or None for remote storage."""
        return None

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def write_text(self, uri: str, text: str, *, durable: bool = True) -> None:
        self.write_bytes(uri, text.encode("utf-8"), durable=durable)


class LocalStorage(Storage):
    def exists(self, uri: str) -> bool:
        return os.path.exists(uri)

    def size(self, uri: str) -> int | None:
        try:
            return os.stat(uri).st_size
        except FileNotFoundError:
            return None

    def read_bytes(self, uri: str) -> bytes:
        with open(uri, "rb") as f:
            return f.read()

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        with open(uri, "rb") as f:
            f.seek(start)
            return f.read(length)

    def open_read(self, uri: str) -> BinaryIO:
        return open(uri, "rb")

    def write_bytes(self, uri: str, data: bytes, *, durable: bool = True) -> None:
        with atomic_local_file(uri) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())

    def put_file(self, local_path: str | os.PathLike, uri: str) -> None:
        if os.path.abspath(local_path) == os.path.abspath(uri):
            return
        with atomic_local_file(uri) as tmp:
            shutil.copyfile(local_path, tmp)

    def get_file(self, uri: str, local_path: str | os.PathLike) -> None:
        self.put_file(uri, str(local_path))

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
        try:
            fd = os.open(uri, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def list(self, prefix: str) -> Iterator[Entry]:
        root = Path(prefix)
        if not root.is_dir():
            return
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                full = Path(dirpath) / name
                try:
                    size = full.stat().st_size
                except FileNotFoundError:
                    continue
                yield Entry(full.relative_to(root).as_posix(), size)

    def delete(self, uri: str) -> None:
        try:
            os.remove(uri)
        except FileNotFoundError:
            pass

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(prefix, ignore_errors=True)

    def local_path(self, uri: str) -> Path | None:
        return Path(uri)


class atomic_local_file:
    """Context manager yielding a temp path beside ``target``; renamed over it on success."""

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)

    def __enter__(self) -> str:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent)
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.chmod(self.tmp, 0o666 & ~_umask())
            os.replace(self.tmp, self.target)
        else:
            try:
                os.remove(self.tmp)
            except FileNotFoundError:
                pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket: write s3://BUCKET/prefix")
    return bucket, key


class S3Storage(Storage):
    """S3 and S3-compatible stores through boto3."""

    def __init__(self) -> None:
        self.client = s3_client()

    @property
    def endpoint(self) -> str:
        """The server's URL (AWS's own when no custom endpoint is set): names the store in messages."""
        return self.client.meta.endpoint_url

    def _missing(self, err: Exception) -> bool:
        code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
        return code in ("404", "NoSuchKey", "NotFound")

    def exists(self, uri: str) -> bool:
        return self.size(uri) is not None

    def size(self, uri: str) -> int | None:
        from botocore.exceptions import ClientError

        bucket, key = _split_s3(uri)
        try:
            return int(self.client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as err:
            if self._missing(err):
                return None
            raise

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = _split_s3(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as err:
            if self._missing(err):
                raise FileNotFoundError(uri) from None
            raise

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        bucket, key = _split_s3(uri)
        rng = f"bytes={start}-{start + length - 1}"
        try:
            return self.client.get_object(Bucket=bucket, Key=key, Range=rng)["Body"].read()
        except Exception as err:
            if self._missing(err):
                raise FileNotFoundError(uri) from None
            raise

    def open_read(self, uri: str) -> BinaryIO:
        bucket, key = _split_s3(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as err:
            if self._missing(err):
                raise FileNotFoundError(uri) from None
            raise

    def write_bytes(self, uri: str, data: bytes, *, durable: bool = True) -> None:
        bucket, key = _split_s3(uri)
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def put_file(self, local_path: str | os.PathLike, uri: str) -> None:
        bucket, key = _split_s3(uri)
        self.client.upload_file(str(local_path), bucket, key)

    def get_file(self, uri: str, local_path: str | os.PathLike) -> None:
        bucket, key = _split_s3(uri)
        with atomic_local_file(local_path) as tmp:
            self.client.download_file(bucket, key, tmp)

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = _split_s3(uri)
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise

    def list(self, prefix: str) -> Iterator[Entry]:
        bucket, key = _split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue   # a "folder" marker (pyarrow's S3FileSystem, consoles): not a file
                yield Entry(obj["Key"][len(key) :], int(obj["Size"]))

    def list_dir(self, prefix: str) -> tuple[list[Entry], list[str]]:
        # one level by the server's delimiter: a Zarr group's members without listing its chunks
        bucket, key = _split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        files, folders = [], []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
            files += [Entry(obj["Key"][len(key):], int(obj["Size"])) for obj in page.get("Contents", [])
                      if not obj["Key"].endswith("/")]
            folders += [p["Prefix"][len(key):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(files, key=lambda e: e.relpath), sorted(folders)

    def delete(self, uri: str) -> None:
        bucket, key = _split_s3(uri)
        self.client.delete_object(Bucket=bucket, Key=key)

    def delete_prefix(self, prefix: str) -> None:
        bucket, key = _split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        batch: list[dict] = []
        for entry in self.list(prefix):
            batch.append({"Key": key + entry.relpath})
            if len(batch) == 1000:
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch})
                batch = []
        if batch:
            self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch})


#: the region when boto3 resolves none (no variable, no ``region`` in the profile): AWS's own default
DEFAULT_REGION = "us-east-1"
#: botocore's names for credential sources that pyarrow's AWS chain also resolves, and renews, by itself
_RENEWED_BY_PYARROW = frozenset({"iam-role", "container-role", "assume-role-with-web-identity"})
# boto3 sessions are not thread-safe (clients are): sessions and clients are made under this lock
_aws_lock = threading.RLock()
_sessions: dict[tuple, boto3.Session] = {}
_local = LocalStorage()
_s3_storages: dict[tuple, S3Storage] = {}


def _aws_env() -> tuple[tuple[str, str], ...]:
    """The AWS_* variables, which boto3 resolves from: a change to any makes a new session (and S3 client)."""
    return tuple(sorted((name, value) for name, value in os.environ.items() if name.startswith("AWS_")))


def aws_session() -> boto3.Session:
    """This process's boto3 session for the current AWS environment, resolved the standard way.

    Credentials follow boto3's chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
    ``AWS_PROFILE`` in ``~/.aws/credentials`` and ``~/.aws/config`` -- or ``AWS_SHARED_CREDENTIALS_FILE``/
    ``AWS_CONFIG_FILE`` -- with its assumed roles and SSO, then container and instance roles). The region is
    ``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else the profile's ``region``; see :func:`aws_region`.
    One session per distinct environment (cached), so a test or a user that changes ``AWS_*`` gets a new one.
    """
    key = _aws_env()
    with _aws_lock:
        session = _sessions.get(key)
        if session is None:
            import boto3

            # botocore reads AWS_DEFAULT_REGION and the profile's region but not AWS_REGION, which the
            # AWS CLI and the other SDKs read first
            session = _sessions[key] = boto3.Session(region_name=os.environ.get("AWS_REGION") or None)
    return session


def aws_region(session: boto3.Session | None = None) -> str:
    """The session's region; :data:`DEFAULT_REGION` only when boto3 resolves none."""
    return (session or aws_session()).region_name or DEFAULT_REGION


def s3_endpoint() -> str | None:
    """The S3-compatible store's URL from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``; None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client(endpoint: str | None = None) -> Any:
    """A boto3 S3 client on :func:`aws_session` (``endpoint`` defaults to :func:`s3_endpoint`).

    It refreshes expiring credentials (assumed roles, SSO, instance roles) itself, as boto3 clients do.
    """
    from botocore.config import Config

    endpoint = endpoint or s3_endpoint()
    config = Config(
        s3={"addressing_style": "path" if endpoint else "auto"},
        retries={"max_attempts": 8, "mode": "standard"},
        max_pool_connections=32,
    )
    with _aws_lock:
        session = aws_session()
        return session.client("s3", endpoint_url=endpoint, region_name=aws_region(session), config=config)


def pyarrow_s3(endpoint: str | None = None) -> pyarrow.fs.S3FileSystem:
    """A pyarrow S3 filesystem with the same credentials, region and endpoint as :func:`s3_client`.

    pyarrow takes static keys, so it is handed the session's credentials *as they are now* (access key,
    secret, session token); boto3 renews expiring ones before handing them out, so a filesystem built
    now starts valid, but it does not renew them: build one per job (the train stage builds one per
    stage run), not one per process. A run that outlives temporary keys fails at its next write and,
    rerun, resumes from its last checkpoint. Instance, container and web-identity (EKS) roles are the
    exception: pyarrow's own AWS chain resolves those the same way on every machine and renews them,
    so for them it gets no keys (its ``role_arn`` option is not used: it would assume a role through
    that chain rather than this session).
    """
    import pyarrow.fs as pafs

    endpoint = endpoint or s3_endpoint()
    if endpoint is None:   # boto3 may find one in the profile (`endpoint_url` in ~/.aws/config): the same here
        resolved = s3_client().meta.endpoint_url
        endpoint = None if resolved.split("//")[-1].split("/")[0].endswith(".amazonaws.com") else resolved
    with _aws_lock:
        session = aws_session()
        credentials = session.get_credentials()
        snapshot = credentials is not None and credentials.method not in _RENEWED_BY_PYARROW
        frozen = credentials.get_frozen_credentials() if snapshot else None
    keys: dict[str, str] = {}
    if frozen is not None:
        keys = {"access_key": frozen.access_key, "secret_key": frozen.secret_key}
        if frozen.token:
            keys["session_token"] = frozen.token
    # checkpoints are written through this filesystem: a brief outage of the store (seconds) is retried
    # with backoff instead of failing the worker group (pyarrow's default gives up after 3 attempts)
    return pafs.S3FileSystem(endpoint_override=endpoint, region=aws_region(session),
                             scheme="http" if endpoint and endpoint.startswith("http://") else "https",
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=10), **keys)


def storage_for(uri: str) -> Storage:
    """The backend for ``uri``. One S3 client per distinct AWS environment (clients are thread-safe)."""
    if not is_s3(uri):
        return _local
    key = _aws_env()
    with _aws_lock:
        s3 = _s3_storages.get(key)
        if s3 is None:
            s3 = _s3_storages[key] = S3Storage()
    return s3
