"""Which objects a scan reads: by content unless the name rules it out, and a bounded
account of every object not read."""

from __future__ import annotations

import io
import logging
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from detector.io import preprocess, reads, storage
from detector.io.selection import EXAMPLES, MAX_EXTENSIONS, NotSelected, Selection

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("key, reason", [
    ("uploads/3f2a9c1b", None),  # no extension: read, identified by its bytes
    ("uploads/upload-77", None),
    ("photos/IMG_0001.HEIC", None),
    ("photos/IMG_0001.JPG", None),
    ("photos/a.avif", None),
    ("photos/scan.jp2", None),
    ("photos/odd.name.v2", None),  # an unknown extension: read
    ("photos/IMG_0001.json", "excluded-by-rule"),
    ("photos/IMG_0001.JSON", "excluded-by-rule"),
    ("notes/readme.txt", "excluded-by-rule"),
    ("exports/report.parquet", "excluded-by-rule"),
    ("clips/IMG_0002.MOV", "video"),
    ("clips/a.mp4", "video"),
])
def test_default_rules_read_by_content_and_exclude_named_non_images(key, reason):
    assert Selection().reason(f"s3://bucket/{key}") == reason


def test_globs_override_the_rules_and_match_any_case():
    included = Selection(include=("*.jpg", "*.png"))
    assert included.reason("s3://b/a.JPG") is None
    assert included.reason("s3://b/3f2a9c1b") == "not-included"
    assert included.reason("s3://b/a.json") == "not-included"
    excluded = Selection(exclude=("thumb_*",))
    assert excluded.reason("s3://b/THUMB_1.jpg") == "excluded-by-glob"
    assert excluded.reason("s3://b/photo.jpg") is None
    # --exclude wins over --include, and --include can select what the rules exclude.
    both = Selection(include=("*.json", "*.jpg"), exclude=("*.jpg",))
    assert both.reason("s3://b/a.jpg") == "excluded-by-glob"
    assert both.reason("s3://b/a.json") is None


def test_the_account_is_bounded_and_merges():
    ranges = []
    for r in range(3):
        account = NotSelected()
        for i in range(1000):
            account.add("excluded-by-rule", f"s3://b/{r}/{i}.x{i}")  # 1,000 extensions
            account.add("video", f"s3://b/{r}/{i}.mp4")
        ranges.append(account.to_dict())
    total = NotSelected()
    for account_data in ranges:
        total.merge(account_data)
    merged = total.to_dict()
    assert merged["total"] == 6000
    assert merged["by_reason"]["video"] == {"count": 3000, "by_extension": {"mp4": 3000},
                                          "examples": [f"s3://b/0/{i}.mp4" for i in range(5)]}
    rule = merged["by_reason"]["excluded-by-rule"]
    assert rule["count"] == sum(rule["by_extension"].values()) == 3000
    assert len(rule["by_extension"]) <= MAX_EXTENSIONS and "(other)" in rule["by_extension"]
    assert len(rule["examples"]) == EXAMPLES
    assert total.summary().startswith("6000 objects: excluded-by-rule 3000 (")
    assert NotSelected().summary() == "none (every listed object was read)"


def _large(fmt: str) -> bytes:
    """An image well past SNIFF_BYTES (noise does not compress)."""
    pixels = np.random.default_rng(3).integers(0, 255, (400, 400, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **({"quality": 95} if fmt != "TIFF" else {}))
    assert len(out.getvalue()) > 2 * reads.SNIFF_BYTES
    return out.getvalue()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_objects_not_named_as_images_are_identified_from_their_first_bytes(where, tmp_path,
                                                                          request, caplog):
    """A large log under a bare key costs SNIFF_BYTES, never its whole size; a large image
    under a bare key or an unknown extension is read whole and decodes, whatever its format
    (Pillow writes a TIFF's directory after the pixels, past the sniffed bytes). On S3 each
    part read is one GET, with no HEAD before it (the server's own log counts them)."""
    preprocess.register_formats()
    objects = {
        "3f2a9c1b": _large("JPEG"), "upload-77": _large("HEIF"), "scan.tiff.v2": _large("TIFF"),
        "frame": _large("PNG"), "server-log": b"GET /index.html 200\n" * 20_000,
        "dump": np.random.default_rng(4).bytes(300_000), "tiny": b'{"a": 1}',
        "named.jpg": b"\xff\xd8 not really a jpeg " * 10_000,
    }
    if where == "s3":
        import boto3

        name = request.getfixturevalue("bucket")
        for key, blob in objects.items():
            boto3.client("s3").put_object(Bucket=name, Key=f"up/{key}", Body=blob)
        root = f"s3://{name}/up"
    else:
        for key, blob in objects.items():
            (tmp_path / key).write_bytes(blob)
        root = str(tmp_path)
    uris = [storage.join(root, key) for key in objects]
    sizes = [len(blob) for blob in objects.values()]
    caplog.set_level(logging.INFO, logger="werkzeug")  # moto's request log
    before = len(caplog.records)
    fetched = dict(zip(objects, reads.fetch_many(uris, sizes), strict=True))
    if where == "s3":
        lines = (re.search(r"([A-Z]+) /\S* HTTP/", r.getMessage()) for r in caplog.records[before:])
        methods = Counter(found.group(1) for found in lines if found)
        # One GET for each object read whole or only sniffed; two (its first bytes, then
        # the rest) for each large image whose name does not say it is one.
        assert methods == {"GET": len(objects) + 4}, methods
    for key in ("3f2a9c1b", "upload-77", "scan.tiff.v2", "frame", "tiny", "named.jpg"):
        assert fetched[key].data == objects[key] and fetched[key].error is None, key
        assert fetched[key].bytes_read == len(objects[key])
    for key in ("3f2a9c1b", "upload-77", "scan.tiff.v2", "frame"):
        assert preprocess.load_image(fetched[key].data, 32)[1].width == 400
    for key in ("server-log", "dump"):
        assert fetched[key].data is None and fetched[key].error == "not-an-image"
        assert fetched[key].bytes_read == reads.SNIFF_BYTES, key
        assert "the rest was not read" in fetched[key].detail
    # Without a listed size (a manifest without sizes) the first bytes still decide.
    assert reads.fetch(storage.join(root, "server-log")).bytes_read == reads.SNIFF_BYTES
    # A sniffed range past the end of an empty object reads it whole; a missing one is
    # named as vanished, not as a failed read.
    storage.write_bytes(storage.join(root, "empty"), b"")
    assert reads.fetch(storage.join(root, "empty")) == reads.Fetched(b"")
    assert reads.fetch(storage.join(root, "gone")).error == "vanished"
