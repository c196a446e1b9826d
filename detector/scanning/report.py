"""The scan report: a committed Parquet dataset at a prefix.

    OUT/part-<range>-<bound>.parquet   one per partition, written once, whole, by a worker
    OUT/_plan.json                     the listing ranges, written when the scan starts
    OUT/_manifest.json                 the commit: written last, after every part

A prefix without `_manifest.json` is not a report (yet): a scan deletes it before it
changes any part and writes it only once every partition has its part. Readers take the
parts with `pandas.read_parquet(OUT)`, `pyarrow.dataset.dataset(OUT)` or duckdb's
`read_parquet('OUT/*.parquet')`; names starting with "_" are not data to any of them.

Each part carries its partition's bounds and counts in its Parquet metadata, so a resumed
scan learns what is committed by reading footers, never the rows.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import posixpath
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from detector.io import storage

MANIFEST = "_manifest.json"
PLAN = "_plan.json"
NEAR_DUPLICATES = "_near_duplicates.parquet"  # with --group-duplicates, committed with it
PART_PREFIX = "part-"
META_KEY = b"detector"
FORMAT_VERSION = 5  # 3: decided_by and evidence; 4: generator columns; 5: media and videos

EVIDENCE_TYPE = pa.list_(pa.struct([("source", pa.string()), ("kind", pa.string()),
                                    ("strength", pa.string()), ("detail", pa.string()),
                                    ("generator", pa.string())]))
GENERATOR_SCORES_TYPE = pa.list_(pa.struct([("generator", pa.string()),
                                            ("score", pa.float64())]))
REPORT_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("size_bytes", pa.int64()),
        ("etag", pa.string()),
        ("media", pa.string()),  # image | video; null where the bytes were never read
        ("format", pa.string()),  # an image's format, a video's codec (H264, VP9, ...)
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("phash", pa.string()),  # detector.data.duplicates.phash of the scored pixels
        ("score_ai", pa.float64()),
        ("verdict", pa.string()),
        ("decided_by", pa.string()),  # provenance | classifier; see detector.verdicts.verdict
        ("evidence", EVIDENCE_TYPE),  # provenance findings, strongest first; see provenance
        # which generator made it: a name, `unknown` or null (detector.verdicts.attribution)
        ("generator", pa.string()),
        ("generator_scores", GENERATOR_SCORES_TYPE),  # the attribution head's top 3
        ("generator_decided_by", pa.string()),  # provenance | classifier
        # Videos only (detector.verdicts.video): the sampled frames' times and scores
        ("duration_s", pa.float64()),
        ("frames_scored", pa.int32()),
        ("frame_scores", pa.list_(pa.float64())),
        ("frame_times_s", pa.list_(pa.float64())),
        ("worst_frame_s", pa.float64()),  # the frame scored most likely AI
        ("model", pa.string()),
        ("threshold", pa.float64()),
        ("error", pa.string()),
        ("error_detail", pa.string()),
        ("scanned_at", pa.timestamp("us", tz="UTC")),
    ]
)
RETRYABLE_ERRORS = {"read-failed", "scan-failed"}  # never reused by --resume


def part_name(partition_id: str) -> str:
    return f"{PART_PREFIX}{partition_id}.parquet"


def write_part(out: str, name: str, table: pa.Table, meta: dict) -> None:
    """Write one part whole: rows sorted by URI in a single row group, its partition's
    bounds and counts in the footer. Readers see the whole file or none of it."""
    table = table.select(REPORT_SCHEMA.names).cast(REPORT_SCHEMA).sort_by("uri")
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=max(1, table.num_rows))
    storage.write_bytes(storage.join(out, name), buffer.getvalue())


def read_part(out: str, name: str) -> pa.Table:
    fs, path = storage.resolve(storage.join(out, name))
    return pq.read_table(path, filesystem=fs, schema=REPORT_SCHEMA)


def part_files(out: str) -> list[str]:
    """Names of the part files under `out` (O(partitions), not objects)."""
    fs, path = storage.resolve(out)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        raise ValueError(f"{out} is a single file (a report from an older version?); "
                         "a report is now a prefix of Parquet parts: remove it or pick "
                         "another --out")
    selector = pafs.FileSelector(path.rstrip("/"), recursive=False, allow_not_found=True)
    names = [posixpath.basename(i.path) for i in fs.get_file_info(selector)]
    return sorted(n for n in names if n.startswith(PART_PREFIX) and n.endswith(".parquet"))


def part_metadata(out: str, names: Iterable[str]) -> dict[str, dict]:
    """name -> the partition record in each part's footer (read in parallel)."""

    def read(name: str) -> tuple[str, dict | None]:
        fs, path = storage.resolve(storage.join(out, name))
        try:
            meta = pq.read_schema(path, filesystem=fs).metadata or {}
        except (OSError, pa.ArrowInvalid):
            return name, None  # unreadable: treated as not committed
        return name, json.loads(meta[META_KEY]) if META_KEY in meta else None

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        found = dict(pool.map(read, list(names)))
    return {name: meta for name, meta in found.items() if meta is not None}


def uncommit(out: str) -> None:
    """Remove the commit marker, and what was written with the commit: from now until the
    next commit, `out` is not a report."""
    for name in (MANIFEST, NEAR_DUPLICATES):
        storage.delete_tree(storage.join(out, name))  # a missing file is fine


def delete_parts(out: str, names: Iterable[str]) -> None:
    def delete(name: str) -> None:
        fs, path = storage.resolve(storage.join(out, name))
        fs.delete_file(path)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(delete, list(names)))


def write_json(out: str, name: str, data: dict) -> None:
    storage.write_bytes(storage.join(out, name), json.dumps(data, indent=2).encode())


def read_json(out: str, name: str) -> dict | None:
    uri = storage.join(out, name)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def read_manifest(out: str) -> dict:
    """The commit manifest; FileNotFoundError when `out` holds no committed report."""
    manifest = read_json(out, MANIFEST)
    if manifest is None:
        raise FileNotFoundError(f"no committed report at {out} ({MANIFEST} missing)")
    return manifest

