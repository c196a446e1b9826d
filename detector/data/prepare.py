"""`detector prepare`: object storage -> Parquet training shards, as distributed work.

    plan        the driver splits each --real/--fake prefix into listing ranges (as scans do);
                `NAME=URI` names a source: a fake's name is its images' `generator`
    list        Ray tasks list the ranges page by page (or sample --per-class from each)
    shuffle     classes and folders mixed, so no part holds one class or one folder
    labels      with --labels, every labelled image joins the listed objects (source `review`)
    decode      read (reads overlap), hash, split by content hash, decode with preprocess
    write       each batch's rows become one Parquet part per split; a summary row passes on
    base        with --base, each part of the base set is copied in, less the images a label
                replaced (`detector.data.extend`); its summary rows pass on the same way

The driver folds the summary rows into running totals (`Tally`): counts, part names, the
skipped objects, a bounded audit sample and an order-free fingerprint. Nothing it holds
grows with the number of images but the part names and the skipped list, which the
manifest must name. Byte-identical duplicates are counted afterwards by Ray Data from the
parts' `sha256` column. `manifest.json` is written last: it is the shard set's commit.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from detector.config import PrepareConfig
from detector.data import audit, duplicates, extend
from detector.data.labels import REVIEW_SOURCE
from detector.data.shards import (
    MANIFEST,
    SHARD_SCHEMA,
    SPLITS,
    UNKNOWN,
    read_manifest,
    write_shard,
)
from detector.io import listing, preprocess, storage
from detector.io.reads import fetch_many

DECODE_BATCH = 32
ROWS_PER_BLOCK = 64  # a decode task's input: two batches
BLOCK_BYTES = 1 << 20  # listing tasks hand on ~6k keys at a time, as scans do
AUDIT_ROWS = 20_000  # the bias audit's sample: enough for a 3-level tree's accuracy

ROW_SCHEMA = pa.schema(
    [
        ("image", pa.binary()), ("label", pa.int8()), ("generator", pa.string()),
        ("source_name", pa.string()), ("source_uri", pa.string()),
        ("source_format", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("sha256", pa.string()), ("phash", pa.string()), ("size_bytes", pa.int64()),
        ("split", pa.string()),
        ("error", pa.string()), ("error_detail", pa.string()),
    ]
)
ROW_FIELDS = tuple(ROW_SCHEMA.names)
LISTED_SCHEMA = pa.schema([("uri", pa.string()), ("label", pa.int8()),
                           ("source_name", pa.string()), ("generator", pa.string()),
                           ("size_bytes", pa.int64())])
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Source:
    """One --real/--fake value: `URI`, or `NAME=URI` to name the source (a fake's name is
    the generator of its images; a real one's is for slicing)."""

    label: int
    uri: str
    name: str | None = None

    @classmethod
    def parse(cls, text: str, label: int) -> Source:
        """`NAME=URI` when the part before the first `=` is a name (letters, digits, `.`, `_`,
        `-`); anything else is a URI, so `s3://b/k=v/` stays one (and `./a=b` a path)."""
        head, sep, rest = text.partition("=")
        if not (sep and rest and SOURCE_NAME.fullmatch(head)):
            return cls(label, text)
        if head.lower() == UNKNOWN:
            raise ValueError(f"{text!r}: {UNKNOWN!r} is what attribution answers for a "
                             "generator it cannot name; give the URI alone for unnamed fakes")
        if head.lower() == REVIEW_SOURCE:
            raise ValueError(f"{text!r}: {REVIEW_SOURCE!r} names the reviewers' labelled "
                             "images (--labels); name this source otherwise")
        return cls(label, rest, head)


def sources(config: PrepareConfig) -> list[Source]:
    """Every --real and --fake source, parsed."""
    return [Source.parse(text, label)
            for label, texts in ((0, config.real), (1, config.fake)) for text in texts]


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


def sample_rank(seed: int, uri: str) -> bytes:
    """--per-class keeps the objects of lowest rank: deterministic for a seed, and
    independent of listing order and of how the listing was split into ranges."""
    return hashlib.sha1(f"{seed}:{uri}".encode()).digest()


# ------------------------------------------------------------------------------ listing


def listing_specs(config: PrepareConfig) -> list[dict]:
    """One spec per listing range of every source, classes alternating (listing tasks
    then run on both classes at once). Raises for a missing bucket or an empty prefix."""
    per_class = []
    for label in (0, 1):
        per_class.append([{"label": label, "name": source.name, "range": rng.to_dict()}
                          for source in sources(config) if source.label == label
                          for rng in listing.plan(source.uri).ranges])
    return [spec for pair in itertools.zip_longest(*per_class) for spec in pair if spec]


def list_specs(batch: pa.Table, per_class: int | None, seed: int) -> Iterator[pa.Table]:
    """Ray Data stage: each spec's objects as they are listed, page-sized tables; with
    `per_class`, only the range's `per_class` objects of lowest rank (a bounded heap)."""
    for text in batch.column("spec").to_pylist():
        spec = json.loads(text)
        objects = listing.iter_range(listing.ListingRange.from_dict(spec["range"]))
        if per_class is not None:
            kept = heapq.nsmallest(per_class, objects, key=lambda o: sample_rank(seed, o.uri))
            yield _listed_table(kept, spec["label"], spec["name"])
            continue
        page = []
        for obj in objects:
            page.append(obj)
            if len(page) == 1000:
                yield _listed_table(page, spec["label"], spec["name"])
                page = []
        yield _listed_table(page, spec["label"], spec["name"])


def _listed_table(objects: list[listing.Listed], label: int, name: str | None) -> pa.Table:
    return pa.table({"uri": [o.uri for o in objects], "label": [label] * len(objects),
                     "source_name": [name] * len(objects),
                     "generator": [name if label else None] * len(objects),
                     "size_bytes": [o.size for o in objects]}, schema=LISTED_SCHEMA)


def sampled_items(listed, per_class: int, seed: int) -> list[dict]:
    """The `per_class` objects of lowest rank per class, from every range's own lowest:
    the driver holds at most `per_class` per class."""
    heaps: dict[int, list] = {0: [], 1: []}
    for batch in listed.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            keep_lowest(heaps[row["label"]], per_class, sample_rank(seed, row["uri"]),
                        row["uri"], (row["size_bytes"], row["source_name"], row["generator"]))
    return [{"uri": uri, "label": label, "source_name": name, "generator": generator,
             "size_bytes": size}
            for label, heap in heaps.items() for _, uri, (size, name, generator) in heap]


def keep_lowest(heap: list, limit: int, rank: bytes, key: str, payload) -> None:
    """Offer (rank, key, payload) to `heap`, which keeps the `limit` entries of lowest
    (rank, key): a max-heap through heapq's min-heap, on the rank's inverted bytes."""
    entry = (bytes(255 - b for b in rank), key)
    if len(heap) < limit:
        heapq.heappush(heap, (*entry, payload))
    elif entry > heap[0][:2]:
        heapq.heapreplace(heap, (*entry, payload))


# ------------------------------------------------------------------------------ decode, write


def decode_batch(
    batch: dict[str, np.ndarray], image_size: int, fractions: tuple[float, ...], seed: int
) -> pa.Table:
    """Ray Data stage: read, hash and decode a batch of objects into model-ready rows."""
    uris = [str(u) for u in batch["uri"]]
    sizes = batch.get("size_bytes")
    fetched = fetch_many(uris, None if sizes is None else [
        None if s is None or s != s else int(s) for s in sizes])  # None or NaN: not listed
    out: dict[str, list] = {name: [] for name in ROW_FIELDS}
    for uri, label, name, generator, (blob, error, detail, _) in zip(
            uris, batch["label"], batch["source_name"], batch["generator"], fetched,
            strict=True):
        # from_items makes a null column NaN
        name = name if isinstance(name, str) else None
        generator = generator if isinstance(generator, str) and label else None
        row = dict.fromkeys(ROW_FIELDS)
        row.update(source_uri=uri, label=int(label), error=error, error_detail=detail,
                   source_name=name, generator=generator)
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
                           width=info.width, height=info.height,
                           phash=duplicates.phash(pixels))
        for name in ROW_FIELDS:
            out[name].append(row[name])
    # An explicit schema: a batch without a single error must not infer `error` as null.
    return pa.table(out, schema=ROW_SCHEMA)


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
        name = write_shard(out_uri, split, run_id,
                           rows.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA))
        for i, selected in enumerate(mask.to_pylist()):
            if selected:
                parts[i] = name
    return table.drop_columns(["image"]).append_column("part", pa.array(parts, pa.string()))


# ------------------------------------------------------------------------------ driver


class Tally:
    """Running totals of the summary rows; memory bounded by parts, skips and the audit
    sample, never by the number of images."""

    def __init__(self) -> None:
        self.objects = 0
        # count_key -> images, per split: the manifest's counts by class, by generator and
        # by named real source are all sums of these.
        self.by_source: dict[str, Counter] = {s: Counter() for s in SPLITS}
        self.parts: dict[str, set[str]] = {s: set() for s in SPLITS}
        self.skipped: list[dict] = []
        self._fingerprint = 0
        self._audit: list[tuple[bytes, str, dict]] = []  # see keep_lowest

    @property
    def written(self) -> int:
        return sum(sum(c.values()) for c in self.by_source.values())

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class."""
        return {split: {kind: sum(n for (k, _), n in counts.items() if k == kind)
                        for kind in ("real", "fake")} for split, counts in self.by_source.items()}

    def named(self, kind: str, unnamed: str | None) -> dict[str, dict[str, int]]:
        """Images of one class per split and source name; unnamed sources count as
        `unnamed` (or not at all when None). Every name seen is in every split."""
        names = sorted({name or unnamed for counts in self.by_source.values()
                        for k, name in counts if k == kind} - {None})
        return {split: {name: sum(n for (k, other), n in counts.items()
                                  if k == kind and (other or unnamed) == name) for name in names}
                for split, counts in self.by_source.items()}

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            self.objects += 1
            if r["error"] is not None:
                self.skipped.append({"uri": r["source_uri"], "error": r["error"],
                                     "detail": r["error_detail"]})
                continue
            self.by_source[r["split"]][count_key(r["label"], r["source_name"],
                                                 r["generator"])] += 1
            self.parts[r["split"]].add(r["part"])
            # A source's name is part of an image's identity in the set (a generator is a
            # label); unnamed images hash as they did before sources had names.
            named = f":{r['source_name']}" if r["source_name"] else ""
            digest = hashlib.blake2b(f"{r['sha256']}:{r['label']}{named}".encode(),
                                     digest_size=16)
            # A sum is independent of the order rows arrive in, and counts repeats.
            term = int.from_bytes(digest.digest(), "big")
            self._fingerprint = (self._fingerprint + term) % 2**128
            self._sample_for_audit(r)

    def _sample_for_audit(self, row: dict) -> None:
        """Keep the AUDIT_ROWS rows of lowest content rank: the same sample every run."""
        keep_lowest(self._audit, AUDIT_ROWS, hashlib.sha1(row["sha256"].encode()).digest(),
                    row["source_uri"], {k: row[k] for k in ("label", "source_format", "width",
                                                            "height", "size_bytes")})

    @property
    def fingerprint(self) -> str:
        return f"{self._fingerprint:032x}"[:16]

    def audit_rows(self) -> list[dict]:
        return [row for *_, row in sorted(self._audit, reverse=True)]


def run(config: PrepareConfig, progress: bool = True) -> dict:
    """Run the preparation pipeline on the current Ray cluster; returns the manifest."""
    import ray
    from ray.data.context import ShuffleStrategy

    if not (config.real or config.fake or config.labels or config.base):
        raise ValueError("nothing to prepare: give --real/--fake sources, --labels or --base")
    base = None
    if config.base:
        base = read_manifest(config.base)
        config = extend.on_base(config, base)
    if abs(sum(config.split) - 1.0) > 1e-6 or len(config.split) != 3:
        raise ValueError(f"--split needs three fractions summing to 1, got {config.split}")
    started = time.perf_counter()
    specs = listing_specs(config)
    labelled = extend.labelled_images(config.labels) if config.labels else None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    # Task-based shuffles: the default hash shuffle starts aggregator actors, seconds of
    # fixed cost per shuffle, while the rows shuffled here are only keys and hashes.
    # Datasets copy the context when created, so this holds for prepare's datasets only.
    saved = context.shuffle_strategy, context.target_max_block_size
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    context.target_max_block_size = BLOCK_BYTES
    try:
        return _run(config, specs, labelled, base, started)
    finally:
        context.shuffle_strategy, context.target_max_block_size = saved


def _run(config: PrepareConfig, specs: list[dict], labelled: extend.Labelled | None,
         base: dict | None, started: float) -> dict:
    import ray

    inputs = []
    if specs:
        listed = ray.data.from_items([{"spec": json.dumps(s)} for s in specs],
                                     override_num_blocks=len(specs)).map_batches(
            list_specs, batch_size=1, batch_format="pyarrow",
            fn_kwargs={"per_class": config.per_class, "seed": config.seed},
            compute=ray.data.TaskPoolStrategy(size=min(listing.LISTING_TASKS, len(specs))),
            num_cpus=0,
        )
        if config.per_class is not None:
            items = sampled_items(listed, config.per_class, config.seed)
            listed = ray.data.from_items(items, override_num_blocks=max(1, len(items) // 256))
        inputs.append(listed)
    if labelled and labelled.items:  # every labelled image, never sampled
        inputs.append(ray.data.from_arrow([
            pa.Table.from_pylist(labelled.items[i:i + 1000], schema=LISTED_SCHEMA)
            for i in range(0, len(labelled.items), 1000)]))
    run_id = uuid.uuid4().hex[:8]
    tally = Tally()
    reviewed: set[str] = set()  # the labelled images' hashes: they replace base rows
    if inputs:
        # Mixed, so every part holds both classes and many folders; then small blocks, so
        # decoding spreads over every CPU.
        objects = inputs[0].union(*inputs[1:]) if len(inputs) > 1 else inputs[0]
        mixed = objects.random_shuffle(seed=config.seed).repartition(
            target_num_rows_per_block=ROWS_PER_BLOCK)
        summaries = mixed.map_batches(
            decode_batch,
            fn_kwargs={"image_size": config.image_size, "fractions": config.split,
                       "seed": config.seed},
            batch_size=DECODE_BATCH,
        ).map_batches(
            write_parts,
            fn_kwargs={"out_uri": config.out, "run_id": run_id},
            batch_size=config.rows_per_file,
            batch_format="pyarrow",
        )
        # Streamed, never materialized: a materialized dataset pins every summary block
        # (and its lineage) in the driver, ~4 KB per image, growing with the input.
        for batch in summaries.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = batch.to_pylist()
            tally.add(rows)
            reviewed.update(r["sha256"] for r in rows
                            if r["source_name"] == REVIEW_SOURCE and r["error"] is None)
    label_counts = None
    if base is not None:
        label_counts = copy_base(config, base, run_id, tally, reviewed, labelled)
    elif labelled is not None:
        label_counts = {"relabeled": 0, "unmatched": len(labelled.relabels), "replaced": 0}
    if tally.objects == 0:
        raise ValueError("no objects found under the given --real/--fake URIs")
    near = regroup_near_duplicates(config, tally, run_id)
    repeated = duplicate_count(config.out, tally.parts, tally.written)
    manifest = build_manifest(config, tally, repeated, time.perf_counter() - started)
    manifest["near_duplicates"] = near
    if labelled is not None:
        manifest["reviewed"] = {**labelled.stats, "read": len(labelled.items),
                              "written": len(reviewed), **label_counts}
    storage.write_bytes(storage.join(config.out, MANIFEST), json.dumps(manifest, indent=2).encode())
    _remove_stale_parts(config.out, manifest)
    return manifest


def copy_base(config: PrepareConfig, base: dict, run_id: str, tally: Tally,
              reviewed: set[str], labelled: extend.Labelled | None) -> dict:
    """Copy the base set's images in (less those `reviewed` replaced, with labels given by
    hash applied), adding their summary rows to `tally`; returns what the labels did."""
    relabels = labelled.relabels if labelled else {}
    copied = extend.copy_base_parts(config.base, base, config.out, run_id, reviewed, relabels)
    rows, relabeled = 0, set()
    for batch in copied.iter_batches(batch_size=None, batch_format="pyarrow") if copied else ():
        summary = batch.to_pylist()
        rows += len(summary)
        tally.add(summary)
        relabeled.update(r["sha256"] for r in summary if r["sha256"] in relabels)
    return {"relabeled": len(relabeled), "unmatched": len(relabels) - len(relabeled),
            "replaced": base["written"] - rows}


def duplicate_count(out_uri: str, parts: dict[str, set[str]], written: int) -> int:
    """Images whose bytes repeat an earlier image's: a Ray Data group-by on the `sha256`
    column of the parts just written (only that column is read; the driver never holds
    the hashes)."""
    import ray

    if not written:
        return 0
    names = [name for split in SPLITS for name in sorted(parts[split])]
    # A block and a hash partition per ~64k images (4 MB of hashes): blocks that size live
    # in the object store, not in the driver, and Ray Data's defaults (200 partitions, a
    # task per file) cost seconds of tasks even for a small set. Materialized first: a
    # sort-based group-by samples its input, and would otherwise read the parts twice.
    partitions = max(1, written // 65536 + 1)
    hashes = ray.data.from_items(
        [{"uri": storage.join(out_uri, name)} for name in names],
        override_num_blocks=min(partitions, len(names)),
    ).map_batches(read_hashes, batch_size=None, batch_format="pyarrow")
    hashes = hashes.materialize()
    return written - hashes.groupby("sha256", num_partitions=partitions).count().count()


def regroup_near_duplicates(config: PrepareConfig, tally: Tally, run_id: str) -> dict:
    """Keep each group of near-duplicate images (perceptual hashes within
    `config.near_duplicates` bits) in one split: the split of its member with the lowest
    SHA-256, so a group's split is as stable as an image's. The rows of other splits move
    there (their parts are rewritten without them, and they join new parts). Runs in one
    Ray task, which holds ~100 bytes per image; the driver gets counts and part names."""
    import ray

    if config.near_duplicates < 0 or not tally.written:
        return {"distance": None}
    parts = {s: sorted(tally.parts[s]) for s in SPLITS}
    result = ray.get(ray.remote(_regroup).options(num_cpus=1).remote(
        config.out, parts, tuple(config.split), config.seed, config.near_duplicates, run_id))
    for split in SPLITS:
        tally.by_source[split].update(result["count_changes"][split])
        tally.parts[split] -= set(result["parts_removed"][split])
        tally.parts[split] |= set(result["parts_added"][split])
    return {key: result[key] for key in ("distance", "groups", "images", "straddling_by_bytes",
                                          "moved")}


def _regroup(out_uri: str, parts: dict[str, list[str]], fractions: tuple[float, ...],
             seed: int, distance: int, run_id: str) -> dict:
    names, splits, shas, hashes, keys = [], [], [], [], []
    for split in SPLITS:
        for name in parts[split]:
            fs, path = storage.resolve(storage.join(out_uri, name))
            table = pq.read_table(path, filesystem=fs, columns=[
                "sha256", "phash", "label", "source_name", "generator"])
            names += [name] * table.num_rows
            splits += [split] * table.num_rows
            shas += table.column("sha256").to_pylist()
            hashes += table.column("phash").to_pylist()
            keys += [count_key(*row) for row in zip(
                table.column("label").to_pylist(), table.column("source_name").to_pylist(),
                table.column("generator").to_pylist(), strict=True)]
    grouped = duplicates.groups(duplicates.to_ints(hashes), distance)
    # Each group's split: that of its lowest SHA-256 (the byte-hash split of that member).
    lowest: dict[int, str] = {}
    for index, group in enumerate(grouped.tolist()):
        if group not in lowest or shas[index] < lowest[group]:
            lowest[group] = shas[index]
    sizes = np.bincount(grouped, minlength=len(grouped))
    straddling = {g for g, s in zip(grouped.tolist(), splits, strict=True)
                  if sizes[g] > 1 and s != splits[g]}
    moves: dict[str, dict[int, str]] = {}  # part -> {row in part: target split}
    changes: dict[str, Counter] = {s: Counter() for s in SPLITS}
    offsets: dict[str, int] = {}
    for index, (group, name, split) in enumerate(zip(grouped.tolist(), names, splits,
                                                     strict=True)):
        row = index - offsets.setdefault(name, index)
        if sizes[group] < 2:
            continue
        target = split_of(lowest[group], fractions, seed)
        if target != split:
            moves.setdefault(name, {})[row] = target
            changes[split][keys[index]] -= 1
            changes[target][keys[index]] += 1
    added, removed = {s: [] for s in SPLITS}, {s: [] for s in SPLITS}
    moving: dict[str, list[pa.Table]] = {s: [] for s in SPLITS}
    for name, rows in moves.items():
        fs, path = storage.resolve(storage.join(out_uri, name))
        table = pq.read_table(path, filesystem=fs)
        for target in set(rows.values()):
            moving[target].append(table.take([r for r, t in rows.items() if t == target]))
        kept = table.filter(pa.array([r not in rows for r in range(table.num_rows)]))
        if kept.num_rows:
            pq.write_table(kept, path, filesystem=fs, compression="zstd")
        else:
            fs.delete_file(path)
            removed[name.split("/", 1)[0]].append(name)
    for target, tables in moving.items():
        if tables:
            added[target].append(write_shard(out_uri, target, run_id, pa.concat_tables(tables)))
    return {"distance": distance, **duplicates.summary(grouped),
            "straddling_by_bytes": len(straddling),
            "moved": sum(len(rows) for rows in moves.values()),
            "count_changes": changes, "parts_added": added, "parts_removed": removed}


def _kind(label: int) -> str:
    return "fake" if label else "real"


def count_key(label: int, source_name: str | None, generator: str | None) -> tuple:
    """What the manifest counts an image under: a fake by its generator (a reviewer's
    label may name one for an image of any source), a real image by its source's name."""
    return _kind(label), generator if label else source_name


def read_hashes(batch: pa.Table) -> pa.Table:
    """Ray Data stage: the `sha256` column of each part named in the batch. Read with
    pyarrow directly: Ray's Parquet reader took 15 s for 281 small parts (pyarrow: 0.3 s)."""
    tables = []
    for uri in batch.column("uri").to_pylist():
        fs, path = storage.resolve(uri)
        tables.append(pq.read_table(path, filesystem=fs, columns=["sha256"]))
    return pa.concat_tables(tables)


def build_manifest(config: PrepareConfig, tally: Tally, repeated: int,
                   seconds: float) -> dict:
    """The shard set's manifest: counts, parts, skipped objects, duplicates, bias audit."""
    return {
        # 2: shards have `generator` and `source_name` columns; 3: and `size_bytes`
        "format_version": 3,
        "image_size": config.image_size,
        "preprocess_version": preprocess.PREPROCESS_VERSION,
        "pixel_layout": "uint8 HxWx3 RGB, row-major, raw bytes in column 'image'",
        "labels": {"0": "real", "1": "ai-generated"},
        "seed": config.seed,
        "split_fractions": list(config.split),
        "sources": {"real": list(config.real), "fake": list(config.fake),
                    "base": config.base, "labels": config.labels},
        # Images per generator (`unknown`: fakes from unnamed sources) and named real source.
        "generators": tally.named("fake", UNKNOWN),
        "real_sources": tally.named("real", None),
        "per_class": config.per_class,
        "objects": tally.objects,
        "written": tally.written,
        "counts": tally.counts,
        "duplicates": repeated,
        "fingerprint": shards_fingerprint(tally.fingerprint, config),
        "parts": {s: sorted(tally.parts[s]) for s in SPLITS},
        "skipped": sorted(tally.skipped, key=lambda r: r["uri"]),
        "audit": {**audit.bias_audit(tally.audit_rows()),
                  "sampled": min(tally.written, AUDIT_ROWS)},
        "seconds": round(seconds, 2),
        "images_per_second": round(tally.objects / seconds, 1) if seconds else None,
    }


def shards_fingerprint(content: str, config: PrepareConfig) -> str:
    """The shard set's identity: its content (images and labels) and what decides each
    image's split (seed, fractions, near-duplicate distance). Feature caches and resumed
    training runs key on it, so a set re-split another way never reuses their work."""
    settings = f"{content}:{config.seed}:{list(config.split)}:{config.near_duplicates}"
    return hashlib.blake2b(settings.encode(), digest_size=8).hexdigest()


def _remove_stale_parts(out_uri: str, manifest: dict) -> None:
    """Delete parts of earlier runs now that the new manifest no longer names them."""
    keep = {p for parts in manifest["parts"].values() for p in parts}
    for split in SPLITS:
        for obj in storage.list_objects(storage.join(out_uri, split)):
            if f"{split}/{obj.uri.rsplit('/', 1)[-1]}" not in keep:
                fs, path = storage.resolve(obj.uri)
                fs.delete_file(path)
