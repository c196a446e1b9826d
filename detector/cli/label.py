"""`detector label`: reviewers' decisions into the labels dataset from the command line.

The images come from a CSV (columns `uri` or `sha256`, `label`, optionally `generator`
and `note`), from a scan report's rows with a given verdict, or as URIs on the command
line; the last two take their label from `--label`. Labels are stored as the HTTP route
stores them (`detector.data.labels`), in batches of at most `labels.MAX_BATCH`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from detector.data import labels
from detector.io import storage


def from_csv(uri: str) -> Iterator[labels.Label]:
    text = storage.read_bytes(uri).decode("utf-8-sig")  # Excel writes a BOM
    for line, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        try:
            yield labels.Label.parse({k: v for k, v in row.items() if k and v})
        except labels.LabelError as err:
            raise labels.LabelError(f"{uri} line {line}: {err}") from None


def from_report(report_uri: str, verdict: str, label: str, generator: str | None,
                note: str | None) -> Iterator[labels.Label]:
    """Every scored row of a committed report with `verdict`, labelled `label`."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from detector.scanning import report

    report.read_manifest(report_uri)  # a report still being written is refused
    fs, path = storage.resolve(report_uri)
    parts = pads.dataset(path, filesystem=fs, format="parquet")
    rows = parts.to_table(columns=["uri"], filter=pc.field("verdict") == verdict)
    for uri in rows.column("uri").to_pylist():
        yield labels.Label.parse({"uri": uri, "label": label, "generator": generator,
                                  "note": note})


def store(labels_uri: str, items: Iterator[labels.Label], reviewer: str) -> dict:
    """Append `items` in batches; {batches, labels} stored."""
    batch: list[labels.Label] = []
    stored = {"batches": 0, "labels": 0}

    def flush() -> None:
        labels.append(labels_uri, batch, reviewer)
        stored["batches"] += 1
        stored["labels"] += len(batch)
        batch.clear()

    for item in items:
        batch.append(item)
        if len(batch) == labels.MAX_BATCH:
            flush()
    if batch:
        flush()
    return stored


def run(args) -> int:
    """`detector label` (see its --help)."""
    import sys

    extra = {"label": args.label, "generator": args.generator, "note": args.note}
    try:
        if args.csv:
            items = from_csv(args.csv)
        elif args.report:
            if not args.verdict or not args.label:
                raise labels.LabelError("--report needs --verdict and --label")
            items = from_report(args.report, args.verdict, args.label, args.generator,
                                args.note)
        elif args.images and args.label:
            items = (labels.Label.parse({"uri": uri, **extra}) for uri in args.images)
        else:
            raise labels.LabelError("give --csv FILE, --report OUT --verdict V --label L, "
                                    "or image URIs with --label L")
        stored = store(args.labels, items, args.reviewer)
    except labels.LabelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:  # a CSV or report that is not there (yet)
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not stored["labels"]:
        print("no labels to store", file=sys.stderr)
        return 1
    _, summary = labels.latest(args.labels)
    print(f"stored {stored['labels']} labels in {stored['batches']} batch(es) at "
          f"{args.labels}; it now holds {summary['labels']} labels for {summary['images']} "
          f"images ({summary['conflicting']} labelled both ways)")
    return 0
