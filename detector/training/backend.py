"""Ray Train's TensorFlow set-up, without TensorFlow where no model runs.

MultiWorkerMirroredStrategy finds its peers through `TF_CONFIG`, which Ray's
`TensorflowConfig` backend sets on every worker before training starts. That class lives
in the `ray.train.tensorflow` package, whose `__init__` imports TensorFlow: the job's
driver (building the trainer) and Ray Train's controller (unpickling its config) would
each import it, about 5 s and 700 MB per process and model, to run no TensorFlow at all.
`MultiWorkerConfig` sets the same `TF_CONFIG` from a module that imports only Ray.

Ray's backend also sets `TF_USE_LEGACY_KERAS=1`, for models written against `tf.keras`
(the separate `tf_keras` package). Ours are Keras 3 (`import keras`), which that variable
would take `tf.keras` away from; it is not set.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import ray
from ray._common.network_utils import build_address
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework


@dataclass
class MultiWorkerConfig(BackendConfig):
    """What Ray's `TensorflowConfig` is to `DataParallelTrainer`, importing no TensorFlow."""

    @property
    def backend_cls(self):
        return _MultiWorkerBackend

    @property
    def framework(self):  # the dashboard's record of the run, and its version collection
        return TrainingFramework.TENSORFLOW


def _set_tf_config(worker_addresses: list[str], index: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": worker_addresses},
                                          "task": {"type": "worker", "index": index}})


def _address() -> str:
    return build_address(*get_address_and_port())


class _MultiWorkerBackend(Backend):
    def on_start(self, worker_group, backend_config: MultiWorkerConfig) -> None:
        addresses = worker_group.execute(_address)  # a free port on each worker's node
        ray.get([worker_group.execute_single_async(rank, _set_tf_config,
                                                   worker_addresses=addresses, index=rank)
                 for rank in range(len(worker_group))])
