"""TensorFlow thread pools sized to what Ray reserved for the process.

TensorFlow starts a thread per core of the host (inside a container too), so several Ray
workers, actors or replicas on one node would fight over the same cores. Each sets its
pools to the CPUs it reserved instead.
"""

from __future__ import annotations

import math


def threads_for(cpus: float) -> int:
    """Threads for a process that reserved `cpus` Ray CPUs (at least one)."""
    return max(1, math.ceil(cpus))


def use_reserved_cpus(cpus: float, gpus: float = 0.0) -> int | None:
    """Size TensorFlow's pools to a CPU reservation; on a GPU the CPU pools barely matter
    and are left alone. Call before the first model is built or loaded. Returns the
    threads the other runtimes should use too (None on a GPU: their default)."""
    if gpus:
        return None
    threads = threads_for(cpus)
    limit_threads(threads)
    return threads


def limit_threads(threads: int) -> None:
    """Cap TensorFlow's thread pools; call before the first model is built or loaded."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
