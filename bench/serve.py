"""HTTP load against the Serve endpoint, with dynamic batching on vs off, in one run.

    .venv/bin/python bench/serve.py [--model resnet50v2 --image-size 224]
                                    [--backend auto --precision int8] [--json OUT]

1. Builds the model (weights none: speed does not depend on them) into a temp artifact,
   with its ONNX and int8 exports; the replicas run --backend/--precision (default: the
   fast path, OpenVINO int8).
2. Raw throughput: `Predictor.score` on pre-decoded batches of 32 in a Ray task before Serve
   starts (a Ray worker, like the replicas: same process priority), i.e. the best the
   hardware does without HTTP, decoding or queueing.
3. For max_batch_size 32 (batching on) and 1 (off): deploys the app on 127.0.0.1 (one Model
   replica, autoscaling pinned) and sends JPEG photos at concurrency 1, 8 and 32, a bounded
   number of requests per level; prints requests/s, p50/p99 latency and the mean batch size.
4. Ratio = served images/s at concurrency 32 (batching on) / raw throughput (aim >= 0.7).

Writes JSON (default bench/results/serve.json).
"""

import argparse
import io
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _measure import save_json
from _model import untrained_artifact
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere, without installing the package
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from detector.config import BACKENDS, PRECISIONS  # noqa: E402  (after the path is set)

DEFAULT_JSON = ROOT / "bench" / "results" / "serve.json"
CONCURRENCY = (1, 8, 32)
MODES = {"batched": 32, "unbatched": 1}  # name -> max_batch_size
TARGET_RATIO = 0.7


def photos(n: int, seed: int = 0) -> list[bytes]:
    """Photo-sized JPEGs (640x480, q90) with texture, so decoding costs what it does live."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        scene = np.asarray(field.resize((640, 480), Image.Resampling.BICUBIC), dtype=np.float32)
        pixels = np.clip(scene + rng.normal(0, 10, scene.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def raw_throughput(uri: str, blobs: list[bytes], batches: int, repeats: int,
                   backend: str, precision: str) -> dict:
    """Images/s of Predictor.score on pre-decoded batches of 32 (median and best)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from detector.io.preprocess import load_image
    from detector.model.predictor import Predictor

    predictor = Predictor.from_uri(uri, batch_size=32, backend=backend, precision=precision)
    decoded = np.stack([load_image(b, predictor.image_size)[0] for b in blobs])
    batch = np.resize(decoded, (32, *decoded.shape[1:]))
    predictor.score(batch)  # trace and warm up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            predictor.score(batch)
        rates.append(32 * batches / (time.perf_counter() - start))
    return {"median_ips": statistics.median(rates), "best_ips": max(rates), "repeats": repeats}


def load(url: str, blobs: list[bytes], concurrency: int, total: int) -> dict:
    """`total` POSTs from `concurrency` keep-alive clients; latency, rate, batch sizes."""
    import requests

    counter = iter(range(total))
    lock = threading.Lock()
    results: list[tuple[float, int, int]] = []

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            response = session.post(url, data=blobs[i % len(blobs)],
                                    headers={"Content-Type": "image/jpeg"}, timeout=300)
            batch = int(response.headers.get("X-Batch-Size", 0))
            results.append((time.perf_counter() - start, response.status_code, batch))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    elapsed = time.perf_counter() - start
    ok = [r for r in results if r[1] == 200]
    latencies = sorted(r[0] for r in ok) or [float("nan")]
    return {
        "concurrency": concurrency, "requests": total, "ok": len(ok),
        "errors": len(results) - len(ok),
        "requests_per_s": len(ok) / elapsed,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "mean_batch_size": statistics.fmean(r[2] for r in ok) if ok else 0.0,
    }


def bench_mode(uri: str, port: int, max_batch_size: int, blobs: list[bytes],
               requests_per_client: int, backend: str, precision: str) -> dict:
    from ray import serve

    from detector.serving.app import ServeConfig, build_app_from_config

    # Same replica queue for both modes, so the only difference is the batching.
    config = ServeConfig(model_uri=uri, min_replicas=1, max_replicas=1,
                         max_batch_size=max_batch_size, max_ongoing_requests=64,
                         backend=backend, precision=precision)
    serve.run(build_app_from_config(config), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/detect"
    load(url, blobs, concurrency=4, total=16)  # warm up the path end to end
    levels = {}
    for c in CONCURRENCY:
        total = max(24, requests_per_client * c)
        levels[str(c)] = stats = load(url, blobs, c, total)
        print(f"  batch<={max_batch_size:<3d} c={c:<3d} {stats['requests_per_s']:7.1f} req/s  "
              f"p50 {stats['p50_ms']:7.1f} ms  p99 {stats['p99_ms']:7.1f} ms  "
              f"mean batch {stats['mean_batch_size']:5.1f}  errors {stats['errors']}",
              flush=True)
    serve.delete("bench")
    return {"max_batch_size": max_batch_size, "levels": levels}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50v2", help="registered model name")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--requests-per-client", type=int, default=6,
                        help="requests per level = max(24, this x concurrency)")
    parser.add_argument("--raw-batches", type=int, default=4, help="batches of 32 per repeat")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--precision", default="int8", choices=PRECISIONS)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    blobs = photos(16)
    with tempfile.TemporaryDirectory() as tmp:
        uri = untrained_artifact(tmp, args.model, args.image_size, exports=True)
        # Our own local Ray on loopback: never join a `ray start` cluster elsewhere.
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1),
                 include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        load_before = os.getloadavg()
        raw = ray.get(ray.remote(num_cpus=1)(raw_throughput).remote(
            uri, blobs, args.raw_batches, 3, args.backend, args.precision))
        print(f"raw Predictor.score, batches of 32: {raw['median_ips']:.1f} img/s (median)")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            modes = {name: bench_mode(uri, port, size, blobs, args.requests_per_client,
                                      args.backend, args.precision)
                     for name, size in MODES.items()}
        finally:
            serve.shutdown()
            ray.shutdown()
    report(args, raw, modes, {"before": load_before, "after": os.getloadavg()})
    return 0


def report(args: argparse.Namespace, raw: dict, modes: dict, loadavg: dict) -> None:
    served = {name: mode["levels"]["32"]["requests_per_s"] for name, mode in modes.items()}
    ratio = served["batched"] / raw["median_ips"]
    result = {
        "benchmark": "serve", "model": args.model, "image_size": args.image_size,
        "backend": args.backend, "precision": args.precision,
        "cpus": os.cpu_count(), "platform": platform.platform(),
        "loadavg_1_5_15": loadavg,  # other processes on the machine skew every number
        "raw_predictor": raw, "modes": modes,
        "served_ips_c32": served,
        "ratio_served_c32_to_raw": ratio,
        "batching_speedup_c32": served["batched"] / served["unbatched"],
        "target_ratio": TARGET_RATIO,
    }
    print(f"\nserved at c=32: batched {served['batched']:.1f} img/s, unbatched "
          f"{served['unbatched']:.1f} img/s (x{result['batching_speedup_c32']:.2f}); "
          f"raw {raw['median_ips']:.1f} img/s -> ratio {ratio:.2f} (target >= {TARGET_RATIO})")
    save_json(str(args.json), result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
