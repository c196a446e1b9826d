"""Shard sets: their layout, commit manifest and readers.

A shard set is `OUT/train/`, `OUT/val/`, `OUT/test/` Parquet parts (written by
`detector.data.prepare`) and `OUT/manifest.json`, which lists the parts and is written last: it
is the commit marker, and readers only read the parts it names, so a crashed or repeated
run never mixes half-written files into a dataset.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from detector.io import parquet, storage

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
# What attribution answers for a generator it cannot name; so no source may be named it,
# and the manifest counts fakes from unnamed sources under it.
UNKNOWN = "unknown"


SHARD_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),  # raw uint8 pixels, image_size x image_size x 3 (lossless)
        ("label", pa.int8()),
        ("generator", pa.string()),  # a fake's source name (--fake NAME=URI); else null
        ("source_name", pa.string()),  # the --real/--fake source's name; null if unnamed
        ("source_uri", pa.string()),
        ("source_format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        ("phash", pa.string()),  # detector.data.duplicates.phash of the stored pixels
        ("size_bytes", pa.int64()),  # of the source object (null in sets before format 3)
    ]
)


def write_shard(out_uri: str, split: str, run_id: str, shard: pa.Table) -> str:
    """Write `shard` as a new part of `split`; returns its name (`split/part-...`)."""
    name = f"{split}/part-{run_id}-{uuid.uuid4().hex[:12]}.parquet"
    fs, path = storage.resolve(storage.join(out_uri, name))
    if not storage.is_s3(out_uri):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(shard, path, filesystem=fs, compression="zstd")
    return name


def read_manifest(shards_uri: str) -> dict:
    uri = storage.join(shards_uri, MANIFEST)
    if not storage.exists(uri):
        raise FileNotFoundError(f"no prepared shards at {shards_uri} ({MANIFEST} missing)")
    return json.loads(storage.read_bytes(uri))


def part_uris(shards_uri: str, split: str, manifest: dict | None = None) -> list[str]:
    manifest = manifest or read_manifest(shards_uri)
    return [storage.join(shards_uri, part) for part in manifest["parts"][split]]


def split_files(shards_uri: str, split: str, manifest: dict | None = None):
    """(filesystem, paths) of one split's parts (only those the manifest names)."""
    uris = part_uris(shards_uri, split, manifest)
    if not uris:
        raise ValueError(f"split {split!r} of {shards_uri} is empty")
    fs, _ = storage.resolve(uris[0])
    return fs, [storage.resolve(u)[1] for u in uris]


def read_split(shards_uri: str, split: str, columns: list[str] | None = None,
               manifest: dict | None = None):
    """A Ray Data dataset over one split's parts (only those the manifest names)."""
    fs, paths = split_files(shards_uri, split, manifest)
    return parquet.read_parquet(paths, fs, columns=columns or ["image", "label"])


def sample_split(shards_uri: str, split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` images of a split (pixels uint8 (N, S, S, 3), labels (N,)),
    reading parts one at a time until there are enough."""
    manifest = read_manifest(shards_uri)
    pixels, labels, have = [], [], 0
    for uri in part_uris(shards_uri, split, manifest):
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, filesystem=fs, columns=["image", "label"])
        table = table.slice(0, limit - have)
        pixels.append(decode_pixels(table["image"].to_pylist(), manifest["image_size"]))
        labels.append(table["label"].to_numpy())
        have += table.num_rows
        if have >= limit:
            break
    if not have:
        raise ValueError(f"split {split!r} of {shards_uri} is empty")
    return np.concatenate(pixels), np.concatenate(labels)


def source_shapes(shards_uri: str, split: str, manifest: dict | None = None
                  ) -> Iterator[tuple[str, int, int]]:
    """(source format, width, height) of each image of a split as it was before decoding,
    read part by part (only those three columns)."""
    fs, paths = split_files(shards_uri, split, manifest)
    for path in paths:
        table = pq.read_table(path, filesystem=fs, columns=["source_format", "width", "height"])
        yield from zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True)


def decode_pixels(images, image_size: int) -> np.ndarray:
    """Column of raw pixel bytes -> uint8 array (N, S, S, 3), without copying per row."""
    joined = b"".join(bytes(b) for b in images)
    return np.frombuffer(joined, dtype=np.uint8).reshape(-1, image_size, image_size, 3)


def read_split_local(shards_uri: str, split: str, columns: list[str] | None = None) -> pa.Table:
    """Read one split into memory without Ray (evaluation of small splits, tests)."""
    tables = []
    for uri in part_uris(shards_uri, split):
        fs, path = storage.resolve(uri)
        tables.append(pq.read_table(path, filesystem=fs, columns=columns))
    return pa.concat_tables(tables) if tables else pa.table({})


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG of a model-ready array (used to feed shard images back through
    `detector predict` and the HTTP API in tests)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
