"""Scans at bucket scale: driver memory and throughput as a bucket grows 10x, and listing
overlapped with scanning on an S3 endpoint. In one run:

- plain: one process lists, reads, decodes and scores a sample of the bucket in batches
  (the work without Ray: the per-object rate a scan has to beat);
- scan --via data of local buckets of tiny PNGs, 20k, 200k and 2M objects by default: the
  driver's peak RSS (the driver process alone: what must fit on a KubeRay head) and its
  curve as the scan goes, end-to-end and steady objects/s;
- on moto's S3 server, a flat prefix of M objects (one listing range, so one serial
  lister): when the first part was committed against when listing finished, and a plain
  boto3 listing of the same prefix.

    .venv/bin/python bench/scan_scale.py [--sizes 20000,200000,2000000] [--s3 80000]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import tempfile
import time

import numpy as np
import psutil
from _measure import (
    OwnPeakRss,
    machine,
    print_machine,
    report,
    run_child,
    save_json,
    start_s3,
)
from _model import untrained_artifact

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 32
MODEL = "vit_tiny"


def blobs(count: int = 64) -> list[bytes]:
    """Distinct tiny sample images (PNG, both classes)."""
    from detector.data.sample import encode, make_image

    out = []
    for i in range(count):
        rng = np.random.default_rng([7, i])
        out.append(encode(make_image(i % 2, rng, (SIZE, SIZE)), "PNG", rng))
    return out


def make_local_bucket(root: str, objects: int, per_folder: int = 1000) -> str:
    images = blobs()
    for i in range(objects):
        folder = os.path.join(root, f"d{i // per_folder:05d}")
        if i % per_folder == 0:
            os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"img-{i:07d}.png"), "wb") as handle:
            handle.write(images[i % len(images)])
    return root


def make_s3_prefix(bucket: str, prefix: str, objects: int) -> str:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    images = blobs()

    def put(i: int) -> None:
        s3.put_object(Bucket=bucket, Key=f"{prefix}/img-{i:07d}.png", Body=images[i % 64])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(objects)))
    return f"s3://{bucket}/{prefix}"


def plain_loop(model_uri: str, root: str, count: int) -> float:
    """List, read, decode and score `count` objects in one process, 32 at a time."""
    from detector.io import preprocess, storage
    from detector.model.predictor import Predictor

    predictor = Predictor.from_uri(model_uri)
    predictor.score(np.zeros((1, SIZE, SIZE, 3), np.uint8))  # trace once
    started = time.perf_counter()
    batch = []
    for n, obj in enumerate(storage.list_objects(root)):
        if n == count:
            break
        batch.append(preprocess.load_image(storage.read_bytes(obj.uri), SIZE)[0])
        if len(batch) == 32:
            predictor.score(np.stack(batch))
            batch = []
    if batch:
        predictor.score(np.stack(batch))
    return count / (time.perf_counter() - started)


def scan_child(source: str, model_uri: str, out: str, partition_size: str,
               objects: str) -> None:
    import ray

    from detector.config import ScanConfig
    from detector.scanning import report as reports
    from detector.scanning.scan import scan

    with OwnPeakRss() as peak:
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 logging_level="ERROR")
        marks: list[tuple[float, int]] = []
        # (objects done, driver RSS MB, of which private (anon) and shared-memory MB),
        # every ~5% of it
        curve: list[tuple[int, int, int, int]] = []
        me = psutil.Process()

        def on_progress(p: dict) -> None:
            marks.append((time.perf_counter(), p["done"]))
            if p["done"] >= (len(curve) + 1) * int(objects) / 20:
                kinds = rss_kinds()
                curve.append((p["done"], round(me.memory_info().rss / 2**20),
                              kinds["RssAnon"], kinds["RssShmem"]))

        started = time.perf_counter()
        summary = scan(ScanConfig(source=source, model=model_uri, out=out, via="data",
                                  partition_size=int(partition_size)), progress=False,
                       on_progress=on_progress)
        seconds = time.perf_counter() - started
    first_t, first_done = next(m for m in marks if m[1] >= 0.1 * summary["objects"])
    last_t, last_done = marks[-1]
    manifest = reports.read_manifest(out)
    report({"objects": summary["objects"], "seconds": seconds, "parts": summary["parts"],
            "steady_objects_per_s": (last_done - first_done) / max(last_t - first_t, 1e-9),
            "driver_peak_rss_mb": peak.mb, "driver_peak_private_mb": peak.anon_mb,
            "driver_rss_curve": curve,
            "timeline": manifest["timeline"], "listed_ahead": manifest.get("listed_ahead")})


def rss_kinds() -> dict[str, int]:
    """This process's resident memory by kind, MB (Linux): RssAnon is its own heap;
    RssShmem counts the pages of shared memory it has touched, such as Ray's object
    store (/dev/shm), which every process on the node maps and the node holds once."""
    with open("/proc/self/status") as status:
        return {k: int(v.split()[0]) // 1024 for k, v in
                (line.split(":", 1) for line in status) if k.startswith("Rss")}


def run_scan(source: str, model_uri: str, out: str, partition_size: int,
             objects: int) -> dict:
    result, tree_pss_mb = run_child(__file__, source, model_uri, out, str(partition_size),
                                    str(objects))
    result["objects_per_s"] = result["objects"] / result["seconds"]
    result["all_processes_peak_pss_mb"] = tree_pss_mb
    return result


def plain_listing(uri: str) -> float:
    from detector.io import storage

    started = time.perf_counter()
    count = sum(1 for _ in storage.list_objects(uri))
    assert count
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,200000,2000000",
                        help="local bucket sizes, comma-separated; empty: only the S3 run")
    parser.add_argument("--s3", type=int, default=80_000, help="objects on the S3 server")
    parser.add_argument("--partition-size", type=int, default=65536)
    parser.add_argument("--s3-partition-size", type=int, default=1000)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "scan_scale.json"))
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        scan_child(*args.child)
        return

    sizes = [int(n) for n in args.sizes.split(",") if n]
    results: dict = {"model": MODEL, "image_size": SIZE, "machine": machine(), "local": []}
    print_machine(results["machine"])
    with tempfile.TemporaryDirectory() as tmp:
        model_uri = untrained_artifact(tmp, MODEL, SIZE)
        for count in sizes:
            bucket = make_local_bucket(os.path.join(tmp, f"bucket-{count}"), count)
            if "plain_objects_per_s" not in results:
                results["plain_objects_per_s"] = plain_loop(model_uri, bucket, 3000)
            run = run_scan(bucket, model_uri, os.path.join(tmp, f"report-{count}"),
                           args.partition_size, count)
            results["local"].append({"bucket_objects": count, **run})
            print_local(results)
            shutil.rmtree(bucket)  # 2M files are ~8 GB of inodes and blocks
        if args.s3:
            results["s3"] = s3_run(tmp, model_uri, args.s3, args.s3_partition_size)
    if args.s3:
        s3 = results["s3"]
        print(f"S3 ({s3['objects']} objects, one flat prefix, parts of {s3['partition_size']}): "
              f"first part committed at {s3['first_part_s']:.1f} s, listing finished at "
              f"{s3['listing_finished_s']:.1f} s (a plain listing takes "
              f"{s3['plain_listing_s']:.1f} s)")
    save_json(args.json, results)


def print_local(results: dict) -> None:
    """The table so far (printed after each bucket, so a long run shows as it goes)."""
    plain = results["plain_objects_per_s"]
    print(f"plain loop: {plain:.0f} objects/s")
    print(f"{'objects':>9s} {'parts':>6s} {'objects/s':>9s} {'steady':>7s} {'x plain':>7s} "
          f"{'driver MB':>9s} {'private MB':>10s} {'x previous':>10s}")
    previous = None
    for r in results["local"]:
        private = r["driver_peak_private_mb"]
        growth = f"{private / previous:10.2f}" if previous else f"{'':10s}"
        print(f"{r['objects']:9d} {r['parts']:6d} {r['objects_per_s']:9.0f} "
              f"{r['steady_objects_per_s']:7.0f} {r['steady_objects_per_s'] / plain:7.2f} "
              f"{r['driver_peak_rss_mb']:9d} {private:10d} {growth}")
        previous = private
    last = results["local"][-1]
    print("driver MB as the last scan went (objects done: RSS, of which private + shared "
          "memory): " + ", ".join(f"{done}: {rss} ({anon} + {shmem})"
                                  for done, rss, anon, shmem in last["driver_rss_curve"]),
          flush=True)


def s3_run(tmp: str, model_uri: str, objects: int, partition_size: int) -> dict:
    """A flat prefix on moto's S3 server: small partitions commit while the one lister
    is still paging. The child scan inherits the endpoint from AWS_*."""
    server = start_s3()
    try:
        source = make_s3_prefix("bench", "flat", objects)
        listing_s = plain_listing(source)
        result = run_scan(source, model_uri, "s3://bench/report", partition_size, objects)
    finally:
        server.stop()
    return {"objects": result["objects"], "plain_listing_s": listing_s,
            "listing_finished_s": result["timeline"]["listing_finished_s"],
            "first_part_s": result["timeline"]["first_part_s"],
            "objects_per_s": result["objects_per_s"], "partition_size": partition_size}


if __name__ == "__main__":
    main()
