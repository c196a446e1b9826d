"""Bucket scans started over HTTP (`POST /v1/scans`), run beside the Serve app.

Each scan runs in its own detached, named Ray actor, so any ingress replica can report on
it (`GET /v1/scans/{id}`) and a restarted ingress does not lose it. Scoring goes through
the Serve model deployment (`--via serve`), sharing its autoscaled replicas with online
traffic. Bounded: at most `max_running` scans at once (more are refused, not queued), and a
finished scan's actor is removed once it has been kept `keep_finished_s` (its report stays).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import ray

from detector.config import ScanConfig

NAMESPACE = "detector-scans"
STARTUP_WAIT_S = 20.0  # how long start_scan waits for a new scan's actor to answer
STATUS_WAIT_S = 10.0  # how long a status question waits for a scan's actor to answer


def allowed(uri: str, prefixes: tuple[str, ...]) -> bool:
    """True when `uri` lies under one of `prefixes` (whole path segments only)."""
    if ".." in uri.split("/"):
        return False
    return any(uri == p.rstrip("/") or uri.startswith(p.rstrip("/") + "/") for p in prefixes)


@ray.remote(num_cpus=0)
class ScanJob:
    """Runs one scan in a thread and answers status questions while it runs."""

    def __init__(self, scan_id: str, config: dict[str, Any]):
        self.state: dict[str, Any] = {
            "id": scan_id, "status": "running", "source": config["source"],
            "output": config["out"], "started_at": _now(), "finished_at": None,
            "progress": None, "summary": None, "error": None,
        }
        self.config = ScanConfig(**config)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        # Imported here, not with the module: the actor answers status questions as soon
        # as its process is up, before Ray Data and the model code are loaded.
        from detector.scanning.scan import scan

        try:
            self.state["summary"] = scan(self.config, progress=False,
                                         on_progress=self._progress)
            self.state["status"] = "succeeded"
        except Exception as exc:  # reported to the caller, not raised into the actor
            self.state.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        self.state["finished_at"] = _now()

    def _progress(self, counts: dict[str, Any]) -> None:
        self.state["progress"] = counts

    def status(self) -> dict[str, Any]:
        return dict(self.state)


class TooManyScans(RuntimeError):
    """`max_running` scans are running already."""


def start_scan(source: str, output: str, model_uri: str, app_name: str,
               max_running: int = 2, keep_finished_s: float = 3600.0) -> str:
    """Start a scan actor; returns its id. Raises TooManyScans at the limit. (Two ingress
    replicas starting scans at the same instant may both pass: the bound is per check.)"""
    running = reap(keep_finished_s)
    if running >= max_running:
        raise TooManyScans(f"{running} scans are running (at most {max_running}); try again "
                           "when one has finished")
    scan_id = uuid.uuid4().hex[:12]
    # Near-duplicates grouped: the review page lists groups whose verdicts differ.
    config = {"source": source, "out": output, "model": model_uri, "via": "serve",
              "serve_app": app_name, "group_duplicates": True}
    job = ScanJob.options(name=f"scan-{scan_id}", namespace=NAMESPACE, lifetime="detached",
                          max_restarts=0).remote(scan_id, config)
    # The 202 says the scan runs: wait until its actor answers. One that is slow to start
    # (a busy cluster) still counts as running (`reap`), so the limit holds meanwhile.
    with contextlib.suppress(ray.exceptions.GetTimeoutError):
        ray.get(job.status.remote(), timeout=STARTUP_WAIT_S)
    return scan_id


def reap(keep_finished_s: float) -> int:
    """Remove the actors of scans finished more than `keep_finished_s` ago; returns how
    many scans are still running."""
    running, now = 0, dt.datetime.now(dt.UTC)
    for actor, state in _scans(answered_only=False):
        if state is None or state["status"] == "running":  # None: still starting
            running += 1
        elif (now - dt.datetime.fromisoformat(state["finished_at"])).total_seconds() \
                >= keep_finished_s:
            ray.kill(actor)
    return running


def list_scans() -> list[dict[str, Any]]:
    """The state of every scan still kept, oldest first."""
    return sorted((state for _, state in _scans()), key=lambda s: (s["started_at"], s["id"]))


def _scans(answered_only: bool = True) -> Iterator[tuple[Any, dict[str, Any] | None]]:
    """Each scan actor with its state; None for one that has not answered in time (still
    starting on a busy cluster), unless `answered_only`."""
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] != NAMESPACE or not entry["name"].startswith("scan-"):
            continue
        try:
            actor = ray.get_actor(entry["name"], namespace=NAMESPACE)
        except ValueError:  # gone meanwhile
            continue
        try:
            yield actor, ray.get(actor.status.remote(), timeout=STATUS_WAIT_S)
        except ray.exceptions.GetTimeoutError:
            if not answered_only:
                yield actor, None
        except ray.exceptions.RayError:  # dead: nothing to report
            continue


class ScanStarting(Exception):
    """The scan exists but its actor has not answered yet (still starting)."""


def scan_status(scan_id: str) -> dict[str, Any] | None:
    """The scan's state, or None when no such scan exists; raises ScanStarting while its
    actor is still starting on a busy cluster (not an error: ask again shortly)."""
    try:
        actor = ray.get_actor(f"scan-{scan_id}", namespace=NAMESPACE)
    except ValueError:
        return None
    try:
        return ray.get(actor.status.remote(), timeout=STATUS_WAIT_S)
    except ray.exceptions.GetTimeoutError as exc:
        raise ScanStarting(scan_id) from exc
    except ray.exceptions.RayActorError:  # died meanwhile (killed by reap, or its node)
        return None


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
