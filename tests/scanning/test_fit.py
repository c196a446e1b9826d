"""How a scan sizes its scoring actor on a real 2-CPU local Ray that cannot add nodes."""

from __future__ import annotations

import threading
import time

import pytest

from detector.config import ScanConfig
from detector.scanning.scan import ScanCannotFit, _cluster_status, _node_cpus, scoring_cpus

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_cpus():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    yield ray
    ray.shutdown()


def test_a_scan_right_after_another_waits_for_its_actors_to_free_the_node(two_cpus):
    """The default actor (2 CPUs and a decode task) is larger than this node: the scan
    settles for what a whole node gives, once the last scan's actor (1.5 CPU, still
    shutting down) has freed it; it once failed at once, seeing 0.5 CPU free."""
    ray = two_cpus

    @ray.remote(num_cpus=1.5)
    class LastScansActor:
        def ready(self) -> bool:
            return True

    holder = LastScansActor.remote()
    assert ray.get(holder.ready.remote())
    # The scan reads the cluster's status, which lags the scheduler by a moment.
    deadline = time.monotonic() + 60
    while free_cpus() != 0.5:
        assert time.monotonic() < deadline, f"the status never showed the holder: {free_cpus()}"
        time.sleep(0.2)
    killed_at = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        ray.kill(holder)

    release = threading.Timer(2.0, kill)
    release.start()
    try:
        config = ScanConfig(source="unused", model="unused", out="unused")
        assert scoring_cpus(config) == 1.5
        returned_at = time.monotonic()
    finally:
        release.join()  # never a ray call from another thread during ray.shutdown
    assert killed_at and killed_at[0] < returned_at  # it waited for the release


def free_cpus() -> float:
    status = _cluster_status()
    return sum(_node_cpus(status)[1].values()) if status is not None else -1.0


def test_an_actor_larger_than_every_node_fails_naming_it(two_cpus):
    config = ScanConfig(source="unused", model="unused", out="unused", cpus_per_actor=2)
    with pytest.raises(ScanCannotFit, match="--cpus-per-actor 2 and a decode task"):
        scoring_cpus(config)
