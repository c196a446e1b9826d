"""Inference and training threads sized to what Ray reserved for the process.

TensorFlow (and OpenVINO, ONNX Runtime) start a thread per core of the host, inside a
container too, so several Ray workers, actors or replicas on one node would fight over
the same cores. Each sizes its runtime to the CPUs it reserved instead.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)


def threads_for(cpus: float) -> int:
    """Threads for a process that reserved `cpus` Ray CPUs (at least one)."""
    return max(1, math.ceil(cpus))


def reserved_threads(cpus: float, gpus: float = 0.0) -> int | None:
    """The thread count for a runtime in a process that reserved `cpus` and `gpus`; None
    on a GPU, where the CPU pools barely matter and keep their defaults."""
    return None if gpus else threads_for(cpus)


def limit_threads(threads: int) -> None:
    """Cap TensorFlow's thread pools. They are fixed once TensorFlow has run anything: a
    later call asking for other sizes leaves them as they are, with a warning."""
    import tensorflow as tf

    threading = tf.config.threading
    if (threading.get_intra_op_parallelism_threads(),
            threading.get_inter_op_parallelism_threads()) == (threads, threads):
        return
    try:
        threading.set_intra_op_parallelism_threads(threads)
        threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as exc:  # "... cannot be modified after initialization"
        log.warning("TensorFlow's thread pools stay as they are: %s", exc)


def configure_gpus() -> None:
    """Let TensorFlow take GPU memory as it needs it. By default it takes nearly all of
    every visible GPU at start, so a second process on the same GPU (a fractional-GPU
    Serve replica or scan actor beside another) runs out of memory. Call before TensorFlow
    first touches a GPU; later it has no effect, and says so in the log."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # "Physical devices cannot be modified after ..."
            log.warning("GPU memory growth stays as it is on %s: %s", gpu.name, exc)
