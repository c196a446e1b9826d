"""Ray Data pipelines: object storage -> Parquet training shards -> training batches.

Preparation streams: the driver lists objects (metadata only), Ray Data reads, hashes and
decodes them in parallel tasks with `detector.preprocess` (the path serving uses too),
and the last stage writes Parquet parts itself and returns one small summary row per
object. The driver only ever holds those summaries, so memory stays flat as inputs grow.

The shard set's `manifest.json` lists its parts and is written last: it is the commit
marker, and readers only read the parts it names, so a crashed or repeated run never
mixes half-written files into a dataset.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from detector import audit, preprocess, storage
from detector.config import PrepareConfig

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
READ_ATTEMPTS = 3
_READ_THREADS = 8  # object-store reads are latency-bound; overlap them within a task


@dataclass(frozen=True)
class Source:
    uri: str
    label: int  # 1 = AI-generated, 0 = real


def split_of(sha256: str, fractions: tuple[float, ...], seed: int) -> str:
    """The split an image belongs to: a pure function of its content and the seed, so
    re-running, or adding images, never moves an image between splits."""
    digest = hashlib.blake2b(f"{seed}:{sha256}".encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "big") / 2**64
    cumulative = 0.0
    for name, fraction in zip(SPLITS, fractions, strict=True):
        cumulative += fraction
        if point < cumulative:
            return name
    return SPLITS[-1]


def list_inputs(config: PrepareConfig) -> list[dict]:
    """Every object under the real and fake prefixes, sampled per class if asked."""
    items = []
    for label, uris in ((0, config.real), (1, config.fake)):
        objects = [o for uri in uris for o in storage.list_objects(uri)]
        if config.per_class is not None and len(objects) > config.per_class:
            # Deterministic for a seed, independent of listing order.
            objects.sort(key=lambda o: hashlib.sha1(f"{config.seed}:{o.uri}".encode()).digest())
            objects = objects[: config.per_class]
        items += [{"uri": o.uri, "label": label, "size_bytes": o.size} for o in objects]
    # Interleave classes and folders in a seeded order: parts then hold a mix of both
    # classes, so even an unshuffled read never feeds a model one class at a time.
    items.sort(key=lambda item: hashlib.sha1(f"{config.seed}/{item['uri']}".encode()).digest())
    return items


def _read_with_retries(uri: str) -> bytes:
    for attempt in range(READ_ATTEMPTS):
        try:
            return storage.read_bytes(uri)
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == READ_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def fetch(uri: str) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, None, None), or (None, code, detail) after retrying transient failures."""
    try:
        return _read_with_retries(uri), None, None
    except FileNotFoundError as exc:
        return None, "vanished", str(exc)
    except OSError as exc:
        return None, "read-failed", str(exc)


def fetch_many(uris: list[str]) -> list[tuple[bytes | None, str | None, str | None]]:
    """`fetch` for each URI, `_READ_THREADS` reads in flight (they wait on storage)."""
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
        return list(pool.map(fetch, uris))


def decode_batch(
    batch: dict[str, np.ndarray], image_size: int, fractions: tuple[float, ...], seed: int
) -> pa.Table:
    """Ray Data stage: read, hash and decode a batch of objects into model-ready rows."""
    uris = [str(u) for u in batch["uri"]]
    fetched = fetch_many(uris)
    out: dict[str, list] = {name: [] for name in ROW_FIELDS}
    for uri, label, (blob, error, detail) in zip(uris, batch["label"], fetched, strict=True):
        row = dict.fromkeys(ROW_FIELDS)
        row.update(source_uri=uri, label=int(label), error=error, error_detail=detail)
        if blob is not None:
            row["size_bytes"] = len(blob)
            row["sha256"] = hashlib.sha256(blob).hexdigest()
            row["split"] = split_of(row["sha256"], fractions, seed)
            try:
                pixels, info = preprocess.load_image(blob, image_size)
            except preprocess.ImageError as err:
                row.update(error=err.code, error_detail=err.detail)
            else:
                row.update(image=pixels.tobytes(), source_format=info.format,
                           width=info.width, height=info.height)
        for name in ROW_FIELDS:
            out[name].append(row[name])
    # An explicit schema: a batch without a single error must not infer `error` as null.
    return pa.table(out, schema=ROW_SCHEMA)


ROW_SCHEMA = pa.schema(
    [
        ("image", pa.binary()), ("label", pa.int8()), ("source_uri", pa.string()),
        ("source_format", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("sha256", pa.string()), ("size_bytes", pa.int64()), ("split", pa.string()),
        ("error", pa.string()), ("error_detail", pa.string()),
    ]
)
ROW_FIELDS = tuple(ROW_SCHEMA.names)
SHARD_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),  # raw uint8 pixels, image_size x image_size x 3 (lossless)
        ("label", pa.int8()),
        ("source_uri", pa.string()),
        ("source_format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
    ]
)


def write_parts(table: pa.Table, out_uri: str, run_id: str) -> pa.Table:
    """Ray Data stage: write each split's decoded rows of a batch as one Parquet part and
    pass on a summary row per object (everything but the pixels)."""
    parts = [None] * table.num_rows
    ok = pc.is_null(table["error"])
    for split in SPLITS:
        mask = pc.and_(ok, pc.equal(table["split"], split))
        rows = table.filter(mask)
        if rows.num_rows == 0:
            continue
        name = f"{split}/part-{run_id}-{uuid.uuid4().hex[:12]}.parquet"
        shard = rows.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
        fs, path = storage.resolve(storage.join(out_uri, name))
        if not storage.is_s3(out_uri):
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(shard, path, filesystem=fs, compression="zstd")
        for i, selected in enumerate(mask.to_pylist()):
            if selected:
                parts[i] = name
    return table.drop_columns(["image"]).append_column("part", pa.array(parts, pa.string()))


def prepare(config: PrepareConfig, progress: bool = True) -> dict:
    """Run the preparation pipeline on the current Ray cluster; returns the manifest."""
    import ray

    if abs(sum(config.split) - 1.0) > 1e-6 or len(config.split) != 3:
        raise ValueError(f"--split needs three fractions summing to 1, got {config.split}")
    started = time.perf_counter()
    items = list_inputs(config)
    if not items:
        raise ValueError("no objects found under the given --real/--fake URIs")
    ray.data.DataContext.get_current().enable_progress_bars = progress
    run_id = uuid.uuid4().hex[:8]
    # Parts of at most rows_per_file rows (a part is assembled in a task's memory, so this
    # bounds memory whatever the input size), and enough of them that every CPU gets work.
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    rows_per_part = max(32, min(config.rows_per_file, len(items) // (2 * cpus)))
    dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 32, 2000)))
    summaries = dataset.map_batches(
        decode_batch,
        fn_kwargs={"image_size": config.image_size, "fractions": config.split,
                   "seed": config.seed},
        batch_size=32,
    ).map_batches(
        write_parts,
        fn_kwargs={"out_uri": config.out, "run_id": run_id},
        batch_size=rows_per_part,
        batch_format="pyarrow",
    )
    rows = [row for batch in summaries.iter_batches(batch_size=4096, batch_format="pyarrow")
            for row in batch.to_pylist()]
    manifest = build_manifest(config, rows, time.perf_counter() - started)
    storage.write_bytes(storage.join(config.out, MANIFEST), json.dumps(manifest, indent=2).encode())
    _remove_stale_parts(config.out, manifest)
    return manifest


def build_manifest(config: PrepareConfig, rows: list[dict], seconds: float) -> dict:
    """Counts, parts, skipped objects, duplicates and the bias audit, from summary rows."""
    written = [r for r in rows if r["error"] is None]
    skipped = sorted(
        ({"uri": r["source_uri"], "error": r["error"], "detail": r["error_detail"]}
         for r in rows if r["error"] is not None),
        key=lambda r: r["uri"],
    )
    counts = {s: {"real": 0, "fake": 0} for s in SPLITS}
    for r in written:
        counts[r["split"]]["fake" if r["label"] else "real"] += 1
    seen: set[str] = set()
    duplicates = 0
    for r in written:
        duplicates += r["sha256"] in seen
        seen.add(r["sha256"])
    fingerprint = hashlib.sha256(
        "\n".join(sorted(f"{r['sha256']}:{r['label']}" for r in written)).encode()
    ).hexdigest()[:16]
    return {
        "format_version": 1,
        "image_size": config.image_size,
        "preprocess_version": preprocess.PREPROCESS_VERSION,
        "pixel_layout": "uint8 HxWx3 RGB, row-major, raw bytes in column 'image'",
        "labels": {"0": "real", "1": "ai-generated"},
        "seed": config.seed,
        "split_fractions": list(config.split),
        "sources": {"real": list(config.real), "fake": list(config.fake)},
        "per_class": config.per_class,
        "objects": len(rows),
        "written": len(written),
        "counts": counts,
        "duplicates": duplicates,
        "fingerprint": fingerprint,
        "parts": {s: sorted({r["part"] for r in written if r["split"] == s}) for s in SPLITS},
        "skipped": skipped,
        "audit": audit.bias_audit(written),
        "seconds": round(seconds, 2),
        "images_per_second": round(len(rows) / seconds, 1) if seconds else None,
    }


def _remove_stale_parts(out_uri: str, manifest: dict) -> None:
    """Delete parts of earlier runs now that the new manifest no longer names them."""
    keep = {p for parts in manifest["parts"].values() for p in parts}
    for split in SPLITS:
        for obj in storage.list_objects(storage.join(out_uri, split)):
            if f"{split}/{obj.uri.rsplit('/', 1)[-1]}" not in keep:
                fs, path = storage.resolve(obj.uri)
                fs.delete_file(path)


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
