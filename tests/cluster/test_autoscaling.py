"""Node autoscaling on this machine, shaped like the KubeRay cluster.

Fake worker nodes get the logical CPU/GPU of the manifests' worker groups
(`detector.deploy.WORKER_GROUPS`), the head gets none (`num-cpus: 0`), and autoscaler v2
runs as on Kubernetes. Work shaped like our jobs' requests (scan actors, a training
worker) asks for more than the head has: worker nodes must appear, the work must finish,
and the nodes must go away after their (scaled-down) idle timeouts.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ray_cluster import BIN, STOP_ENV, client_env, free_port, free_ports, stop_group

from detector import deploy

pytestmark = pytest.mark.ray

IDLE_SCALE = 30  # idle timeouts 300 s (CPU) / 600 s (GPU) become 10 s / 20 s
OBJECT_STORE = 128 * 1024**2  # per fake node; Ray's default is 30% of this machine's RAM
MAX_WORKERS = {"cpu": 2, "gpu": 1}  # maxReplicas 16 / 4 would not fit 2 cores and 24 GiB


def node_types() -> dict[str, dict]:
    """Autoscaler node types from the manifests' worker groups (logical resources only:
    fake nodes cannot take a memory resource, so the group's memory is left out)."""
    return {
        name: {
            "resources": {**shape.ray_resources(), "object_store_memory": OBJECT_STORE},
            "node_config": {},
            "min_workers": shape.min_replicas,
            "max_workers": MAX_WORKERS[name],
            "idle_timeout_s": shape.idle_timeout_s / IDLE_SCALE,
        }
        for name, shape in deploy.WORKER_GROUPS.items()
    }


def _autoscaling_cluster_class():
    from ray.cluster_utils import AutoscalingCluster

    class LocalAutoscalingCluster(AutoscalingCluster):
        """AutoscalingCluster with its config built here and a lifecycle of its own.

        The base class reads fake_multi_node/example.yaml, which the wheel does not ship
        (so does the monitor for provider type `fake_multinode`: `external` with the fake
        provider's class avoids that), and its start()/shutdown() run `ray stop --force`,
        which kills every Ray on the machine while other test runs use theirs. This one
        runs `ray start --head --block` on free ports in a process group of its own.
        """

        def __init__(self, worker_node_types: dict, temp_dir: str):
            from ray._private.services import get_node_ip_address

            self.ip, self.port, self.temp_dir = get_node_ip_address(), free_port(), temp_dir
            self.process: subprocess.Popen | None = None
            super().__init__({"CPU": 0, "GPU": 0}, worker_node_types, autoscaler_v2=True)

        @property
        def address(self) -> str:
            return f"{self.ip}:{self.port}"

        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False,
                             **config_kwargs):
            from ray.autoscaler._private.fake_multi_node.node_provider import (
                FAKE_HEAD_NODE_ID,
            )

            head = {"resources": head_resources, "node_config": {}, "max_workers": 0}
            return {
                "cluster_name": "detector-local",
                "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
                "upscaling_speed": 1.0,
                "idle_timeout_minutes": 1.0,  # per-type idle_timeout_s take precedence
                "provider": {
                    "type": "external",
                    "module": "ray.autoscaler._private.fake_multi_node.node_provider."
                              "FakeMultiNodeProvider",
                    "use_node_id_as_ip": True,
                    "disable_node_updaters": True,
                    "disable_launch_config_check": True,
                    "launch_multiple": True,
                    "head_node_id": FAKE_HEAD_NODE_ID,
                    "gcs_address": self.address,  # not the default port 6379
                },
                "available_node_types": {"ray.head.default": head, **worker_node_types},
                "head_node_type": "ray.head.default",
                "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
                "file_mounts_sync_continuously": False, "rsync_exclude": [],
                "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
                "head_setup_commands": [], "worker_setup_commands": [],
                "head_start_ray_commands": [], "worker_start_ray_commands": [],
                **config_kwargs,
            }

        def start(self, _system_config=None, override_env=None) -> None:
            from ray.autoscaler._private.fake_multi_node.node_provider import (
                FAKE_HEAD_NODE_ID,
            )

            config = Path(self.temp_dir) / "autoscaling.json"
            config.write_text(json.dumps(self._config))
            flags = ("ray-client-server-port", "dashboard-agent-listen-port",
                     "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
            # Distinct, and none the GCS port: `ray start` refuses a port given twice.
            free = [port for port in free_ports(len(flags) + 1) if port != self.port]
            ports = [f"--{flag}={port}" for flag, port in zip(flags, free, strict=False)]
            command = [
                str(BIN / "ray"), "start", "--head", "--block", f"--port={self.port}",
                "--num-cpus=0", "--num-gpus=0", f"--object-store-memory={OBJECT_STORE}",
                f"--autoscaling-config={config}", f"--temp-dir={self.temp_dir}",
                "--include-dashboard=false", "--disable-usage-stats", *ports,
            ]
            env = client_env(STOP_ENV) | {
                "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "RAY_enable_autoscaler_v2": "1",  # what autoscalerOptions.version: v2 sets
                "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
                **(override_env or {}),
            }
            self.log = Path(self.temp_dir) / "ray-start.log"
            with open(self.log, "w") as out:
                self.process = subprocess.Popen(command, env=env, stdout=out,
                                                stderr=subprocess.STDOUT,
                                                start_new_session=True)
            self._wait_for_gcs(timeout=60)

        def _wait_for_gcs(self, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                assert self.process.poll() is None, self.log.read_text()[-3000:]
                try:
                    socket.create_connection((self.ip, self.port), timeout=1).close()
                    return
                except OSError:
                    time.sleep(0.5)
            raise TimeoutError(f"GCS not listening on {self.address} after {timeout} s")

        def autoscaler_log(self, lines: int = 40) -> str:
            """The autoscaler's last decisions, for failure messages."""
            logs = sorted(Path(self.temp_dir).glob("session_*/logs/monitor.log"))
            # The fake provider's config warns about empty legacy fields every second.
            text = [line for line in (logs[-1].read_text().splitlines() if logs else [])
                    if "legacy field" not in line][-lines:]
            return "\n--- monitor.log ---\n" + "\n".join(text)

        def shutdown(self) -> None:
            """SIGTERM to `ray start` (it drains and stops its processes), then SIGKILL to
            whatever is left of this cluster's own process group, fake nodes included."""
            if self.process is not None:
                stop_group(self.process)

    return LocalAutoscalingCluster


# The driver runs in its own process: Ray reads RAY_AUTH_MODE at import, and this test
# process may already have imported Ray without it. Every wait in it is bounded. It writes
# its report to a file: on stdout, Ray's autoscaler events (printed there by a thread of
# its own) once ran into the report's line.
DRIVER = r"""
import json, sys, time
import ray

address, phases, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
ray.init(address=address, logging_level="ERROR")
alive = lambda: [n for n in ray.nodes() if n["Alive"]]
report = {"nodes_before": len(alive())}
start = time.monotonic()

@ray.remote
class Worker:
    def run(self):
        time.sleep(1)
        return ray.get_runtime_context().get_node_id()

actors, placed, peak = [], [], 1
for shapes in phases:  # one job after another; each phase's actors stay until the end
    new = [Worker.options(**shape).remote() for shape in shapes]
    actors += new
    refs = [actor.run.remote() for actor in new]
    deadline = time.monotonic() + 180  # a fake node is a whole raylet: slow on a busy box
    while time.monotonic() < deadline:
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=1)
        peak = max(peak, len(alive()))
        if len(done) == len(refs):
            break
    placed += ray.get(refs, timeout=5)
resources = {n["NodeID"]: n["Resources"] for n in alive()}
report.update(peak=peak, up_s=time.monotonic() - start,
              placed=[resources[node] for node in placed])
for actor in actors:
    ray.kill(actor)  # the jobs are over: their nodes are idle from now on
deadline = time.monotonic() + 150
while time.monotonic() < deadline and len(alive()) > 1:
    time.sleep(1)
report.update(nodes_after=len(alive()), down_s=time.monotonic() - start)
with open(out, "w") as handle:
    json.dump(report, handle)
"""


def test_worker_nodes_follow_the_work():
    cpu, gpu = deploy.WORKER_GROUPS["cpu"], deploy.WORKER_GROUPS["gpu"]
    scan = {"num_cpus": deploy.SCAN.cpus_per_actor}
    train = {"num_cpus": deploy.TRAIN.cpus_per_worker, "num_gpus": deploy.TRAIN.gpus_per_worker}
    # A training worker, then 3 scan actors: more CPUs than one GPU node and one CPU node
    # hold together, so the autoscaler must bring up the GPU node and both CPU nodes.
    # The order matters: with the GPU group at its maximum, scan actors that reach the GPU
    # node first (Ray only prefers CPU nodes for CPU work) would leave the training worker
    # no room at all. On Kubernetes the RayJobs avoid that with a cluster per job.
    phases = [[train], [scan, scan, scan]]
    assert deploy.SCAN.cpus_per_actor * 3 + deploy.TRAIN.cpus_per_worker > gpu.cpus + cpu.cpus

    temp_dir = tempfile.mkdtemp(prefix="ras-", dir="/tmp")  # short: socket paths
    cluster = _autoscaling_cluster_class()(node_types(), temp_dir)
    try:
        cluster.start()
        out = Path(temp_dir) / "report.json"
        result = subprocess.run([sys.executable, "-c", DRIVER, cluster.address,
                                 json.dumps(phases), str(out)], env=client_env(),
                                capture_output=True, text=True, timeout=600)
        assert cluster.process.poll() is None, cluster.log.read_text()[-3000:]
        assert result.returncode == 0 and out.exists(), (
            result.stdout[-2000:] + result.stderr[-2000:] + cluster.autoscaler_log())
        report = json.loads(out.read_text())
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

    assert report["nodes_before"] == 1  # the head alone: it holds no CPUs, so no work runs
    assert report["peak"] == 1 + 3, report  # head + GPU node + both CPU nodes
    gpu_node = report["placed"][0]  # the training worker
    assert gpu_node.get("GPU") == gpu.gpus and gpu_node["CPU"] == gpu.cpus, report
    # Scan actors fill the GPU node's spare CPUs and two CPU-group nodes.
    assert all(r["CPU"] in (cpu.cpus, gpu.cpus) for r in report["placed"][1:]), report
    assert report["nodes_after"] == 1, f"worker nodes did not go away when idle: {report}"
    print(f"scaled 0 -> 3 workers in {report['up_s']:.0f} s, back to 0 by "
          f"{report['down_s']:.0f} s")
