"""Bucket scanning: every selected object under a prefix -> exactly one report row.

Ray Data streams: the driver lists objects (metadata only), tasks read and decode them
with `detector.preprocess`, a scoring stage turns pixels into scores (an actor pool with
the shared Predictor for `--via data`, or the Serve deployment's replicas for
`--via serve`), and the driver writes the small report rows to a local Parquet file
that is published to the output URI only when complete.

Exactly one row per object is enforced at the end, not hoped for: rows lost to a crashed
worker are scanned again, duplicates from retried work are dropped.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from detector import data, preprocess, storage
from detector.config import ScanConfig
from detector.threads import use_reserved_cpus

log = logging.getLogger(__name__)

REPORT_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("size_bytes", pa.int64()),
        ("etag", pa.string()),
        ("format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("score_ai", pa.float64()),
        ("verdict", pa.string()),
        ("model", pa.string()),
        ("threshold", pa.float64()),
        ("error", pa.string()),
        ("error_detail", pa.string()),
        ("scanned_at", pa.timestamp("us", tz="UTC")),
    ]
)
# Decoded rows between the decode and scoring stages: report columns + pixels.
DECODED_SCHEMA = pa.schema([("pixels", pa.binary()), *REPORT_SCHEMA])
RETRYABLE_ERRORS = {"read-failed", "scan-failed"}  # not reused by --resume
PROGRESS_EVERY_S = 10.0


def decode_objects(batch: dict[str, np.ndarray], image_size: int, max_bytes: int) -> pa.Table:
    """Ray Data stage: read and decode a batch of listed objects (never raises per object)."""
    rows = {name: [] for name in DECODED_SCHEMA.names}
    for uri, size, etag in zip(batch["uri"], batch["size_bytes"], batch["etag"], strict=True):
        row = dict.fromkeys(DECODED_SCHEMA.names)
        row.update(uri=str(uri), size_bytes=int(size), etag=str(etag))
        if size > max_bytes:  # refused before a byte is downloaded
            row.update(error="too-large", error_detail=f"{size} bytes exceeds {max_bytes}")
        else:
            blob, error, detail = data.fetch(str(uri))
            if blob is None:
                row.update(error=error, error_detail=detail)
            else:
                try:
                    pixels, info = preprocess.load_image(blob, image_size, max_bytes=max_bytes)
                except preprocess.ImageError as err:
                    row.update(error=err.code, error_detail=err.detail)
                else:
                    row.update(pixels=pixels.tobytes(), format=info.format, width=info.width,
                               height=info.height)
        for name in DECODED_SCHEMA.names:
            rows[name].append(row[name])
    return pa.table(rows, schema=DECODED_SCHEMA)


class ScoreWithPredictor:
    """Ray Data actor: holds one Predictor and scores the decoded rows of each batch."""

    def __init__(self, model_uri: str, threshold: float | None, precision: str = "float32",
                 cpus: float = 1.0, gpus: float = 0.0):
        from detector.predictor import Predictor

        use_reserved_cpus(cpus, gpus)
        self.predictor = Predictor.from_uri(model_uri, precision=precision)
        self.threshold = threshold

    def __call__(self, table: pa.Table) -> pa.Table:
        return finish_rows(table, self.predictor.card, self.threshold, self.predictor.score)


class ScoreWithServe:
    """Ray Data actor: sends each batch's pixels to the Serve model deployment, so scans
    share the autoscaled replicas that answer HTTP traffic."""

    def __init__(self, app_name: str, threshold: float | None):
        from ray import serve

        from detector.artifact import ModelCard

        self.handle = serve.get_deployment_handle("Model", app_name=app_name)
        self.card = ModelCard(**self.handle.card.remote().result())
        self.threshold = threshold

    def __call__(self, table: pa.Table) -> pa.Table:
        def score(pixels: np.ndarray) -> np.ndarray:
            return np.asarray(self.handle.score_pixels.remote(pixels).result())

        return finish_rows(table, self.card, self.threshold, score)


def finish_rows(table: pa.Table, card, threshold: float | None, score) -> pa.Table:
    """Score the decodable rows of `table` and fill in the report columns for all rows."""
    threshold = card.threshold if threshold is None else threshold
    pixels_column = table.column("pixels").to_pylist()
    scores: list[float | None] = [None] * table.num_rows
    todo = [i for i, p in enumerate(pixels_column) if p is not None]
    if todo:
        batch = data.decode_pixels([pixels_column[i] for i in todo], card.image_size)
        for i, value in zip(todo, score(batch), strict=True):
            scores[i] = float(value)
    verdicts = [None if s is None else card.verdict(s, threshold) for s in scores]
    now = dt.datetime.now(dt.UTC)
    table = table.drop_columns(["pixels", "score_ai", "verdict", "model", "threshold",
                                "scanned_at"])
    n = table.num_rows
    columns = {
        "score_ai": pa.array(scores, pa.float64()),
        "verdict": pa.array(verdicts, pa.string()),
        "model": pa.array([f"{card.name}@{card.id}"] * n, pa.string()),
        "threshold": pa.array([threshold] * n, pa.float64()),
        "scanned_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
    }
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table.select(REPORT_SCHEMA.names).cast(REPORT_SCHEMA)


def scan(config: ScanConfig, progress: bool = True, on_progress=None) -> dict:
    """Scan `config.source` into a report at `config.out`; returns the summary.

    `on_progress(dict)` receives done/total/errors/objects_per_second as rows arrive."""
    import ray

    from detector.artifact import load_card

    started = time.perf_counter()
    card = load_card(config.model)
    listed = list(storage.list_objects(config.source, config.include))
    reused = _reusable_rows(config, listed) if config.resume else {}
    todo = [o for o in listed if (o.uri, o.etag) not in reused]
    via = resolve_via(config)
    log.info("scan %s: %d objects selected, %d reused from the previous report, %d to scan "
             "via %s", config.source, len(listed), len(reused), len(todo), via)
    ray.data.DataContext.get_current().enable_progress_bars = progress

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "report.parquet")
        with pq.ParquetWriter(local, REPORT_SCHEMA, compression="zstd") as writer:
            if reused:
                writer.write_table(pa.Table.from_pylist(list(reused.values()), REPORT_SCHEMA))
            seen = _run_passes(config, card, todo, via, writer, started, on_progress)
        table = pq.read_table(local)
        if table.num_rows != len(listed):  # the contract; never publish a report breaking it
            raise RuntimeError(f"report has {table.num_rows} rows for {len(listed)} objects")
        _publish(local, config.out)
    summary = summarize(table, config, time.perf_counter() - started, len(todo), via)
    summary["scanned"] = seen
    return summary


def _run_passes(config, card, todo, via, writer, started, on_progress) -> int:
    """Scan `todo`, then re-scan whatever a crashed worker lost; write each URI once."""
    written: set[str] = set()
    progress = Progress(len(todo), started, on_progress)
    pending = todo
    for attempt in range(3):
        if not pending:
            break
        for table in _stream(config, card, pending, via):
            table = _first_rows_only(table, written)
            writer.write_table(table)
            progress.update(len(written), table.num_rows - table.column("error").null_count)
        pending = [o for o in pending if o.uri not in written]
        if pending:
            log.warning("pass %d left %d objects without a row; scanning them again",
                        attempt + 1, len(pending))
    if pending:  # still missing after retries: say so in the report, never drop them
        writer.write_table(_failed_rows(pending, card, config.threshold))
        written.update(o.uri for o in pending)
    return len(written)


def _first_rows_only(table: pa.Table, written: set[str]) -> pa.Table:
    keep = []
    for i, uri in enumerate(table.column("uri").to_pylist()):
        if uri not in written:
            written.add(uri)
            keep.append(i)
    return table.take(keep)


class Progress:
    """Logs done/total, objects/s and errors at most every PROGRESS_EVERY_S seconds."""

    def __init__(self, total: int, started: float, callback=None):
        self.total, self.started, self.errors, self.last = total, started, 0, 0.0
        self.callback = callback

    def update(self, done: int, errors: int) -> None:
        self.errors += errors
        now = time.perf_counter()
        if self.callback is not None:
            self.callback({"done": done, "total": self.total, "errors": self.errors,
                           "objects_per_second": round(done / max(now - self.started, 1e-9), 1)})
        if now - self.last >= PROGRESS_EVERY_S or done >= self.total:
            self.last = now
            rate = done / max(now - self.started, 1e-9)
            log.info("scan progress: %d/%d objects, %.1f objects/s, %d errors",
                     done, self.total, rate, self.errors)


def _stream(config: ScanConfig, card, objects, via: str) -> Iterable[pa.Table]:
    import ray

    items = [{"uri": o.uri, "size_bytes": o.size, "etag": o.etag} for o in objects]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 16, 4000)))
    decoded = dataset.map_batches(
        decode_objects,
        fn_kwargs={"image_size": card.image_size, "max_bytes": config.max_bytes},
        batch_size=16,
        # Half a CPU: reads wait on storage part of the time. Resources unlike the scoring
        # actors' also keep Ray Data from fusing decoding into them, where it would run
        # serially with the model instead of alongside it (or occupy a GPU actor's CPU).
        num_cpus=0.5,
    )
    if via == "serve":
        scored = decoded.map_batches(
            ScoreWithServe, fn_constructor_args=(config.serve_app, config.threshold),
            batch_size=config.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.actors or 4),
            num_cpus=0.1,  # I/O-bound: the replicas do the compute
        )
    else:
        scored = decoded.map_batches(
            ScoreWithPredictor,
            fn_constructor_args=(config.model, config.threshold, config.precision,
                                 config.cpus_per_actor, config.gpus_per_actor),
            batch_size=config.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_actors(config)),
            num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor,
        )
    for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield batch.cast(REPORT_SCHEMA)


def _actors(config: ScanConfig) -> int:
    import ray

    if config.actors:
        return config.actors
    if config.gpus_per_actor:
        return max(1, int(ray.cluster_resources().get("GPU", 1) / config.gpus_per_actor))
    return max(1, int(ray.cluster_resources().get("CPU", 2) // (2 * config.cpus_per_actor)))


def resolve_via(config: ScanConfig) -> str:
    """`auto` means: through Serve when a detector app is running, else an actor pool."""
    if config.via != "auto":
        return config.via
    try:
        from ray import serve

        status = serve.status()
        return "serve" if config.serve_app in status.applications else "data"
    except Exception:
        return "data"


def _reusable_rows(config: ScanConfig, listed) -> dict[tuple[str, str], dict]:
    """Rows of the previous report for objects that are unchanged (same uri and etag)."""
    if not storage.exists(config.out):
        return {}
    fs, path = storage.resolve(config.out)
    previous = pq.read_table(path, filesystem=fs).cast(REPORT_SCHEMA).to_pylist()
    current = {(o.uri, o.etag) for o in listed}
    return {
        (row["uri"], row["etag"]): row
        for row in previous
        if (row["uri"], row["etag"]) in current and row["error"] not in RETRYABLE_ERRORS
    }


def _failed_rows(objects, card, threshold) -> pa.Table:
    now = dt.datetime.now(dt.UTC)
    return pa.Table.from_pylist(
        [{"uri": o.uri, "size_bytes": o.size, "etag": o.etag, "model": f"{card.name}@{card.id}",
          "threshold": card.threshold if threshold is None else threshold,
          "error": "scan-failed", "error_detail": "no result after 3 attempts",
          "scanned_at": now} for o in objects],
        REPORT_SCHEMA,
    )


def _publish(local_file: str, uri: str) -> None:
    """The whole report appears at `uri` at once (rename locally, one PUT on S3)."""
    with open(local_file, "rb") as handle:
        storage.write_bytes(uri, handle.read())


def summarize(table: pa.Table, config: ScanConfig, seconds: float, scanned: int,
              via: str) -> dict:
    verdicts = Counter(v for v in table.column("verdict").to_pylist() if v)
    errors = Counter(e for e in table.column("error").to_pylist() if e)
    return {
        "out": config.out,
        "objects": table.num_rows,
        "by_verdict": dict(sorted(verdicts.items())),
        "by_error": dict(sorted(errors.items())),
        "via": via,
        "seconds": round(seconds, 2),
        "objects_per_second": round(scanned / seconds, 1) if seconds else None,
    }
