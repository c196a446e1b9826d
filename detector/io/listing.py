"""Listing a source as distributed work: a prefix (or a key manifest) split into ranges.

A scan never lists a whole bucket in one place. The driver only *plans*: a few delimiter
listings near the top of the prefix find its folders, and each becomes a `ListingRange`
that a Ray task lists page by page while the scan runs (`iter_range`). A range is either a
prefix listed recursively, or a prefix's own objects plus any folder that is not a range of
its own (so folders created after planning are still covered exactly once).

Every range yields objects in a fixed order with a sort `key` (the URI for listings, the
row position for manifests), which is what report partitions are cut along.

For billion-object buckets, `--manifest URI` reads keys from CSV or Parquet files (an S3
Inventory report, for example): one range per file, or per row group of a single Parquet
file, so listing costs no LIST calls at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from detector.io import storage
from detector.io.selection import NotSelected, Selection

PLAN_LIST_CALLS = 32  # delimiter listings the driver may spend on planning
PLAN_MAX_RANGES = 16  # listing parallelism to spare; more would only cut smaller parts
LISTING_TASKS = 4  # ranges listed at once by a scan or prepare; each is I/O-bound and cheap
MANIFEST_SUFFIXES = (".csv", ".csv.gz", ".parquet")


@dataclass(frozen=True)
class ListingRange:
    """One unit of listing work. `prefix` ends in "/" (or is a local directory path);
    objects under a folder in `exclude` belong to other ranges. A manifest range names a
    file and optionally one of its row groups."""

    prefix: str = ""
    exclude: tuple[str, ...] = ()
    manifest: str = ""
    row_group: int | None = None

    @property
    def id(self) -> str:
        """Stable across runs for the same range: part file names derive from it."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    def to_dict(self) -> dict:
        return {**asdict(self), "exclude": list(self.exclude)}

    @classmethod
    def from_dict(cls, data: dict) -> ListingRange:
        return cls(**{**data, "exclude": tuple(data.get("exclude", ()))})


@dataclass(frozen=True)
class Listed:
    """One listed object: `key` orders objects within their range."""

    uri: str
    size: int | None
    etag: str | None
    key: str


@dataclass
class Plan:
    """What the driver holds about a source: its ranges, never its objects."""

    source: str
    ranges: list[ListingRange] = field(default_factory=list)
    list_calls: int = 0


# ------------------------------------------------------------------------------ planning


def plan(source: str, manifest: str | None = None, max_calls: int = PLAN_LIST_CALLS,
         max_ranges: int = PLAN_MAX_RANGES) -> Plan:
    """Split `source` (or a key `manifest`) into at most `max_ranges` listing ranges,
    breadth first, spending at most `max_calls` delimiter listings. Raises
    FileNotFoundError for a missing bucket, directory or manifest, and ValueError when
    the prefix holds nothing at all."""
    if manifest:
        return Plan(source=manifest, ranges=_manifest_ranges(manifest))
    root = _root_prefix(source)
    result = Plan(source=source)
    frontier = [root]
    while frontier and result.list_calls < max_calls:
        prefix = frontier.pop(0)
        children, has_objects, complete, calls = _folders(prefix)
        result.list_calls += calls
        if prefix == root and not children and not has_objects:
            raise ValueError(f"no objects under {source}")
        planned = len(result.ranges) + len(frontier)
        if not complete or not children or planned + 1 + len(children) > max_ranges:
            result.ranges.append(ListingRange(prefix=prefix))  # listed whole, recursively
            continue
        result.ranges.append(ListingRange(prefix=prefix, exclude=tuple(children)))
        frontier += children
    result.ranges += [ListingRange(prefix=p) for p in frontier]
    return result


def _root_prefix(source: str) -> str:
    if storage.is_s3(source):
        bucket, _, prefix = source[len("s3://"):].partition("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"  # a prefix names a folder: s3://b/img must not match s3://b/img2/x
        return f"s3://{bucket}/{prefix}"
    path = storage.local_path(source)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such directory: {path}")
    return path.rstrip("/") + "/"


def _folders(prefix: str, max_pages: int = 2) -> tuple[list[str], bool, bool, int]:
    """(child folders, whether `prefix` holds objects itself, whether the listing was
    complete within `max_pages`, LIST calls spent)."""
    if not storage.is_s3(prefix):
        entries = list(os.scandir(prefix))
        dirs = sorted(e.path + "/" for e in entries if e.is_dir(follow_symlinks=False))
        return dirs, any(e.is_file() for e in entries), True, 0
    bucket, key_prefix = _split(prefix)
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=key_prefix, Delimiter="/")
    children, has_objects, calls = [], False, 0
    for page in _check_bucket(pages, bucket):
        calls += 1
        children += [f"s3://{bucket}/{p['Prefix']}" for p in page.get("CommonPrefixes", [])]
        has_objects = has_objects or bool(page.get("Contents"))
        if not page.get("IsTruncated"):
            return children, has_objects, True, calls
        if calls >= max_pages:
            return children, has_objects, False, calls
    return children, has_objects, True, calls


def _manifest_ranges(manifest: str) -> list[ListingRange]:
    fs, path = storage.resolve(manifest)
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no key manifest at {manifest}")
    if info.type == pafs.FileType.Directory:
        files = sorted(o.uri for o in storage.list_objects(manifest)
                       if o.uri.lower().endswith(MANIFEST_SUFFIXES))
        if not files:
            raise ValueError(f"no .csv, .csv.gz or .parquet files under {manifest}")
        return [ListingRange(manifest=f) for f in files]
    if manifest.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        groups = pq.ParquetFile(path, filesystem=fs).num_row_groups
        return [ListingRange(manifest=manifest, row_group=g) for g in range(groups)]
    return [ListingRange(manifest=manifest)]


# ------------------------------------------------------------------------------ listing


def iter_range(rng: ListingRange, selection: Selection | None = None,
               after: str | None = None, last: str | None = None,
               not_selected: NotSelected | None = None) -> Iterator[Listed]:
    """The objects of one range to read, in key order (`selection`'s rules; every object
    without one), optionally only keys in (`after`, `last`] (to list one partition
    again). Objects the rules leave out are counted into `not_selected`."""
    if rng.manifest:
        objects = _iter_manifest(rng)
    elif storage.is_s3(rng.prefix):
        objects = _iter_s3(rng, after)
    else:
        objects = _iter_local(rng.prefix.rstrip("/"), set(rng.exclude))
    for obj in objects:
        if after is not None and obj.key <= after:
            continue
        if last is not None and obj.key > last:
            return
        reason = selection.reason(obj.uri) if selection is not None else None
        if reason is not None:
            if not_selected is not None:
                not_selected.add(reason, obj.uri)
            continue
        yield obj


def _iter_s3(rng: ListingRange, after: str | None) -> Iterator[Listed]:
    bucket, key_prefix = _split(rng.prefix)
    if not rng.exclude:
        yield from _iter_s3_flat(bucket, key_prefix, after)
        return
    # Objects of the prefix itself and folders that are no range of their own, merged in
    # key order: a delimiter page lists both, each sorted, and a folder's keys sort
    # exactly where the folder does.
    excluded = set(rng.exclude)
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=key_prefix, Delimiter="/")
    for page in _check_bucket(pages, bucket):
        entries = [(item["Key"], item) for item in page.get("Contents", [])]
        entries += [(p["Prefix"], None) for p in page.get("CommonPrefixes", [])]
        for key, item in sorted(entries, key=lambda e: e[0]):
            if item is not None:
                if not key.endswith("/"):
                    yield _listed_s3(bucket, item)
            elif f"s3://{bucket}/{key}" not in excluded:
                yield from _iter_s3_flat(bucket, key, None)


def _iter_s3_flat(bucket: str, key_prefix: str, after: str | None) -> Iterator[Listed]:
    kwargs = {"Bucket": bucket, "Prefix": key_prefix}
    if after and after.startswith(f"s3://{bucket}/{key_prefix}"):
        kwargs["StartAfter"] = after[len(f"s3://{bucket}/"):]
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(**kwargs)
    for page in _check_bucket(pages, bucket):
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):  # folder marker objects
                yield _listed_s3(bucket, item)


def _listed_s3(bucket: str, item: dict) -> Listed:
    uri = f"s3://{bucket}/{item['Key']}"
    return Listed(uri, int(item["Size"]), item["ETag"].strip('"'), uri)


def _iter_local(directory: str, excluded: set[str]) -> Iterator[Listed]:
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    # Sort as the full paths sort: a folder "b" lists as "b/", after a file "b.jpg".
    entries.sort(key=lambda e: e.name + ("/" if e.is_dir(follow_symlinks=False) else ""))
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if entry.path + "/" not in excluded:
                yield from _iter_local(entry.path, set())
        elif entry.is_file():
            stat = entry.stat()
            yield Listed(entry.path, stat.st_size,
                         storage.local_etag(stat.st_size, stat.st_mtime_ns), entry.path)


def _iter_manifest(rng: ListingRange) -> Iterator[Listed]:
    """Rows of a key manifest: `uri`, or `bucket` + `key`; optional `size`/`size_bytes`
    and `etag`/`e_tag`. The key is the row's position, so partitions stay put."""
    for position, row in enumerate(_manifest_rows(rng)):
        uri = row.get("uri")
        if not uri:
            uri = f"s3://{row['bucket']}/{row['key']}"
        size = row.get("size_bytes", row.get("size"))
        etag = row.get("etag", row.get("e_tag"))
        yield Listed(str(uri), None if size is None else int(size),
                     None if etag is None else str(etag).strip('"'), f"{position:015d}")


def _manifest_rows(rng: ListingRange) -> Iterator[dict]:
    import pyarrow.parquet as pq

    fs, path = storage.resolve(rng.manifest)
    if rng.manifest.lower().endswith(".parquet"):
        parquet = pq.ParquetFile(path, filesystem=fs)
        groups = [rng.row_group] if rng.row_group is not None else range(parquet.num_row_groups)
        for group in groups:
            yield from parquet.read_row_group(group).to_pylist()
        return
    import pyarrow.csv as pacsv

    with fs.open_input_stream(path, compression="detect") as stream:
        reader = pacsv.open_csv(stream)
        columns = set(reader.schema.names)
        if "uri" not in columns and not {"bucket", "key"} <= columns:
            raise ValueError(f"{rng.manifest}: a key manifest needs a header with `uri`, "
                             f"or `bucket` and `key` (found {sorted(columns)})")
        for batch in reader:
            yield from batch.to_pylist()


# ------------------------------------------------------------------------------ helpers


def _split(prefix: str) -> tuple[str, str]:
    bucket, _, key_prefix = prefix[len("s3://"):].partition("/")
    return bucket, key_prefix


def _check_bucket(pages, bucket: str):
    """Turn a missing bucket into one line instead of a botocore traceback."""
    from botocore.exceptions import ClientError

    try:
        yield from pages
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
            raise FileNotFoundError(f"no such bucket: {bucket}") from None
        raise
