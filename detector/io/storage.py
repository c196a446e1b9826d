"""URIs -> pyarrow filesystems, listing, reading and atomic writes.

Accepted URIs: ``s3://bucket/key``, ``file:///abs/path`` and plain local paths. Keys are
used as written (spaces and non-ASCII included), never percent-decoded.

S3 uses the standard AWS credential chain. A custom endpoint (MinIO, Ceph, the local
test server) comes from ``AWS_ENDPOINT_URL``, which pyarrow does not read by itself, so
it is passed explicitly here.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import posixpath
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.fs as pafs


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object. `etag` changes whenever the content does."""

    uri: str
    size: int
    etag: str


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with forward slashes (also for local paths)."""
    return posixpath.join(uri.rstrip("/") if uri not in ("/", "s3://") else uri, *parts)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return the filesystem holding `uri` and the path inside it."""
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :]
    return pafs.LocalFileSystem(), local_path(uri)


def local_path(uri: str) -> str:
    if uri.startswith("file://"):
        return os.path.abspath(uri[len("file://") :])
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r} (use s3://, file:// or a path)")
    return os.path.abspath(uri)


def absolute(uri: str) -> str:
    """`uri` with a relative local path made absolute against this process's directory:
    for handing to processes that run elsewhere (Ray Train's workers change into their
    run's directory, so a path relative to the command's directory misses there)."""
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return local_path(uri)


def s3_endpoint() -> dict[str, str]:
    """pyarrow S3 options derived from the standard AWS environment variables."""
    options = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["endpoint_override"] = parsed.netloc
        options["scheme"] = parsed.scheme
    return {key: value for key, value in options.items() if value}


@lru_cache(maxsize=8)
def _cached_s3(options: tuple[tuple[str, str], ...]) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(**dict(options))


def s3_filesystem() -> pafs.S3FileSystem:
    # Keyed by the environment so tests that change AWS_ENDPOINT_URL get a fresh client.
    return _cached_s3(tuple(sorted(s3_endpoint().items())))


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        return _get_object(uri)[0]
    with pafs.LocalFileSystem().open_input_stream(local_path(uri)) as stream:
        return stream.read()


def read_prefix(uri: str, size: int, want_rest: Callable[[bytes], bool]) -> tuple[bytes, bool]:
    """The first `size` bytes of an object, and the rest only when `want_rest(first)` asks
    for it (on S3 a ranged GET for each part; the second only of the same version).
    Returns (bytes, whole): `whole` is False when the rest was left unread."""
    if is_s3(uri):
        first, etag = _get_object(uri, f"bytes=0-{size - 1}")
        return _with_rest(first, size, want_rest,
                          lambda: _get_object(uri, f"bytes={size}-", if_match=etag)[0])
    with pafs.LocalFileSystem().open_input_stream(local_path(uri)) as stream:
        return _with_rest(stream.read(size), size, want_rest, stream.read)


def _with_rest(first: bytes, size: int, want_rest: Callable[[bytes], bool],
               rest: Callable[[], bytes]) -> tuple[bytes, bool]:
    if len(first) < size:  # that was all of it
        return first, True
    if not want_rest(first):
        return first, False
    return first + rest(), True


# S3 errors that mean the object (or its bucket) is not there.
_MISSING = {"NoSuchKey", "NoSuchBucket", "404"}


def _get_object(uri: str, byte_range: str | None = None,
                if_match: str | None = None) -> tuple[bytes, str]:
    """(bytes, ETag) of an S3 object, or of `byte_range` of it, in one GET. pyarrow's
    streams send a HEAD before every GET (it takes no listed size in Python), which
    doubles a scan's requests and their latency. Errors are those pyarrow raises:
    FileNotFoundError when the object is missing, OSError for any other failure."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri[len("s3://") :].partition("/")
    request = {"Bucket": bucket, "Key": key}
    if byte_range:
        request["Range"] = byte_range
    if if_match:
        request["IfMatch"] = if_match
    try:
        response = s3_client().get_object(**request)
        return response["Body"].read(), response["ETag"]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in _MISSING:
            raise FileNotFoundError(f"{uri}: {exc}") from exc
        if code == "InvalidRange":  # a range past the end: the object is empty
            return b"", ""  # no rest to ask for, so no version to pin
        raise OSError(f"{uri}: {exc}") from exc
    except BotoCoreError as exc:
        raise OSError(f"{uri}: {exc}") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Readers see the old content or the new, never a part.

    On S3 a single PUT only becomes visible once complete; locally we rename a temp file.
    """
    fs, path = resolve(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_objects(uri: str, patterns: Iterable[str] | None = None) -> Iterator[ObjectInfo]:
    """Every object below `uri` (recursively, sorted by URI), optionally filtered by
    case-insensitive glob patterns on the file name. S3 listings paginate as needed and
    carry the objects' real ETags."""
    lowered = [p.lower() for p in patterns] if patterns else None
    listed = _list_s3(uri) if is_s3(uri) else _list_local(uri)
    for info in sorted(listed, key=lambda o: o.uri):
        name = posixpath.basename(info.uri).lower()
        if lowered and not any(fnmatch.fnmatchcase(name, p) for p in lowered):
            continue
        yield info


def _list_s3(uri: str) -> Iterator[ObjectInfo]:
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"  # a prefix names a folder: s3://b/img must not match s3://b/img2/x
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):  # folder marker objects
                yield ObjectInfo(f"s3://{bucket}/{item['Key']}", item["Size"],
                                 item["ETag"].strip('"'))


def _list_local(uri: str) -> Iterator[ObjectInfo]:
    fs, root = resolve(uri)
    selector = pafs.FileSelector(root.rstrip("/"), recursive=True, allow_not_found=True)
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.File:
            yield ObjectInfo(uri=info.path, size=info.size,
                             etag=local_etag(info.size, info.mtime_ns))


def local_etag(size: int, mtime_ns: int) -> str:
    """Local files have no ETag: size + mtime changes whenever a file is replaced, which
    is what report resumption needs."""
    return hashlib.sha1(f"{size}:{mtime_ns}".encode()).hexdigest()[:16]


# The variables boto3 builds an S3 client from: a client is kept per combination, so a
# process whose environment points elsewhere (tests, one endpoint per module) or carries
# new credentials gets a new one, as it did when every call built its own.
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
               "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
               "AWS_DEFAULT_REGION")
_client_lock = threading.Lock()


def s3_client():
    """This process's boto3 S3 client (boto3 reads AWS_ENDPOINT_URL and the credential
    chain itself). Clients are thread-safe, and building one costs tens of milliseconds,
    so reads share it."""
    return _cached_client(tuple(os.environ.get(name) for name in _CLIENT_ENV))


@lru_cache(maxsize=8)
def _cached_client(_environment: tuple[str | None, ...]):
    import boto3
    from botocore.config import Config

    with _client_lock:  # boto3's sessions are not thread-safe: one built at a time
        # As many connections as a task's reads in flight (io.reads), and a few to spare.
        return boto3.session.Session().client("s3", config=Config(max_pool_connections=16))


def delete_tree(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def publish_dir(local_dir: str, uri: str, commit_file: str) -> None:
    """Copy a finished local directory to `uri` so that it appears complete or not at all.

    Locally the directory is renamed into place (atomic). On S3, where there is no
    rename, every other file is uploaded first and `commit_file` last: readers treat a
    prefix without it as absent, so a crash mid-upload never looks like an artifact.
    """
    if not os.path.exists(os.path.join(local_dir, commit_file)):
        raise FileNotFoundError(f"{commit_file} missing from {local_dir}")
    if not is_s3(uri):
        target = local_path(uri)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        staging = f"{target}.staging-{uuid.uuid4().hex[:8]}"
        shutil.copytree(local_dir, staging)
        if os.path.exists(target):
            retired = f"{target}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, retired)
            os.rename(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, target)
        return
    fs, path = resolve(uri)
    if fs.get_file_info(join(path, commit_file)).type == pafs.FileType.File:
        fs.delete_file(join(path, commit_file))  # un-publish the old one before overwriting
    upload_dir(local_dir, uri, last=commit_file)


def upload_dir(local_dir: str, uri: str, last: str | None = None) -> None:
    """Copy every file below `local_dir` to `uri` (any storage), file by file, `last`
    (a path relative to `local_dir`) after all the others."""
    files = []
    for root, _, names in os.walk(local_dir):
        for name in names:
            files.append(os.path.relpath(os.path.join(root, name), local_dir))
    for rel in sorted(files, key=lambda f: (f == last, f)):
        with open(os.path.join(local_dir, rel), "rb") as handle:
            write_bytes(join(uri, rel.replace(os.sep, "/")), handle.read())


def download_dir(uri: str, local_dir: str) -> None:
    """Copy every file below `uri` into `local_dir`, keeping relative paths."""
    fs, root = resolve(uri)
    root = root.rstrip("/")
    selector = pafs.FileSelector(root, recursive=True)
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root) + 1 :]
        target = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)


@contextlib.contextmanager
def local_files(directory: str, names: Iterable[str]) -> Iterator[str]:
    """A local directory holding the files `names` of `directory`: the directory itself
    when it is local (read in place), else a download of those files into a temporary
    directory, removed on exit."""
    if not is_s3(directory):
        yield local_path(directory)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            download_file(join(directory, name), os.path.join(tmp, name))
        yield tmp


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local path to read the file at `uri` from (see `local_files`)."""
    parent, name = posixpath.split(uri.rstrip("/"))
    with local_files(parent, [name]) as directory:
        yield os.path.join(directory, name)


def download_file(uri: str, local_file: str) -> None:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as src, open(local_file, "wb") as dst:
        shutil.copyfileobj(src, dst)
