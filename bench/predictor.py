"""The model stage on every runtime: img/s of each backend x precision, as ratios to
TensorFlow float32, measured in one run on the same artifact and the same pixels.

ResNet50V2 with the product's head at 224 px by default (weights none: speed does not
depend on them), exported to ONNX and to OpenVINO int8 (NNCF, 64 sample images) as
training and `detector export --int8` do. Each runtime scores pre-decoded batches of 32
with the same thread count, the best of a few repeats after a warm-up. Combinations that
cannot run here are listed with the reason `Predictor.from_uri` gives. The CPU's
inference features are printed first, so the numbers can be read on other machines.

    .venv/bin/python bench/predictor.py [--model resnet50v2] [--image-size 224] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from _measure import machine, print_machine, save_json
from _model import sample_pixels, untrained_artifact

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up banners
HERE = os.path.dirname(os.path.abspath(__file__))
RUNTIMES = (("keras", "float32"), ("keras", "bfloat16"), ("onnxruntime", "float32"),
            ("onnxruntime", "bfloat16"), ("openvino", "float32"), ("openvino", "bfloat16"),
            ("openvino", "int8"))
AIMS = {"openvino/int8": 8.0, "openvino/bfloat16": 4.0}  # issue #12, on this machine's CPU


def throughput(uri: str, backend: str, precision: str, threads: int, pixels, repeats: int
               ) -> float:
    """Best img/s of `Predictor.score` over `repeats` passes, after one warm-up batch."""
    from detector.model.predictor import Predictor

    predictor = Predictor.from_uri(uri, batch_size=32, backend=backend, precision=precision,
                                   threads=threads)
    predictor.score(pixels[:32])
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.score(pixels)
        best = max(best, len(pixels) / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50v2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for every runtime (a Ray reservation's CPUs)")
    parser.add_argument("--images", type=int, default=128, help="images per timed pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "predictor.json"))
    args = parser.parse_args()

    from detector.io.threads import limit_threads
    from detector.model.runtimes import RuntimeUnavailable

    limit_threads(args.threads)  # TensorFlow's pools, before any model is built
    info = machine()
    print_machine(info)
    results: dict = {"model": args.model, "image_size": args.image_size,
                     "threads": args.threads, **info, "runtimes": {}}
    pixels = sample_pixels(args.images, args.image_size, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        uri = untrained_artifact(tmp, args.model, args.image_size, exports=True)
        print(f"artifact with ONNX and int8 exports in {time.perf_counter() - started:.0f} s")
        for backend, precision in RUNTIMES:
            key = f"{backend}/{precision}"
            try:
                rate = throughput(uri, backend, precision, args.threads, pixels, args.repeats)
            except RuntimeUnavailable as err:
                results["runtimes"][key] = {"unavailable": str(err)}
                print(f"{key:22s}      n/a  ({err})", flush=True)
                continue
            results["runtimes"][key] = {"images_per_s": rate}
            print(f"{key:22s} {rate:8.1f} img/s", flush=True)
    baseline = results["runtimes"]["keras/float32"]["images_per_s"]
    print(f"\n{'runtime':22s} {'img/s':>8s} {'vs TF float32':>14s}")
    for key, run in results["runtimes"].items():
        if "images_per_s" not in run:
            continue
        run["vs_keras_float32"] = run["images_per_s"] / baseline
        aim = f"   (aim >= {AIMS[key]:.0f}x)" if key in AIMS else ""
        print(f"{key:22s} {run['images_per_s']:8.1f} {run['vs_keras_float32']:13.2f}x{aim}")
    save_json(args.json, results)


if __name__ == "__main__":
    main()
