"""`detector sample` -> S3 (moto server on 127.0.0.1) -> `detector prepare` -> shards on S3."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from detector.config import PrepareConfig
from detector.data import duplicates, prepare
from detector.data import shards as shard_sets
from detector.data.sample import SampleSpec, write_sample
from detector.io import storage

pytestmark = pytest.mark.e2e

PER_CLASS = 150
CORRUPT = 3
FAMILIES = ("upsampler", "decoder-grid", "lowpass-tint")


@pytest.fixture(scope="module")
def sampled(s3_server, local_ray):
    import boto3

    boto3.client("s3").create_bucket(Bucket="raw")
    write_sample("s3://raw/sample", SampleSpec(per_class=PER_CLASS, size=48, seed=3,
                                               corrupt=CORRUPT, generators=len(FAMILIES)))
    return "s3://raw/sample"


def prepare_into(out: str, source: str, **overrides) -> dict:
    settings = {"real": (f"{source}/real",), "fake": (f"{source}/fake",), **overrides}
    config = PrepareConfig(out=out, image_size=48, **settings)
    return prepare.run(config, progress=False)


def membership(shards: str) -> dict[str, set[str]]:
    return {split: set(shard_sets.read_split_local(shards, split, ["sha256"])["sha256"].to_pylist())
            for split in shard_sets.SPLITS}


def test_prepare_streams_s3_into_complete_shards(sampled, capsys):
    """Named sources: the families as generators, plus one unnamed fake folder and a named
    real source."""
    import boto3

    from detector.cli.common import print_prepare_summary

    boto3.client("s3").create_bucket(Bucket="shards")
    fakes = tuple(f"{name}={sampled}/fake/{name}" for name in FAMILIES[:2])
    manifest = prepare_into("s3://shards/run1", sampled, real=(f"camera={sampled}/real",),
                            fake=(*fakes, f"{sampled}/fake/{FAMILIES[2]}"))

    total = 2 * PER_CLASS
    assert manifest["objects"] == total + 2 * CORRUPT
    assert manifest["written"] == total
    skipped = manifest["skipped"]
    assert len(skipped) == 2 * CORRUPT
    assert {s["error"] for s in skipped} <= {"empty", "truncated", "not-an-image", "corrupt"}
    assert all(s["uri"].startswith("s3://raw/sample/") and s["detail"] for s in skipped)

    counts = {s: sum(manifest["counts"][s].values()) for s in shard_sets.SPLITS}
    assert sum(counts.values()) == total
    for split, fraction in zip(shard_sets.SPLITS, (0.7, 0.15, 0.15), strict=True):
        # A content-hash split is binomial (that is what keeps an image's split fixed when
        # images are added): within 4 standard deviations of the requested share; at the
        # notebook's 200k images one sd is 0.08 percentage points.
        sd = (total * fraction * (1 - fraction)) ** 0.5
        assert abs(counts[split] - fraction * total) <= 4 * sd

    sets = membership("s3://shards/run1")
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"])
    assert not (sets["val"] & sets["test"])

    table = shard_sets.read_split_local("s3://shards/run1", "train")
    assert set(table.column_names) >= {"image", "label", "source_uri", "source_format", "width",
                                       "height", "sha256"}
    pixels = shard_sets.decode_pixels(table.column("image").to_pylist()[:4], 48)
    assert pixels.shape == (4, 48, 48, 3)
    names = " ".join(table.column("source_uri").to_pylist())
    assert "ü" in names  # odd keys survived listing and reading
    stored = json.loads(storage.read_bytes("s3://shards/run1/manifest.json"))
    assert stored["fingerprint"] == manifest["fingerprint"]
    assert stored["audit"]["warnings"] == []

    # Every image's generator is its source's name; fakes from the unnamed folder are
    # `unknown` in the manifest and null in the shards, as real images are.
    rows = pa.concat_tables(shard_sets.read_split_local(
        "s3://shards/run1", split, ["label", "generator", "source_name", "source_uri"])
        for split in shard_sets.SPLITS).to_pylist()
    expected = Counter()
    for row in rows:
        family = row["source_uri"].split("/")[5] if row["label"] else None
        generator = family if family in FAMILIES[:2] else None
        assert row["generator"] == generator
        assert row["source_name"] == (generator if row["label"] else "camera")
        expected[generator or ("unknown" if row["label"] else "real")] += 1
    by_generator = {name: sum(manifest["generators"][split][name] for split in shard_sets.SPLITS)
                    for name in manifest["generators"]["train"]}
    assert by_generator == {name: expected[name] for name in (*FAMILIES[:2], "unknown")}
    assert by_generator == {name: PER_CLASS // 3 for name in by_generator}
    assert manifest["real_sources"] == {split: {"camera": manifest["counts"][split]["real"]}
                                        for split in shard_sets.SPLITS}
    for split in shard_sets.SPLITS:
        assert sum(manifest["generators"][split].values()) == manifest["counts"][split]["fake"]
    print_prepare_summary(manifest, "s3://shards/run1")
    printed = capsys.readouterr().out
    for name in (*FAMILIES[:2], "unknown"):
        counts = manifest["generators"]
        assert (f"generator {name}: train={counts['train'][name]} val={counts['val'][name]} "
                f"test={counts['test'][name]}") in printed


def footer_readers_started() -> int:
    """Ray Data's footer-reading actors this Ray has started, running or done."""
    import ray

    return sum(info["ActorClassName"] == "FooterReader"
               for info in ray._private.state.actors().values())


def test_a_split_read_through_ray_data_gets_a_footer_pool_sized_to_its_parts(sampled):
    """The previous test's shards on S3, as training reads them: every row of the split,
    its footers read by one actor per 10 part files (Ray's default starts 32 for these 3:
    see detector.io.parquet)."""
    from detector.io import parquet

    fs, parts = shard_sets.split_files("s3://shards/run1", "train")
    assert parquet.count_files(fs, parts) == len(parts)
    assert parquet.count_files(fs, [parts[0].rsplit("/", 1)[0]]) >= len(parts)  # a folder
    before = footer_readers_started()
    dataset = shard_sets.read_split("s3://shards/run1", "train", ["sha256"])
    read = [sha for batch in dataset.iter_batches(batch_format="pyarrow")
            for sha in batch["sha256"].to_pylist()]
    assert sorted(read) == sorted(membership("s3://shards/run1")["train"])
    assert footer_readers_started() - before == parquet.footer_readers(len(parts)) == 1


def test_rerun_gives_identical_membership_and_drops_stale_parts(sampled):
    import boto3

    boto3.client("s3").create_bucket(Bucket="rerun")
    first = prepare_into("s3://rerun/shards", sampled)
    before = membership("s3://rerun/shards")
    second = prepare_into("s3://rerun/shards", sampled)
    after = membership("s3://rerun/shards")
    assert after == before and sum(map(len, after.values())) == 2 * PER_CLASS
    assert first["fingerprint"] == second["fingerprint"]
    assert first["counts"] == second["counts"]
    listed = {o.uri.rsplit("/", 2)[-2] + "/" + o.uri.rsplit("/", 1)[-1]
              for s in shard_sets.SPLITS for o in storage.list_objects(f"s3://rerun/shards/{s}")}
    assert listed == {p for parts in second["parts"].values() for p in parts}
    for uri in shard_sets.part_uris("s3://rerun/shards", "val"):
        fs, path = storage.resolve(uri)
        assert pq.read_metadata(path, filesystem=fs).num_rows > 0


def test_per_class_sampling_is_deterministic(sampled, tmp_path):
    named = {"fake": (f"families={sampled}/fake",), "per_class": 40, "seed": 5}
    a = prepare_into(str(tmp_path / "a"), sampled, **named)
    b = prepare_into(str(tmp_path / "b"), sampled, **named)
    assert a["objects"] == b["objects"] == 80
    assert a["fingerprint"] == b["fingerprint"]
    assert membership(str(tmp_path / "a")) == membership(str(tmp_path / "b"))
    # Sampled objects keep their source's name.
    assert sum(a["generators"][split]["families"] for split in shard_sets.SPLITS) == 40 - sum(
        1 for item in a["skipped"] if "/fake/" in item["uri"])
    fakes = shard_sets.read_split_local(str(tmp_path / "a"), "train", ["label", "generator"])
    assert {(row["label"], row["generator"]) for row in fakes.to_pylist()} == {
        (0, None), (1, "families")}


def test_biased_sample_makes_the_audit_warn(local_ray, tmp_path, capsys):
    from detector.cli.common import print_prepare_summary

    write_sample(str(tmp_path / "biased"), SampleSpec(per_class=40, size=48, biased=True))
    manifest = prepare_into(str(tmp_path / "shards"), str(tmp_path / "biased"))
    assert manifest["audit"]["trivial_rule_accuracy"]["format"] > 0.9
    assert any("format" in w for w in manifest["audit"]["warnings"])
    print_prepare_summary(manifest, str(tmp_path / "shards"))
    assert "WARNING" in capsys.readouterr().err


def test_nested_folders_duplicates_and_per_class_rule(local_ray, tmp_path):
    """Listing ranges over nested folders lose and repeat nothing; duplicates are counted
    across folders; --per-class keeps exactly the lowest-ranked objects of each class."""
    import shutil

    source = tmp_path / "src"
    write_sample(str(source), SampleSpec(per_class=60, size=48, seed=11))
    copies = source / "fake" / "nested" / "copies"
    copies.mkdir(parents=True)
    originals = sorted((source / "fake").rglob("*.png"))[:3]
    for original in originals:
        shutil.copy(original, copies / original.name)

    manifest = prepare_into(str(tmp_path / "all"), str(source))
    assert manifest["objects"] == manifest["written"] == 123
    assert manifest["duplicates"] == 3
    uris = set(shard_sets.read_split_local(str(tmp_path / "all"), "train", ["source_uri"])
               ["source_uri"].to_pylist())
    for split in ("val", "test"):
        uris |= set(shard_sets.read_split_local(str(tmp_path / "all"), split, ["source_uri"])
                    ["source_uri"].to_pylist())
    assert len(uris) == 123  # every object exactly once

    sampled = prepare_into(str(tmp_path / "some"), str(source), per_class=25, seed=9)
    assert sampled["counts"]["train"]["fake"] + sampled["counts"]["val"]["fake"] + \
        sampled["counts"]["test"]["fake"] == 25
    chosen = set()
    for split in shard_sets.SPLITS:
        chosen |= set(shard_sets.read_split_local(str(tmp_path / "some"), split, ["source_uri"])
                      ["source_uri"].to_pylist())
    expected = set()
    for folder in ("real", "fake"):
        listed = [o.uri for o in storage.list_objects(str(source / folder))]
        expected |= set(sorted(listed, key=lambda u: prepare.sample_rank(9, u))[:25])
    assert chosen == expected


def test_empty_source_is_a_clear_error(local_ray, tmp_path):
    write_sample(str(tmp_path / "src"), SampleSpec(per_class=5, size=48))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no objects under"):
        prepare_into(str(tmp_path / "out"), str(tmp_path / "src"),
                     fake=(str(tmp_path / "empty"),))


def test_near_duplicate_copies_stay_in_one_split_and_are_counted(s3_server, local_ray):
    """Resized and re-encoded copies of one image are a group: all of it lands in one
    split (by bytes, most groups would straddle), and the manifest counts the groups."""
    import io

    import boto3
    import numpy as np
    from PIL import Image

    from detector.data.sample import make_image

    boto3.client("s3").create_bucket(Bucket="near")
    rng = np.random.default_rng(11)
    originals = 40
    for label, kind in enumerate(("real", "fake")):
        for k in range(originals // 2):
            image = Image.fromarray(make_image(label, rng, (160, 120)))
            for j, (size, fmt) in enumerate([((160, 120), "PNG"), ((80, 60), "JPEG"),
                                             ((120, 90), "WEBP")]):
                buffer = io.BytesIO()
                image.resize(size).save(buffer, fmt)
                storage.write_bytes(f"s3://near/{kind}/img-{k:03d}-copy{j}.{fmt.lower()}",
                                    buffer.getvalue())
    manifest = prepare_into("s3://near/shards", "s3://near")
    near = manifest["near_duplicates"]
    assert manifest["written"] == 3 * originals
    # Nearly every copy joins its original (pHash within 6 bits; a rare copy of these
    # smooth synthetic scenes lands 8 bits away and stands alone).
    assert near["groups"] >= originals - 2 and near["images"] >= 3 * originals - 3, near
    assert near["straddling_by_bytes"] > originals // 3 and near["moved"] > 0, near
    rows = []
    for split in shard_sets.SPLITS:
        table = shard_sets.read_split_local("s3://near/shards", split, ["source_uri", "phash"])
        rows += [(split, r["source_uri"], r["phash"]) for r in table.to_pylist()]
    assert all(len(h) == 16 for _, _, h in rows)
    # Every group (recomputed from the stored hashes) lies in one split...
    labels = duplicates.groups(duplicates.to_ints([h for _, _, h in rows]))
    splits_of: dict[int, set[str]] = {}
    for label, (split, _, _) in zip(labels.tolist(), rows, strict=True):
        splits_of.setdefault(label, set()).add(split)
    assert all(len(s) == 1 for s in splits_of.values())
    # ...and so do the copies of nearly every original.
    where: dict[str, set[str]] = {}
    for split, uri, _ in rows:
        where.setdefault(uri.rsplit("-copy", 1)[0], set()).add(split)
    assert sum(len(s) == 1 for s in where.values()) >= originals - 2
    counts = {s: sum(manifest["counts"][s].values()) for s in shard_sets.SPLITS}
    assert sum(counts.values()) == 3 * originals
    assert counts == {s: shard_sets.read_split_local("s3://near/shards", s, ["sha256"]).num_rows
                      for s in shard_sets.SPLITS}
    assert {s: sorted(p) for s, p in manifest["parts"].items()} == {
        s: sorted(f"{s}/{o.uri.rsplit('/', 1)[-1]}"
                  for o in storage.list_objects(f"s3://near/shards/{s}"))
        for s in shard_sets.SPLITS}


def test_extension_less_keys_make_the_same_shards_as_named_ones(local_ray, tmp_path):
    """Uploads named by content hash: prepare identifies them by their bytes, so the
    shards hold the same images in the same splits as from the named copies; a JSON
    sidecar beside each is skipped, counted, not an error."""
    import hashlib

    named = tmp_path / "named"
    write_sample(str(named), SampleSpec(per_class=20, size=48, seed=13))
    hashed = tmp_path / "hashed"
    for path in sorted(named.rglob("*.*")):
        target = hashed / path.parent.relative_to(named) / \
            hashlib.sha1(path.read_bytes()).hexdigest()[:16]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
        target.with_name(target.name + ".json").write_text('{"uploader": "u1"}')
    first = prepare_into(str(tmp_path / "from-named"), str(named))
    second = prepare_into(str(tmp_path / "from-hashed"), str(hashed))
    assert membership(str(tmp_path / "from-named")) == membership(str(tmp_path / "from-hashed"))
    assert first["counts"] == second["counts"] and first["written"] == second["written"] == 40


def test_a_set_built_on_a_base_and_labels(sampled):
    """`prepare --base --labels`: the base's images keep their splits, labelled images join
    under source `review` with the reviewer's label, a label replaces the base row of the
    same bytes (by URI) or relabels it (by hash), and every label is accounted for."""
    import boto3

    from detector.data import labels as label_data

    boto3.client("s3").create_bucket(Bucket="relabel")
    base_uri = "s3://relabel/base"
    base = prepare_into(base_uri, sampled, fake=tuple(f"{n}={sampled}/fake/{n}"
                                                      for n in FAMILIES))
    write_sample("s3://relabel/scanned", SampleSpec(per_class=6, size=48, seed=11))
    new_real = sorted(o.uri for o in storage.list_objects("s3://relabel/scanned/real"))
    new_fake = sorted(o.uri for o in storage.list_objects("s3://relabel/scanned/fake"))
    train = shard_sets.read_split_local(base_uri, "train").to_pylist()
    in_base = next(r for r in train if r["label"] == 0)  # re-read from its URI: replaced
    by_hash = next(r for r in train if r["label"] == 1)  # labelled by its hash: relabelled
    found = [{"uri": uri, "label": "ai-generated"} for uri in new_real]  # the misses
    found += [{"uri": new_fake[0], "label": "ai-generated", "generator": FAMILIES[0]}]
    found += [{"uri": in_base["source_uri"], "label": "ai-generated"},
              {"sha256": by_hash["sha256"], "label": "real"},
              {"sha256": "f" * 64, "label": "real"},  # an image in neither set
              {"uri": "s3://relabel/scanned/gone.png", "label": "real"}]  # deleted since
    label_data.append("s3://relabel/labels", map(label_data.Label.parse, found), "ana")

    with pytest.raises(ValueError, match="--image-size 64 differs from the base's 48"):
        prepare.run(PrepareConfig(out="s3://relabel/x", base=base_uri, image_size=64),
                    progress=False)
    with pytest.raises(ValueError, match="--out must differ from --base"):
        prepare.run(PrepareConfig(out=base_uri + "/", base=base_uri), progress=False)
    manifest = prepare.run(PrepareConfig(out="s3://relabel/new", base=base_uri,
                                         labels="s3://relabel/labels"), progress=False)

    assert manifest["reviewed"] == {"labels": len(found), "images": len(found),
                                  "conflicting": 0, "read": len(found) - 2,
                                  "written": len(new_real) + 2, "relabeled": 1,
                                  "unmatched": 1, "replaced": 1}
    assert manifest["skipped"] == [{"uri": "s3://relabel/scanned/gone.png",
                                    "error": "vanished", "detail": manifest["skipped"][0]
                                    ["detail"]}]
    assert manifest["written"] == base["written"] + len(new_real) + 1
    assert (manifest["image_size"], manifest["seed"]) == (48, base["seed"])
    assert manifest["sources"]["base"] == base_uri
    assert manifest["fingerprint"] != base["fingerprint"]

    rows = {split: shard_sets.read_split_local("s3://relabel/new", split).to_pylist()
            for split in shard_sets.SPLITS}
    where = {r["sha256"]: split for split, table in rows.items() for r in table}
    before = membership(base_uri)
    assert all(where[sha] == split for split, shas in before.items() for sha in shas)
    everything = {r["source_uri"]: r for table in rows.values() for r in table}
    assert len(everything) == manifest["written"]
    for uri in [*new_real, new_fake[0], in_base["source_uri"]]:
        row = everything[uri]
        assert (row["label"], row["source_name"]) == (1, "review"), uri
        assert row["size_bytes"] > 0 and row["sha256"] in where
    assert everything[new_fake[0]]["generator"] == FAMILIES[0]
    assert everything[new_real[0]]["generator"] is None
    relabelled = everything[by_hash["source_uri"]]
    assert (relabelled["label"], relabelled["generator"], relabelled["source_name"]) == \
        (0, None, "review")
    # The manifest counts a reviewer's fake under the generator named, else `unknown`, and
    # the relabelled image among the reals of source `review`.
    counted = {name: sum(manifest["generators"][s].get(name, 0) for s in shard_sets.SPLITS)
               for name in (*FAMILIES, "unknown")}
    before_counts = {name: sum(base["generators"][s].get(name, 0) for s in shard_sets.SPLITS)
                     for name in (*FAMILIES, "unknown")}
    assert counted[FAMILIES[0]] == before_counts[FAMILIES[0]] + 1 - \
        (by_hash["generator"] == FAMILIES[0])
    assert counted["unknown"] == len(new_real) + 1
    assert sum(manifest["real_sources"][s].get("review", 0) for s in shard_sets.SPLITS) == 1
