"""Which objects a scan reads: by content unless the name rules it out, and a bounded
account of every object not read."""

from __future__ import annotations

import pytest

from detector.selection import EXAMPLES, MAX_EXTENSIONS, NotSelected, Selection

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
    for data in ranges:
        total.merge(data)
    data = total.to_dict()
    assert data["total"] == 6000
    assert data["by_reason"]["video"] == {"count": 3000, "by_extension": {"mp4": 3000},
                                          "examples": [f"s3://b/0/{i}.mp4" for i in range(5)]}
    rule = data["by_reason"]["excluded-by-rule"]
    assert rule["count"] == sum(rule["by_extension"].values()) == 3000
    assert len(rule["by_extension"]) <= MAX_EXTENSIONS and "(other)" in rule["by_extension"]
    assert len(rule["examples"]) == EXAMPLES
    assert total.summary().startswith("6000 objects: excluded-by-rule 3000 (")
    assert NotSelected().summary() == "none (every listed object was read)"
