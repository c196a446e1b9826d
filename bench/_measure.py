"""Shared by the benchmarks: run a child process, sample its tree's memory, read its result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import psutil


def save_json(path: str, results: dict) -> None:
    """Write a benchmark's results (bench/results/ is git-ignored: numbers are per machine)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(results, handle, indent=2)


def per_item_ms(function, items: list, repeats: int = 3) -> float:
    """Best mean milliseconds per item of `function` over `repeats` passes (after one
    warm-up call)."""
    function(items[0])
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for item in items:
            function(item)
        best = min(best, (time.perf_counter() - started) / len(items))
    return best * 1000


def machine() -> dict:
    """The CPU every figure came from: its name, cores and inference features (so a number
    in the README can be read against another machine's)."""
    from detector.model.runtimes import cpu_features, cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "cpu_features": cpu_features()}


def print_machine(info: dict) -> None:
    features = info["cpu_features"]
    print(f"CPU: {info['cpu']}, {info['cores']} cores; has "
          + (", ".join(name for name, has in features.items() if has) or "none")
          + "; lacks " + (", ".join(name for name, has in features.items() if not has)
                          or "none"), flush=True)


def start_s3():
    """moto's S3 server on a free loopback port, with AWS_* pointing at it (child processes
    inherit the endpoint); `.stop()` it when done."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    return server


def report(result: dict) -> None:
    """Called in the child: one marked line, since Ray may print to stdout too."""
    print("RESULT " + json.dumps(result), flush=True)


def run_child(script: str, *args: str) -> tuple[dict, int]:
    """Run `python script --child ARGS...`; return (its reported result, peak PSS in MB of
    it and every descendant: ray.init() in the child starts GCS, raylet and workers)."""
    child = subprocess.Popen([sys.executable, script, "--child", *args],
                             stdout=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            total = 0
            try:  # PSS counts shared memory (the object store) once, not per process
                parent = psutil.Process(child.pid)
                for proc in [parent, *parent.children(recursive=True)]:
                    total += proc.memory_full_info().pss
            except psutil.Error:
                pass
            peak = max(peak, total)
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = child.communicate()
    done.set()
    thread.join()
    if child.returncode:
        raise SystemExit(f"{script} {' '.join(args)} failed ({child.returncode})")
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), round(peak / 2**20)


class OwnPeakRss:
    """Peak RSS of this process alone (a driver: what must fit on a KubeRay head),
    sampled every 0.1 s while the `with` block runs; `.mb` after it, and `.anon_mb`, the
    peak of its private memory alone (Linux RssAnon: without the pages of Ray's shared
    object store it has mapped, which the node holds once whoever maps them)."""

    def __enter__(self) -> OwnPeakRss:
        self._me, self._peak, self._done = psutil.Process(), 0, threading.Event()
        self._peak_anon = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self._peak = max(self._peak, self._me.memory_info().rss)
            self._peak_anon = max(self._peak_anon, _rss_anon())
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    @property
    def mb(self) -> int:
        return round(self._peak / 2**20)

    @property
    def anon_mb(self) -> int:
        return round(self._peak_anon / 2**20)


def _rss_anon() -> int:
    """This process's private resident bytes (0 where /proc/self/status has no RssAnon)."""
    try:
        with open("/proc/self/status") as status:
            line = next((line for line in status if line.startswith("RssAnon:")), "")
    except OSError:
        return 0
    return int(line.split()[1]) * 1024 if line else 0


def batches(x, y, size: int, seed: int | None = None):
    """A Keras-fit batch source over arrays (`detector.training.fit` takes callables that
    yield (pixels, labels)): shuffled by `seed`, in order when it is None."""
    import numpy as np

    def generate():
        order = np.random.default_rng(seed).permutation(len(x)) if seed is not None else \
            np.arange(len(x))
        for i in range(0, len(x), size):
            yield x[order[i:i + size]], y[order[i:i + size]]

    return generate
