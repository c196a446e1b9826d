"""Inference runtimes behind the one Predictor: Keras (TensorFlow), OpenVINO, ONNX Runtime.

A runtime maps float32 pixels (N, S, S, 3) in 0..255 to P(AI-generated) (N,). Which one
runs is chosen once, from the artifact's exports and the hardware (`resolve`); a backend
or precision that cannot run here is an error that says why, never a silent fallback to
something slower.

    backend        float32   bfloat16              int8
    keras          yes       AMX/AVX512-BF16 or GPU  -
    openvino       yes       AMX/AVX512-BF16       NNCF export (model_int8.xml)
    onnxruntime    yes       -                     -
"""

from __future__ import annotations

import glob
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from detector.config import BACKENDS, PRECISIONS
from detector.io import storage
from detector.io.threads import configure_gpus, limit_threads
from detector.model.artifact import (
    INT8_FILE,
    ONNX_FILE,
    ModelCard,
    files_of,
    kind_for,
    load_artifact,
)


class RuntimeUnavailable(ValueError):
    """The backend or precision asked for cannot run with this artifact or hardware."""


@dataclass(frozen=True)
class Choice:
    backend: str
    precision: str

    def __str__(self) -> str:
        return f"{self.backend}/{self.precision}"


def resolve(card: ModelCard, backend: str = "auto", precision: str = "float32",
            uri: str = "MODEL_URI") -> Choice:
    """The runtime to use. `auto`: OpenVINO on CPU when the artifact has the export the
    precision needs, ONNX Runtime's CUDA provider on a GPU, otherwise Keras."""
    if backend not in BACKENDS:
        raise RuntimeUnavailable(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise RuntimeUnavailable(f"precision must be one of {PRECISIONS}, got {precision!r}")
    kind = kind_for(precision)
    has_export = kind in card.exports
    if backend == "auto":
        if precision == "int8":
            backend = "openvino"  # its only runtime: a missing export is the error to give
        elif gpu_present():
            backend = "onnxruntime" if has_export and _ort_cuda() and precision == "float32" \
                else "keras"
        elif has_export:
            backend = "openvino"
        else:
            backend = "keras"
    choice = Choice(backend, precision)
    if precision == "int8" and backend != "openvino":
        raise RuntimeUnavailable(f"int8 runs on OpenVINO only, not {backend}")
    if precision == "bfloat16" and backend == "onnxruntime":
        raise RuntimeUnavailable("ONNX Runtime runs float32 here: use --backend openvino "
                                 "(or keras) for bfloat16")
    if precision == "bfloat16" and not bf16_hardware(gpu_ok=backend == "keras"):
        raise RuntimeUnavailable("bfloat16 needs a CPU with AMX or AVX512-BF16 (or a GPU for "
                                 "keras); this machine has neither, so it would be emulated "
                                 "and slower than float32")
    if backend != "keras" and not has_export:
        command = f"detector export --model {uri}" + \
            (" --int8" if kind == "int8" else "")
        raise RuntimeUnavailable(f"{choice} needs the artifact's {files_of(kind)[0]}, and "
                                 f"model {card.name}@{card.id} has none: run `{command}`")
    return choice


def load(uri: str, choice: Choice, card: ModelCard, threads: int | None = None
         ) -> Callable[[np.ndarray], np.ndarray]:
    """The forward function of `choice` for the artifact at `uri`."""
    if choice.backend == "keras":

        configure_gpus()  # TensorFlow is imported here only: the other runtimes never load it
        if threads:
            limit_threads(threads)
        model, _ = load_artifact(uri)
        return keras_forward(model, card.image_size, choice.precision)
    kind = kind_for(choice.precision)
    with storage.local_files(uri, files_of(kind)) as directory:
        path = os.path.join(directory, INT8_FILE if kind == "int8" else ONNX_FILE)
        if choice.backend == "openvino":
            return openvino_forward(path, choice.precision, threads)
        return onnxruntime_forward(path, threads)


def keras_forward(model, image_size: int, precision: str = "float32"
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """The Keras model as a compiled forward function, in float32 or mixed bfloat16.

    Every forward returns (N, K) float32: column 0 the raw P(AI), then a model's
    attribution columns if it has them (see architectures/heads.py)."""
    import tensorflow as tf

    if precision not in ("float32", "bfloat16"):
        raise RuntimeUnavailable(f"keras runs float32 or bfloat16, not {precision}")
    if precision == "bfloat16":
        model = with_dtype_policy(model, "mixed_bfloat16")
    # A fixed signature compiles the graph once; a Python call per batch would pay
    # Keras' eager overhead every time (~4x slower on this CPU).
    compiled = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32)],
        reduce_retracing=True,
    )
    return lambda pixels: _rows(compiled(pixels), pixels)


def with_dtype_policy(model, policy: str):
    """A copy of `model` whose layers compute in `policy` (e.g. mixed_bfloat16), with the
    same float32 weights. The output layers stay float32 so scores keep full precision.

    bfloat16 roughly doubles CPU inference on processors with AMX or AVX512-BF16 (and
    helps on Ampere+ GPUs); elsewhere it is emulated and slower, which `runtimes.resolve`
    refuses.
    """
    config = model.get_config()
    outputs = config.get("output_layers") or []
    if outputs and isinstance(outputs[0], str):  # a single output is stored unwrapped
        outputs = [outputs]
    keep_float32 = {entry[0] for entry in outputs}

    def rewrite(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy":
                return {**node, "config": {**node["config"], "name": policy}}
            return {key: rewrite(value) for key, value in node.items()}
        if isinstance(node, list):
            return [rewrite(value) for value in node]
        return node

    layers = [layer if layer.get("name") in keep_float32 else rewrite(layer)
              for layer in config["layers"]]
    clone = model.__class__.from_config({**config, "layers": layers})
    clone.set_weights(model.get_weights())
    return clone


def openvino_forward(path: str, precision: str, threads: int | None
                     ) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov

    config = {
        # OpenVINO's CPU plugin defaults to bf16 on AMX machines; float32 must mean it.
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bfloat16" else "f32",
        "PERFORMANCE_HINT": "LATENCY",  # one stream: a batch at a time, all threads on it
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(path, "CPU", config)  # read now: the file may go
    request = compiled.create_infer_request()
    # An infer request runs one inference at a time ("Infer Request is busy" otherwise),
    # and a Serve replica calls from several threads; one at a time is also what the
    # LATENCY hint wants: every thread on one batch.
    lock = threading.Lock()

    def forward(pixels: np.ndarray) -> np.ndarray:
        with lock:
            return _rows(request.infer([pixels])[0], pixels)

    return forward


def onnxruntime_forward(path: str, threads: int | None
                        ) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu_present() and \
        _ort_cuda() else ["CPUExecutionProvider"]
    session = ort.InferenceSession(path, options, providers=providers)
    name = session.get_inputs()[0].name

    def forward(pixels: np.ndarray) -> np.ndarray:
        return _rows(session.run(None, {name: pixels})[0], pixels)

    return forward


def _rows(output, pixels: np.ndarray) -> np.ndarray:
    """A model's output as one row per image: (N, 1) for a binary model, (N, 1 + G) with
    an attribution head."""
    return np.asarray(output, dtype=np.float32).reshape(len(pixels), -1)


def gpu_present() -> bool:
    """An NVIDIA device visible to this process (without importing TensorFlow)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _ort_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def training_policy(gpus: float) -> str:
    """The Keras mixed-precision policy for training on this worker: float16 with loss
    scaling on a GPU, bfloat16 on a CPU that computes it natively; refused elsewhere,
    where emulated bfloat16 would be slower than float32."""
    if gpus:
        return "mixed_float16"
    if bf16_hardware(gpu_ok=False):
        return "mixed_bfloat16"
    raise RuntimeUnavailable("--mixed-precision needs a GPU or a CPU with AMX or "
                             "AVX512-BF16, and this worker has neither: train in float32")


def bf16_hardware(gpu_ok: bool = True) -> bool:
    """AMX or AVX512-BF16 on this CPU (or, for TensorFlow, a GPU)."""
    if gpu_ok and gpu_present():
        return True
    features = cpu_features()
    return features["amx_bf16"] or features["avx512_bf16"]


# oneDNN's ISA levels in order, as its ONEDNN_MAX_CPU_ISA setting names them (aliases at
# the same rank), each with the features it is the first to use.
ONEDNN_ISA_LEVELS = (
    ("SSE41",), ("AVX",), ("AVX2",), ("AVX2_VNNI", "AVX2_VNNI_2"), ("AVX512_CORE",),
    ("AVX512_CORE_VNNI",), ("AVX512_CORE_BF16",), ("AVX10_1_512", "AVX512_CORE_FP16"),
    ("AVX10_1_512_AMX", "AVX512_CORE_AMX"),
)
FEATURE_FROM_LEVEL = {"avx2": 2, "avx_vnni": 3, "avx512f": 4, "avx512_vnni": 5,
                      "avx512_bf16": 6, "amx_bf16": 8, "amx_int8": 8}


def cpu_features() -> dict[str, bool]:
    """The CPU's inference features (also for benchmarks to print, so their numbers can
    be read on other machines). A cap set with oneDNN's ONEDNN_MAX_CPU_ISA (which
    TensorFlow's kernels obey) hides what lies above it: bfloat16 under a cap of AVX2 is
    emulated, as on an AVX2-only CPU."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = set(handle.read().split())
    except OSError:
        flags = set()
    cap = isa_cap()
    return {name: name in flags and (cap is None or level <= cap)
            for name, level in FEATURE_FROM_LEVEL.items()}


def isa_cap() -> int | None:
    """The rank in ONEDNN_ISA_LEVELS of ONEDNN_MAX_CPU_ISA, or None when it sets no cap."""
    asked = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    for rank, names in enumerate(ONEDNN_ISA_LEVELS):
        if asked in names:
            return rank
    return None  # unset, ALL/DEFAULT, or a level above every feature named here


def cpu_name() -> str:
    """The CPU's model name, e.g. "AMD EPYC 7B12" (for benchmark lines)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
