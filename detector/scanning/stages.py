"""The Ray Data stages of a scan, in pipeline order:

    list_partitions   listing ranges -> object rows, cut into partitions (+ a header each)
    decode_objects    read and decode the objects that need scoring (reads overlap)
    ScoreWith*        pixels -> scores (own actor pool, or the Serve Model replicas)
    PartWriter        gathers each partition's rows and writes its part, once, whole

Every stage passes one table shape (`WORK_SCHEMA`) and leaves rows it has nothing to do
with untouched: reused rows, rows that already carry an error, partition headers. None of
them raises for one bad object; an object's trouble becomes its row's error code.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detector.data import duplicates, shards
from detector.io import preprocess, reads, video
from detector.io.listing import ListingRange, iter_range
from detector.io.selection import VIDEO_EXTENSIONS, NotSelected, Selection, extension
from detector.io.threads import reserved_threads
from detector.model.artifact import ModelCard
from detector.model.predictor import Predictor
from detector.scanning import gate, report
from detector.scanning.partitions import Partition, Span, cut, partition_id
from detector.verdicts import consistency, familiarity, provenance, residual
from detector.verdicts.attribution import attribute_for
from detector.verdicts.verdict import classify_for, decide_for
from detector.verdicts.video import decide_video

log = logging.getLogger(__name__)

WORK_SCHEMA = pa.schema([
    # "object"; "frame" (of a video object); "header", one per partition after its
    # objects; "range_done", one per spec
    ("kind", pa.string()),
    ("partition", pa.string()),
    *report.REPORT_SCHEMA,
    ("reused", pa.bool_()),  # a row of the previous report, carried over as it was
    ("pixels", pa.binary()),  # between decoding and scoring only
    # "frame" rows, one per sampled frame of a video, from decoding to the writer
    ("frame_index", pa.int32()),
    ("frame_s", pa.float64()),
    ("heads", pa.list_(pa.float32())),  # the attribution head's output for the frame
    ("header", pa.string()),  # JSON, header rows only
])
NOTE_SCHEMA = pa.schema([("status", pa.string()), ("partition", pa.string()),
                         ("info", pa.string())])
# Listing output is re-blocked to this many rows for decoding. Ray Data keeps some state
# per block in the driver: 64-row blocks made its memory grow 1.43x for a 10x bucket.
ROWS_PER_BLOCK = 256
SERVE_RETRY_S = 600.0  # how long a scan waits for Serve to replace a lost replica


# ------------------------------------------------------------------------------ listing


def list_partitions(batch: pa.Table, selection: Selection, partition_size: int,
                    out: str, listing_gate=None, block_bytes: int = 0,
                    **run) -> Iterator[pa.Table]:
    """Ray Data stage: list each spec's range and emit its objects partition by partition.

    A spec is {"range", "committed": spans of parts a resumed scan may reuse, "bounds":
    (after, last) to list one lost partition again}. A partition whose committed part
    still matches every object (same etag, and `run`: model, threshold, provenance rules,
    consistency checks) is not emitted at all, only its header, marked `kept`: its part
    stays as it is. Each other partition waits for `listing_gate` (a `gate.ListingGate`
    handle) to admit its objects; `block_bytes` is the pipeline's target block size."""
    admission = gate.Admission(listing_gate, block_bytes) if listing_gate is not None \
        else None
    for text in batch.column("spec").to_pylist():
        spec = json.loads(text)
        rng = ListingRange.from_dict(spec["range"])
        committed = {partition_id(rng.id, s["after"]): s for s in spec.get("committed", [])}
        spans = [Span(s["after"], s["last"]) for s in committed.values()]
        not_selected = None
        if spec.get("bounds"):
            after, last = spec["bounds"]
            spans, objects = [Span(after, last)], iter_range(rng, selection, after, last)
        else:  # counted only when a whole range is listed: never twice for a lost partition
            not_selected = NotSelected()
            objects = iter_range(rng, selection, not_selected=not_selected)
        count = 0
        for part in cut(objects, rng.id, partition_size, spans):
            count += 1
            for table in _partition_rows(part, rng, committed.get(part.id), out, run,
                                         admission):
                yield admission.emitted(table) if admission else table
        done = {"range": rng.id, "partitions": count, "listed_at": time.time()}
        if not_selected is not None:
            done["not_selected"] = not_selected.to_dict()
        yield _table([{"kind": "range_done", "partition": "", "header": json.dumps(done)}])


def _partition_rows(part: Partition, rng: ListingRange, committed: dict | None, out: str,
                    run: dict, admission: gate.Admission | None) -> Iterator[pa.Table]:
    old = _reusable_rows(out, committed, run)
    reused = {o.uri: old[o.uri] for o in part.objects
              if o.uri in old and o.etag is not None and old[o.uri]["etag"] == o.etag}
    header = {"range": rng.to_dict(), "after": part.after, "last": part.last,
              "expected": len(part.objects), "file": report.part_name(part.id)}
    if committed and len(reused) == len(part.objects) == committed["rows"]:
        yield _table([_header_row(part.id, {**header, "expected": 0, "kept": committed})])
        return
    if admission is not None:
        admission.admit(len(part.objects))
    header["listed_at"] = time.time()
    rows = []
    for obj in part.objects:
        row = reused.get(obj.uri)
        if row is not None:
            rows.append({**row, "kind": "object", "partition": part.id, "reused": True})
        else:
            rows.append({"kind": "object", "partition": part.id, "uri": obj.uri,
                         "size_bytes": obj.size, "etag": obj.etag, "reused": False})
        if len(rows) >= ROWS_PER_BLOCK * 16:
            yield _table(rows)
            rows = []
    rows.append(_header_row(part.id, header))
    yield _table(rows)


def _reusable_rows(out: str, committed: dict | None, run: dict) -> dict[str, dict]:
    """uri -> row of the committed part, for rows a resumed scan may keep as they are:
    written by the same model, threshold, provenance rules, consistency checks (or none)
    and report format."""
    if not committed or any(committed.get(key) != value for key, value in run.items()) or \
            committed.get("consistency") != run.get("consistency") or \
            committed.get("format_version") != report.FORMAT_VERSION:
        return {}  # something a row depends on changed: every row is scored again
    rows = report.read_part(out, committed["file"]).to_pylist()
    return {r["uri"]: r for r in rows if r["error"] not in report.RETRYABLE_ERRORS}


def _header_row(partition: str, header: dict) -> dict:
    return {"kind": "header", "partition": partition, "header": json.dumps(header)}


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


# ------------------------------------------------------------------------------ decoding


def decode_objects(table: pa.Table, image_size: int, max_bytes: int,
                   videos: video.VideoLimits | None = None,
                   frames: int = video.DEFAULT_FRAMES) -> Iterator[pa.Table]:
    """Ray Data stage: read and decode the rows that need scoring (never raises per
    object: a bad object's row gets an error code instead of pixels).

    With `videos` (their limits), videos are scored too, found by name or by content.
    The images and every other row go on first, as one table; then each video, read one
    at a time, goes on as its row and one `frame` row per sampled frame (`frames` of
    them) as soon as it is sampled: a task holds one video's bytes and frames at most."""
    rows = table.to_pylist()
    todo = [r for r in rows if r["kind"] == "object" and not r["reused"]]
    pooled, one_by_one = [], []  # one_by_one: what may be a video too large for the pool
    for row in todo:
        named_video = videos is not None and extension(row["uri"]) in VIDEO_EXTENSIONS
        limit = videos.max_bytes if named_video or (
            videos is not None and not preprocess.named_as_image(row["uri"])) else max_bytes
        size = row["size_bytes"]
        if size is not None and size > limit:
            row.update(error="too-large",  # refused before a byte is downloaded
                       error_detail=f"{size} bytes exceeds {limit}")
        elif named_video or (size is not None and size > max_bytes):
            one_by_one.append(row)
        else:
            pooled.append(row)
    fetched = reads.fetch_many([r["uri"] for r in pooled], [r["size_bytes"] for r in pooled],
                               videos=videos is not None)
    later = []
    for row, got in zip(pooled, fetched, strict=True):
        if got.data is not None and videos is not None and video.looks_like_video(got.data[:16]):
            later.append((row, got))  # sampled after the images have gone on
        else:
            _decode(row, got, image_size, max_bytes)
    held = {id(r) for r, _ in later} | {id(r) for r in one_by_one}
    yield _table([r for r in rows if id(r) not in held])
    for row, got in later:
        yield _table(_decode_video(row, got.data, image_size, frames, videos))
    for row in one_by_one:
        got = reads.fetch(row["uri"], row["size_bytes"], videos=True)
        if got.data is not None and video.looks_like_video(got.data[:16]):
            yield _table(_decode_video(row, got.data, image_size, frames, videos))
        else:  # an image after all (or an error), under its image limit
            _decode(row, got, image_size, max_bytes)
            yield _table([row])
        del got  # this video's bytes go before the next one's are read


def _decode(row: dict, got: reads.Fetched, image_size: int, max_bytes: int) -> None:
    """Fill in an image row from its bytes, or its error."""
    if got.data is None:
        row.update(error=got.error, error_detail=got.detail)
        return
    blob = got.data
    if row["size_bytes"] is None:  # from a manifest without sizes
        row["size_bytes"] = len(blob)
    row["evidence"] = [e.to_dict() for e in provenance.inspect(blob)]
    if preprocess.could_be_image(blob[:16]):  # an image, whether or not it decodes
        row["media"] = "image"
    try:
        pixels, info = preprocess.load_image(blob, image_size, max_bytes=max_bytes)
    except preprocess.ImageError as err:
        row.update(error=err.code, error_detail=err.detail)
    else:
        row.update(media="image", pixels=pixels.tobytes(), format=info.format,
                   width=info.width, height=info.height, phash=duplicates.phash(pixels))


def _decode_video(row: dict, blob: bytes, image_size: int, frames: int,
                  limits: video.VideoLimits) -> list[dict]:
    """A video's row (its verdict waits for its frames' scores, in `PartWriter`) and one
    `frame` row per sampled frame; or its row alone, with its error."""
    if row["size_bytes"] is None:
        row["size_bytes"] = len(blob)
    row.update(media="video", evidence=[e.to_dict() for e in provenance.inspect(blob)])
    try:
        sampled = video.sample_frames(blob, image_size, frames, limits)
    except video.VideoError as err:
        row.update(error=err.code, error_detail=err.detail)
        return [row]
    row.update(sampled.fields())  # frames_scored: the frame rows its writer waits for
    return [row, *({"kind": "frame", "partition": row["partition"], "uri": row["uri"],
                    "frame_index": i, "frame_s": float(t), "pixels": pixels.tobytes()}
                   for i, (pixels, t) in enumerate(zip(sampled.pixels, sampled.times_s,
                                                       strict=True)))]


# ------------------------------------------------------------------------------ scoring


class ScoreWithPredictor:
    """Ray Data actor: holds one Predictor and scores the decoded rows of each batch."""

    def __init__(self, model_uri: str, threshold: float, backend: str = "auto",
                 precision: str = "float32", cpus: float = 1.0, gpus: float = 0.0,
                 check_consistency: bool = False, batch_size: int = 32):

        threads = reserved_threads(cpus, gpus)
        self.predictor = Predictor.from_uri(model_uri, batch_size=batch_size, backend=backend,
                                            precision=precision, threads=threads)
        self.threshold, self.check_consistency = threshold, check_consistency

    def __call__(self, table: pa.Table) -> pa.Table:
        return finish_rows(table, self.predictor.card, self.threshold,
                           self.predictor.score_and_attribute, self.check_consistency)


class ScoreWithServe:
    """Ray Data actor: sends each batch's pixels to the Serve Model deployment, so scans
    share the autoscaled replicas that answer HTTP traffic. A replica that dies is
    replaced by Serve; the batch waits for it instead of failing the scan. Every answer
    names the model that produced it, so a redeployed app cannot slip in another one."""

    def __init__(self, app_name: str, model_id: str, threshold: float,
                 check_consistency: bool = False, batch_size: int = 32):
        from ray import serve


        self.handle = serve.get_deployment_handle("Model", app_name=app_name)
        self.card = ModelCard(**self._call("card"))
        self.model_id, self.threshold = model_id, threshold
        self.check_consistency, self.batch_size = check_consistency, batch_size
        self._check(self.card.id)

    def __call__(self, table: pa.Table) -> pa.Table:
        def score(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            scores, heads = [], []
            for i in range(0, len(pixels), self.batch_size):  # one request per batch
                answer = self._call("score_pixels", pixels[i : i + self.batch_size])
                self._check(answer["model"])
                scores.append(np.asarray(answer["scores"]).reshape(-1))
                heads.append(answer.get("heads"))
            return np.concatenate(scores), \
                None if heads[0] is None else np.concatenate(heads)

        return finish_rows(table, self.card, self.threshold, score, self.check_consistency)

    def _check(self, served: str) -> None:
        if served != self.model_id:
            raise RuntimeError(f"the Serve app now serves model {served}, not {self.model_id} "
                               "that this scan started with; scan again with --resume")

    def _call(self, method: str, *args):
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        deadline, pause = time.monotonic() + SERVE_RETRY_S, 1.0
        while True:
            try:
                return getattr(self.handle, method).remote(*args).result(timeout_s=300)
            except (RayActorError, DeploymentUnavailableError, BackPressureError,
                    TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("Serve %s failed (%s); retrying in %.0f s", method,
                            type(exc).__name__, pause)
                time.sleep(pause)
                pause = min(pause * 2, 30.0)


def finish_rows(table: pa.Table, card, threshold: float, score_and_attribute,
                check_consistency: bool = False) -> pa.Table:
    """Score the decoded rows of `table` (`score_and_attribute`: pixels -> (scores, head
    outputs or None), as `Predictor.score_and_attribute`) and fill in the report columns
    of every object row scanned now; reused rows and headers pass through as they are.
    With `check_consistency`, each image's re-encoded copies are scored too (see
    `detector.verdicts.consistency`)."""
    rows = table.to_pylist()
    decoded = [r for r in rows if r["pixels"] is not None]
    if decoded:
        batch = shards.decode_pixels([r["pixels"] for r in decoded], card.image_size)
        scores, heads = score_and_attribute(batch)
        images = [i for i, r in enumerate(decoded) if r["kind"] == "object"]
        unlike = residual.check(card.domain, batch[images])
        copies = (consistency.copy_scores(batch[images], lambda p: score_and_attribute(p)[0])
                  if check_consistency and images else [None] * len(images))
        for i, row in enumerate(decoded):
            if row["kind"] == "frame":  # its video is decided by the writer
                row.update(score_ai=float(scores[i]), pixels=None,
                           heads=None if heads is None else heads[i].tolist())
        for i, copy_scores, unlike_real in zip(images, copies, unlike, strict=True):
            row, value = decoded[i], float(scores[i])
            evidence = _evidence(row)
            found = [familiarity.check(card.domain, row["format"], row["width"], row["height"]),
                     unlike_real]
            if copy_scores is not None:
                found.append(consistency.finding(lambda s: classify_for(card, s, threshold),
                                                 value, copy_scores))
            if any(found):
                evidence += [f for f in found if f is not None]
                row["evidence"] = [e.to_dict() for e in evidence]
            verdict, decided_by = decide_for(card, value, evidence, threshold)
            named = attribute_for(card, verdict, evidence,
                                  None if heads is None else heads[i])
            row.update(score_ai=value, verdict=verdict, decided_by=decided_by,
                       generator=named.generator, generator_scores=named.scores,
                       generator_decided_by=named.decided_by, pixels=None)
    now = dt.datetime.now(dt.UTC)
    label = f"{card.name}@{card.id}"
    for row in rows:
        if row["kind"] == "object" and not row["reused"]:
            # evidence: [] where none was read (refused or unread objects), never null.
            row.update(model=label, threshold=threshold, scanned_at=now,
                       evidence=row.get("evidence") or [])
    return _table(rows)


def _evidence(row: dict) -> list[provenance.Evidence]:
    return [provenance.Evidence(**e) for e in row.get("evidence") or []]


# ------------------------------------------------------------------------------ writing


class PartWriter:
    """Ray Data actor: collects each partition's rows until its header says all of them
    are here, then writes the partition's part. Emits notes for the driver: `listed`
    (a partition's expected count), `progress` (rows seen) and `committed`.

    Rows of one partition can arrive in any order and from any upstream task; a row that
    arrives twice (a retried upstream task) is written once. A writer that dies loses
    only the partitions it was still gathering: the driver sees them listed but never
    committed and lists them again.

    A video's row waits here for its frames' scores (`frame` rows, which may come before
    or after it, in any batches), then is decided by the video rule with `card` and the
    run's threshold (`detector.verdicts.video`)."""

    def __init__(self, out: str, run: dict, card: ModelCard | None = None):
        self.out, self.run, self.card = out, run, card
        self.open: dict[str, dict] = collections.defaultdict(
            lambda: {"tables": [], "uris": set(), "header": None,
                     "videos": collections.defaultdict(lambda: {"row": None, "frames": {}})})

    def __call__(self, table: pa.Table) -> pa.Table:
        notes: list[dict] = []
        kinds = table.column("kind")
        for row in table.filter(pc.equal(kinds, "header")).to_pylist():
            header = json.loads(row["header"])
            self.open[row["partition"]]["header"] = header
            notes.append(_note("listed", row["partition"], header))
        for row in table.filter(pc.equal(kinds, "range_done")).to_pylist():
            notes.append(_note("range_done", "", json.loads(row["header"])))
        objects = table.filter(pc.equal(kinds, "object"))
        fresh = errors = 0
        for name in pc.unique(objects.column("partition")).to_pylist():
            rows = objects.filter(pc.equal(objects.column("partition"), name))
            state = self.open[name]
            keep = []
            for i, uri in enumerate(rows.column("uri").to_pylist()):
                if uri not in state["uris"]:
                    state["uris"].add(uri)
                    keep.append(i)
            rows = rows.take(pa.array(keep, pa.int64()))  # [] alone has no type
            fresh += rows.num_rows
            errors += rows.num_rows - rows.column("error").null_count
            waiting = _awaiting_frames(rows)
            for row in rows.filter(waiting).to_pylist():
                state["videos"][row["uri"]]["row"] = row
            state["tables"].append(rows.filter(pc.invert(waiting)).select(_WRITTEN))
        for row in table.filter(pc.equal(kinds, "frame")).select(
                ["partition", "uri", "frame_index", "frame_s", "score_ai", "heads"]).to_pylist():
            state = self.open[row["partition"]]
            if row["uri"] in state["uris"] and row["uri"] not in state["videos"]:
                continue  # its video was decided: a retried task's copy
            state["videos"][row["uri"]]["frames"][row["frame_index"]] = row
        for state in self.open.values():
            for uri in [u for u, v in state["videos"].items() if _all_frames(v)]:
                decided = self._decide(**state["videos"].pop(uri))
                state["tables"].append(_table([decided]).select(_WRITTEN))
        if fresh:
            notes.append(_note("progress", "", {"rows": fresh, "errors": errors}))
        for name in [n for n, s in self.open.items() if _complete(s)]:
            notes.append(self._commit(name, self.open.pop(name)))
        return pa.Table.from_pylist(notes, schema=NOTE_SCHEMA)

    def _decide(self, row: dict, frames: dict[int, dict]) -> dict:
        """A video's row, decided from its frames' scores."""
        ordered = [frames[i] for i in range(row["frames_scored"])]
        scores = [f["score_ai"] for f in ordered]
        times = [f["frame_s"] for f in ordered]
        heads = None if ordered[0]["heads"] is None else [f["heads"] for f in ordered]
        decided = decide_video(self.card, scores, times, heads, _evidence(row),
                               self.run["threshold"])
        return {**row, **decided.fields()}

    def _commit(self, name: str, state: dict) -> dict:
        header = state["header"]
        if header.get("kept"):
            return _note("committed", name, header["kept"])
        table = pa.concat_tables(state["tables"]) if state["tables"] else \
            WORK_SCHEMA.empty_table().select(_WRITTEN)
        reused = int(pc.sum(table.column("reused")).as_py() or 0)
        meta = {
            "partition": name, "file": header["file"], "range": header["range"],
            "after": header["after"], "last": header["last"], "rows": table.num_rows,
            "listed_at": header.get("listed_at"),
            "scanned": table.num_rows - reused, "reused": reused,
            "by_media": _counts(table.column("media")),
            "by_verdict": _counts(table.column("verdict")),
            "by_generator": _counts(table.column("generator")),
            "by_error": _counts(table.column("error")),
            "format_version": report.FORMAT_VERSION, **self.run,
        }
        report.write_part(self.out, header["file"], table, meta)
        return _note("committed", name, {**meta, "committed_at": time.time()})


_WRITTEN = [*report.REPORT_SCHEMA.names, "reused"]


def _complete(state: dict) -> bool:
    header = state["header"]
    return header is not None and len(state["uris"]) >= header["expected"] and \
        not state["videos"]


def _awaiting_frames(rows: pa.Table) -> pa.ChunkedArray:
    """Which of `rows` are videos whose frames were sampled and are not decided yet."""
    return pc.fill_null(pc.and_(pc.and_(pc.equal(rows.column("media"), "video"),
                                        pc.is_null(rows.column("verdict"))),
                                pc.is_null(rows.column("error"))), False)


def _all_frames(pending: dict) -> bool:
    row = pending["row"]
    return row is not None and len(pending["frames"]) >= row["frames_scored"]


def _counts(column: pa.ChunkedArray) -> dict[str, int]:
    counts = pc.value_counts(column.drop_null()).to_pylist()
    return {c["values"]: int(c["counts"]) for c in sorted(counts, key=lambda c: c["values"])}


def _note(status: str, partition: str, info: dict) -> dict:
    return {"status": status, "partition": partition, "info": json.dumps(info)}
