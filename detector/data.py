"""Shard sets: their layout, commit manifest and readers, and the object reads every job uses.

A shard set is `OUT/train/`, `OUT/val/`, `OUT/test/` Parquet parts (written by
`detector.prepare`) and `OUT/manifest.json`, which lists the parts and is written last: it
is the commit marker, and readers only read the parts it names, so a crashed or repeated
run never mixes half-written files into a dataset.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from detector import preprocess, storage

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
READ_ATTEMPTS = 3
SNIFF_BYTES = 64 * 1024  # what is read of an object not named as an image to identify it
T = TypeVar("T")
_READ_THREADS = 8  # object-store reads are latency-bound; overlap them within a task


class Fetched(NamedTuple):
    """An object's bytes, or why there are none; `bytes_read` counts what was downloaded."""

    data: bytes | None
    error: str | None = None
    detail: str | None = None
    bytes_read: int = 0


def _with_retries(read: Callable[[], T]) -> T:
    for attempt in range(READ_ATTEMPTS):
        try:
            return read()
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == READ_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def fetch(uri: str, size: int | None = None) -> Fetched:
    """Read an object, retrying transient failures. One whose name does not say it is an
    image (no extension, or one Pillow does not know) and that is larger than
    `SNIFF_BYTES` is sniffed: its first `SNIFF_BYTES` are read, and the rest only when
    they can start an image, so a large log or archive under a bare key costs 64 KiB."""
    try:
        if preprocess.named_as_image(uri) or (size is not None and size <= SNIFF_BYTES):
            blob = _with_retries(lambda: storage.read_bytes(uri))
            return Fetched(blob, bytes_read=len(blob))
        blob, whole = _with_retries(
            lambda: storage.read_prefix(uri, SNIFF_BYTES, preprocess.could_be_image))
    except FileNotFoundError as exc:
        return Fetched(None, "vanished", str(exc))
    except OSError as exc:
        return Fetched(None, "read-failed", str(exc))
    if not whole:
        return Fetched(None, "not-an-image", f"not a recognised image format (its first "
                       f"{len(blob)} bytes match no image signature; the rest was not read)",
                       len(blob))
    return Fetched(blob, bytes_read=len(blob))


def fetch_many(uris: list[str], sizes: list[int | None] | None = None) -> list[Fetched]:
    """`fetch` for each URI (with its listed size, when known), `_READ_THREADS` reads in
    flight (they wait on storage)."""
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
        return list(pool.map(fetch, uris, sizes or [None] * len(uris)))


SHARD_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),  # raw uint8 pixels, image_size x image_size x 3 (lossless)
        ("label", pa.int8()),
        ("source_uri", pa.string()),
        ("source_format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        ("phash", pa.string()),  # detector.duplicates.phash of the stored pixels
    ]
)


def read_manifest(shards_uri: str) -> dict:
    uri = storage.join(shards_uri, MANIFEST)
    if not storage.exists(uri):
        raise FileNotFoundError(f"no prepared shards at {shards_uri} ({MANIFEST} missing)")
    return json.loads(storage.read_bytes(uri))


def part_uris(shards_uri: str, split: str, manifest: dict | None = None) -> list[str]:
    manifest = manifest or read_manifest(shards_uri)
    return [storage.join(shards_uri, part) for part in manifest["parts"][split]]


def read_split(shards_uri: str, split: str, columns: list[str] | None = None,
               manifest: dict | None = None):
    """A Ray Data dataset over one split's parts (only those the manifest names)."""
    import ray

    uris = part_uris(shards_uri, split, manifest)
    if not uris:
        raise ValueError(f"split {split!r} of {shards_uri} is empty")
    fs, _ = storage.resolve(uris[0])
    paths = [storage.resolve(u)[1] for u in uris]
    return ray.data.read_parquet(paths, filesystem=fs, columns=columns or ["image", "label"])


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
