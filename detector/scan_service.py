"""Bucket scans started over HTTP (`POST /v1/scans`), run beside the Serve app.

Each scan runs in its own detached, named Ray actor, so any ingress replica can report on
it (`GET /v1/scans/{id}`) and a restarted ingress does not lose it. Scoring goes through
the Serve model deployment (`--via serve`), sharing its autoscaled replicas with online
traffic.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from typing import Any

import ray

from detector.config import ScanConfig

NAMESPACE = "detector-scans"


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
        from detector.scan import scan

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


def start_scan(source: str, output: str, model_uri: str, app_name: str) -> str:
    """Start a scan actor; returns its id."""
    scan_id = uuid.uuid4().hex[:12]
    config = {"source": source, "out": output, "model": model_uri, "via": "serve",
              "serve_app": app_name}
    ScanJob.options(name=f"scan-{scan_id}", namespace=NAMESPACE, lifetime="detached",
                    max_restarts=0).remote(scan_id, config)
    return scan_id


def scan_status(scan_id: str) -> dict[str, Any] | None:
    """The scan's state, or None when no such scan exists."""
    try:
        actor = ray.get_actor(f"scan-{scan_id}", namespace=NAMESPACE)
    except ValueError:
        return None
    return ray.get(actor.status.remote(), timeout=10)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
