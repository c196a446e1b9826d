"""The scan service's view of its actors on a real local Ray: a scan whose actor has not
answered yet is "starting" (the API's 503), not an error and not a missing scan."""

from __future__ import annotations

import time

import pytest

from detector.scanning import service

pytestmark = pytest.mark.ray


def test_a_scan_still_starting_is_neither_an_error_nor_missing(local_ray, monkeypatch):
    ray = local_ray

    @ray.remote(num_cpus=0)
    class SlowToStart:
        def __init__(self):
            time.sleep(3)  # a busy node: the process is up, its constructor is not done

        def status(self):
            return {"id": "slow", "status": "running"}

    monkeypatch.setattr(service, "STATUS_WAIT_S", 0.5)
    actor = SlowToStart.options(name="scan-slow", namespace=service.NAMESPACE,
                                lifetime="detached").remote()
    try:
        with pytest.raises(service.ScanStarting):
            service.scan_status("slow")
        assert service.reap(keep_finished_s=3600) == 1  # counted as running meanwhile
        assert service.list_scans() == []  # listed once it answers
        deadline = time.monotonic() + 60
        while True:
            try:
                assert service.scan_status("slow") == {"id": "slow", "status": "running"}
                break
            except service.ScanStarting:
                assert time.monotonic() < deadline
    finally:
        ray.kill(actor)
    assert service.scan_status("nothing-like-it") is None
