"""How a scan sizes its scoring actor on a real 2-CPU local Ray that cannot add nodes."""

from __future__ import annotations

import threading

import pytest

from detector.config import ScanConfig
from detector.scanning.scan import ScanCannotFit, scoring_cpus

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
    threading.Timer(2.0, ray.kill, args=(holder,)).start()
    config = ScanConfig(source="unused", model="unused", out="unused")
    assert scoring_cpus(config) == 1.5


def test_an_actor_larger_than_every_node_fails_naming_it(two_cpus):
    config = ScanConfig(source="unused", model="unused", out="unused", cpus_per_actor=2)
    with pytest.raises(ScanCannotFit, match="--cpus-per-actor 2 and a decode task"):
        scoring_cpus(config)
