"""What one request per object saves: reading many small S3 objects as a scan task does
(8 in flight), on moto's S3 server, in one run:

- plain: pyarrow's input stream, as `detector.io.storage` read S3 before (pyarrow sends a
  HEAD for the object's size before every GET: two requests per object);
- one GET: `detector.io.storage.read_bytes` now (boto3's `get_object`).

It prints objects per second both ways and the CPU this process spent (client and the
in-process server together), with their ratios.

    .venv/bin/python bench/s3_reads.py [--objects 2000] [--size-kb 40]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import time

import numpy as np
from _measure import machine, print_machine, save_json, start_s3

HERE = os.path.dirname(os.path.abspath(__file__))
IN_FLIGHT = 8  # detector.io.reads' threads per task


def fill(objects: int, size_kb: float) -> list[str]:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="reads")
    blob = np.random.default_rng(0).bytes(int(size_kb * 1024))
    keys = [f"images/{i:06d}.jpg" for i in range(objects)]
    with concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket="reads", Key=key, Body=blob), keys))
    return [f"s3://reads/{key}" for key in keys]


def timed(read, uris: list[str]) -> tuple[float, float, int]:
    """(seconds, CPU seconds of this process, bytes) to read `uris`, IN_FLIGHT at once."""
    started, cpu = time.perf_counter(), time.process_time()
    with concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
        total = sum(pool.map(read, uris))
    return time.perf_counter() - started, time.process_time() - cpu, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--size-kb", type=float, default=40)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "s3_reads.json"))
    args = parser.parse_args()
    from detector.io import storage

    results: dict = {"machine": machine(), "objects": args.objects, "size_kb": args.size_kb}
    print_machine(results["machine"])
    server = start_s3()
    try:
        uris = fill(args.objects, args.size_kb)

        def plain(uri: str) -> int:
            fs, path = storage.resolve(uri)
            with fs.open_input_stream(path) as stream:
                return len(stream.read())

        def one_get(uri: str) -> int:
            return len(storage.read_bytes(uri))

        for read in (plain, one_get):
            timed(read, uris[:50])  # warm the clients and their connection pools
        for name, read in (("plain", plain), ("one_get", one_get)):
            seconds, cpu, total = timed(read, uris)
            assert total == len(uris) * int(args.size_kb * 1024)
            results[name] = {"seconds": seconds, "cpu_seconds": cpu}
    finally:
        server.stop()
    n, plain_run, one = args.objects, results["plain"], results["one_get"]
    print(f"{n} objects of {args.size_kb:g} KB, {IN_FLIGHT} in flight: plain (HEAD + GET) "
          f"{n / plain_run['seconds']:,.0f} objects/s, {plain_run['cpu_seconds']:.2f} CPU s; "
          f"one GET {n / one['seconds']:,.0f} objects/s "
          f"({plain_run['seconds'] / one['seconds']:.2f}x), {one['cpu_seconds']:.2f} CPU s "
          f"({plain_run['cpu_seconds'] / one['cpu_seconds']:.2f}x less, server included)")
    save_json(args.json, results)


if __name__ == "__main__":
    main()
