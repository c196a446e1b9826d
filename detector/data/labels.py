"""Reviewers' labels as data: an append-only Parquet dataset at a URI.

    LABELS/part-<time>-<random>.parquet   one per batch, written once, whole, never rewritten

Every batch (one `POST /v1/labels`, one `detector label` run) becomes a new part under a
name no other writer can choose, written in one PUT (S3) or one rename (local): two
reviewers labelling at once can never lose each other's work, and a reader sees a batch
whole or not at all. Reading takes every part: the latest label for an image (by its
sha256 when known, else its URI) wins, and images whose labels disagree are counted.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

LABEL_VALUES = ("real", "ai-generated")
# The source name labelled images carry in training shards: `detector compare` finds the
# reviewed images (and among them the baseline's misses) by it.
REVIEW_SOURCE = "review"
PART_PREFIX = "part-"
MAX_NOTE = 1000  # characters
MAX_BATCH = 1000  # labels in one batch
SHA256 = re.compile(r"^[0-9a-f]{64}$")


@functools.cache
def schema():
    """The labels' Parquet schema. Built on first use, as pyarrow and storage are imported
    where used: the CLI imports this module for its constants at start-up."""
    import pyarrow as pa

    return pa.schema([
        ("uri", pa.string()),  # the image's URI (null when only its hash is known)
        ("sha256", pa.string()),  # of the image's bytes (null when only its URI is known)
        ("label", pa.string()),  # real | ai-generated
        ("generator", pa.string()),  # which generator made it, when the reviewer knows
        ("note", pa.string()),
        ("reviewer", pa.string()),
        ("labeled_at", pa.timestamp("us", tz="UTC")),
        ("batch", pa.string()),  # the part it was written in
    ])


class LabelError(ValueError):
    """A label that cannot be stored, and why (the whole batch is refused with it)."""


@dataclass(frozen=True)
class Label:
    """One reviewer's decision on one image."""

    label: str
    uri: str | None = None
    sha256: str | None = None
    generator: str | None = None
    note: str | None = None

    @classmethod
    def parse(cls, item: Mapping) -> Label:
        """A label from a JSON object or CSV row; LabelError says what is wrong with it."""
        unknown = set(item) - {"uri", "sha256", "label", "generator", "note"}
        if unknown:
            raise LabelError(f"unknown fields {sorted(unknown)}")
        label = _text(item.get("label"))
        if label not in LABEL_VALUES:
            raise LabelError(f"label must be one of {', '.join(LABEL_VALUES)}, got {label!r}")
        uri, digest = _text(item.get("uri")), _text(item.get("sha256"))
        if not uri and not digest:
            raise LabelError("a label needs the image's uri or sha256")
        if digest and not SHA256.fullmatch(digest):
            raise LabelError(f"sha256 must be 64 lowercase hex digits, got {digest[:80]!r}")
        note = _text(item.get("note"))
        if note and len(note) > MAX_NOTE:
            raise LabelError(f"note is longer than {MAX_NOTE} characters")
        generator = _text(item.get("generator"))
        if generator and label != "ai-generated":
            raise LabelError("only an ai-generated label names a generator")
        return cls(label, uri or None, digest or None, generator or None, note or None)

    @property
    def key(self) -> str:
        """What identifies the image across batches: its hash when known, else its URI."""
        return f"sha256:{self.sha256}" if self.sha256 else f"uri:{self.uri}"


def _text(value) -> str:
    return value.strip() if isinstance(value, str) else ""


def append(labels_uri: str, labels: Iterable[Label], reviewer: str) -> dict:
    """Store one batch as a new part; returns {batch, labels}. Refuses an empty batch, one
    over MAX_BATCH labels and a reviewer without a name."""
    labels = list(labels)
    if not labels:
        raise LabelError("an empty batch")
    if len(labels) > MAX_BATCH:
        raise LabelError(f"{len(labels)} labels in one batch; at most {MAX_BATCH}")
    if not reviewer.strip():
        raise LabelError("a batch needs its reviewer")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from detector.io import storage

    now = dt.datetime.now(dt.UTC)
    batch = f"{PART_PREFIX}{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:12]}.parquet"
    table = pa.Table.from_pylist([
        {"uri": item.uri, "sha256": item.sha256, "label": item.label,
         "generator": item.generator, "note": item.note, "reviewer": reviewer.strip(),
         "labeled_at": now, "batch": batch} for item in labels], schema=schema())
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes(storage.join(labels_uri, batch), buffer.getvalue())
    return {"batch": batch, "labels": len(labels)}


def read_all(labels_uri: str):
    """Every label ever stored, as a pyarrow Table in the order written (oldest first)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from detector.io import storage

    parts = sorted(o.uri for o in storage.list_objects(labels_uri)
                   if o.uri.rsplit("/", 1)[-1].startswith(PART_PREFIX)
                   and o.uri.endswith(".parquet"))
    if not parts:
        return schema().empty_table()
    tables = []
    for uri in parts:
        fs, path = storage.resolve(uri)
        tables.append(pq.read_table(path, filesystem=fs, schema=schema()))
    return pa.concat_tables(tables).sort_by([("labeled_at", "ascending"),
                                             ("batch", "ascending")])


def latest(labels_uri: str) -> tuple:
    """(the latest label per image, {labels, images, conflicting}): `conflicting` counts
    images that were labelled both real and ai-generated by someone at some point; the
table is a pyarrow Table."""
    rows = read_all(labels_uri).to_pylist()
    newest: dict[str, dict] = {}
    seen: dict[str, set[str]] = {}
    for row in rows:  # oldest first: a later label replaces an earlier one
        key = Label(row["label"], row["uri"], row["sha256"]).key
        newest[key] = row
        seen.setdefault(key, set()).add(row["label"])
    conflicting = sum(1 for values in seen.values() if len(values) > 1)
    import pyarrow as pa

    table = pa.Table.from_pylist(list(newest.values()), schema=schema())
    return table, {"labels": len(rows), "images": len(newest), "conflicting": conflicting}
