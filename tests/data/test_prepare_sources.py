"""--real/--fake values: `NAME=URI` names a source, and anything else stays a URI."""

from __future__ import annotations

import pytest

from detector.config import PrepareConfig
from detector.data.prepare import Source, sources

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text, name, uri", [
    ("sdxl=s3://bucket/sdxl/", "sdxl", "s3://bucket/sdxl/"),
    ("midjourney-v6.1=/data/mj", "midjourney-v6.1", "/data/mj"),
    ("DALL_E_3=file:///data/dalle", "DALL_E_3", "file:///data/dalle"),
    ("s3://bucket/date=2026-12-01/", None, "s3://bucket/date=2026-12-01/"),  # a Hive-style key
    ("./a=b", None, "./a=b"),
    ("/data/fake", None, "/data/fake"),
    ("=s3://bucket/x", None, "=s3://bucket/x"),
    ("name=", None, "name="),
])
def test_name_is_taken_only_when_it_looks_like_one(text, name, uri):
    assert Source.parse(text, 1) == Source(1, uri, name)


def test_unknown_is_reserved_for_attribution():
    with pytest.raises(ValueError, match="'unknown' is what attribution answers"):
        Source.parse("Unknown=s3://bucket/x", 1)


def test_sources_keep_their_class():
    config = PrepareConfig(real=("coco=s3://b/coco", "s3://b/phone"), fake=("sdxl=s3://b/sd",),
                           out="s3://b/shards")
    assert sources(config) == [Source(0, "s3://b/coco", "coco"), Source(0, "s3://b/phone"),
                               Source(1, "s3://b/sd", "sdxl")]


def test_repeated_flags_keep_every_source():
    import argparse

    from detector import config as cfg

    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, PrepareConfig)
    args = parser.parse_args(["--real", "s3://b/r", "--fake", "mj=s3://b/mj", "--fake",
                              "sdxl=s3://b/sd", "s3://b/other", "--out", "s3://b/o",
                              "--split", "0.8,0.1,0.1"])
    config = cfg.from_args(PrepareConfig, args)
    assert config.fake == ("mj=s3://b/mj", "sdxl=s3://b/sd", "s3://b/other")
    assert config.split == (0.8, 0.1, 0.1)
