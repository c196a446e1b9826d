"""Listing ranges, partition cutting and report parts, without Ray or a network."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from detector.io import listing
from detector.io.listing import Listed, ListingRange
from detector.io.selection import Selection
from detector.scanning import report
from detector.scanning.partitions import Span, cut, partition_id

pytestmark = pytest.mark.unit


def objects(*keys: str) -> list[Listed]:
    return [Listed(k, 1, "e", k) for k in keys]


def keys_of(partitions) -> list[list[str]]:
    return [[o.key for o in p.objects] for p in partitions]


def test_cut_by_size_with_stable_bounds():
    parts = list(cut(objects(*"abcdefg"), "r", size=3))
    assert keys_of(parts) == [["a", "b", "c"], ["d", "e", "f"], ["g"]]
    assert [(p.after, p.last) for p in parts] == [(None, "c"), ("c", "f"), ("f", "g")]
    again = list(cut(objects(*"abcdefg"), "r", size=3))
    assert [p.id for p in again] == [p.id for p in parts]  # same listing, same partitions
    assert parts[1].id == partition_id("r", "c")


def test_known_spans_keep_their_objects_whatever_was_added():
    first = list(cut(objects(*"bdfh"), "r", size=2))
    spans = [p.span for p in first]  # (None, d], (d, h]
    resumed = list(cut(objects(*"abcdefghij"), "r", size=2, spans=spans))
    # New keys inside a committed span join it; keys past the last span are cut afresh.
    assert keys_of(resumed) == [["a", "b", "c", "d"], ["e", "f", "g", "h"], ["i", "j"]]
    assert [p.id for p in resumed[:2]] == [p.id for p in first]
    assert [p.fixed for p in resumed] == [True, True, False]


def test_gaps_between_committed_spans_are_cut_without_crossing_them():
    # An interrupted run committed (None, b] and (f, h], not the partition between them.
    spans = [Span(None, "b"), Span("f", "h")]
    parts = list(cut(objects(*"abcdefghi"), "r", size=2, spans=spans))
    assert keys_of(parts) == [["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"], ["i"]]
    assert parts[1].after == "b" and parts[3].id == partition_id("r", "f")
    # Listing one lost partition again gives it back under the same id.
    again = list(cut(objects(*"cd"), "r", size=2, spans=[parts[1].span]))
    assert [p.id for p in again] == [parts[1].id]


def test_a_span_whose_objects_all_vanished_is_skipped():
    parts = list(cut(objects("a", "z"), "r", size=5, spans=[Span(None, "a"), Span("a", "m")]))
    assert keys_of(parts) == [["a"], ["z"]]


def tree(root, files: list[str]) -> None:
    for name in files:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(b"x")


def test_plan_covers_every_object_once_also_in_folders_added_later(tmp_path):
    tree(tmp_path, ["top.png", "a/1.png", "a/x/2.png", "b.png", "b/3.png", "c/4.jpg",
                    "c/notes.txt"])
    plan = listing.plan(str(tmp_path))
    assert plan.ranges[0].exclude  # the root itself, minus its folders
    tree(tmp_path, ["new/5.png"])  # a folder the plan has not seen
    images = Selection(include=("*.png", "*.jpg"))
    listed = [o.uri for r in plan.ranges for o in listing.iter_range(r, images)]
    expected = ["top.png", "a/1.png", "a/x/2.png", "b.png", "b/3.png", "c/4.jpg", "new/5.png"]
    assert sorted(listed) == sorted(str(tmp_path / p) for p in expected)
    for rng in plan.ranges:  # each range in key order: what partition bounds rely on
        keys = [o.key for o in listing.iter_range(rng)]
        assert keys == sorted(keys)


def test_plan_stays_within_its_range_budget(tmp_path):
    tree(tmp_path, [f"d{i:03d}/img.png" for i in range(40)])
    plan = listing.plan(str(tmp_path), max_ranges=16)
    assert plan.ranges == [ListingRange(prefix=str(tmp_path) + "/")]  # listed whole
    assert len(list(listing.iter_range(plan.ranges[0]))) == 40


def test_plan_refuses_a_missing_or_empty_source(tmp_path):
    with pytest.raises(FileNotFoundError):
        listing.plan(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no objects"):
        listing.plan(str(tmp_path))


def test_manifest_ranges_read_csv_and_parquet(tmp_path):
    import pyarrow.parquet as pq

    (tmp_path / "keys.csv").write_text("bucket,key,size,e_tag\nb,k 1.png,10,\"abc\"\n"
                                       "b,k2.jpg,20,def\n")
    [rng] = listing.plan("", manifest=str(tmp_path / "keys.csv")).ranges
    listed = list(listing.iter_range(rng))
    assert [(o.uri, o.size, o.etag) for o in listed] == [("s3://b/k 1.png", 10, "abc"),
                                                        ("s3://b/k2.jpg", 20, "def")]
    pq.write_table(pa.table({"uri": [f"s3://b/{i}.png" for i in range(10)]}),
                   tmp_path / "keys.parquet", row_group_size=4)
    ranges = listing.plan("", manifest=str(tmp_path / "keys.parquet")).ranges
    assert [r.row_group for r in ranges] == [0, 1, 2]
    assert sum(len(list(listing.iter_range(r))) for r in ranges) == 10
    (tmp_path / "bad.csv").write_text("path\nx\n")
    with pytest.raises(ValueError, match="needs a header"):
        list(listing.iter_range(ListingRange(manifest=str(tmp_path / "bad.csv"))))


def test_parts_are_whole_sorted_single_row_group_files_with_their_record(tmp_path):
    import pyarrow.parquet as pq

    out = str(tmp_path / "report")
    rows = [{"uri": u, "size_bytes": 1, "etag": "e"} for u in ("c", "a", "b")]
    table = pa.Table.from_pylist(rows, schema=report.REPORT_SCHEMA)
    report.write_part(out, "part-x.parquet", table, {"rows": 3, "after": None})
    assert report.part_files(out) == ["part-x.parquet"]
    assert os.listdir(out) == ["part-x.parquet"]  # no temp file left beside it
    assert report.read_part(out, "part-x.parquet").column("uri").to_pylist() == ["a", "b", "c"]
    assert pq.ParquetFile(os.path.join(out, "part-x.parquet")).metadata.num_row_groups == 1
    assert report.part_metadata(out, ["part-x.parquet"]) == {
        "part-x.parquet": {"rows": 3, "after": None}}
    with pytest.raises(FileNotFoundError, match="no committed report"):
        report.read_manifest(out)
    single = tmp_path / "old.parquet"
    single.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="single file"):
        report.part_files(str(single))


def test_the_listing_gate_admits_within_its_window_and_never_waits_on_held_rows():
    import asyncio

    from detector.scanning.gate import ListingGate, window_rows

    async def admitted(call, within: float = 0.2) -> bool:
        task = asyncio.ensure_future(call)
        await asyncio.sleep(within)
        return task.done()

    async def run() -> None:
        gate = ListingGate(window=100, patience_s=60)
        assert await admitted(gate.admit(80, "a"))  # the first is always let in
        blocked = asyncio.ensure_future(gate.admit(50, "b"))
        await asyncio.sleep(0.2)
        assert not blocked.done()  # 130 > 100
        await gate.release(40)  # 40 reached the writer: 40 + 50 fit
        await asyncio.wait_for(blocked, 1)
        assert gate.stats() == {"window": 100, "in_flight": 90, "most_in_flight": 90,
                                "most_held": 0, "forced": 0}
        # A task that waits while it may hold all 90 rows unsent: nothing is moving that
        # could ever make room, so it is let in at once.
        assert await admitted(gate.admit(60, "a", unsent=90))
        assert gate.stats()["most_held"] == 90
        # Without progress, the gate opens after its patience, one partition at a time.
        patient = ListingGate(window=10, patience_s=0.3)
        await patient.admit(10, "a")
        assert not await admitted(patient.admit(10, "a"), within=0.1)
        await asyncio.sleep(0.4)
        assert patient.stats()["in_flight"] == 20 and patient.stats()["forced"] == 1

    asyncio.run(run())
    assert window_rows(65_536) == 131_072 and window_rows(100) == 16_384
    assert window_rows(100, asked=150) == 150
    assert window_rows(100, asked=150, held_downstream=288) == 676  # never below 1 + 2 x held


def test_a_videos_row_is_decided_once_from_its_frames_in_whatever_order_they_come(tmp_path):
    """The writer holds a video's row until all its frames' scores are there, whether
    they come before or after it, split over batches or twice (a retried task): one row,
    decided as `detector predict` decides the video."""
    import json

    import keras
    import pyarrow.parquet as pq
    from video_fixtures import make_video

    from detector.data.sample import SampleSpec, write_sample
    from detector.io.video import VideoLimits
    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard, save_artifact
    from detector.model.predictor import Predictor
    from detector.scanning.stages import WORK_SCHEMA, PartWriter, decode_objects, finish_rows

    keras.utils.set_random_seed(3)
    model = str(tmp_path / "model")
    save_artifact(build_model("vit_tiny", image_size=32),
                  ModelCard(name="vit_tiny", architecture="vit", image_size=32,
                            preprocess_version=1, threshold=0.5, uncertain_margin=0.0), model)
    predictor = Predictor.from_uri(model, backend="keras")
    blob = make_video("mp4", (1,) * 12 + (0,) * 12)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "clip").write_bytes(blob)  # found by its bytes, not its name
    write_sample(str(tmp_path / "in"), SampleSpec(per_class=1, size=32, seed=1))
    uris = [str(p) for p in sorted((tmp_path / "in").rglob("*")) if p.is_file()]
    rows = [{"kind": "object", "partition": "p", "uri": u, "size_bytes": os.path.getsize(u),
             "etag": "e", "reused": False} for u in uris]
    decoded = list(decode_objects(pa.Table.from_pylist(rows, schema=WORK_SCHEMA), 32,
                                  10**6, VideoLimits(), frames=8))
    assert len(decoded) == 2  # the images (and other rows) first, then the video
    scored = [finish_rows(t, predictor.card, 0.5, predictor.score_and_attribute)
              for t in decoded]
    frames = scored[1].filter(pa.compute.equal(scored[1].column("kind"), "frame"))
    video_row = scored[1].filter(pa.compute.equal(scored[1].column("kind"), "object"))
    assert frames.num_rows == 8 and video_row.num_rows == 1
    header = pa.Table.from_pylist([{"kind": "header", "partition": "p", "header": json.dumps(
        {"range": {}, "after": None, "last": uris[-1], "expected": len(uris),
         "file": "part-p.parquet"})}], schema=WORK_SCHEMA)
    run = {"model": "m", "threshold": 0.5}
    orders = {
        "in order": [scored[0], scored[1], header],
        "frames first, split": [frames.slice(0, 3), header, scored[0], frames.slice(3),
                                video_row],
        "retried": [scored[0], frames.slice(0, 5), video_row, frames, scored[1], header,
                    scored[1]],
    }
    expected = predictor.predict_video(blob, count=8)
    written = {}
    for name, tables in orders.items():
        out = tmp_path / name.replace(" ", "-").replace(",", "")
        writer = PartWriter(str(out), run, predictor.card)
        notes = [n for t in tables for n in writer(t).to_pylist()]
        assert [n["status"] for n in notes].count("committed") == 1, name
        table = pq.read_table(out / "part-p.parquet")
        assert table.num_rows == len(uris), name
        row = next(r for r in table.to_pylist() if r["media"] == "video")
        assert (row["verdict"], row["frames_scored"]) == (expected.verdict, 8), name
        assert row["frame_scores"] == pytest.approx(expected.frame_scores, abs=1e-5), name
        assert row["frame_times_s"] == expected.frame_times_s, name
        assert row["worst_frame_s"] == expected.worst_frame_s, name
        written[name] = row
    assert len({json.dumps(r, default=str, sort_keys=True) for r in written.values()}) == 1
