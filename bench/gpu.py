"""The GPU path, measured where an accelerator is present: the exported model on ONNX
Runtime's TensorRT and CUDA providers and the Keras model on TensorFlow's GPU, as ratios
to ONNX Runtime on the CPU in the same run.

A GPU user's Predictor resolves `--backend auto` to ONNX Runtime's CUDA provider when the
artifact has `model.onnx` and `onnxruntime-gpu` is installed (`pip install
onnxruntime-gpu` in the image), else to Keras on the GPU. This script measures both with
pre-decoded batches; where no GPU is visible it measures the CPU rows, says so and exits 0.

    .venv/bin/python bench/gpu.py [--model URI | --onnx PATH] [--batch 64] [--seconds 10]

`--onnx PATH` needs only numpy and onnxruntime (no TensorFlow, no Ray): it runs on a bare
GPU machine with an exported file copied to it. Where that machine's onnxruntime has no CUDA
provider but PyTorch has CUDA, the `torch/cuda` rows replay the same exported graph with
PyTorch (`_onnx_torch.py`; float32, and bfloat16/float16 autocast), checked against ONNX
Runtime on the CPU. `--pack OUT` writes the export with float16-stored weights (half the
size, widened back to float32 before running) for machines that take little luggage.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
ORT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def rate(forward, batch: np.ndarray, seconds: float) -> float:
    """Images/s of `forward` on `batch`, after a warm-up (TensorRT builds its engine then)."""
    forward(batch)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        forward(batch)
        done += len(batch)
    return done / (time.perf_counter() - started)


def onnxruntime_rows(onnx_path: str, batch: np.ndarray, seconds: float) -> dict:
    import onnxruntime as ort

    rows = {}
    available = ort.get_available_providers()
    for provider in ORT_PROVIDERS:
        if provider not in available:
            rows[f"onnxruntime/{provider}"] = {"unavailable": "not in this onnxruntime build"}
            continue
        session = ort.InferenceSession(onnx_path, providers=[provider])
        name = session.get_inputs()[0].name
        rows[f"onnxruntime/{provider}"] = {"images_per_s": rate(
            lambda x, s=session, n=name: s.run(None, {n: x}), batch, seconds)}
    return rows


def torch_rows(onnx_path: str, batch: np.ndarray, seconds: float, reference: np.ndarray
               ) -> dict:
    """The exported graph replayed by PyTorch on CUDA: host batch in, scores back on the
    host (as a Predictor would), in float32 and in bfloat16/float16 autocast."""
    try:
        import onnx
        import torch
        from _onnx_torch import OnnxGraph
    except ImportError as exc:
        return {"torch/cuda": {"unavailable": f"no PyTorch here ({exc.name})"}}
    if not torch.cuda.is_available():
        return {"torch/cuda": {"unavailable": "PyTorch sees no CUDA device"}}
    graph = OnnxGraph(onnx.load(onnx_path), "cuda").eval()
    rows = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        def forward(x, dtype=dtype):
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype,
                                                        enabled=dtype != torch.float32):
                return graph(torch.from_numpy(x).to("cuda", non_blocking=True)
                             ).float().cpu().numpy()

        def resident(x, dtype=dtype):  # the batch already on the GPU: compute alone
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype,
                                                        enabled=dtype != torch.float32):
                graph(x)
                torch.cuda.synchronize()

        diff = float(np.abs(forward(batch).reshape(-1) - reference.reshape(-1)).max())
        name = str(dtype).removeprefix("torch.")
        rows[f"torch/cuda/{name}"] = {"images_per_s": rate(forward, batch, seconds),
                                      "max_abs_diff_vs_ort_cpu": diff}
        on_gpu = torch.from_numpy(batch).to("cuda")
        rows[f"torch/cuda/{name}/on-device"] = {"images_per_s": rate(resident, on_gpu,
                                                                     seconds)}
    rows["torch/cuda/float32"]["device"] = torch.cuda.get_device_name(0)
    return rows


def keras_rows(model_uri: str, batch: np.ndarray, seconds: float) -> dict:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return {"keras/gpu": {"unavailable": "TensorFlow sees no GPU"}}
    for gpu in gpus:  # what every product process on a shared GPU must do
        tf.config.experimental.set_memory_growth(gpu, True)
    from detector.model.predictor import Predictor

    rows = {}
    for precision in ("float32", "bfloat16"):
        predictor = Predictor.from_uri(model_uri, batch_size=len(batch), backend="keras",
                                       precision=precision)
        rows[f"keras/gpu/{precision}"] = {"images_per_s": rate(predictor.score, batch, seconds)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="artifact URI with model.onnx (default: an untrained "
                        "ResNet50V2 at 224 px, exported here)")
    source.add_argument("--onnx", help="an exported model.onnx (numpy + onnxruntime only)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "gpu.json"))
    parser.add_argument("--pack", metavar="OUT", help="only write the export, with float16 "
                        "weights, to OUT and exit")
    args = parser.parse_args()

    gpu = bool(glob.glob("/dev/nvidia[0-9]*"))
    print("GPU: " + ("present" if gpu else "none visible: only the CPU rows are measured"))
    with tempfile.TemporaryDirectory() as tmp:
        model_uri, onnx_path = args.model, args.onnx
        if onnx_path is None:
            from _model import untrained_artifact

            from detector.io import storage

            model_uri = model_uri or untrained_artifact(tmp, "resnet50v2", args.image_size,
                                                        exports=True)
            onnx_path = os.path.join(tmp, "model.onnx")
            storage.download_file(storage.join(model_uri, "model.onnx"), onnx_path)
        import onnx
        import onnxruntime as ort
        from _onnx_pack import narrow, widen

        if args.pack:
            onnx.save(narrow(onnx.load(onnx_path)), args.pack)
            print(f"wrote {args.pack} ({os.path.getsize(args.pack) / 2**20:.0f} MiB)")
            return
        wide = os.path.join(tmp, "wide.onnx")  # a packed export, widened (else a copy)
        onnx.save(widen(onnx.load(onnx_path)), wide)
        onnx_path = wide
        cpu = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        size = cpu.get_inputs()[0].shape[1]
        batch = np.random.default_rng(0).uniform(0, 255, (args.batch, size, size, 3)) \
            .astype(np.float32)
        reference = cpu.run(None, {cpu.get_inputs()[0].name: batch})[0]
        rows = onnxruntime_rows(onnx_path, batch, args.seconds)
        rows |= torch_rows(onnx_path, batch, args.seconds, reference)
        if model_uri is not None:
            rows |= keras_rows(model_uri, batch, args.seconds)
    baseline = rows["onnxruntime/CPUExecutionProvider"]["images_per_s"]
    print(f"{'runtime':36s} {'img/s':>8s} {'vs ORT CPU':>10s}   (batch {args.batch})")
    for key, row in rows.items():
        if "images_per_s" in row:
            row["vs_onnxruntime_cpu"] = row["images_per_s"] / baseline
            extra = (f"   max |diff| vs ORT CPU {row['max_abs_diff_vs_ort_cpu']:.1e}"
                     if "max_abs_diff_vs_ort_cpu" in row else "")
            print(f"{key:36s} {row['images_per_s']:8.1f} {row['vs_onnxruntime_cpu']:9.2f}x"
                  + extra)
        else:
            print(f"{key:36s}      n/a   ({row['unavailable']})")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"gpu": gpu, "batch": args.batch, "runtimes": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
