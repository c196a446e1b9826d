"""Preparation throughput and memory: the Ray Data pipeline vs a plain loop.

Prints images/s of `detector.data.prepare.run` and of a single-process loop doing the same
work (list, read, hash, decode with the same preprocess, write Parquet) over the same
objects, as ratios, at two input sizes 10x apart; the marginal rate between the two sizes
(what every further image costs, once Ray's worker start-up is paid); and the peak memory
of the pipeline (driver + Ray workers) at both sizes: streaming means it must not grow
with the input. `--scale N` adds prepare runs of N/10 and N tiny images and compares the
driver's own peak RSS (what must fit on a KubeRay head).

    .venv/bin/python bench/prepare.py [--small 300] [--image-size 224] [--scale 200000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time

from _measure import OwnPeakRss, report, run_child, save_json

HERE = os.path.dirname(os.path.abspath(__file__))


def plain_loop(source: str, out: str, image_size: int) -> float:
    """The baseline: one process, one object at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from detector.io import preprocess, storage

    started = time.perf_counter()
    rows = {"image": [], "label": [], "sha256": []}
    for label, folder in ((0, "real"), (1, "fake")):
        for obj in storage.list_objects(storage.join(source, folder)):
            blob = storage.read_bytes(obj.uri)
            digest = hashlib.sha256(blob).hexdigest()
            try:
                pixels, _ = preprocess.load_image(blob, image_size)
            except preprocess.ImageError:
                continue
            rows["image"].append(pixels.tobytes())
            rows["label"].append(label)
            rows["sha256"].append(digest)
    os.makedirs(out, exist_ok=True)
    pq.write_table(pa.table(rows), os.path.join(out, "all.parquet"), compression="zstd")
    return time.perf_counter() - started


def pipeline_child(source: str, out: str, image_size: int) -> None:
    """Runs in its own process so memory readings belong to this run alone."""
    import ray

    from detector.config import PrepareConfig
    from detector.data import prepare

    with OwnPeakRss() as peak:
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 logging_level="ERROR")
        config = PrepareConfig(real=(f"{source}/real",), fake=(f"{source}/fake",), out=out,
                               image_size=image_size)
        started = time.perf_counter()
        manifest = prepare.run(config, progress=False)
        seconds = time.perf_counter() - started
    report({"seconds": seconds, "objects": manifest["objects"], "driver_peak_rss_mb": peak.mb,
            "duplicates": manifest["duplicates"]})


def run_pipeline(source: str, out: str, image_size: int) -> dict:
    result, peak_mb = run_child(__file__, source, out, str(image_size))
    return {**result, "peak_pss_mb": peak_mb}


def scale_run(tmp: str, objects: int) -> dict:
    """Prepare of `objects` tiny PNGs (half per class; 64 distinct images repeated, so the
    duplicate count is exercised too) at 32 px: the driver's memory as the input grows."""
    from scan_scale import make_local_bucket

    source = os.path.join(tmp, f"tiny-{objects}")
    for folder in ("real", "fake"):
        make_local_bucket(os.path.join(source, folder), objects // 2)
    result = run_pipeline(source, os.path.join(tmp, f"tiny-shards-{objects}"), 32)
    return {**result, "images_per_s": result["objects"] / result["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=300, help="images per class, small run")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--scale", type=int, default=0,
                        help="also prepare N/10 and N tiny images and compare driver memory")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "prepare.json"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        pipeline_child(args.child[0], args.child[1], int(args.child[2]))
        return

    from detector.data.sample import SampleSpec, write_sample

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, per_class in (("small", args.small), ("large", args.small * 10)):
            source = os.path.join(tmp, f"bucket-{label}")
            write_sample(source, SampleSpec(per_class=per_class, seed=1))
            run = run_pipeline(source, os.path.join(tmp, f"shards-{label}"), args.image_size)
            plain = plain_loop(source, os.path.join(tmp, f"plain-{label}"), args.image_size)
            results[label] = {"objects": run["objects"], "pipeline_seconds": run["seconds"],
                              "plain_seconds": plain, "peak_pss_mb": run["peak_pss_mb"],
                              "pipeline_images_per_s": run["objects"] / run["seconds"],
                              "plain_images_per_s": run["objects"] / plain,
                              "speedup": plain / run["seconds"]}
    small, large = results["small"], results["large"]
    extra = large["objects"] - small["objects"]
    results["marginal_pipeline_images_per_s"] = extra / (large["pipeline_seconds"]
                                                         - small["pipeline_seconds"])
    results["marginal_plain_images_per_s"] = extra / (large["plain_seconds"]
                                                      - small["plain_seconds"])
    results["marginal_speedup"] = (results["marginal_pipeline_images_per_s"]
                                   / results["marginal_plain_images_per_s"])
    results["memory_growth_10x_input"] = large["peak_pss_mb"] / small["peak_pss_mb"]
    print(f"{'run':6s} {'objects':>8s} {'pipeline img/s':>15s} {'plain img/s':>12s} "
          f"{'ratio':>6s} {'peak PSS MB':>12s}")
    for label in ("small", "large"):
        r = results[label]
        print(f"{label:6s} {r['objects']:8d} {r['pipeline_images_per_s']:15.1f} "
              f"{r['plain_images_per_s']:12.1f} {r['speedup']:6.2f} {r['peak_pss_mb']:12d}")
    print(f"marginal rate (large - small): pipeline "
          f"{results['marginal_pipeline_images_per_s']:.1f} img/s, plain loop "
          f"{results['marginal_plain_images_per_s']:.1f} img/s: "
          f"{results['marginal_speedup']:.2f}x")
    print(f"peak memory, 10x the input: {results['memory_growth_10x_input']:.2f}x")
    if args.scale:
        with tempfile.TemporaryDirectory() as tmp:
            tiny = {n: scale_run(tmp, n) for n in (args.scale // 10, args.scale)}
        results["scale"] = tiny
        for n, r in tiny.items():
            print(f"{n:8d} tiny images: {r['images_per_s']:7.1f} img/s, driver peak RSS "
                  f"{r['driver_peak_rss_mb']} MB, {r['duplicates']} duplicates")
        small_rss, large_rss = (r["driver_peak_rss_mb"] for r in tiny.values())
        results["driver_rss_growth_10x"] = large_rss / small_rss
        print(f"driver peak RSS, 10x the images: {results['driver_rss_growth_10x']:.2f}x")
    save_json(args.json, results)


if __name__ == "__main__":
    main()
