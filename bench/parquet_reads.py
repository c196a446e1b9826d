"""What a footer pool sized to the files saves: reading a set of Parquet files through Ray
Data on a local Ray, as training reads a split of shards, in one run:

- plain: `ray.data.read_parquet` as Ray 2.60 does it (a pool of 32 footer-reading actors
  for every read);
- sized: `detector.io.parquet.read_parquet` (one actor per 10 files, up to 32).

Each read is consumed whole. It prints seconds per read and the CPU the whole machine
spent on it (Ray's worker processes included), with their ratios, for each file count.
Run it on an otherwise idle machine: the CPU figure is the machine's.

    .venv/bin/python bench/parquet_reads.py [--files 3,30] [--rows-per-file 100] [--reads 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import psutil
from _measure import machine, print_machine, save_json

HERE = os.path.dirname(os.path.abspath(__file__))


def write_files(folder: str, files: int, rows: int) -> list[str]:
    """`files` Parquet files of `rows` rows each: an image-sized binary column and a label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    paths = []
    for index in range(files):
        table = pa.table({"image": [rng.bytes(3_000) for _ in range(rows)],
                          "label": rng.integers(0, 2, rows).astype(np.int8)})
        paths.append(os.path.join(folder, f"part-{index:04d}.parquet"))
        pq.write_table(table, paths[-1])
    return paths


def footer_processes() -> set[int]:
    """The worker processes Ray has started for footer-reading actors so far."""
    import ray

    return {info["Pid"] for info in ray._private.state.actors().values()
            if info["ActorClassName"] == "FooterReader" and info.get("Pid")}


def timed(read, paths: list[str], rows: int) -> tuple[float, float, int]:
    """(seconds, machine CPU seconds, footer-reader processes started) of one read of
    `paths`, consumed whole."""
    import pyarrow.fs as pafs

    before = footer_processes()
    cpu = sum(psutil.cpu_times()[:3])  # user, nice, system of every process
    started = time.perf_counter()
    dataset = read(paths, pafs.LocalFileSystem())
    seen = sum(batch.num_rows for batch in dataset.iter_batches(batch_format="pyarrow"))
    seconds = time.perf_counter() - started
    assert seen == rows, (seen, rows)
    return seconds, sum(psutil.cpu_times()[:3]) - cpu, len(footer_processes() - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", default="3,30")
    parser.add_argument("--rows-per-file", type=int, default=100)
    parser.add_argument("--reads", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=8,
                        help="logical CPUs of the local Ray (a node bigger than this machine)")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "parquet_reads.json"))
    args = parser.parse_args()
    os.environ.pop("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", None)  # Ray's default for plain
    import ray

    from detector.io import parquet

    def plain(paths, fs):
        return ray.data.read_parquet(paths, filesystem=fs)

    def sized(paths, fs):
        return parquet.read_parquet(paths, fs)

    results: dict = {"machine": machine(), "rows_per_file": args.rows_per_file}
    print_machine(results["machine"])
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        with tempfile.TemporaryDirectory() as folder:
            for files in (int(n) for n in args.files.split(",")):
                os.makedirs(os.path.join(folder, str(files)))
                paths = write_files(os.path.join(folder, str(files)), files, args.rows_per_file)
                rows = files * args.rows_per_file
                timed(sized, paths, rows)  # start Ray's workers before either is measured
                runs: dict = {"plain": [], "sized": []}
                for attempt in range(args.reads):  # alternating, so drift hits both
                    order = ("plain", "sized") if attempt % 2 == 0 else ("sized", "plain")
                    for name in order:
                        runs[name].append(timed(plain if name == "plain" else sized, paths,
                                                rows))
                row = {name: {"seconds": float(np.median([r[0] for r in each])),
                              "cpu_seconds": float(np.median([r[1] for r in each])),
                              "footer_processes": int(np.median([r[2] for r in each]))}
                       for name, each in runs.items()}
                results[f"files_{files}"] = row
                p, s = row["plain"], row["sized"]
                print(f"{files} files, median of {args.reads} reads: plain {p['seconds']:.2f} s, "
                      f"{p['cpu_seconds']:.1f} CPU s, {p['footer_processes']} footer-reader "
                      f"processes; sized {s['seconds']:.2f} s, {s['footer_processes']} processes "
                      f"({p['seconds'] / s['seconds']:.2f}x faster), {s['cpu_seconds']:.1f} CPU s "
                      f"({p['cpu_seconds'] / s['cpu_seconds']:.2f}x less)", flush=True)
    finally:
        ray.shutdown()
    save_json(args.json, results)


if __name__ == "__main__":
    main()
