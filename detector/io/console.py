"""What commands print for people, and where everything else goes.

Quiet by default: a command prints its own concise lines; Ray's and TensorFlow's chatter
(Ray Data plans, Train controller reports, absl/oneDNN/CUDA banners, worker output) goes
to a log file, `$DETECTOR_LOG_DIR/<command>-<time>.log` (default: the temp dir), and
Ray's own session logs. `--verbose` shows it all as before.

Workers cannot print to a quiet driver (Ray's `log_to_driver` is off), so lines a person
should see from inside a Ray job (one per training epoch, a resume) travel through a
`Relay`, which the driver prints.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import queue
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, TextIO

# Loggers whose console output is chatter for a person at a terminal.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")

_state: dict[str, Any] = {"verbose": True, "log": None}


def configure(command: str, verbose: bool) -> Path | None:
    """Set the mode for this process; quiet sends native stderr (absl, oneDNN, gRPC) and
    Ray's console loggers to a log file, whose path it returns. Python's own stderr
    (errors, warnings, progress bars) stays on the terminal."""
    if _state["log"] is not None:  # once per process
        return Path(_state["log"].name)
    _state["verbose"] = verbose
    if verbose:
        return None
    folder = Path(os.environ.get("DETECTOR_LOG_DIR") or Path(tempfile.gettempdir(),
                                                                "detector-logs"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{command}-{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    log = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    terminal = os.dup(2)
    os.dup2(log.fileno(), 2)  # native code writes to fd 2: now the log file
    sys.stderr = os.fdopen(terminal, "w", buffering=1)  # Python keeps the terminal
    _state["log"] = log
    quiet_ray_loggers()
    return path


def verbose() -> bool:
    return bool(_state["verbose"])


def quiet_ray_loggers() -> None:
    """Point Ray's console handlers at the log file. Call again after Ray (or Ray Data,
    Serve) has set its loggers up: each installs its handlers on first import or start."""
    log: TextIO | None = _state["log"]
    if log is None:
        return
    for name in RAY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if type(handler) is not logging.FileHandler and isinstance(
                    handler, logging.StreamHandler) and handler.stream is not log:
                handler.setStream(log)


def quiet_raylet_messages() -> None:
    """Send the warnings raylets push to the driver ("(raylet) WARNING: 8 PYTHON worker
    processes have been started ...") to the log file. Ray prints them on stdout even with
    `log_to_driver` off, from a listener thread that looks its printer up on each message,
    so replacing that module function is enough; a failure that matters still reaches the
    person as the job's own error."""
    log: TextIO | None = _state["log"]
    if log is None:
        return
    from ray._private import worker

    def to_log(data: dict, ignore_prefix: bool = False) -> None:
        for line in data.get("lines", ()):
            log.write(f"({data.get('pid', 'ray')}) {line}\n")

    if hasattr(worker, "print_to_stdstream"):  # a Ray without it prints as it likes
        worker.print_to_stdstream = to_log


class Relay:
    """Lines from Ray workers, printed by the driver (`with Relay() as relay:` around the
    job, `relay.handle` passed to the workers, `say(handle, text)` there)."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self.handle = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)

    def __enter__(self) -> Relay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        self.handle.shutdown()

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                print(self.handle.get(timeout=0.5), flush=True)
            except queue.Empty:  # ray.util.queue raises the standard library's Empty
                continue
            except Exception:  # the queue actor is gone: nothing more will come
                return

    def _drain(self) -> None:
        try:
            while True:
                print(self.handle.get_nowait(), flush=True)
        except Exception:  # Empty, or the actor is gone
            return


def say(handle: Any, text: str) -> None:
    """Show `text` to the person running the job: through the driver's relay when there
    is one, else on this process's stdout."""
    if handle is None:
        print(text, flush=True)
        return
    try:
        handle.put_nowait(text)
    except Exception:  # a full or gone relay must never fail the training step
        print(text, flush=True)
