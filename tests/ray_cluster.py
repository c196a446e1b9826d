"""Ray clusters of a test's own, started the way users start them, and the processes in them.

Test modules run side by side (pytest-xdist), so nothing here touches another test's Ray:
`ray stop` (which kills every Ray on the machine) is never used, and a test looks for
processes to kill only among the descendants of its own cluster's root process.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

BIN = Path(sys.executable).parent
_heads = itertools.count()


def free_port() -> int:
    """A free port between Ray's worker ports (10002-19999) and the kernel's ephemeral
    range (32768+), from which every port-0 bind (a new Ray's GCS, agents, gRPC servers)
    draws: a port chosen there could be taken by the Ray a test starts before the test's
    own server binds it (seen once: "Failed to bind to address '127.0.0.1:41019'")."""
    import random
    import socket

    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (see free_port): independent draws can repeat one, and
    `ray start` refuses a port given to two of its components."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def client_env(extra: dict | None = None) -> dict[str, str]:
    """The environment for `ray`/`serve` commands and job entrypoints."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # `ray`, `serve` and job `python`
    env["RAY_AUTH_MODE"] = "token"  # `ray start` (2.60) turns token auth on
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.pop("RAY_ADDRESS", None)
    return env | (extra or {})


# On SIGTERM `ray start` drains its node first, for up to 30 s while anything still holds
# a worker (Serve's proxy, a job's leftover actors): that is for Kubernetes pods in a
# rolling upgrade; a test cluster that is done has nothing to hand over.
STOP_ENV = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2"}


# `ray start` gives up when its raylet has not registered within Ray's fixed 30 s (seen on
# a loaded 2-core machine: "The current node timed out during startup"), after its
# dashboard already answered. Such a start is tried again on new ports.
START_ATTEMPTS = 2


@contextlib.contextmanager
def ray_head(log_dir: Path, num_cpus: int = 4, env: dict | None = None) -> Iterator[dict]:
    """`ray start --head --block` on free ports in its own process group, stopped by
    signalling that group only. Yields address (the dashboard's, for jobs), gcs, process
    and log once the node has started and its dashboard answers."""
    for attempt in range(1, START_ATTEMPTS + 1):
        head = _start_head(log_dir, num_cpus, env)
        try:
            wait_for(lambda h=head: "Ray runtime started." in h["log"].read_text() and
                     ray_cli("job", "list", f"--address={h['address']}").returncode == 0,
                     timeout=180, what="the node and its dashboard", alive=head["process"],
                     log=head["log"])
            break
        except BaseException:
            _stop_head(head)
            if attempt == START_ATTEMPTS or "timed out during startup" not in \
                    head["log"].read_text():
                raise
    try:
        yield head
    finally:
        _stop_head(head)


def _start_head(log_dir: Path, num_cpus: int, env: dict | None) -> dict:
    # Short: Ray's socket paths have a length limit.
    temp_dir = Path(f"/tmp/rc-{os.getpid()}-{next(_heads)}")
    names = ("gcs", "dashboard", "client", "agent", "grpc", "runtime_env", "metrics")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    command = [
        str(BIN / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dashboard']}", f"--ray-client-server-port={ports['client']}",
        f"--dashboard-agent-listen-port={ports['agent']}",
        f"--dashboard-agent-grpc-port={ports['grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env']}",
        f"--metrics-export-port={ports['metrics']}", f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = log_dir / "ray-start.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=client_env(STOP_ENV | (env or {})), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return {"address": f"http://127.0.0.1:{ports['dashboard']}",
            "gcs": f"127.0.0.1:{ports['gcs']}", "process": process, "log": log,
            "temp_dir": temp_dir}


def _stop_head(head: dict) -> None:
    stop_group(head["process"])
    shutil.rmtree(head["temp_dir"], ignore_errors=True)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to `ray start` alone: it drains and stops its node in seconds (signalling
    the whole group at once kills the children under it and the drain hangs). Then SIGKILL
    whatever is left in the group, which holds only this cluster's processes."""
    process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(60)
    with contextlib.suppress(ProcessLookupError):  # the group is empty already
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def ray_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=client_env(), capture_output=True,
                          text=True, timeout=timeout)


def wait_for(check, timeout: float, what: str, alive: subprocess.Popen | None = None,
             log: Path | None = None) -> None:
    """Polls `check` (exceptions count as not yet) until it is true; fails the test after
    `timeout`, or at once if `alive` exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            pytest.fail(f"ray start exited while waiting for {what}:\n"
                        f"{log.read_text()[-3000:] if log else ''}")
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def processes(title: str, root: int | None = None) -> dict[int, str]:
    """{pid: command line} of the processes under `root` (default: this process, whose
    `ray.init` started its Ray as children) whose title contains `title`, such as
    "ray::RayTrainWorker" or a Ray Data stage's name."""
    found = {}
    for child in psutil.Process(root or os.getpid()).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # gone since it was listed
            line = " ".join(child.cmdline())
            if line.startswith("ray::") and title in line:
                found[child.pid] = line
    return found
