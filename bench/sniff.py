"""What reading by content costs: objects whose name does not say they are images (bare
UUID keys, unknown extensions) are sniffed, their first 64 KiB read to identify them. On
moto's S3 server, in one run:

- plain: each object read whole, as a scan did before sniffing (the baseline);
- sniffed: `detector.io.reads.fetch`, as scan and prepare read now.

For bare-key non-images (logs, archives) it prints the bytes read per object, both ways;
for bare-key images, the extra time of reading the first 64 KiB and the rest apart.

    .venv/bin/python bench/sniff.py [--objects 100] [--size-mb 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import time

import numpy as np
from _measure import machine, print_machine, save_json, start_s3
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def fill(objects: int, size_mb: float) -> tuple[list[str], list[str], list[int], list[int]]:
    """`objects` bare-key non-images (half text logs, half binary) of `size_mb` and as many
    bare-key JPEGs of 1-2 MP; returns their URIs and sizes."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="sniff")
    rng = np.random.default_rng(0)
    size = int(size_mb * 2**20)
    log = (b"2026-12-04T15:00:00Z GET /upload 200 1834 0.012\n" * (size // 48 + 1))[:size]
    blobs = {f"other/{i:05d}": log if i % 2 else rng.bytes(size) for i in range(objects)}
    for i in range(objects):
        pixels = rng.integers(0, 255, (1024, 1024 + 64 * (i % 8), 3), np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=90)
        blobs[f"images/{i:05d}"] = out.getvalue()

    def put(item: tuple[str, bytes]) -> None:
        s3.put_object(Bucket="sniff", Key=item[0], Body=item[1])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(put, blobs.items()))
    others = [k for k in blobs if k.startswith("other/")]
    images = [k for k in blobs if k.startswith("images/")]
    return ([f"s3://sniff/{k}" for k in others], [f"s3://sniff/{k}" for k in images],
            [len(blobs[k]) for k in others], [len(blobs[k]) for k in images])


def timed(read, uris: list[str]) -> tuple[float, int]:
    """Seconds and bytes to read `uris` one after another (latency per object, not
    overlapped, so the difference is the sniff's own)."""
    started, total = time.perf_counter(), 0
    for uri in uris:
        total += read(uri)
    return time.perf_counter() - started, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=100)
    parser.add_argument("--size-mb", type=float, default=2.0)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "sniff.json"))
    args = parser.parse_args()
    from detector.io import reads, storage

    results: dict = {"machine": machine(), "objects": args.objects, "size_mb": args.size_mb}
    print_machine(results["machine"])
    server = start_s3()
    try:
        others, images, other_sizes, image_sizes = fill(args.objects, args.size_mb)
        size_of = dict(zip(others + images, other_sizes + image_sizes, strict=True))

        def whole(uri: str) -> int:
            return len(storage.read_bytes(uri))

        def sniffed(uri: str) -> int:
            fetched = reads.fetch(uri, size_of[uri])
            assert (fetched.data is None) == (uri in others), uri
            return fetched.bytes_read

        for name, uris in (("non_images", others), ("images", images)):
            timed(whole, uris[:5])  # warm the client and connection pool
            plain_s, plain_bytes = timed(whole, uris)
            sniff_s, sniff_bytes = timed(sniffed, uris)
            results[name] = {"plain_s": plain_s, "plain_bytes": plain_bytes,
                             "sniffed_s": sniff_s, "sniffed_bytes": sniff_bytes}
    finally:
        server.stop()
    n, other, image = args.objects, results["non_images"], results["images"]
    fewer = other["plain_bytes"] / other["sniffed_bytes"]
    print(f"{n} bare-key non-images of {args.size_mb:g} MB: read whole "
          f"{other['plain_bytes'] / n:,.0f} bytes and {1000 * other['plain_s'] / n:.1f} ms "
          f"each; sniffed {other['sniffed_bytes'] / n:,.0f} bytes ({fewer:.0f}x fewer) and "
          f"{1000 * other['sniffed_s'] / n:.1f} ms each "
          f"({other['plain_s'] / other['sniffed_s']:.1f}x faster)")
    print(f"{n} bare-key JPEGs of {np.mean(image_sizes) / 2**20:.2f} MB on average: read "
          f"whole {1000 * image['plain_s'] / n:.1f} ms each; sniffed then read "
          f"{1000 * image['sniffed_s'] / n:.1f} ms each "
          f"({image['sniffed_s'] / image['plain_s']:.2f}x the time, the same "
          f"{image['sniffed_bytes'] / n:,.0f} bytes)")
    save_json(args.json, results)


if __name__ == "__main__":
    main()
