"""Bucket scanning: every selected object under a prefix -> exactly one report row.

The driver plans and keeps the books; workers do everything that grows with the bucket:

    plan (driver: a few delimiter listings -> listing ranges)
      -> list_partitions (tasks: pages -> partitions of objects, as they arrive, while
         the `gate` admits them: listing stays a window ahead of the writer)
      -> decode_objects (tasks) -> ScoreWithPredictor | ScoreWithServe (actors)
      -> PartWriter (actor: one part per partition, written whole)
      -> notes to the driver (per partition: listed, committed; counts)

The driver holds one record per partition, never one per object, and commits the report
(`detector.scanning.report`) only when every listed partition has its part. A partition the
pipeline lost (a dead writer, say) is listed and scanned again, up to `MAX_PASSES`
times; parts already written stay, so an interrupted scan continues with `--resume`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np

from detector.config import ScanConfig
from detector.data import duplicates
from detector.io import listing, storage
from detector.io.selection import NotSelected, Selection
from detector.io.video import VideoLimits
from detector.model.artifact import load_card, resolve
from detector.scanning import gate, report
from detector.scanning.stages import (
    NOTE_SCHEMA,
    ROWS_PER_BLOCK,
    PartWriter,
    ScoreWithPredictor,
    ScoreWithServe,
    decode_objects,
    list_partitions,
)
from detector.verdicts import consistency, provenance

log = logging.getLogger(__name__)

MAX_PASSES = 3
PROGRESS_EVERY_S = 10.0
DEFAULT_CPUS_PER_ACTOR = 2.0
DECODE_CPUS = 0.5  # per decode task: reads wait on storage part of the time
BLOCK_BYTES = 2 * 1024 * 1024  # ~12k listed keys, or ~13 decoded images at 224 px
REPORT_SCHEMA = report.REPORT_SCHEMA  # re-exported: the report's columns
NEAR_DUPLICATES = report.NEAR_DUPLICATES  # re-exported


class ScanStalled(RuntimeError):
    """Nothing could be scheduled for too long, and no node is on its way."""


class ScanCannotFit(RuntimeError):
    """The cluster cannot add nodes and has no room for the scan's actors."""


def scan(config: ScanConfig, progress: bool = True,
         on_progress: Callable[[dict], None] | None = None) -> dict:
    """Scan `config.source` into a committed report at `config.out`; returns the summary.

    `on_progress(dict)` receives listed/done/errors/partitions/objects_per_second."""

    started, started_at = time.perf_counter(), _now()
    # One version for the whole scan, even if training publishes another meanwhile.
    config = dataclasses.replace(config, model=resolve(config.model))
    card = load_card(config.model)
    threshold = card.threshold if config.threshold is None else config.threshold
    label = f"{card.name}@{card.id}"
    out = config.out.rstrip("/")
    via = resolve_via(config, card.id)
    if via == "data":  # sized once, before anything is written: no room fails here
        config = dataclasses.replace(config, cpus_per_actor=scoring_cpus(config))
    existing = report.part_files(out)  # refuses a single-file report from older versions
    plan = _plan(config, out)
    report.uncommit(out)  # from here until the commit, `out` is not a report
    if not config.resume and existing:
        report.delete_parts(out, existing)
    committed = _committed_spans(out, existing) if config.resume else {}
    provenance.check_settings()  # a bad trust-anchor setting fails here, not per image
    run = {"model": label, "threshold": threshold, "provenance": provenance.rules_id()}
    if config.consistency:  # other verdicts: rows scored without it are not reused
        run["consistency"] = list(consistency.CHECKS)
    if config.video == "scan":  # rows differ with the videos read and their frames
        run["video_frames"] = config.video_frames
    report.write_json(out, report.PLAN, {
        "source": config.source, "manifest": config.manifest, "include": list(config.include),
        "exclude": list(config.exclude),
        "partition_size": config.partition_size, "started_at": started_at, **run,
        "ranges": [r.to_dict() for r in plan.ranges]})
    log.info("scan %s -> %s: %d listing ranges (%d LIST calls to plan), %d committed parts "
             "to reuse, scoring via %s with %s", config.source, out, len(plan.ranges),
             plan.list_calls, sum(len(v) for v in committed.values()), via, label)

    ledger = Ledger(started, on_progress, bar=progress, ranges=len(plan.ranges))
    specs = [{"range": r.to_dict(), "committed": committed.get(r.id, [])} for r in plan.ranges]
    try:
        for attempt in range(MAX_PASSES):
            _run_pass(config, card, via, specs, out, run, ledger)
            lost = ledger.lost()
            if not lost:
                break
            log.warning("pass %d: %d partitions listed but not written; listing them again",
                        attempt + 1, len(lost))
            specs = [{"range": h["range"], "bounds": [h["after"], h["last"]],
                      "committed": committed.get(listing.ListingRange.from_dict(
                          h["range"]).id, [])} for h in lost]
    finally:
        ledger.close()
    if ledger.lost():
        raise RuntimeError(f"{len(ledger.lost())} partitions still have no part after "
                           f"{MAX_PASSES} passes; the {len(ledger.committed)} written parts "
                           "are kept: run the scan again with --resume")
    if ledger.objects() == 0:
        raise ValueError(f"no objects under {config.manifest or config.source} to read; "
                         f"not read: {ledger.not_selected.summary()}")
    files = {meta["file"] for meta in ledger.committed.values()}
    report.delete_parts(out, [f for f in report.part_files(out) if f not in files])
    manifest = _manifest(config, ledger, run, via, started_at, time.perf_counter() - started)
    if config.group_duplicates:  # before the commit: the listing is part of the report
        manifest["near_duplicates"] = group_near_duplicates(out, sorted(files))
    report.write_json(out, report.MANIFEST, manifest)
    return summarize(manifest)


def group_near_duplicates(out: str, files: list[str]) -> dict:
    """Group the report's objects by pHash (in a Ray task, which holds ~100 bytes per
    object; the driver gets counts), writing OUT/_near_duplicates.parquet: one row per
    grouped object with its group (the group's first URI) and verdict."""
    import ray

    return ray.get(ray.remote(_group_report).options(num_cpus=1).remote(out, files))


def _group_report(out: str, files: list[str]) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = ["uri", "phash", "verdict"]
    table = pa.concat_tables([report.read_part(out, name).select(columns) for name in files])
    table = table.filter(pc.is_valid(table["phash"]))
    labels = duplicates.groups(duplicates.to_ints(table.column("phash").to_pylist()))
    sizes = np.bincount(labels, minlength=len(labels))
    grouped = np.flatnonzero(sizes[labels] > 1)
    uris = table.column("uri").to_pylist()
    listing = pa.table({"uri": [uris[i] for i in grouped],
                        "group": [uris[labels[i]] for i in grouped],
                        "group_size": sizes[labels[grouped]].astype(np.int32),
                        "verdict": table.column("verdict").take(pa.array(grouped)).to_pylist()})
    storage.write_bytes(storage.join(out, NEAR_DUPLICATES), _parquet(listing.sort_by(
        [("group", "ascending"), ("uri", "ascending")])))
    verdicts = {}
    for group, verdict in zip(listing.column("group").to_pylist(),
                              listing.column("verdict").to_pylist(), strict=True):
        verdicts.setdefault(group, set()).add(verdict)
    roots = np.unique(labels[grouped])  # a group's label is its first member's index
    largest = sorted(((int(sizes[root]), uris[root]) for root in roots), reverse=True)[:5]
    return {"distance": duplicates.DEFAULT_DISTANCE, **duplicates.summary(labels),
            "mixed_verdicts": sum(len(v) > 1 for v in verdicts.values()),
            "largest": [{"group": uri, "size": size} for size, uri in largest],
            "listing": NEAR_DUPLICATES}


def _parquet(table) -> bytes:
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _plan(config: ScanConfig, out: str) -> listing.Plan:
    """The listing ranges: those of the interrupted run when resuming the same source
    (so partitions line up with its parts), else planned afresh."""
    previous = report.read_json(out, report.PLAN) if config.resume else None
    if previous and previous["source"] == config.source and \
            previous.get("manifest") == config.manifest and \
            previous.get("partition_size") == config.partition_size:
        return listing.Plan(config.source, [listing.ListingRange.from_dict(r)
                                            for r in previous["ranges"]])
    return listing.plan(config.source, manifest=config.manifest)


def _committed_spans(out: str, names: Iterable[str]) -> dict[str, list[dict]]:
    """range id -> the partition records of the parts already written there."""
    spans: dict[str, list[dict]] = {}
    for meta in report.part_metadata(out, names).values():
        if "range" in meta and "after" in meta:
            rid = listing.ListingRange.from_dict(meta["range"]).id
            spans.setdefault(rid, []).append(meta)
    return spans


# ------------------------------------------------------------------------------ one pass


def _run_pass(config: ScanConfig, card, via: str, specs: list[dict], out: str, run: dict,
              ledger: Ledger) -> None:
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours is the bar
    # Ray Data gathers a task's outputs into blocks of up to this many bytes before it
    # hands any on: at the default 128 MiB a listing task would pass on nothing until its
    # range (half a million keys) was listed. Datasets copy the context when created, so
    # the smaller size applies to this scan's pipeline only.
    saved, context.target_max_block_size = context.target_max_block_size, BLOCK_BYTES
    callbacks = context.custom_execution_callback_classes
    context.custom_execution_callback_classes = [*callbacks, _block_stats_forgetter()]
    window = gate.window_rows(config.partition_size, config.listed_ahead,
                              held_downstream=ROWS_PER_BLOCK + _rows_per_call(config))
    listing_gate = gate.start(window)
    try:
        try:
            notes = _pipeline(config, card, via, specs, out, run, listing_gate)
        finally:
            context.target_max_block_size = saved
            context.custom_execution_callback_classes = callbacks
        for batch in _iterate_watched(notes, config.stall_timeout, ledger):
            written = ledger.update(batch.cast(NOTE_SCHEMA).to_pylist())
            if written:
                listing_gate.release.remote(written)
        stats = ray.get(listing_gate.stats.remote())
        ahead = ledger.listed_ahead  # over every pass: the most of each, forced summed
        ledger.listed_ahead = {
            "window": window,
            "most": max(stats["most_in_flight"], ahead.get("most", 0)),
            "most_held": max(stats["most_held"], ahead.get("most_held", 0)),
            "forced": stats["forced"] + ahead.get("forced", 0)}
        log.info("scan pass: at most %d objects listed ahead of the writer (window %d, "
                 "%d partitions let through after %d s without progress)",
                 stats["most_in_flight"], window, stats["forced"], gate.PATIENCE_S)
    finally:
        ray.kill(listing_gate)


# Ray Data keeps a stats record for every block each operator hands on, in the driver, for
# the whole run (`MapOperator._output_blocks_stats`, ~1.4 KB each), for `Dataset.stats()`,
# which a scan never reads: a scan hands on four blocks per 256 objects, so ~40 MB at 2M
# objects, the driver's one memory that still grew with the bucket. A callback on Ray
# Data's execution loop forgets them as the scan goes. The field is private: should a Ray
# release rename it, nothing is forgotten (memory grows as before) and the ray-tier test
# of this callback fails.
BLOCK_STATS_KEPT = 512  # per operator, at most


def forget_block_stats(operators: Iterable) -> None:
    """Drops the per-block stats records of `operators` once one holds more than
    BLOCK_STATS_KEPT."""
    for operator in operators:
        kept = getattr(operator, "_output_blocks_stats", None)
        if kept is not None and len(kept) > BLOCK_STATS_KEPT:
            kept.clear()


def _block_stats_forgetter() -> type:
    """An execution callback class for Ray Data's `custom_execution_callback_classes`
    that calls forget_block_stats on each step of the execution loop."""
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    class ForgetBlockStats(ExecutionCallback):
        def on_execution_step(self, executor) -> None:
            forget_block_stats(executor._topology)

    return ForgetBlockStats


def _pipeline(config: ScanConfig, card, via: str, specs: list[dict], out: str, run: dict,
              listing_gate):
    """The scan's Ray Data pipeline for `specs`, ending in the writer's notes."""
    import ray

    items = [{"spec": json.dumps(s)} for s in specs]
    listed = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        list_partitions, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"selection": Selection(tuple(config.include), tuple(config.exclude),
                                          videos=config.video == "scan"),
                   "partition_size": config.partition_size,
                   "out": out, "listing_gate": listing_gate, "block_bytes": BLOCK_BYTES,
                   **run},
        compute=ray.data.TaskPoolStrategy(size=min(listing.LISTING_TASKS, len(items))), num_cpus=0,
    )
    decoded = _reblocked(listed, ROWS_PER_BLOCK).map_batches(
        decode_objects, batch_size=ROWS_PER_BLOCK, batch_format="pyarrow",
        fn_kwargs={"image_size": card.image_size, "max_bytes": config.max_bytes,
                   "videos": VideoLimits(max_bytes=config.video_max_bytes)
                   if config.video == "scan" else None, "frames": config.video_frames},
        # Resources unlike the scoring actors' also keep Ray Data from fusing decoding into
        # them, where it would run serially with the model (or hold a GPU actor's CPU).
        num_cpus=DECODE_CPUS,
    )
    if via == "serve":
        scored = decoded.map_batches(
            ScoreWithServe, fn_constructor_args=(config.serve_app, card.id, run["threshold"],
                                                 config.consistency, config.batch_size),
            batch_size=_rows_per_call(config), batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.actors or 4),
            num_cpus=0.1,  # I/O-bound: the replicas do the compute
        )
    else:
        cpus = config.cpus_per_actor  # sized by `scan` (scoring_cpus)
        scored = decoded.map_batches(
            ScoreWithPredictor,
            fn_constructor_args=(config.model, run["threshold"], config.backend,
                                 config.precision, cpus, config.gpus_per_actor,
                                 config.consistency, config.batch_size),
            batch_size=_rows_per_call(config), batch_format="pyarrow",
            # Grows with the cluster: Ray Data adds actors while they are busy and the
            # cluster (or its autoscaler) has room, up to --actors when given.
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.actors),
            num_cpus=cpus, num_gpus=config.gpus_per_actor,
        )
    return scored.map_batches(
        PartWriter, fn_constructor_args=(out, run, card), batch_size=None, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0,
    )


def _rows_per_call(config: ScanConfig) -> int:
    """Rows per scoring call, run as forward passes of `batch_size`. A call's output is a
    block, and each block costs the driver its bookkeeping (see forget_block_stats):
    32-row calls made 8x more of them."""
    return max(config.batch_size, ROWS_PER_BLOCK)


def _reblocked(dataset, rows: int):
    """`dataset` in blocks of `rows` rows, streaming. A listing task hands on blocks of
    `BLOCK_BYTES` (~12k keys), each of which would be one decode task's whole input;
    `rows`-row blocks spread decoding over all decode tasks.
    The re-blocking only moves rows, yet Ray Data gives its tasks the default 1 CPU and no
    argument to change it: on a small cluster they would wait for a CPU the scoring actor
    holds. Zero it on the logical operator (a private field; checked by the 2-CPU test)."""
    reblocked = dataset.repartition(target_num_rows_per_block=rows)
    reblocked._logical_plan.dag.ray_remote_args["num_cpus"] = 0
    return reblocked


MIN_SCORING_CPUS = 0.5  # the smallest scoring actor worth starting (one thread)
FIT_WAIT_S = 10.0  # the actors of a scan that just ended free their CPUs within seconds


def scoring_cpus(config: ScanConfig) -> float:
    """CPUs per scoring actor: as asked, or by default 2 (also its thread count) unless
    no node has room for that and a decode task beside it, when it takes what fits.

    Room is what is free when the cluster cannot add nodes (another app's replicas hold
    the rest: waiting for them would be waiting for nothing), and a node's size when an
    autoscaler can add one. Free room is watched for FIT_WAIT_S before it is settled for
    less. Where not even the smallest actor fits, ScanCannotFit says so then, naming
    what holds the CPUs; an actor larger than every node fails at once."""
    if config.gpus_per_actor and config.cpus_per_actor is None:
        return 1.0
    asked = config.cpus_per_actor
    wanted = (asked if asked is not None else DEFAULT_CPUS_PER_ACTOR) + DECODE_CPUS
    deadline = time.monotonic() + FIT_WAIT_S
    while True:
        status = _cluster_status()
        grows = status is None or can_grow(status)
        totals, free = _node_cpus(status) if status is not None else ({}, {})
        if not totals:  # no status, or no node yet (scaling from zero)
            return asked or DEFAULT_CPUS_PER_ACTOR
        room = max((totals if grows else free).values())
        largest = max(totals.values())
        # Only free room can change by waiting, and not past a whole node: on nodes
        # smaller than the default, wait for a whole free one (the last scan's actors).
        if grows or room >= min(wanted, largest) or time.monotonic() >= deadline or \
                (asked is not None and wanted > largest):
            break
        time.sleep(0.5)
    if asked is not None:
        if not grows and asked + DECODE_CPUS > room:
            raise ScanCannotFit(_cannot_fit(f"--cpus-per-actor {asked:g}", totals, free))
        return asked
    if room >= wanted:
        return DEFAULT_CPUS_PER_ACTOR
    fitted = room - DECODE_CPUS
    if fitted < MIN_SCORING_CPUS:
        if not grows:
            raise ScanCannotFit(_cannot_fit(f"a scoring actor ({MIN_SCORING_CPUS:g} CPU at "
                                            "least)", totals, free))
        fitted = MIN_SCORING_CPUS  # the smallest actor; nodes the autoscaler adds are alike
    log.info("scoring actors reserve %.1f CPUs: the largest node has%s %.1f, and decoding "
             "needs %.1f beside them", fitted, "" if grows else " free", room, DECODE_CPUS)
    return fitted


def can_grow(status) -> bool:
    """Whether nodes are on their way or an autoscaler runs: v2 reports its state to the
    GCS; v1 publishes a status whose node types are its config's, where a cluster without
    one (`ray start`) shows each node as a type of its own, "node_<id>"."""
    if status.pending_launches or status.pending_nodes:
        return True
    if (status.stats.autoscaler_version or "0") != "0":
        return True
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        report = json.loads(_internal_kv_get(DEBUG_AUTOSCALING_STATUS) or "{}")
        types = report.get("autoscaler_report", {}).get("node_type_mapping") or {}
    except Exception:  # no v1 monitor, or a status of another shape
        return False
    return any(kind != f"node_{node}" for node, kind in types.items())


def _node_cpus(status) -> tuple[dict[str, float], dict[str, float]]:
    """(total, free) CPUs of each live node, by node id."""
    totals, free = {}, {}
    for node in status.active_nodes + status.idle_nodes:
        for usage in node.resource_usage.usage if node.resource_usage else ():
            if usage.resource_name == "CPU":
                totals[node.node_id] = usage.total
                free[node.node_id] = usage.total - usage.used
    return totals, free


def _cannot_fit(what: str, totals: dict[str, float], free: dict[str, float]) -> str:
    return (f"{what} and a decode task ({DECODE_CPUS:g} CPU) fit on no node, and this "
            f"cluster cannot add nodes (no autoscaler): {sum(free.values()):g} of "
            f"{sum(totals.values()):g} CPUs are free, the most on one node "
            f"{max(free.values()):g}. Holding CPUs: {cpu_holders() or 'unknown'}. Stop or "
            "shrink those (a Serve app: `serve shutdown`, or fewer/smaller replicas), "
            "lower --cpus-per-actor, or run the scan through that app with --via serve "
            "when it serves this model.")


def cpu_holders(most: int = 6) -> str:
    """What holds CPUs on the cluster, largest first: live actors grouped by class (and
    Serve app), e.g. "3 x ServeReplica:detector:Model (1.5 CPU)"."""
    import asyncio

    import ray

    try:
        gcs = ray._private.worker.global_worker.gcs_client
        actors = asyncio.run(_actor_infos(gcs))
    except Exception:  # the GCS API is private: without it the message loses its detail
        return ""
    held: Counter = Counter()
    count: Counter = Counter()
    for info in actors.values():
        cpus = dict(info.required_resources).get("CPU", 0.0)
        if info.state == ALIVE and cpus > 0:
            held[info.class_name] += cpus
            count[info.class_name] += 1
    return ", ".join(f"{count[name]} x {name} ({cpus:g} CPU)"
                     for name, cpus in held.most_common(most))


ALIVE = 2  # ActorTableData.ActorState.ALIVE


async def _actor_infos(gcs):
    return await gcs.async_get_all_actor_info(timeout=10)


# ------------------------------------------------------------------------------ watching


def _iterate_watched(dataset, stall_timeout: float, ledger: Ledger):
    """Batches of `dataset`, raising ScanStalled when nothing has moved for
    `stall_timeout` seconds while work waits for resources no node is coming to give."""
    batches: queue.Queue = queue.Queue(maxsize=8)
    done = object()

    def pump() -> None:
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                batches.put(batch)
            batches.put(done)
        except BaseException as exc:  # handed to the driver's thread
            batches.put(exc)

    threading.Thread(target=pump, daemon=True, name="scan-results").start()
    last_move = time.monotonic()
    while True:
        try:
            item = batches.get(timeout=min(30.0, max(stall_timeout / 2, 1.0)))
        except queue.Empty:
            idle = time.monotonic() - last_move
            waiting = missing_resources()
            if waiting:
                log.warning("scan: no progress for %.0f s; waiting for %s", idle, waiting)
                if idle > stall_timeout and not nodes_on_the_way():
                    raise ScanStalled(f"nothing could be scheduled for {idle:.0f} s: work "
                                      f"waits for {waiting} and no node is being added. "
                                      f"Holding CPUs: {cpu_holders() or 'unknown'}. Lower "
                                      "--cpus-per-actor/--gpus-per-actor, or add "
                                      "nodes.") from None
            continue
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        last_move = time.monotonic()
        yield item


def missing_resources() -> str:
    """Pending tasks' and actors' resource shapes, e.g. "1 x {'CPU': 2.0}"."""
    status = _cluster_status()
    if status is None:
        return ""
    shapes = [f"{r.count} x {dict(r.bundle)}"
              for demand in status.resource_demands.ray_task_actor_demand
              for r in demand.bundles_by_count]
    if not shapes:
        return ""
    free = {k: round(v, 2) for k, v in status.available_resources().items()
            if k in ("CPU", "GPU")}
    return f"{', '.join(shapes)} (free now: {free})"


def nodes_on_the_way() -> bool:
    status = _cluster_status()
    return bool(status and (status.pending_launches or status.pending_nodes))


def _cluster_status():
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        return get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception:  # an older or unreachable GCS: the watchdog only loses its detail
        return None


# ------------------------------------------------------------------------------ books


class Ledger:
    """The driver's books: one record per partition (never per object), progress lines,
    an optional terminal progress bar and the `on_progress` callback."""

    def __init__(self, started: float, callback: Callable[[dict], None] | None = None,
                 bar: bool = False, ranges: int = 0):
        self.started, self.callback, self.ranges = started, callback, ranges
        self.wall_started = time.time() - (time.perf_counter() - started)
        self.ranges_done: set[str] = set()
        self.not_selected = NotSelected()  # bounded: counts by reason and extension
        self.listed_ahead: dict = {}  # the gate's window and the most it held
        self.last_listed_at = 0.0
        self.listing_finished_at: float | None = None  # wall clock, in the listing tasks
        self.first_part_at: float | None = None  # wall clock, in the writer
        self.listed: dict[str, dict] = {}  # partition -> header
        self.committed: dict[str, dict] = {}  # partition -> part record
        self.done = self.errors = 0
        self.last_log = 0.0
        self.bar = _progress_bar() if bar else None

    def update(self, notes: list[dict]) -> int:
        """Books `notes`; returns how many objects they say reached the writer."""
        written = 0
        for note in notes:
            info = json.loads(note["info"])
            if note["status"] == "listed":
                self.listed[note["partition"]] = info
            elif note["status"] == "range_done":
                self.ranges_done.add(info["range"])
                self.not_selected.merge(info.get("not_selected") or {})
                self.last_listed_at = max(self.last_listed_at, info["listed_at"])
                if len(self.ranges_done) == self.ranges and self.listing_finished_at is None:
                    self.listing_finished_at = self.last_listed_at
            elif note["status"] == "committed":
                self.committed[note["partition"]] = info
                if "committed_at" in info and self.first_part_at is None:
                    self.first_part_at = info["committed_at"]
                if "kept" in self.listed.get(note["partition"], {}):
                    self.done += info["rows"]  # reused whole: no progress rows came
                    self.errors += sum(info["by_error"].values())
            else:
                self.done += info["rows"]
                self.errors += info["errors"]
                written += info["rows"]
        self._report()
        return written

    def lost(self) -> list[dict]:
        """Headers of partitions listed but never written."""
        return [h for p, h in self.listed.items() if p not in self.committed]

    def objects(self) -> int:
        return sum(meta["rows"] for meta in self.committed.values())

    def snapshot(self) -> dict:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        listed = sum(h["kept"]["rows"] if "kept" in h else h["expected"]
                     for h in self.listed.values())
        listed = max(listed, self.done)  # rows can arrive before their partition's header
        return {"listed": listed, "done": self.done, "total": listed, "errors": self.errors,
                "listing": "done" if self.listing_finished_at else "running",
                "partitions_listed": len(self.listed),
                "partitions_committed": len(self.committed),
                "objects_per_second": round(self.done / seconds, 1)}

    def _report(self) -> None:
        state = self.snapshot()
        if self.callback is not None:
            self.callback(state)
        if self.bar is not None:
            self.bar.total = state["listed"]
            self.bar.n = state["done"]
            self.bar.set_postfix(errors=state["errors"], parts=state["partitions_committed"],
                                 refresh=False)
            self.bar.refresh()
        now = time.perf_counter()
        if now - self.last_log >= PROGRESS_EVERY_S:
            self.last_log = now
            log.info("scan progress: %d/%d objects listed so far, %.1f objects/s, %d errors, "
                     "%d/%d partitions written", state["done"], state["listed"],
                     state["objects_per_second"], state["errors"],
                     state["partitions_committed"], state["partitions_listed"])

    def timeline(self) -> dict:
        """Seconds from the start: when listing finished, when the first part was
        written (None when every part was reused)."""
        def since(wall: float | None) -> float | None:
            return None if wall is None else round(wall - self.wall_started, 2)

        return {"listing_finished_s": since(self.listing_finished_at),
                "first_part_s": since(self.first_part_at)}

    def close(self) -> None:
        self.last_log = 0.0
        self._report()  # the final counts, whenever the last line was
        if self.bar is not None:
            self.bar.close()


def _progress_bar():
    """A tqdm bar on a terminal; nothing (log lines only) when stderr is not one."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=0, unit="obj", desc="scan", dynamic_ncols=True, file=sys.stderr)


# ------------------------------------------------------------------------------ commit


def _manifest(config: ScanConfig, ledger: Ledger, run: dict, via: str, started_at: str,
              seconds: float) -> dict:
    parts = sorted(ledger.committed.values(), key=lambda m: m["file"])
    media, verdicts, generators, errors = Counter(), Counter(), Counter(), Counter()
    for part in parts:
        media.update(part.get("by_media") or {})
        verdicts.update(part["by_verdict"])
        generators.update(part.get("by_generator") or {})
        errors.update(part["by_error"])
    objects = sum(p["rows"] for p in parts)
    scanned = sum(p["scanned"] for p in parts if "kept" not in ledger.listed[p["partition"]])
    return {
        "format_version": report.FORMAT_VERSION,
        "source": config.manifest or config.source,
        "include": list(config.include),
        "exclude": list(config.exclude),
        # Every listed object is a row (`objects`) or counted here, with why it was not read.
        "not_scanned": ledger.not_selected.to_dict(),
        "out": config.out.rstrip("/"),
        **run,
        "model_uri": config.model,
        "via": via,
        "started_at": started_at,
        "finished_at": _now(),
        "seconds": round(seconds, 2),
        "objects": objects,
        "scanned": scanned,
        "reused": objects - scanned,
        "video": config.video,  # scan | skip: whether videos were read
        "by_media": dict(sorted(media.items())),  # rows whose bytes were read, by what
        "by_verdict": dict(sorted(verdicts.items())),
        "by_generator": dict(sorted(generators.items())),  # images with a generator named
        "by_error": dict(sorted(errors.items())),
        "objects_per_second": round(scanned / seconds, 1) if seconds else None,
        "timeline": ledger.timeline(),
        "partition_size": config.partition_size,
        "listed_ahead": ledger.listed_ahead,
        # When each part's objects were listed (admitted by the gate) and the part written.
        "parts": [{k: p.get(k) for k in ("file", "partition", "rows", "after", "last", "range",
                                         "listed_at", "committed_at")} for p in parts],
    }


def summarize(manifest: dict) -> dict:
    """The scan's summary, from its commit manifest (never from reading the rows)."""
    keys = ("out", "objects", "scanned", "reused", "by_media", "by_verdict", "by_generator",
            "by_error",
            "via",
            "seconds", "objects_per_second", "model", "threshold", "not_scanned")
    extra = {"near_duplicates": manifest["near_duplicates"]} \
        if "near_duplicates" in manifest else {}
    return {**{k: manifest.get(k) for k in keys}, "parts": len(manifest["parts"]), **extra}


def resolve_via(config: ScanConfig, model_id: str) -> str:
    """Where scoring runs. `serve` needs the Serve app to serve exactly this model;
    `auto` uses it when it does and otherwise the scan's own actor pool."""
    if config.via == "data":
        return "data"
    served = served_model_id(config.serve_app)
    if config.via == "serve":
        if served is None:
            raise ValueError(f"--via serve: no Serve application {config.serve_app!r} is "
                             "running")
        if served != model_id:
            raise ValueError(f"--via serve: Serve application {config.serve_app!r} serves "
                             f"model {served}, not {model_id} from {config.model}; use "
                             "--via data, or deploy that model")
        return "serve"
    if served is not None and served != model_id:
        log.info("Serve application %r serves model %s, not %s: scoring with the scan's own "
                 "actor pool (--via data)", config.serve_app, served, model_id)
    return "serve" if served == model_id else "data"


def served_model_id(app_name: str) -> str | None:
    """The id of the model a running Serve app serves, or None when none runs."""
    try:
        from ray import serve

        if app_name not in serve.status().applications:
            return None
        handle = serve.get_deployment_handle("Model", app_name=app_name)
        return handle.ping.remote().result(timeout_s=60)
    except Exception:  # no Serve on this cluster
        return None


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
