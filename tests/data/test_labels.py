"""The labels dataset: append-only batches on local disk and on a real S3 endpoint, the
latest label per image, and `detector label` from URIs, a CSV and a scan report."""

from __future__ import annotations

import concurrent.futures

import pytest

from detector.data import labels

pytestmark = pytest.mark.unit

DIGEST = "0123456789abcdef" * 4


@pytest.mark.parametrize("item, message", [
    ({"uri": "s3://b/x.jpg", "label": "fake"}, "label must be one of"),
    ({"label": "real"}, "needs the image's uri or sha256"),
    ({"sha256": "ABC", "label": "real"}, "64 lowercase hex"),
    ({"uri": "s3://b/x.jpg", "label": "real", "generator": "sdxl"}, "only an ai-generated"),
    ({"uri": "s3://b/x.jpg", "label": "real", "colour": "red"}, "unknown fields"),
    ({"uri": "s3://b/x.jpg", "label": "real", "note": "x" * 1001}, "longer than"),
])
def test_a_label_says_what_is_wrong_with_it(item, message):
    with pytest.raises(labels.LabelError, match=message):
        labels.Label.parse(item)


def test_the_latest_label_per_image_wins_and_disagreements_are_counted(tmp_path):
    uri = str(tmp_path / "labels")
    assert labels.latest(uri)[1] == {"labels": 0, "images": 0, "conflicting": 0}
    first = labels.append(uri, [labels.Label.parse({"uri": "/a.jpg", "label": "real"}),
                                labels.Label.parse({"sha256": DIGEST, "label": "real"})],
                          "ana")
    labels.append(uri, [labels.Label.parse({"uri": "/a.jpg", "label": "ai-generated",
                                            "generator": "sdxl"})], "ben")
    labels.append(uri, [labels.Label.parse({"sha256": DIGEST, "label": "real",
                                            "note": "checked twice"})], "ana")
    table, summary = labels.latest(uri)
    assert summary == {"labels": 4, "images": 2, "conflicting": 1}
    rows = {row["uri"] or row["sha256"]: row for row in table.to_pylist()}
    assert (rows["/a.jpg"]["label"], rows["/a.jpg"]["generator"],
            rows["/a.jpg"]["reviewer"]) == ("ai-generated", "sdxl", "ben")
    assert rows[DIGEST]["note"] == "checked twice"
    assert first["labels"] == 2 and first["batch"].startswith("part-")
    # Batches are never rewritten: three parts, one per batch, and nothing else.
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == \
        sorted({row["batch"] for row in labels.read_all(uri).to_pylist()})
    with pytest.raises(labels.LabelError, match="empty batch"):
        labels.append(uri, [], "ana")
    with pytest.raises(labels.LabelError, match="reviewer"):
        labels.append(uri, [labels.Label.parse({"uri": "/a.jpg", "label": "real"})], " ")


def test_concurrent_batches_on_s3_are_all_kept(bucket):
    """16 writers, 25 one-label batches each, at once, on a real S3 endpoint."""
    uri = f"s3://{bucket}/labels"

    def write(writer: int) -> None:
        for i in range(25):
            labels.append(uri, [labels.Label.parse(
                {"uri": f"s3://{bucket}/img/{writer}-{i}.png", "label": "real"})],
                f"reviewer-{writer}")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(write, range(16)))
    _, summary = labels.latest(uri)
    assert summary == {"labels": 400, "images": 400, "conflicting": 0}
    assert len(set(labels.read_all(uri).column("batch").to_pylist())) == 400


def test_detector_label_from_uris_a_csv_and_a_report(tmp_path, capsys):
    import pyarrow as pa

    from detector.cli.commands import main
    from detector.scanning import report

    store = str(tmp_path / "labels")
    assert main(["label", "--labels", store, "--label", "ai-generated", "--generator",
                 "sdxl", "/img/a.png", "/img/b.png", "--reviewer", "ana"]) == 0
    assert "stored 2 labels in 1 batch(es)" in capsys.readouterr().out
    sheet = tmp_path / "review.csv"
    sheet.write_text("uri,sha256,label,note\n/img/a.png,,real,looked again\n"
                     f",{DIGEST},ai-generated,\n", encoding="utf-8-sig")
    assert main(["label", "--labels", store, "--csv", str(sheet)]) == 0
    assert "holds 4 labels for 3 images (1 labelled both ways)" in capsys.readouterr().out
    # A committed report: its uncertain rows, labelled in one go.
    out = str(tmp_path / "report")
    rows = [{"uri": f"/img/{i}.png", "verdict": ("uncertain", "real")[i % 2]}
            for i in range(6)]
    table = pa.Table.from_pylist([{**r, "error": None} for r in rows],
                                 schema=report.REPORT_SCHEMA)
    report.write_part(out, report.part_name("a"), table, {"rows": 6})
    assert main(["label", "--labels", store, "--report", out, "--verdict", "uncertain",
                 "--label", "ai-generated"]) == 1  # not committed yet: refused
    report.write_json(out, report.MANIFEST, {"objects": 6})
    assert main(["label", "--labels", store, "--report", out, "--verdict", "uncertain",
                 "--label", "ai-generated"]) == 0
    stored, summary = labels.latest(store)
    assert summary["images"] == 6
    reported = {row["uri"] for row in rows}
    assert {r["uri"] for r in stored.to_pylist() if r["uri"] in reported} == \
        {"/img/0.png", "/img/2.png", "/img/4.png"}
    # Bad input: a clear message, nothing stored.
    sheet.write_text("uri,label\n/img/c.png,maybe\n")
    assert main(["label", "--labels", store, "--csv", str(sheet)]) == 2
    assert "line 2: label must be one of" in capsys.readouterr().err
    assert labels.latest(store)[1]["labels"] == summary["labels"]
